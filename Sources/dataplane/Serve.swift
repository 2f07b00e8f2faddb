import Aio
import ArgumentParser
import CShims
import Glibc
import IOThreads
import QMP

/// `dataplane serve [--qmp PATH] [--iothread ID]... [qemu-storage-daemon options]`: a main
/// loop (an AioContext on its own thread) serving a QMP monitor and vhost-user-blk exports
/// until `quit`, SIGINT or SIGTERM; then exports are deleted (drained), devices detached,
/// IOThreads joined and the sockets removed.
///
/// qemu-storage-daemon's spellings are accepted (QEMU's docs/tools/qemu-storage-daemon.rst):
/// `--object iothread,id=ID[,poll-max-ns=N,...]`, `--blockdev driver=file|raw|null-co,...`,
/// `--export type=vhost-user-blk,id=ID,node-name=N,addr.type=unix,addr.path=P[,writable=on]
/// [,num-queues=N][,iothread=ID | ,iothread.0=ID,iothread.1=ID...][,logical-block-size=N]`,
/// `--chardev socket,id=C,path=P,server=on,wait=off` with `--monitor chardev=C`, and `--pidfile PATH` (written once every
/// socket listens: the readiness signal).
struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve a QMP monitor and vhost-user-blk exports (qemu-storage-daemon's options).")

    @Option(help: "Path of the QMP UNIX socket (created with mode 0600).") var qmp: String?
    @Option(name: .customLong("iothread"), help: "Create an IOThread with this id at start (repeatable).") var iothreads: [String] = []
    @Option(name: .customLong("object"), help: "iothread,id=ID[,poll-max-ns=N,...] (repeatable).") var objects: [String] = []
    @Option(name: .customLong("blockdev"), help: "driver=file|raw|null-co,node-name=N,... (repeatable).") var blockdevs: [String] = []
    @Option(name: .customLong("export"), help: "type=vhost-user-blk,id=ID,node-name=N,addr.type=unix,addr.path=P,... (repeatable).")
    var exports: [String] = []
    @Option(name: .customLong("chardev"), help: "socket,id=ID,path=P,server=on,wait=off (for --monitor).") var chardevs: [String] = []
    @Option(name: .customLong("monitor"), help: "chardev=ID: serve QMP on that chardev's socket.") var monitors: [String] = []
    @Option(help: "Write the process id here once everything listens.") var pidfile: String?

    mutating func validate() throws {
        if let qmp { guard !qmp.isEmpty && qmp.utf8.count < 108 else { throw ValidationError("--qmp needs a socket path shorter than 108 bytes") } }
        for id in iothreads where !isWellFormedObjectID(id) {
            throw ValidationError("--iothread '\(id)': Parameter 'id' expects an identifier")
        }
        guard qmp != nil || !monitors.isEmpty || !exports.isEmpty else {
            throw ValidationError("nothing to serve: give --qmp, --monitor or --export")
        }
        _ = try qmpPath()
    }

    /// The QMP socket: --qmp, or the path of the chardev --monitor names.
    func qmpPath() throws -> String? {
        if let qmp { return qmp }
        guard let m = monitors.first else { return nil }
        guard monitors.count == 1 else { throw ValidationError("only one --monitor is supported") }
        let mon = try keyValues(m, implied: "chardev")
        guard let cid = mon.first(where: { $0.0 == "chardev" })?.1 else { throw ValidationError("--monitor: Parameter 'chardev' is missing") }
        for c in chardevs {
            let kv = try keyValues(c, implied: "backend")
            guard kv.first(where: { $0.0 == "id" })?.1 == cid else { continue }
            guard kv.first(where: { $0.0 == "backend" })?.1 == "socket" else { throw ValidationError("--chardev \(cid): only 'socket' is supported") }
            guard let path = kv.first(where: { $0.0 == "path" })?.1 else { throw ValidationError("--chardev \(cid): Parameter 'path' is missing") }
            return path
        }
        throw ValidationError("--monitor: chardev '\(cid)' not found")
    }

    func run() throws {
        final class Outcome: @unchecked Sendable {  // written by the loop thread before it exits, read after join
            var error: Error?
        }
        let outcome = Outcome()
        let path = try qmpPath(), ids = iothreads, pidfile = pidfile
        // Startup commands in qemu-storage-daemon's order: objects, block nodes, exports.
        var startup: [(String, String, JSON)] = []
        for o in objects { startup.append(("--object", "object-add", try Serve.json(o, implied: "qom-type"))) }
        for b in blockdevs { startup.append(("--blockdev", "blockdev-add", try Serve.json(b, implied: nil))) }
        for e in exports { startup.append(("--export", "block-export-add", try Serve.json(e, implied: nil))) }
        let commands = startup
        final class Box: @unchecked Sendable {  // handed to the loop thread once
            let body: () -> Void
            init(_ body: @escaping () -> Void) { self.body = body }
        }
        let box = Box {
            do { try Serve.loop(path: path, iothreads: ids, startup: commands, pidfile: pidfile) } catch { outcome.error = error }
        }
        var thread = pthread_t()
        // Retained for the loop thread, which takes the reference back and runs the loop.
        let rc = pthread_create(&thread, nil, { arg in
            Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue().body()
            return nil
        }, Unmanaged.passRetained(box).toOpaque())
        guard rc == 0 else { throw StartupError(description: "cannot start the main loop thread: \(String(cString: strerror(rc)))") }
        pthread_join(thread, nil)
        if let e = outcome.error { throw e }
    }

    struct StartupError: Error, CustomStringConvertible {
        let description: String
    }

    static func loop(path: String?, iothreads: [String], startup: [(String, String, JSON)], pidfile: String?) throws {
        let ctx = try AioContext()
        let monitor = Monitor(context: ctx)
        for id in iothreads { try monitor.registry.create(id: id) }
        final class State: @unchecked Sendable {  // main loop thread only
            var running = true
            var stopping = false
        }
        let state = State()
        var server: QMPServer? = nil
        /// Runs the monitor's loop until its shutdown is over.
        func shutDown() {
            var done = false
            monitor.shutdown { done = true }
            while !done { ctx.poll(blocking: true) }
        }
        let finishStartup = { (failure: Error?) throws in
            if let failure {
                // Undo what was set up, then report.
                shutDown()
                server?.stop()
                throw failure
            }
        }
        for (option, command, args) in startup {
            do {
                try monitor.runStartupCommand(command, args)
            } catch {
                try finishStartup(StartupError(description: "\(option): \(error.desc)"))
            }
        }
        if let path {
            do { server = try QMPServer(path: path, monitor: monitor) } catch { try finishStartup(error) }
        }
        let qmpServer = server
        // quit, SIGINT and SIGTERM: the command running finishes and is answered, then every
        // export is deleted, every device detached and every IOThread stopped; then the
        // clients are disconnected and the loop ends.
        let finish: @Sendable () -> Void = {
            qmpServer?.stop()
            state.running = false
        }
        monitor.onQuit = finish
        let signals = try EventNotifier()
        dp_stop_signals_to_eventfd(signals.fileDescriptor)
        ctx.setEventNotifier(signals, FDHandlerCallbacks(read: {
            signals.testAndClear()
            guard !state.stopping else { return }
            state.stopping = true
            monitor.shutdown(finish)
        }))
        // One line when everything listens (the pid file, if asked for, is written next).
        var serving: [String] = []
        if let path { serving.append("QMP monitor on \(path)") }
        for (option, _, args) in startup where option == "--export" {
            if let id = args["id"]?.stringValue, let sock = args["addr"]?["path"]?.stringValue {
                serving.append("export \(id) on \(sock)")
            }
        }
        errorLine("dataplane: ready (backend \(ctx.backendKind)): " + serving.joined(separator: "; "))
        if let pidfile {
            let text = "\(getpid())\n"
            let fd = open(pidfile, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            if fd >= 0 {
                _ = text.withCString { write(fd, $0, strlen($0)) }
                close(fd)
            }
        }
        while state.running { ctx.poll(blocking: true) }
        ctx.removeEventNotifier(signals)
        if let pidfile { unlink(pidfile) }
    }

    /// `a=1,b.c=on` as key/value pairs; a first item without `=` is the value of `implied`.
    func keyValues(_ text: String, implied: String?) throws -> [(String, String)] { try Serve.keyValues(text, implied: implied) }

    static func keyValues(_ text: String, implied: String?) throws -> [(String, String)] {
        var out: [(String, String)] = []
        for (i, item) in text.split(separator: ",", omittingEmptySubsequences: false).enumerated() {
            if let eq = item.firstIndex(of: "=") {
                out.append((String(item[..<eq]), String(item[item.index(after: eq)...])))
            } else if i == 0, let implied, !item.isEmpty {
                out.append((implied, String(item)))
            } else {
                throw ValidationError("'\(text)': expected key=value, got '\(item)'")
            }
        }
        return out
    }

    static let integerKeys: Set<String> = ["num-queues", "logical-block-size", "size", "poll-max-ns", "poll-grow",
                                           "poll-shrink", "aio-max-batch", "thread-pool-min", "thread-pool-max"]
    static let booleanKeys: Set<String> = ["writable", "read-only", "read-zeroes", "fixed-iothread", "writethrough",
                                           "direct", "auto-read-only", "server", "wait"]

    /// A qemu-storage-daemon option as the QMP arguments of the matching command: dotted keys
    /// nest (`addr.path`), `on`/`off` are booleans, sizes and counts are integers.
    static func json(_ text: String, implied: String?) throws -> JSON {
        var root: [(String, JSON)] = []
        func insert(_ path: ArraySlice<String>, _ value: JSON, into members: inout [(String, JSON)]) {
            let key = path.first!
            if path.count == 1 {
                members.removeAll { $0.0 == key }
                members.append((key, value))
                return
            }
            var inner: [(String, JSON)] = []
            if let i = members.firstIndex(where: { $0.0 == key }), case .object(let m) = members[i].1 {
                inner = m
                members.remove(at: i)
            }
            insert(path.dropFirst(), value, into: &inner)
            members.append((key, .object(inner)))
        }
        for (key, raw) in try keyValues(text, implied: implied) {
            let leaf = key.split(separator: ".").last.map(String.init) ?? key
            let value: JSON
            if booleanKeys.contains(leaf) {
                switch raw {
                case "on", "true", "yes": value = .bool(true)
                case "off", "false", "no": value = .bool(false)
                default: throw ValidationError("Parameter '\(key)' expects 'on' or 'off'")
                }
            } else if integerKeys.contains(leaf) {
                guard let v = parseSize(raw) else { throw ValidationError("Parameter '\(key)' expects a number") }
                value = .int(v)
            } else {
                value = .string(raw)
            }
            insert(ArraySlice(key.split(separator: ".").map(String.init)), value, into: &root)
        }
        return listsFromIndices(.object(root))
    }

    /// QEMU's keyval: an object whose keys are exactly 0, 1, …, n-1 is the list of its values
    /// (`iothread.0=iot0,iothread.1=iot1` is `"iothread": ["iot0", "iot1"]`).
    static func listsFromIndices(_ value: JSON) -> JSON {
        guard case .object(let members) = value else { return value }
        let converted = members.map { ($0.0, listsFromIndices($0.1)) }
        var byIndex: [Int: JSON] = [:]
        for (k, v) in converted {
            guard let i = Int(k), i >= 0, String(i) == k else { return .object(converted) }
            byIndex[i] = v
        }
        guard !byIndex.isEmpty, (0..<byIndex.count).allSatisfy({ byIndex[$0] != nil }) else { return .object(converted) }
        return .array((0..<byIndex.count).map { byIndex[$0]! })
    }

    /// `4096`, `64M`, `1G`, `512k`.
    static func parseSize(_ text: String) -> Int64? {
        let units: [Character: Int64] = ["k": 1 << 10, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40]
        if let last = text.last, let scale = units[last], let v = Int64(text.dropLast()) { return v * scale }
        return Int64(text)
    }
}
