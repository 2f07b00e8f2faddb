// The QMP monitor's protocol and commands, independent of sockets: a session takes bytes
// and answers through a send closure. Everything here runs on the main loop's home thread
// (the server's AioContext); long operations (device attach and detach) run as tasks and
// come back to that thread through a one-shot BH.
import Aio
import Devices
import Glibc
import IOThreads

/// A QMP error: class and description, as QEMU words them.
public struct QMPError: Error, Equatable {
    public var errorClass: String
    public var desc: String
    public init(_ errorClass: String, _ desc: String) {
        self.errorClass = errorClass
        self.desc = desc
    }

    /// A GenericError.
    public init(_ desc: String) {
        self.init("GenericError", desc)
    }
}

/// One client connection's protocol state.
public final class MonitorSession {
    var stream = JSONStream()
    var negotiated = false
    /// A command whose answer is still being computed (responses stay in request order).
    var busy = false
    var queued: [JSONStream.Output] = []
    let send: (String) -> Void
    var closed = false

    public init(send: @escaping (String) -> Void) { self.send = send }

    func reply(_ json: JSON) { if !closed { send(json.serialized + "\r\n") } }
}

/// The monitor: IOThreads, devices and the commands over them.
///
/// `@unchecked Sendable`: confined to the main loop's home thread (`context`); tasks that
/// finish elsewhere hop back with `context.scheduleOneShot` before touching anything here.
public final class Monitor: @unchecked Sendable {
    public let registry: IOThreadRegistry
    public let context: AioContext
    var sessions: [ObjectIdentifier: MonitorSession] = [:]
    var devices: [String: VirtioBlkDevice] = [:]
    var unplugging: Set<String> = []
    /// Block nodes, exports and their creation order (BlockExports.swift).
    var nodes: [String: BlockNode] = [:]
    var exports: [String: ExportEntry] = [:]
    var exportOrder: [String] = []
    /// Called when a client sends `quit`.
    public var onQuit: (() -> Void)?

    public static let version = JSON.object([
        ("qemu", .object([("micro", .int(0)), ("minor", .int(2)), ("major", .int(10))])),
        ("package", .string("dataplane")),
    ])

    public static let commands = [
        "qmp_capabilities", "query-version", "query-commands", "query-iothreads", "x-query-iothread-stats",
        "object-add", "object-del", "qom-list", "qom-get", "qom-set", "device_add", "device_del",
        "human-monitor-command", "quit",
        "blockdev-add", "blockdev-del", "block-export-add", "block-export-del", "query-block-exports",
    ]

    public init(context: AioContext, registry: IOThreadRegistry = IOThreadRegistry()) {
        self.context = context
        self.registry = registry
    }

    /// A new client: sends the greeting.
    public func open(_ session: MonitorSession) {
        sessions[ObjectIdentifier(session)] = session
        session.reply(.object([("QMP", .object([("version", Monitor.version), ("capabilities", .array([]))]))]))
    }

    public func close(_ session: MonitorSession) {
        session.closed = true
        sessions.removeValue(forKey: ObjectIdentifier(session))
    }

    /// Bytes from a client.
    public func receive<C: Collection>(_ bytes: C, from session: MonitorSession) where C.Element == UInt8 {
        let outputs = session.stream.feed(bytes)
        for o in outputs {
            if session.busy { session.queued.append(o) } else { handle(o, session) }
        }
    }

    func handle(_ output: JSONStream.Output, _ session: MonitorSession) {
        switch output {
        case .error(let message):
            session.reply(Monitor.errorReply(QMPError(message), id: nil))
        case .value(let request):
            execute(request, session)
        }
    }

    static func errorReply(_ e: QMPError, id: JSON?) -> JSON {
        var m: [(String, JSON)] = [("error", .object([("class", .string(e.errorClass)), ("desc", .string(e.desc))]))]
        if let id { m.append(("id", id)) }
        return .object(m)
    }

    static func returnReply(_ value: JSON, id: JSON?) -> JSON {
        var m: [(String, JSON)] = [("return", value)]
        if let id { m.append(("id", id)) }
        return .object(m)
    }

