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
