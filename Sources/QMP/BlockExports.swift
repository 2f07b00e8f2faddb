// qemu-storage-daemon's block commands over the monitor: blockdev-add / blockdev-del for the
// node kinds an export needs (file, raw over file, null-co), block-export-add /
// block-export-del / query-block-exports for vhost-user-blk, and the BLOCK_EXPORT_DELETED
// event, with qemu-storage-daemon 7.2's argument names, defaults and error texts (reference
// vhost-user-blk.md 5.3, 5.4). Main loop thread only, like the rest of the monitor.
import Aio
import Devices
import Glibc
import IOThreads
import VhostUser

/// A block node (`blockdev-add`).
struct BlockNode {
    enum Kind {
        case file(path: String, direct: Bool)
        case raw(file: String)
        case null(size: UInt64)
    }
    let name: String
    let kind: Kind
    let readOnly: Bool
}

/// An export and what the monitor keeps about it.
final class ExportEntry {
    let export: Export
    let nodeName: String
    /// An IOThread the monitor made because `iothread` was not given (the export then runs
    /// on its own thread instead of the main loop); stopped when the export goes.
    let privateThread: IOThread?
    var shuttingDown = false
    init(export: Export, nodeName: String, privateThread: IOThread?) {
        self.export = export
        self.nodeName = nodeName
        self.privateThread = privateThread
    }
}

extension Monitor {
    // MARK: blockdev-add / blockdev-del

    func blockdevAdd(_ args: JSON) throws {
        let a = try Arguments(args, ["driver": .string, "node-name": .string, "filename": .string, "file": .string,
                                     "read-only": .bool, "cache": .any, "aio": .string, "size": .int,
                                     "read-zeroes": .bool, "auto-read-only": .bool, "discard": .string],
                              required: ["driver", "node-name"])
        let driver = a.string("driver")!
        let name = a.string("node-name")!
        guard isWellFormedObjectID(name) else { throw QMPError("Invalid node-name: '\(name)'") }
        guard nodes[name] == nil else { throw QMPError("Duplicate nodes with node-name='\(name)'") }
        var readOnly = false
        if case .bool(let b)? = a["read-only"] { readOnly = b }
        let kind: BlockNode.Kind
        switch driver {
        case "file":
            guard let path = a.string("filename") else { throw QMPError("Parameter 'filename' is missing") }
            var direct = false
            if let cache = a["cache"], case .bool(let d)? = cache["direct"] { direct = d }
            let fd = Glibc.open(path, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC)
            guard fd >= 0 else { throw QMPError("Could not open '\(path)': \(String(cString: strerror(errno)))") }
            Glibc.close(fd)
            kind = .file(path: path, direct: direct)
        case "raw":
            guard let child = a.string("file") else { throw QMPError("Parameter 'file' is missing") }
            guard let c = nodes[child] else { throw QMPError("Cannot find device='' nor node-name='\(child)'") }
            guard case .file = c.kind else { throw QMPError("raw: node '\(child)' is not a file node") }
            readOnly = readOnly || c.readOnly
            kind = .raw(file: child)
        case "null-co":
            let size = a["size"]?.intValue ?? (1 << 30)
            guard size >= 0 else { throw QMPError("Parameter 'size' expects a non-negative size") }
            kind = .null(size: UInt64(size))
        default:
            throw QMPError("Parameter 'driver' does not accept value '\(driver)'")
        }
        nodes[name] = BlockNode(name: name, kind: kind, readOnly: readOnly)
    }

    func blockdevDel(_ args: JSON) throws {
        let a = try Arguments(args, ["node-name": .string], required: ["node-name"])
        let name = a.string("node-name")!
        guard nodes[name] != nil else { throw QMPError("Failed to find node with node-name='\(name)'") }
        let usedByExport = exports.values.contains { $0.nodeName == name || fileChild(of: $0.nodeName) == name }
        let usedByNode = nodes.values.contains { if case .raw(let f) = $0.kind { return f == name } else { return false } }
        guard !usedByExport && !usedByNode else { throw QMPError("Node \(name) is in use") }
        nodes.removeValue(forKey: name)
    }