    /// Broadcasts an event to every negotiated session.
    public func emit(_ name: String, _ data: JSON?) {
        var ts = timespec()
        let ok = clock_gettime(CLOCK_REALTIME, &ts) == 0
        var m: [(String, JSON)] = [("event", .string(name))]
        if let data { m.append(("data", data)) }
        m.append(("timestamp", .object([("seconds", .int(ok ? Int64(ts.tv_sec) : -1)),
                                        ("microseconds", .int(ok ? Int64(ts.tv_nsec / 1000) : -1))])))
        for s in sessions.values where s.negotiated { s.reply(.object(m)) }
    }

    // MARK: - Envelope

    func execute(_ request: JSON, _ session: MonitorSession) {
        guard case .object(let members) = request else {
            session.reply(Monitor.errorReply(QMPError("QMP input must be a JSON object"), id: nil))
            return
        }
        let id = request["id"]
        var name: String? = nil
        for (k, v) in members {
            switch k {
            case "execute":
                guard case .string(let s) = v else {
                    session.reply(Monitor.errorReply(QMPError("QMP input member 'execute' must be a string"), id: id))
                    return
                }
                name = s
            case "arguments":
                guard case .object = v else {
                    session.reply(Monitor.errorReply(QMPError("QMP input member 'arguments' must be an object"), id: id))
                    return
                }
            case "id": break
            default:
                session.reply(Monitor.errorReply(QMPError("QMP input member '\(k)' is unexpected"), id: id))
                return
            }
        }
        guard let name else {
            session.reply(Monitor.errorReply(QMPError("QMP input lacks member 'execute'"), id: id))
            return
        }
        let args = request["arguments"] ?? .object([])
        if !session.negotiated && name != "qmp_capabilities" {
            session.reply(Monitor.errorReply(QMPError("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'"), id: id))
            return
        }
        if session.negotiated && name == "qmp_capabilities" {
            session.reply(Monitor.errorReply(QMPError("CommandNotFound", "Capabilities negotiation is already complete, command ignored"), id: id))
            return
        }
        guard Monitor.commands.contains(name) else {
            session.reply(Monitor.errorReply(QMPError("CommandNotFound", "The command \(name) has not been found"), id: id))
            return
        }
        session.busy = true
        run(name, args, session) { [weak self, session] result in
            switch result {
            case .success(let v): session.reply(Monitor.returnReply(v, id: id))
            case .failure(let e): session.reply(Monitor.errorReply(e, id: id))
            }
            session.busy = false
            // Requests that arrived meanwhile, in order.
            while !session.busy && !session.queued.isEmpty {
                let next = session.queued.removeFirst()
                self?.handle(next, session)
            }
        }
    }

    // MARK: - Commands

    typealias Done = (Result<JSON, QMPError>) -> Void

