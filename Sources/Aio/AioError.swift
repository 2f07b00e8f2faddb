import Glibc

/// An environment failure while creating or running an ``AioContext``: the kernel refused
/// a resource. Programming errors (misuse of the API) crash with a message instead.
public struct AioError: Error, Equatable, CustomStringConvertible, Sendable {
    public enum Code: Sendable, Equatable {
        /// `eventfd`, `epoll_create1`, a ring or a thread could not be created.
        case resourceUnavailable
        /// io_uring was required (``AioContext/Backend/ioUring``) but the kernel refused it.
        case ioUringUnavailable
        /// A system call failed.
        case systemCall
    }

    public let code: Code
    /// The errno, when a system call failed.
    public let errno: Int32
    public let message: String

    public init(code: Code, errno: Int32, message: String) {
        self.code = code
        self.errno = errno
        self.message = message
    }

    /// An error for the system call `name` that failed with `errno`.
    public static func syscall(_ name: String, errno: Int32) -> AioError {
        AioError(code: errno == EMFILE || errno == ENFILE || errno == ENOMEM ? .resourceUnavailable : .systemCall,
                 errno: errno, message: "\(name): \(String(cString: strerror(errno))) (errno \(errno))")
    }

    public var description: String { message }
}
