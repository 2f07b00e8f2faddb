import CLiburing
import Glibc

/// Whether io_uring can be used in this process, and if not, why.
public enum UringAvailability: Sendable, Equatable {
    case available
    case unavailable(errno: Int32, reason: String)

    public var isAvailable: Bool { self == .available }
}

public enum UringProbe {
    /// Asks the kernel for a tiny ring (and closes it at once). Explains a refusal:
    /// ENOSYS (kernel built without io_uring), EPERM (seccomp, or `kernel.io_uring_disabled`),
    /// ENOMEM (locked-memory limit), EMFILE/ENFILE (no descriptor left).
    public static func check() -> UringAvailability {
        var params = io_uring_params()
        let fd = dp_io_uring_setup_raw(2, &params)
        if fd >= 0 {
            close(fd)
            return .available
        }
        let err = -fd
        return .unavailable(errno: err, reason: explain(errno: err))
    }

    /// A sentence for a failed io_uring setup.
    public static func explain(errno err: Int32) -> String {
        switch err {
        case ENOSYS: return "the kernel has no io_uring (ENOSYS)"
        case EPERM:
            let sysctl = readDisabledSysctl()
            if let sysctl, sysctl != 0 {
                return "io_uring is disabled by kernel.io_uring_disabled=\(sysctl) (EPERM)"
            }
            return "io_uring is refused for this process, e.g. by a seccomp filter (EPERM)"
        case ENOMEM: return "not enough locked memory for a ring (ENOMEM); raise RLIMIT_MEMLOCK"
        case EMFILE, ENFILE: return "no file descriptor left for a ring (\(err == EMFILE ? "EMFILE" : "ENFILE"))"
        default: return "io_uring_setup failed: \(String(cString: strerror(err))) (errno \(err))"
        }
    }

    /// `/proc/sys/kernel/io_uring_disabled` (6.6+): 0 enabled, 1 only for a group, 2 disabled.
    static func readDisabledSysctl() -> Int? {
        let fd = open("/proc/sys/kernel/io_uring_disabled", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buf = [UInt8](repeating: 0, count: 16)
        let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard n > 0 else { return nil }
        return Int(String(decoding: buf[0..<n], as: UTF8.self).trimmingSpaces())
    }
}

extension String {
    fileprivate func trimmingSpaces() -> String {
        String(self.filter { !$0.isWhitespace })
    }
}