    func run(_ name: String, _ args: JSON, _ session: MonitorSession, _ done: @escaping Done) {
        do {
            switch name {
            case "qmp_capabilities":
                let a = try Arguments(args, ["enable": .array])
                if case .array(let caps)? = a["enable"], !caps.isEmpty {
                    let names = caps.map { $0.stringValue ?? $0.serialized }
                    throw QMPError("Capability \(names.joined(separator: ", ")) not available")
                }
                session.negotiated = true
                done(.success(.object([])))
            case "query-version":
                _ = try Arguments(args, [:])
                done(.success(Monitor.version))
            case "query-commands":
                _ = try Arguments(args, [:])
                done(.success(.array(Monitor.commands.map { .object([("name", .string($0))]) })))
            case "query-iothreads":
                _ = try Arguments(args, [:])
                done(.success(.array(registry.all.map(iothreadInfo))))
            case "x-query-iothread-stats":
                _ = try Arguments(args, [:])
                done(.success(.array(registry.all.map(iothreadStats))))
            case "object-add":
                try objectAdd(args)
                done(.success(.object([])))
            case "object-del":
                let a = try Arguments(args, ["id": .string], required: ["id"])
                do { try registry.remove(a.string("id")!) } catch { throw QMPError("\(error)") }
                done(.success(.object([])))
            case "qom-list":
                let a = try Arguments(args, ["path": .string], required: ["path"])
                _ = try resolve(a.string("path")!)
                var props: [JSON] = [.object([("name", .string("type")), ("type", .string("string"))])]
                props += IOThreadProperties.names.map { .object([("name", .string($0)), ("type", .string("int"))]) }
                done(.success(.array(props)))
            case "qom-get":
                let a = try Arguments(args, ["path": .string, "property": .string], required: ["path", "property"])
                let t = try resolve(a.string("path")!)
                let p = a.string("property")!
                if p == "type" { done(.success(.string("iothread"))); return }
                do { done(.success(.int(try t.property(p)))) } catch { throw QMPError("\(error)") }
            case "qom-set":
                let a = try Arguments(args, ["path": .string, "property": .string, "value": .any],
                                      required: ["path", "property", "value"])
                let t = try resolve(a.string("path")!)
                let p = a.string("property")!
                guard let v = a["value"]?.intValue else {
                    throw QMPError("Invalid parameter type for '\(p)', expected: integer")
                }
                do { try t.setProperty(p, to: v) } catch { throw QMPError("\(error)") }
                done(.success(.object([])))
            case "device_add":
                try deviceAdd(args, done)
            case "device_del":
                let a = try Arguments(args, ["id": .string], required: ["id"])
                try deviceDel(a.string("id")!)
                done(.success(.object([])))
            case "blockdev-add":
                try blockdevAdd(args)
                done(.success(.object([])))
            case "blockdev-del":
                try blockdevDel(args)
                done(.success(.object([])))
            case "block-export-add":
                try blockExportAdd(args)
                done(.success(.object([])))
            case "block-export-del":
                try blockExportDel(args, done)
            case "query-block-exports":
                _ = try Arguments(args, [:])
                done(.success(queryBlockExports()))
            case "human-monitor-command":
                let a = try Arguments(args, ["command-line": .string, "cpu-index": .int], required: ["command-line"])
                done(.success(.string(hmp(a.string("command-line")!))))
            case "quit":
                _ = try Arguments(args, [:])
                done(.success(.object([])))
                onQuit?()
            default:
                throw QMPError("CommandNotFound", "The command \(name) has not been found")
            }
        } catch let e as QMPError {
            done(.failure(e))
        } catch {
            done(.failure(QMPError("\(error)")))
        }
    }

    func iothreadInfo(_ t: IOThread) -> JSON {
        let p = t.properties
        return .object([
            ("id", .string(t.id)), ("thread-id", .int(Int64(t.threadID))), ("poll-max-ns", .int(p.pollMaxNs)),
            ("poll-grow", .int(p.pollGrow)), ("poll-shrink", .int(p.pollShrink)), ("aio-max-batch", .int(p.aioMaxBatch)),
            ("holders", .array(t.holders.map { .string($0) })),
        ])
    }

    func iothreadStats(_ t: IOThread) -> JSON {
        let s = t.statistics
        let windows = s.pollWindows.sorted { $0.key < $1.key }.map { JSON.object([("fd", .int(Int64($0.key))), ("ns", .int($0.value))]) }
        return .object([
            ("id", .string(t.id)), ("backend", .string(t.context.backendKind.rawValue)),
            ("iterations", .uint(s.iterations)), ("bh-run", .uint(s.bottomHalvesRun)),
            ("dispatches", .uint(s.handlerDispatches)), ("completions", .uint(s.completions)),
            ("poll-hits", .uint(s.pollHits)), ("poll-misses", .uint(s.pollMisses)),
            ("polling-ns", .uint(s.pollNanoseconds)), ("blocked-ns", .uint(s.blockedNanoseconds)),
            ("eventfd-writes", .uint(s.eventfdWrites)), ("ring-enters", .uint(s.ringEnters)),
            ("cpu-ns", .int(t.cpuTimeNanoseconds)), ("poll-windows", .array(windows)),
        ])
    }

    func resolve(_ path: String) throws -> IOThread {
        let id = path.hasPrefix("/objects/") ? String(path.dropFirst(9)) : path
        guard !id.contains("/"), let t = registry.lookup(id) else { throw QMPError("DeviceNotFound", "Device '\(path)' not found") }
        return t
    }

