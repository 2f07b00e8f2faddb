// The QMP monitor, independent of sockets: sessions take bytes and answer through a send
// closure; everything runs on the monitor's context (its main loop).
//
// Design note: one command at a time, as QEMU runs them under its big lock. Every message a
// session's stream yields (a request or a parse error) joins one queue shared by every
// client, in arrival order; the monitor takes the next one only when the one before has been
// answered. A command whose work is asynchronous (device_add's attach, block-export-del's
// drain, a move) runs as a task that prefers the monitor's executor, so its code runs on the
// monitor's thread between awaits, and the next command waits for its answer. Work that QEMU
// lets outlive its command (device_del's drain, which answers at once and announces the end
// with DEVICE_DELETED) runs the same way without holding the queue; the objects it touches
// are in a state (`unplugging`) that every command checks. So each command's checks and
// effects are atomic with respect to every other command, whatever the number of clients.
//
// Shutdown (`quit`, or the embedder on a signal) lets the command running finish and be
// answered, runs no queued command, waits for unplugs in progress, then deletes every export,
// detaches every device, releases every node's hold and stops every IOThread.
import Aio
import Devices
import Glibc
import IOThreads

/// A QMP error: class and description, as QEMU words them.
public struct QMPError: Error, Equatable, Sendable {
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
///
/// `@unchecked Sendable`: confined to the monitor's thread (it is carried through command
/// tasks, which run there).
public final class MonitorSession: @unchecked Sendable {
    var stream = JSONStream()
    var negotiated = false
    let send: (String) -> Void
    var closed = false
    /// Messages of this session waiting in the monitor's queue.
    var queued = 0
    /// Told true when the session has `Monitor.backlogLimit` messages waiting (stop reading its
    /// socket), false when it is below again.
    public var onBacklog: ((Bool) -> Void)?

    public init(send: @escaping (String) -> Void) { self.send = send }

    func reply(_ json: JSON) { if !closed { send(json.serialized + "\r\n") } }
}

/// The monitor: IOThreads, devices, block nodes and exports, and the command table over them.
///
/// `@unchecked Sendable`: confined to the home thread of `context`: the fd handlers that feed
/// it run there, and its command tasks prefer `executor`, which runs them there.
public final class Monitor: @unchecked Sendable {
    public let registry: IOThreadRegistry
    public let context: AioContext
    /// Runs the monitor's tasks on `context`'s thread.
    let executor: ContextExecutor
    var sessions: [ObjectIdentifier: MonitorSession] = [:]

    /// The command table (CommandTable.swift).
    var table: [String: QMPCommand] = [:]
    var tableOrder: [String] = []

    /// The queue of every session's messages, in arrival order.
    struct Pending {
        let session: MonitorSession
        let output: JSONStream.Output
    }
    var pending: [Pending] = []
    var pendingHead = 0
    /// A command is running (its answer is not out yet).
    var executing = false

    enum Shutdown { case none, requested, running, done }
    var shutdownState = Shutdown.none
    var shutdownWaiters: [() -> Void] = []
    /// Called once a `quit` has shut the monitor down (after its answer went out).
    public var onQuit: (() -> Void)?

    /// Devices (DeviceCommands.swift).
    var devices: [String: DeviceEntry] = [:]
    var deviceOrder: [String] = []
    /// device_del drains in progress, by device id.
    var unplugs: [String: Task<Void, Never>] = [:]
    /// Block nodes, exports and their creation order (BlockExports.swift).
    var nodes: [String: BlockNode] = [:]
    var exports: [String: ExportEntry] = [:]
    var exportOrder: [String] = []

    /// Messages a session may have waiting before it is told to stop sending (QEMU's
    /// QMP_REQ_QUEUE_LEN_MAX).
    public static let backlogLimit = 8

    public static let version = JSON.object([
        ("qemu", .object([("micro", .int(0)), ("minor", .int(2)), ("major", .int(10))])),
        ("package", .string("dataplane")),
    ])

    /// A monitor on `context`, whose home thread must be the caller's (the thread that polls
    /// it), with the built-in commands.
    public init(context: AioContext, registry: IOThreadRegistry = IOThreadRegistry()) {
        self.context = context
        self.registry = registry
        executor = ContextExecutor(context: context, name: "the QMP monitor")
        for c in Monitor.builtinCommands { register(c) }
    }

    deinit {
        executor.close()
    }

    // MARK: - Sessions

    /// A new client: sends the greeting.
    public func open(_ session: MonitorSession) {
        sessions[ObjectIdentifier(session)] = session
        session.reply(.object([("QMP", .object([("version", Monitor.version), ("capabilities", .array([]))]))]))
    }

