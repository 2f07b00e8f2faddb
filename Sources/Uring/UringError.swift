import Glibc

/// An error from the kernel's io_uring interface (or from a system call the ring needs).
///
/// Environment failures (the kernel refused, memory or descriptors ran out) are reported
/// with this type; programming errors crash instead.
public struct UringError: Error, Equatable, CustomStringConvertible, Sendable {
    /// The positive errno value.
    public let errno: Int32
    /// What was being done, e.g. `"io_uring_queue_init"`.
    public let operation: String

    public init(errno: Int32, operation: String) {
        self.errno = errno
        self.operation = operation
    }

    public var description: String {
        "\(operation): \(String(cString: strerror(errno))) (errno \(errno))"
    }
}