    func objectAdd(_ args: JSON) throws {
        var spec: [String: ArgumentType] = ["qom-type": .string, "id": .string]
        for n in IOThreadProperties.names { spec[n] = .int }
        let a = try Arguments(args, spec, required: ["qom-type", "id"])
        let type = a.string("qom-type")!
        guard type == "iothread" else { throw QMPError("Parameter 'qom-type' does not accept value '\(type)'") }
        var props = IOThreadProperties()
        for n in IOThreadProperties.names {
            if let v = a[n]?.intValue {
                do { try props.set(n, to: v) } catch { throw QMPError("\(error)") }
            }
        }
        do { try registry.create(id: a.string("id")!, properties: props) } catch { throw QMPError("\(error)") }
    }

    func deviceAdd(_ args: JSON, _ done: @escaping Done) throws {
        let a = try Arguments(args, ["driver": .string, "id": .string, "iothread": .string, "iothread-vq-mapping": .array,
                                     "num-queues": .int, "queue-size": .int, "backend": .string],
                              required: ["driver", "id"])
        let driver = a.string("driver")!
        guard driver == "virtio-blk" || driver == "virtio-blk-pci" else {
            throw QMPError("'\(driver)' is not a valid device model name")
        }
        let id = a.string("id")!
        guard isWellFormedObjectID(id) else { throw QMPError("Parameter 'id' expects an identifier") }
        guard devices[id] == nil else { throw QMPError("Duplicate device ID '\(id)'") }
        let queues = Int(a["num-queues"]?.intValue ?? 1)
        guard queues > 0 else { throw QMPError("num-queues property must be larger than 0") }
        // Before the mapping, which has an entry per queue: a huge count must not allocate.
        guard queues <= VirtioBlkDevice.maxQueues else {
            throw QMPError("num-queues must be in [1, \(VirtioBlkDevice.maxQueues)]")
        }
        let size = Int(a["queue-size"]?.intValue ?? 256)
        guard size > 2 else { throw QMPError("invalid queue-size property (\(size)), must be > 2") }
        guard size & (size - 1) == 0 && size <= 1024 else {
            throw QMPError("invalid queue-size property (\(size)), must be a power of 2 (max 1024)")
        }
        let backend: BlockBackend
        do { backend = try BlockBackend(parsing: a.string("backend") ?? "null") } catch { throw QMPError("\(error)") }
        var mapping: [IOThread]
        switch (a.string("iothread"), a["iothread-vq-mapping"]) {
        case (.some, .some):
            throw QMPError("iothread and iothread-vq-mapping properties cannot be set at the same time")
        case (.some(let tid), nil):
            guard let t = registry.lookup(tid.hasPrefix("/objects/") ? String(tid.dropFirst(9)) : tid) else {
                throw QMPError("DeviceNotFound", "Device '\(tid)' not found")
            }
            mapping = Array(repeating: t, count: queues)
        case (nil, .some(.array(let items))):
            var entries: [IOThreadVQMappingEntry] = []
            for item in items {
                guard case .object = item, let name = item["iothread"]?.stringValue else {
                    throw QMPError("Invalid parameter type for 'iothread-vq-mapping', expected: IOThreadVirtQueueMapping")
                }
                var vqs: [Int]? = nil
                if case .array(let v)? = item["vqs"] { vqs = v.compactMap { $0.intValue.map(Int.init) } }
                entries.append(IOThreadVQMappingEntry(iothread: name, vqs: vqs))
            }
            do {
                mapping = try resolveIOThreadVQMapping(entries, numQueues: queues) { [registry] in registry.lookup($0) }
            } catch { throw QMPError("\(error)") }
        default:
            throw QMPError("virtio-blk needs 'iothread' or 'iothread-vq-mapping' (this runtime has no main-loop dataplane)")
        }
        let device: VirtioBlkDevice
        do { device = try VirtioBlkDevice(id: id, queues: queues, queueSize: size, backend: backend) } catch { throw QMPError("\(error)") }
        devices[id] = device
        let ctx = context
        let reply = MainThreadOnly(done)
        let monitor = MainThreadOnly(self)
        Task { [mapping] in
            let failure: QMPError?
            do {
                try await device.attach(mapping: mapping)
                failure = nil
            } catch {
                failure = QMPError("\(error)")
            }
            ctx.scheduleOneShot {
                if let failure {
                    monitor.value.devices.removeValue(forKey: id)
                    reply.value(.failure(failure))
                } else {
                    reply.value(.success(.object([])))
                }
            }
        }
    }

