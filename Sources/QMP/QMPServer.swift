// The monitor served on a UNIX socket (mode 0600) by fd handlers on one AioContext, several
// clients at once. Reads are non-blocking and go straight to the session's byte-stream
// parser; writes that would block are queued and finished by a write handler.
import Aio
import CShims
import Glibc

/// `@unchecked Sendable`: confined to the home thread of `monitor.context`.
public final class QMPServer: @unchecked Sendable {
    public let path: String
    let monitor: Monitor
    let listenFD: Int32
    var clients: [Int32: Client] = [:]

    final class Client {
        let fd: Int32
        var session: MonitorSession!
        var pending: [UInt8] = []
        var writing = false
        init(fd: Int32) { self.fd = fd }
    }

    /// Listens at `path`. Home thread of `monitor.context`.
    public init(path: String, monitor: Monitor) throws(AioError) {
        self.path = path
        self.monitor = monitor
        let fd = dp_unix_listen(path, 64)
        guard fd >= 0 else { throw AioError.syscall("listen on \(path)", errno: -fd) }
        listenFD = fd
        monitor.context.setFdHandler(fd, FdHandlerCallbacks(read: { [unowned(unsafe) self] in acceptAll() }))
    }

    /// Stops listening, disconnects every client and removes the socket file.
    public func stop() {
        monitor.context.removeFdHandler(listenFD)
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
            client.session = MonitorSession { [unowned(unsafe) self, unowned client] text in send(client, Array(text.utf8)) }
            clients[fd] = client
            monitor.context.setFdHandler(fd, FdHandlerCallbacks(read: { [unowned(unsafe) self] in readable(fd) }))
            monitor.open(client.session)
        }
    }

    func readable(_ fd: Int32) {
        guard let client = clients[fd] else { return }
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
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
                    let fd = client.fd
                    monitor.context.setFdHandler(fd, FdHandlerCallbacks(
                        read: { [unowned(unsafe) self] in readable(fd) },
                        write: { [unowned(unsafe) self] in writable(fd) }))
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
            monitor.context.setFdHandler(fd, FdHandlerCallbacks(read: { [unowned(unsafe) self] in readable(fd) }))
        }
    }

    func disconnect(_ fd: Int32) {
        guard let client = clients.removeValue(forKey: fd) else { return }
        monitor.context.removeFdHandler(fd)
        monitor.close(client.session)
        close(fd)
    }

    /// Connected clients.
    public var clientCount: Int { clients.count }
}
