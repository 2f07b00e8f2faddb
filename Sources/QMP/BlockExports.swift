// qemu-storage-daemon's block commands over the monitor: blockdev-add / blockdev-del for the
// node kinds an export needs (file, raw over file, null-co), block-export-add /
// block-export-del / query-block-exports for vhost-user-blk, the BLOCK_EXPORT_DELETED event,
// with qemu-storage-daemon 7.2's argument names, defaults and error texts (reference
// vhost-user-blk.md 5.3, 5.4); and QEMU's x-blockdev-set-iothread, which moves a node, and
// with it the exports on it (front ends connected), to another IOThread. Monitor thread.
//
// An export's lifecycle in the monitor: serving -> moving -> serving ..., serving ->
// deleting -> gone; moving and deleting last only as long as their command. An export holds
// its IOThreads as the block node it exports; a node placed on an IOThread by
// x-blockdev-set-iothread holds it too, as itself.
import Aio
import Devices
import Glibc
import IOThreads
import VhostUser

/// A block node (`blockdev-add`).
final class BlockNode {
    enum Kind {
        case file(path: String, direct: Bool)
        case raw(file: String)
        case null(size: UInt64)
    }
    let name: String
    let kind: Kind
    let readOnly: Bool
    /// Holds the IOThread x-blockdev-set-iothread placed the node on, if any.
    let holds: IOThreadHoldSet
    /// The IOThread the node is placed on (nil: the main loop).
    var placement: IOThread? { holds.threads.first }
    init(name: String, kind: Kind, readOnly: Bool) {
        self.name = name
        self.kind = kind
        self.readOnly = readOnly
        holds = IOThreadHoldSet(holder: .blockNode(name: name))
    }
}

/// An export and what the monitor keeps about it.
///
/// `@unchecked Sendable`: confined to the monitor's thread (carried through its tasks).
final class ExportEntry: @unchecked Sendable {
    enum State: Equatable { case serving, moving, deleting }
    let export: Export
    let nodeName: String
    /// An IOThread the monitor made because none was named (the export then runs on a thread
    /// of its own instead of the main loop); stopped when the export leaves it.
    var privateThread: IOThread?
    var state = State.serving
    init(export: Export, nodeName: String, privateThread: IOThread?) {
        self.export = export
        self.nodeName = nodeName
        self.privateThread = privateThread
    }
}

extension Monitor {
    // MARK: blockdev-add / blockdev-del

    static var blockdevAddArguments: [String: QMPArgumentType] {
        ["driver": .string, "node-name": .string, "filename": .string, "file": .string,
         "read-only": .bool, "cache": .any, "aio": .string, "size": .int,
         "read-zeroes": .bool, "auto-read-only": .bool, "discard": .string]
    }