    func deviceDel(_ idOrPath: String) throws {
        let id = idOrPath.hasPrefix("/machine/peripheral/") ? String(idOrPath.dropFirst(20)) : idOrPath
        guard let device = devices[id] else { throw QMPError("DeviceNotFound", "Device '\(idOrPath)' not found") }
        guard !unplugging.contains(id) else { throw QMPError("Device \(id) is already in the process of unplug") }
        unplugging.insert(id)
        let ctx = context
        let monitor = MainThreadOnly(self)
        // Drain, then release the IOThreads, then tell every client (QEMU's order).
        Task {
            try? await device.detach()
            ctx.scheduleOneShot {
                let m = monitor.value
                m.devices.removeValue(forKey: id)
                m.unplugging.remove(id)
                m.emit("DEVICE_DELETED", .object([("device", .string(id)), ("path", .string(device.holderPath))]))
            }
        }
    }

    /// Deletes every export and detaches every device (for shutdown); calls `done` on the
    /// main loop thread.
    public func detachAll(_ done: @escaping () -> Void) {
        deleteAllExports { [self] in detachDevices(done) }
    }

    func detachDevices(_ done: @escaping () -> Void) {
        let all = Array(devices.values)
        let ctx = context
        let finish = MainThreadOnly(done)
        let monitor = MainThreadOnly(self)
        Task {
            for d in all { try? await d.detach() }
            ctx.scheduleOneShot {
                monitor.value.devices.removeAll()
                finish.value()
            }
        }
    }

    func hmp(_ line: String) -> String {
        let words = line.split(separator: " ").map(String.init)
        switch words.first {
        case "help", "?":
            return "help|? [cmd] -- show the help\r\ninfo iothreads -- show the IOThreads\r\n"
        case "info":
            guard words.count > 1 else { return "info iothreads -- show the IOThreads\r\n" }
            guard words[1] == "iothreads" else { return "info: unknown subcommand '\(words[1])'\r\n" }
            var out = ""
            for t in registry.all {
                let p = t.properties
                out += "\(t.id):\r\n  thread_id=\(t.threadID)\r\n  poll-max-ns=\(p.pollMaxNs)\r\n  poll-grow=\(p.pollGrow)\r\n"
                out += "  poll-shrink=\(p.pollShrink)\r\n  aio-max-batch=\(p.aioMaxBatch)\r\n"
                out += "  holders=\(t.holders.joined(separator: ","))\r\n"
            }
            return out
        default:
            return "unknown command: '\(words.first ?? "")'\r\n"
        }
    }
}

/// The QAPI types arguments are checked against.
enum ArgumentType: String {
    case string, int = "integer", bool = "boolean", array, any
}

/// Arguments validated before any side effect, with QEMU's texts.
struct Arguments {
    let values: [String: JSON]

    init(_ args: JSON, _ spec: [String: ArgumentType], required: Set<String> = []) throws {
        guard case .object(let members) = args else { throw QMPError("QMP input member 'arguments' must be an object") }
        var values: [String: JSON] = [:]
        for (k, v) in members {
            guard let type = spec[k] else { throw QMPError("Parameter '\(k)' is unexpected") }
            let ok: Bool
            switch type {
            case .string: ok = v.stringValue != nil
            case .int: ok = v.intValue != nil
            case .bool: if case .bool = v { ok = true } else { ok = false }
            case .array: if case .array = v { ok = true } else { ok = false }
            case .any: ok = true
            }
            guard ok else { throw QMPError("Invalid parameter type for '\(k)', expected: \(type.rawValue)") }
            values[k] = v
        }
        for r in required.sorted() where values[r] == nil { throw QMPError("Parameter '\(r)' is missing") }
        self.values = values
    }

    subscript(key: String) -> JSON? { values[key] }
    func string(_ key: String) -> String? { values[key]?.stringValue }
}


/// A value created on the main loop's home thread, carried through a task and used again
/// only on that thread (after a one-shot BH brought the work back).
/// `@unchecked Sendable`: the hop through `scheduleOneShot` is what orders the accesses.
struct MainThreadOnly<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}
