import CShims
import Glibc

/// An eventfd used as a doorbell (QEMU's `EventNotifier`): ``set()`` from any thread,
/// ``testAndClear()`` by whoever consumes it. Owns the descriptor and closes it on deinit.
///
/// Sendable: the only state is an immutable descriptor; eventfd reads and writes are
/// atomic in the kernel.
public final class EventNotifier: Sendable {
    /// The eventfd (non-blocking, close-on-exec).
    public let fileDescriptor: Int32

    /// - Throws: ``AioError`` when the kernel has no descriptor or memory left.
    public init() throws(AioError) {
        let fd = eventfd(0, Int32(EFD_NONBLOCK | EFD_CLOEXEC))
        guard fd >= 0 else { throw AioError.syscall("eventfd", errno: errno) }
        fileDescriptor = fd
    }

    /// Takes ownership of an eventfd someone else created (a vhost-user front end's kick or
    /// call fd). It is made non-blocking and close-on-exec: an fd passed over a socket
    /// arrives blocking, and a blocking read of an unset eventfd would stall the loop.
    /// - Throws: ``AioError`` when `fd` is not an open descriptor (nothing is closed then).
    public init(adopting fd: Int32) throws(AioError) {
        let flags = fcntl(fd, F_GETFL)
        guard flags >= 0, fcntl(fd, F_SETFL, flags | O_NONBLOCK) == 0 else {
            throw AioError.syscall("fcntl(O_NONBLOCK)", errno: errno)
        }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        fileDescriptor = fd
    }

    deinit { close(fileDescriptor) }

    /// Signals the notifier (adds 1 to the counter). Never blocks.
    public func set() {
        var one: UInt64 = 1
        while true {
            let n = write(fileDescriptor, &one, 8)
            // EAGAIN means the counter is saturated: it is already set, which is all we want.
            if n == 8 || errno != EINTR { return }
        }
    }

    /// Clears the notifier; returns whether it was set.
    @discardableResult
    public func testAndClear() -> Bool {
        var value: UInt64 = 0
        while true {
            let n = read(fileDescriptor, &value, 8)
            if n == 8 { return value != 0 }
            if errno != EINTR { return false }
        }
    }
}