    /// The client went away: its messages that have not started are dropped; a command of its
    /// that runs finishes (its effects stay) and its answer goes nowhere.
    public func close(_ session: MonitorSession) {
        session.closed = true
        sessions.removeValue(forKey: ObjectIdentifier(session))
        guard session.queued > 0 else { return }
        session.queued = 0
        pending = pending[pendingHead...].filter { $0.session !== session }
        pendingHead = 0
    }

    /// Bytes from a client.
    public func receive<C: Collection>(_ bytes: C, from session: MonitorSession) where C.Element == UInt8 {
        guard !session.closed else { return }
        for o in session.stream.feed(bytes) {
            pending.append(Pending(session: session, output: o))
            session.queued += 1
            if session.queued == Monitor.backlogLimit { session.onBacklog?(true) }
        }
        pump()
    }

    /// Runs queued messages until one starts asynchronous work or the queue is empty.
    func pump() {
        while !executing && shutdownState == .none && pendingHead < pending.count {
            let next = pending[pendingHead]
            pendingHead += 1
            if pendingHead > 64 && pendingHead * 2 > pending.count {
                pending.removeFirst(pendingHead)
                pendingHead = 0
            }
            next.session.queued -= 1
            if next.session.queued == Monitor.backlogLimit - 1 { next.session.onBacklog?(false) }
            handle(next.output, next.session)
        }
        if !executing && shutdownState == .requested { runShutdown() }
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

    // MARK: - Envelope and execution

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
        if !session.negotiated && name != "qmp_capabilities" {
            session.reply(Monitor.errorReply(QMPError("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'"), id: id))
            return
        }
        if session.negotiated && name == "qmp_capabilities" {
            session.reply(Monitor.errorReply(QMPError("CommandNotFound", "Capabilities negotiation is already complete, command ignored"), id: id))
            return
        }
        guard let command = table[name] else {
            session.reply(Monitor.errorReply(QMPError("CommandNotFound", "The command \(name) has not been found"), id: id))
            return
        }
        let arguments: QMPArguments
        do throws(QMPError) {
            arguments = try QMPArguments(request["arguments"] ?? .object([]), command.arguments, required: command.required)
        } catch {
            session.reply(Monitor.errorReply(error, id: id))
            return
        }
        let call = QMPCall(arguments: arguments, monitor: self, session: session)
        switch command.handler {
        case .sync(let body):
            do throws(QMPError) {
                session.reply(Monitor.returnReply(try body(call), id: id))
            } catch {
                session.reply(Monitor.errorReply(error, id: id))
            }
        case .async(let body):
            executing = true
            Task(executorPreference: executor) { [self] in
                let reply: JSON
                do throws(QMPError) {
                    reply = Monitor.returnReply(try await body(call), id: id)
                } catch {
                    reply = Monitor.errorReply(error, id: id)
                }
                assertOnMonitorThread()
                session.reply(reply)
                executing = false
                pump()
            }
        }
    }

    /// Runs `body` as a task on the monitor's thread (for work that outlives its command,
    /// such as a device_del's drain).
    @discardableResult
    func spawn(_ body: @escaping @Sendable () async -> Void) -> Task<Void, Never> {
        Task(executorPreference: executor) {
            await body()
        }
    }

    func assertOnMonitorThread() {
        precondition(context.isOnHomeThread, "BUG DETECTED: the monitor's state was touched off its thread")
    }

    // MARK: - Shutdown

    /// Shuts the monitor's objects down, as `quit` does: no queued command runs any more; the
    /// one running finishes and is answered; unplugs in progress finish (with their events);
    /// then every export is deleted, every device detached, every node's hold released and
    /// every IOThread stopped. `done` runs on the monitor's thread once all of that is over.
    /// Monitor thread; a second call's `done` runs when the first shutdown is over.
    public func shutdown(_ done: @escaping () -> Void) {
        assertOnMonitorThread()
        if shutdownState == .done { return done() }
        shutdownWaiters.append(done)
        guard shutdownState == .none else { return }
        shutdownState = .requested
        // Queued messages will not run.
        for p in pending[pendingHead...] { p.session.queued = 0 }
        pending = []
        pendingHead = 0
        if !executing { runShutdown() }
    }

    /// Whether a shutdown has started.
    public var isShuttingDown: Bool { shutdownState != .none }

    func runShutdown() {
        shutdownState = .running
        spawn { [self] in
            for (_, unplug) in unplugs { await unplug.value }
            await deleteAllExports()
            await detachAllDevices()
            releaseNodeHolds()
            registry.removeAll()
            shutdownState = .done
            let waiters = shutdownWaiters
            shutdownWaiters = []
            for w in waiters { w() }
        }
    }
}
