import Aio
import ArgumentParser
import CShims
import Glibc
import IOThreads
import QMP

/// `dataplane serve --qmp PATH [--iothread ID]...`: a main loop (an AioContext on its own
/// thread) serving a QMP monitor until `quit`, SIGINT or SIGTERM; then devices are detached
/// (drained), IOThreads joined and the socket removed.
struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve a QMP monitor on a UNIX socket (drive it with qmp-shell or qemu.qmp).")

    @Option(help: "Path of the QMP UNIX socket (created with mode 0600).") var qmp: String
    @Option(name: .customLong("iothread"), help: "Create an IOThread with this id at start (repeatable).") var iothreads: [String] = []

    mutating func validate() throws {
        guard !qmp.isEmpty && qmp.utf8.count < 108 else { throw ValidationError("--qmp needs a socket path shorter than 108 bytes") }
        for id in iothreads where !isWellFormedObjectID(id) {
            throw ValidationError("--iothread '\(id)': Parameter 'id' expects an identifier")
        }
    }

    func run() throws {
        final class Outcome: @unchecked Sendable {  // written by the loop thread before it exits, read after join
            var error: Error?
        }
        let outcome = Outcome()
        let path = qmp, ids = iothreads
        final class Box: @unchecked Sendable {  // handed to the loop thread once
            let body: () -> Void
            init(_ body: @escaping () -> Void) { self.body = body }
        }
        let box = Box {
            do { try Serve.loop(path: path, iothreads: ids) } catch { outcome.error = error }
        }
        var thread = pthread_t()
        pthread_create(&thread, nil, { arg in
            Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue().body()
            return nil
        }, Unmanaged.passRetained(box).toOpaque())
        pthread_join(thread, nil)
        if let e = outcome.error { throw e }
    }

    static func loop(path: String, iothreads: [String]) throws {
        let ctx = try AioContext()
        let monitor = Monitor(context: ctx)
        for id in iothreads { try monitor.registry.create(id: id) }
        let server = try QMPServer(path: path, monitor: monitor)
        final class State: @unchecked Sendable {  // main loop thread only
            var running = true
            var stopping = false
        }
        let state = State()
        let shutdown: @Sendable () -> Void = {
            guard !state.stopping else { return }
            state.stopping = true
            monitor.detachAll {
                monitor.registry.removeAll()
                server.stop()
                state.running = false
            }
        }
        monitor.onQuit = { ctx.scheduleOneShot { shutdown() } }  // after the reply went out
        let signals = try EventNotifier()
        dp_stop_signals_to_eventfd(signals.fileDescriptor)
        ctx.setEventNotifier(signals, FdHandlerCallbacks(read: { shutdown() }))
        errorLine("dataplane: QMP monitor on \(path) (backend \(ctx.backendKind))")
        while state.running { ctx.poll(blocking: true) }
        ctx.removeEventNotifier(signals)
    }
}