    func blockdevAdd(_ a: QMPArguments) throws(QMPError) {
        let driver = a.string("driver")!
        let name = a.string("node-name")!
        guard isWellFormedObjectID(name) else { throw QMPError("Invalid node-name: '\(name)'") }
        guard nodes[name] == nil else { throw QMPError("Duplicate nodes with node-name='\(name)'") }
        var readOnly = a.bool("read-only") ?? false
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

    func blockdevDel(_ name: String) throws(QMPError) {
        guard let node = nodes[name] else { throw QMPError("Failed to find node with node-name='\(name)'") }
        let usedByExport = exports.values.contains { $0.nodeName == name || fileChild(of: $0.nodeName) == name }
        let usedByNode = nodes.values.contains { if case .raw(let f) = $0.kind { return f == name } else { return false } }
        guard !usedByExport && !usedByNode else { throw QMPError("Node \(name) is in use") }
        node.holds.release()
        nodes.removeValue(forKey: name)
    }

    func fileChild(of node: String) -> String? {
        if case .raw(let f)? = nodes[node]?.kind { return f }
        return nil
    }

    /// What a node reads and writes: a backend, its size for null nodes, read-only.
    func backend(of node: String) throws(QMPError) -> (BlockBackend, UInt64, Bool) {
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

    /// The node, its file child and the nodes whose file it is: what moves together.
    func graph(of name: String) -> Set<String> {
        var g: Set<String> = [name]
        if let f = fileChild(of: name) { g.insert(f) }
        for (n, node) in nodes { if case .raw(let f) = node.kind, f == name { g.insert(n) } }
        return g
    }

    /// Releases the holds of every node placed on an IOThread (shutdown).
    func releaseNodeHolds() {
        for node in nodes.values { node.holds.release() }
    }

    // MARK: block-export-add / block-export-del / query-block-exports

    static var blockExportAddArguments: [String: QMPArgumentType] {
        ["type": .string, "id": .string, "node-name": .string, "writable": .bool,
         "writethrough": .bool, "iothread": .any, "fixed-iothread": .bool,
         "addr": .any, "logical-block-size": .int, "num-queues": .int]
    }

    func blockExportAdd(_ a: QMPArguments) throws(QMPError) {
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
        let writable = a.bool("writable") ?? false
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
        } else if let placed = graph(of: node).lazy.compactMap({ self.nodes[$0]?.placement }).first {
            // The node was placed with x-blockdev-set-iothread: the export runs there, as
            // QEMU's export runs in its node's AioContext.
            threads = [placed]
        } else {
            // No IOThread named: the export gets a thread of its own (this runtime has no
            // main-loop dataplane), not listed by query-iothreads.
            own = try privateThread(for: id)
            threads = [own!]
        }
        let export: Export
        do throws(ExportError) {
            export = try Export(id: id, backend: backend, socketPath: path, iothreads: threads, numQueues: Int(clamping: queues),
                                writable: writable, logicalBlockSize: Int(clamping: lbs), size: size,
                                holder: .blockNode(name: node), log: { line in errorLine("dataplane: \(line)") })
        } catch {
            try? own?.stop()
            throw QMPError(error.message)
        }
        exports[id] = ExportEntry(export: export, nodeName: node, privateThread: own)
        exportOrder.append(id)
    }

    /// A thread of the export's own, standing in for QEMU's main loop.
    func privateThread(for id: String) throws(QMPError) -> IOThread {
        do throws(IOThreadError) { return try IOThread(id: "export-\(id)") } catch { throw QMPError(error.message) }
    }

    /// `iothread`: absent (nil), a name, or a non-empty list of names (QEMU 9.0+'s form).
    func iothreadNames(_ value: JSON?) throws(QMPError) -> [String]? {
        switch value {
        case nil, .null?:
            return nil
        case .string(let name)?:
            return [name]
        case .array(let items)? where !items.isEmpty:
            var names: [String] = []
            for item in items {
                guard let name = item.stringValue else {
                    throw QMPError("Invalid parameter type for 'iothread[]', expected: string")
                }
                names.append(name)
            }
            return names
        case .array?:
            throw QMPError("Parameter 'iothread' must not be an empty list")
        default:
            throw QMPError("Invalid parameter type for 'iothread', expected: string or array")
        }
    }

    /// Answers once the export is gone, after BLOCK_EXPORT_DELETED: the order qemu-storage-daemon
    /// 7.2 shows when nothing holds the export, so a client that stops reading at the answer
    /// has seen the event. No other command runs meanwhile; the drain never blocks the main
    /// loop (other clients' sockets are read, their commands wait in the queue).
    func blockExportDel(_ a: QMPArguments) async throws(QMPError) {
        let id = a.string("id")!
        if let mode = a.string("mode"), mode != "safe" && mode != "hard" {
            throw QMPError("Parameter 'mode' does not accept value '\(mode)'")
        }
        guard let entry = exports[id] else { throw QMPError("Export '\(id)' is not found") }
        guard entry.state == .serving else { throw QMPError("Export '\(id)' is already shutting down") }
        await deleteExport(id, entry)
        emit("BLOCK_EXPORT_DELETED", .object([("id", .string(id))]))
    }

    /// Deletes the export (drain, release its IOThreads, stop its own thread) and forgets it.
    func deleteExport(_ id: String, _ entry: ExportEntry) async {
        entry.state = .deleting
        do throws(ExportError) {
            try await entry.export.delete()
        } catch {
            preconditionFailure("BUG DETECTED: deleting export '\(id)' failed: \(error)")
        }
        assertOnMonitorThread()
        try? entry.privateThread?.stop()  // nothing holds it any more
        exports.removeValue(forKey: id)
        exportOrder.removeAll { $0 == id }
    }

    func queryBlockExports() -> JSON {
        .array(exportOrder.reversed().compactMap { id in
            guard let e = exports[id] else { return nil }
            return .object([("node-name", .string(e.nodeName)), ("shutting-down", .bool(e.state == .deleting)),
                            ("type", .string("vhost-user-blk")), ("id", .string(id))])
        })
    }

    /// Deletes every export (shutdown).
    func deleteAllExports() async {
        for id in exportOrder {
            guard let entry = exports[id] else { continue }
            await deleteExport(id, entry)
        }
    }

    // MARK: x-blockdev-set-iothread

    /// QEMU's `x-blockdev-set-iothread`: places the node (and the nodes it is connected to)
    /// on the IOThread, or on the main loop with `null`. Exports on those nodes move with it,
    /// live, front ends connected; as in QEMU, that needs `force`. The node holds its IOThread
    /// as itself; the new IOThread is held before anything leaves the old one. An export
    /// moved to the main loop runs on a thread of its own (this runtime has no main-loop
    /// dataplane).
    func setNodeIOThread(_ a: QMPArguments) async throws(QMPError) {
        let name = a.string("node-name")!
        guard let node = nodes[name] else { throw QMPError("Failed to find node with node-name='\(name)'") }
        let target: IOThread?
        switch a["iothread"]! {
        case .null: target = nil
        case .string(let id):
            guard let t = registry.lookup(id) else { throw QMPError("Cannot find iothread \(id)") }
            target = t
        default: throw QMPError("Invalid parameter type for 'iothread', expected: string or null")
        }
        let related = graph(of: name)
        let users = exportOrder.filter { id in exports[id].map { related.contains($0.nodeName) } ?? false }
        if !users.isEmpty && !(a.bool("force") ?? false) {
            throw QMPError("Node \(name) is associated with a BlockBackend and could be in use (use force=true to override this check)")
        }
        if let target {
            do throws(IOThreadError) { try node.holds.hold([target]) } catch { throw QMPError(error.message) }
        }
        for id in users {
            guard let entry = exports[id] else { continue }
            try await moveExport(id, entry, to: target)
        }
        node.holds.release(keeping: target.map { [$0] } ?? [])
    }

    /// Moves the export's queues and control socket to `target` (nil: a thread of its own).
    func moveExport(_ id: String, _ entry: ExportEntry, to target: IOThread?) async throws(QMPError) {
        guard entry.state == .serving else { throw QMPError("Export '\(id)' is already shutting down") }
        let old = entry.privateThread
        if target == nil, let old, entry.export.iothreads.allSatisfy({ $0 === old }) { return }  // already on its own thread
        let destination: IOThread
        if let target { destination = target } else { destination = try privateThread(for: id) }
        entry.state = .moving
        defer { entry.state = .serving }
        do throws(ExportError) {
            try await entry.export.move(to: [destination])
        } catch {
            if target == nil { try? destination.stop() }
            throw QMPError(error.message)
        }
        assertOnMonitorThread()
        entry.privateThread = target == nil ? destination : nil
        if let old, old !== destination { try? old.stop() }  // the export released it
    }
}

/// One line to standard error.
func errorLine(_ text: String) {
    var line = text + "\n"
    line.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
}