    func fileChild(of node: String) -> String? {
        if case .raw(let f)? = nodes[node]?.kind { return f }
        return nil
    }

    /// What a node reads and writes: a backend, its size for null nodes, read-only.
    func backend(of node: String) throws -> (BlockBackend, UInt64, Bool) {
        guard let n = nodes[node] else { throw QMPError("Cannot find device='' nor node-name='\(node)'") }
        switch n.kind {
        case .file(let path, let direct):
            return (.file(path: path, direct: direct), 0, n.readOnly)
        case .null(let size):
            return (.null, size, n.readOnly)
        case .raw(let f):
            let (b, s, ro) = try backend(of: f)
            return (b, s, ro || n.readOnly)
        }
    }

    // MARK: block-export-add / block-export-del / query-block-exports

    func blockExportAdd(_ args: JSON) throws {
        let a = try Arguments(args, ["type": .string, "id": .string, "node-name": .string, "writable": .bool,
                                     "writethrough": .bool, "iothread": .any, "fixed-iothread": .bool,
                                     "addr": .any, "logical-block-size": .int, "num-queues": .int],
                              required: ["type", "id", "node-name"])
        let type = a.string("type")!
        guard type == "vhost-user-blk" else { throw QMPError("Parameter 'type' does not accept value '\(type)'") }
        let id = a.string("id")!
        guard isWellFormedObjectID(id) else { throw QMPError("Invalid block export id") }
        guard exports[id] == nil else { throw QMPError("Block export id '\(id)' is already in use") }
        guard let addr = a["addr"] else { throw QMPError("Parameter 'addr' is missing") }
        guard case .object = addr, let addrType = addr["type"]?.stringValue else {
            throw QMPError("Invalid parameter type for 'addr', expected: SocketAddress")
        }
        guard addrType == "unix" else {
            throw QMPError("Only socket address types 'unix' and 'fd' are supported")
        }
        guard let path = addr["path"]?.stringValue else { throw QMPError("Parameter 'addr.path' is missing") }
        let node = a.string("node-name")!
        let (backend, size, nodeReadOnly) = try backend(of: node)
        var writable = false
        if case .bool(let w)? = a["writable"] { writable = w }
        if writable && nodeReadOnly { throw QMPError("Cannot export read-only node as writable") }
        let queues = a["num-queues"]?.intValue ?? 1
        guard queues > 0 else { throw QMPError("num-queues must be greater than 0") }
        let lbs = a["logical-block-size"]?.intValue ?? 512
        var threads: [IOThread]
        var own: IOThread? = nil
        if let names = try iothreadNames(a["iothread"]) {
            // QEMU 9.0+: a string, or a list whose queue q runs on entry q % n (the control
            // socket on the first).
            threads = []
            for tid in names {
                guard let t = registry.lookup(tid) else { throw QMPError("iothread \"\(tid)\" not found") }
                threads.append(t)
            }
        } else {
            // No IOThread named: the export gets a thread of its own (this runtime has no
            // main-loop dataplane), not listed by query-iothreads.
            do { own = try IOThread(id: "export-\(id)") } catch { throw QMPError("\(error)") }
            threads = [own!]
        }
        let export: Export
        do {
            export = try Export(id: id, backend: backend, socketPath: path, iothreads: threads, numQueues: Int(clamping: queues),
                                writable: writable, logicalBlockSize: Int(clamping: lbs), size: size,
                                log: { line in errorLine("dataplane: \(line)") })
        } catch {
            own?.stop()
            throw QMPError(error.message)
        }
        exports[id] = ExportEntry(export: export, nodeName: node, privateThread: own)
        exportOrder.append(id)
    }

    /// `iothread`: absent (nil), a name, or a non-empty list of names (QEMU 9.0+'s form).
    func iothreadNames(_ value: JSON?) throws -> [String]? {
        switch value {
        case nil, .null?:
            return nil
        case .string(let name)?:
            return [name]
        case .array(let items)? where !items.isEmpty:
            return try items.map { item throws -> String in
                guard let name = item.stringValue else {
                    throw QMPError("Invalid parameter type for 'iothread[]', expected: string")
                }
                return name
            }
        case .array?:
            throw QMPError("Parameter 'iothread' must not be an empty list")
        default:
            throw QMPError("Invalid parameter type for 'iothread', expected: string or array")
        }
    }

