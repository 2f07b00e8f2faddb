// The monitor served on a UNIX socket (mode 0600) by fd handlers on one AioContext, several
// clients at once. Reads are non-blocking and go straight to the session's byte-stream
// parser; a client with `Monitor.backlogLimit` messages waiting in the monitor's queue is not
// read until it is below again (QEMU suspends a monitor the same way). Writes that would
// block are queued and finished by a write handler.
import Aio
import CShims
import Glibc

/// `@unchecked Sendable`: confined to the home thread of `monitor.context`.
///
/// Its fd handlers refer to it `unowned(unsafe)`: they are removed in ``stop()``, which must
/// run before the server is dropped (deinit checks it), and a removed handler is never
/// called again.
public final class QMPServer: @unchecked Sendable {
    public let path: String
    let monitor: Monitor
    let listenFD: Int32
    var clients: [Int32: Client] = [:]

    var stopped = false

    final class Client {
        let fd: Int32
        var session: MonitorSession!
        var pending: [UInt8] = []
        var writing = false
        /// False while the client has too many messages waiting in the monitor's queue.
        var reading = true
        init(fd: Int32) { self.fd = fd }
    }

    /// Listens at `path`. Home thread of `monitor.context`.
    public init(path: String, monitor: Monitor) throws(AioError) {
        self.path = path
        self.monitor = monitor
        let fd = dp_unix_listen(path, 64)
        guard fd >= 0 else { throw AioError.syscall("listen on \(path)", errno: -fd) }
        listenFD = fd
        monitor.context.setFDHandler(fd, FDHandlerCallbacks(read: { [unowned(unsafe) self] in acceptAll() }))
    }

    deinit {
        precondition(stopped, "BUG DETECTED: QMPServer on \(path) dropped without stop()")
    }

    /// Stops listening, disconnects every client and removes the socket file. Idempotent.
    public func stop() {
        guard !stopped else { return }
        stopped = true
        monitor.context.removeFDHandler(listenFD)
        close(listenFD)
        for fd in Array(clients.keys) { disconnect(fd) }
        unlink(path)
    }

    func acceptAll() {
        while true {
            let fd = accept(listenFD, nil, nil)
            guard fd >= 0 else { return }  // EAGAIN: done; EMFILE etc.: the client waits in the backlog
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            let client = Client(fd: fd)
            // unowned(unsafe) self: sessions end (disconnect, stop) before the server can go;
            // unowned client: the client owns its session.
            client.session = MonitorSession { [unowned(unsafe) self, unowned client] text in send(client, Array(text.utf8)) }
            client.session.onBacklog = { [unowned(unsafe) self, unowned client] full in
                client.reading = !full
                watch(client)
            }
            clients[fd] = client
            watch(client)
            monitor.open(client.session)
        }
    }

    /// Registers the client's handler for what it waits for now: reading unless its backlog is
    /// full, writing while replies are queued.
    func watch(_ client: Client) {
        guard clients[client.fd] === client else { return }
        let fd = client.fd
        // unowned(unsafe): the handlers are removed in disconnect or stop(), before the server goes.
        let read: (@Sendable () -> Void)? = client.reading ? { @Sendable [unowned(unsafe) self] in readable(fd) } : nil
        let write: (@Sendable () -> Void)? = client.writing ? { @Sendable [unowned(unsafe) self] in writable(fd) } : nil
        if read == nil && write == nil {
            monitor.context.removeFDHandler(fd)
        } else {
            monitor.context.setFDHandler(fd, FDHandlerCallbacks(read: read, write: write))
        }
    }

    func readable(_ fd: Int32) {
        guard let client = clients[fd] else { return }
        var buf = [UInt8](repeating: 0, count: 65536)
        while client.reading {
            let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n > 0 {
                monitor.receive(buf[0..<n], from: client.session)
                if clients[fd] == nil { return }  // the command closed it
                continue
            }
            if n < 0 && (errno == EAGAIN || errno == EINTR) { return }
            disconnect(fd)  // EOF or error
            return
        }
    }

    func send(_ client: Client, _ bytes: [UInt8]) {
        guard clients[client.fd] != nil else { return }
        client.pending += bytes
        flush(client)
    }

    func flush(_ client: Client) {
        while !client.pending.isEmpty {
            let n = client.pending.withUnsafeBytes { Glibc.send(client.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n > 0 {
                client.pending.removeFirst(n)
                continue
            }
            if n < 0 && errno == EINTR { continue }
            if n < 0 && errno == EAGAIN {
                if !client.writing {
                    client.writing = true
                    watch(client)
                }
                return
            }
            disconnect(client.fd)
            return
        }
    }

    func writable(_ fd: Int32) {
        guard let client = clients[fd] else { return }
        flush(client)
        if client.pending.isEmpty && client.writing && clients[fd] != nil {
            client.writing = false
            watch(client)
        }
    }

    func disconnect(_ fd: Int32) {
        guard let client = clients.removeValue(forKey: fd) else { return }
        monitor.context.removeFDHandler(fd)
        monitor.close(client.session)
        close(fd)
    }

    /// Connected clients.
    public var clientCount: Int { clients.count }
}
