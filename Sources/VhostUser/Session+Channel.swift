// The wire of a Session: one message at a time off a non-blocking socket (header, then exactly
// `size` payload bytes, with the SCM_RIGHTS fds of every read, at most 8), and replies queued
// when the socket is full and finished by a write handler. Session thread.
import Aio
import CShims
import Glibc

extension Session {
    // Closures registered on the context or queued as waiters hold the session strongly: a
    // message or a drain may end the session (the export drops it) while one of them runs.
    // Every one of them is removed or run by the time the session closes.
    func watch() {
        var write: (@Sendable () -> Void)? = nil
        if writing { write = { [self] in flush() } }
        ctx.setFDHandler(fd, FDHandlerCallbacks(read: { [self] in readable() }, write: write))
    }

    // MARK: - Reading messages

    enum ReadResult { case incomplete, message(VhostUserMessage), failed(String) }

    func readable() {
        while !paused && !closed {
            switch readMessage() {
            case .incomplete:
                return
            case .failed(let why):
                disconnect(why)
                return
            case .message(let m):
                dispatch(m)
            }
        }
    }

    /// Reads what the socket has towards the current message; never blocks.
    func readMessage() -> ReadResult {
        while true {
            let want: Int
            if rxFill < VhostUser.headerSize {
                want = VhostUser.headerSize - rxFill
            } else {
                let size = Int(rx.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
                let total = VhostUser.headerSize + size
                if rxFill == total { break }
                want = total - rxFill
            }
            var nfds: Int32 = 0
            let n = dp_recv_with_fds(fd, rx + rxFill, want, fdScratch, Int32(VhostUser.maxFDs), &nfds)
            if n == -Int(EAGAIN) { return .incomplete }
            if n == -Int(EMSGSIZE) { return .failed("more than \(VhostUser.maxFDs) fds on one message") }
            if n < 0 { return .failed("receive: \(String(cString: strerror(Int32(-n))))") }
            if n == 0 { return .failed(rxFill == 0 ? "front end closed the connection" : "end of file inside a message") }
            for i in 0..<Int(nfds) { rxFDs.append(fdScratch[i]) }
            if rxFDs.count > VhostUser.maxFDs {
                return .failed("A maximum of \(VhostUser.maxFDs) fds are allowed, however got \(rxFDs.count) fds now")
            }
            rxFill += n
            if rxFill == VhostUser.headerSize {
                let flags = rx.loadUnaligned(fromByteOffset: 4, as: UInt32.self)
                let size = rx.loadUnaligned(fromByteOffset: 8, as: UInt32.self)
                if size > UInt32(VhostUser.maxPayload) { return .failed("too big message request: size \(size)") }
                if flags & VhostUser.versionMask != VhostUser.version {
                    return .failed("bad version in flags 0x\(String(flags, radix: 16))")
                }
                if flags & VhostUser.replyFlag != 0 { return .failed("a request with the reply flag set") }
            }
        }
        let m = VhostUserMessage(
            request: rx.loadUnaligned(as: UInt32.self),
            flags: rx.loadUnaligned(fromByteOffset: 4, as: UInt32.self),
            payload: UnsafeRawBufferPointer(start: rx + VhostUser.headerSize, count: rxFill - VhostUser.headerSize),
            fds: rxFDs)
        rxFill = 0
        rxFDs = []
        return .message(m)
    }

    // MARK: - Writing replies

    func ack(_ m: VhostUserMessage, _ value: UInt64) {
        guard m.needsReply && replyAck else { return }
        reply(m.request, u64: value)
    }

    func reply(_ request: UInt32, u64 value: UInt64) {
        withUnsafeBytes(of: value.littleEndian) { reply(request, payload: $0) }
    }

    func reply(_ request: UInt32, payload: UnsafeRawBufferPointer) {
        guard !closed else { return }
        var bytes = [UInt8](repeating: 0, count: VhostUser.headerSize)
        bytes.withUnsafeMutableBytes { h in
            h.storeBytes(of: request, toByteOffset: 0, as: UInt32.self)
            h.storeBytes(of: VhostUser.replyFlags, toByteOffset: 4, as: UInt32.self)
            h.storeBytes(of: UInt32(payload.count), toByteOffset: 8, as: UInt32.self)
        }
        bytes += payload
        tx += bytes
        flush()
    }

    func flush() {
        while !tx.isEmpty && !closed {
            let n = tx.withUnsafeBytes { dp_send_with_fds(fd, $0.baseAddress, $0.count, nil, 0) }
            if n > 0 {
                tx.removeFirst(n)
                continue
            }
            if n == -Int(EAGAIN) {
                guard tx.count <= 65536 else { return disconnect("front end does not read its replies") }
                if !writing {
                    writing = true
                    if !paused { watch() }
                }
                return
            }
            return disconnect("send: \(String(cString: strerror(Int32(-n))))")
        }
        if writing && tx.isEmpty && !closed {
            writing = false
            if !paused { watch() }
        }
    }

    /// Whether the front end has closed its end (POLLRDHUP or POLLHUP; 0x2000 is POLLRDHUP,
    /// which Glibc's module does not export), whatever is still unread.
    func peerHungUp() -> Bool {
        var p = pollfd(fd: fd, events: Int16(POLLIN) | 0x2000, revents: 0)
        guard poll(&p, 1, 0) == 1 else { return false }
        return p.revents & (0x2000 | Int16(POLLHUP)) != 0
    }
}