    /// Answers once the export is gone, after BLOCK_EXPORT_DELETED: the order qemu-storage-daemon
    /// 7.2 shows when nothing holds the export, so a client that stops reading at the answer
    /// has seen the event. This session's later commands wait, in order; other sessions are
    /// served meanwhile (the drain never blocks the main loop).
    func blockExportDel(_ args: JSON, _ done: @escaping Done) throws {
        let a = try Arguments(args, ["id": .string, "mode": .string], required: ["id"])
        let id = a.string("id")!
        if let mode = a.string("mode"), mode != "safe" && mode != "hard" {
            throw QMPError("Parameter 'mode' does not accept value '\(mode)'")
        }
        guard let entry = exports[id] else { throw QMPError("Export '\(id)' is not found") }
        guard !entry.shuttingDown else { throw QMPError("Export '\(id)' is already shutting down") }
        entry.shuttingDown = true
        deleteExport(entry, id: id) { done(.success(.object([]))) }
    }

    /// Deletes the export (drain, release the IOThread), then forgets it and emits
    /// BLOCK_EXPORT_DELETED; `done` runs on the main loop thread after that.
    func deleteExport(_ entry: ExportEntry, id: String, _ done: @escaping () -> Void) {
        let ctx = context
        let monitor = MainThreadOnly(self)
        let finish = MainThreadOnly(done)
        let export = entry.export
        let own = entry.privateThread
        Task {
            try? await export.delete()
            own?.stop()
            ctx.scheduleOneShot {
                let m = monitor.value
                m.exports.removeValue(forKey: id)
                m.exportOrder.removeAll { $0 == id }
                m.emit("BLOCK_EXPORT_DELETED", .object([("id", .string(id))]))
                finish.value()
            }
        }
    }

    func queryBlockExports() -> JSON {
        .array(exportOrder.reversed().compactMap { id in
            guard let e = exports[id] else { return nil }
            return .object([("node-name", .string(e.nodeName)), ("shutting-down", .bool(e.shuttingDown)),
                            ("type", .string("vhost-user-blk")), ("id", .string(id))])
        })
    }

    /// Deletes every export (for shutdown); `done` runs on the main loop thread.
    func deleteAllExports(_ done: @escaping () -> Void) {
        guard !exports.isEmpty else { return done() }
        final class Countdown {
            var left: Int
            init(_ n: Int) { left = n }
        }
        let countdown = Countdown(exports.count)
        let last = {
            countdown.left -= 1
            if countdown.left == 0 { done() }
        }
        for (id, entry) in exports {
            if entry.shuttingDown {
                waitGone(id, last)  // already on its way (block-export-del)
            } else {
                entry.shuttingDown = true
                deleteExport(entry, id: id, last)
            }
        }
    }

    func waitGone(_ id: String, _ done: @escaping () -> Void) {
        if exports[id] == nil { return done() }
        let monitor = MainThreadOnly(self)
        let d = MainThreadOnly(done)
        context.scheduleOneShot { monitor.value.waitGone(id, d.value) }
    }

    /// Runs a synchronous command at startup (the command line's `--object`, `--blockdev`,
    /// `--export`), with the same validation and texts as over QMP. Main loop thread.
    public func runStartupCommand(_ name: String, _ args: JSON) throws(QMPError) {
        var failure: QMPError? = nil
        do {
            switch name {
            case "object-add": try objectAdd(args)
            case "blockdev-add": try blockdevAdd(args)
            case "block-export-add": try blockExportAdd(args)
            default: throw QMPError("CommandNotFound", "The command \(name) has not been found")
            }
        } catch let e as QMPError {
            failure = e
        } catch {
            failure = QMPError("\(error)")
        }
        if let failure { throw failure }
    }
}

/// One line to standard error.
func errorLine(_ text: String) {
    var line = text + "\n"
    line.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
}
