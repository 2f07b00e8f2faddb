import CShims
import Glibc

/// Where a device's requests go.
public enum BlockBackend: Sendable, Equatable, CustomStringConvertible {
    /// Completes every request at once, in the queue handler (no I/O).
    case null
    /// One io_uring NOP per request on the IOThread's ring (the epoll backend completes it at
    /// once through its queue).
    case nop
    /// 512-byte-sector reads and writes of a real file through the IOThread's ring.
    case file(path: String, direct: Bool)
    /// Completes each request from a timer after the given nanoseconds (a slow device).
    case delay(nanoseconds: Int64)

    /// Parses `null`, `nop`, `file:PATH` (`file+direct:PATH` for O_DIRECT) or
    /// `delay:DURATION` (e.g. `100us`, `2ms`, `1s`, `500ns`).
    public init(parsing text: String) throws(DeviceError) {
        if text == "null" { self = .null; return }
        if text == "nop" { self = .nop; return }
        if text.hasPrefix("file:") || text.hasPrefix("file+direct:") {
            let direct = text.hasPrefix("file+direct:")
            let path = String(text.dropFirst(direct ? 12 : 5))
            guard !path.isEmpty else { throw DeviceError("backend 'file:' needs a path") }
            self = .file(path: path, direct: direct)
            return
        }
        if text.hasPrefix("delay:") {
            guard let ns = parseDuration(String(text.dropFirst(6))), ns >= 0 else {
                throw DeviceError("backend 'delay:' needs a duration such as 100us, 2ms or 1s")
            }
            self = .delay(nanoseconds: ns)
            return
        }
        throw DeviceError("unknown backend '\(text)': expected null, nop, file:PATH or delay:DURATION")
    }

    public var description: String {
        switch self {
        case .null: return "null"
        case .nop: return "nop"
        case .file(let path, let direct): return (direct ? "file+direct:" : "file:") + path
        case .delay(let ns): return "delay:\(ns)ns"
        }
    }
}

/// A backend ready for I/O: for `.file`, the open file and its size.
///
/// Sendable: every property is immutable; the descriptor is used by one IOThread's ring at a
/// time per request, and positional I/O needs no shared file offset.
public final class OpenBlockBackend: Sendable {
    public let backend: BlockBackend
    /// The file (`.file` only), else -1.
    public let fileDescriptor: Int32
    /// The size in bytes requests are checked against, when known (a regular file's size, or
    /// the size given for a backend without storage). nil: no range check (a character
    /// device such as /dev/full).
    public let sizeBytes: UInt64?
    /// Writes (OUT) fail with IOERR.
    public let readOnly: Bool

    /// Opens `backend`.
    /// - Parameters:
    ///   - readOnly: open the file read-only and refuse writes.
    ///   - size: the size of a backend without storage (null, nop, delay); ignored for files.
    /// - Throws: ``DeviceError`` (`Could not open 'PATH': …`) when the file cannot be opened.
    public init(_ backend: BlockBackend, readOnly: Bool = false, size: UInt64? = nil) throws(DeviceError) {
        self.backend = backend
        self.readOnly = readOnly
        guard case .file(let path, let direct) = backend else {
            fileDescriptor = -1
            sizeBytes = size
            return
        }
        let mode = (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC
        var fd = open(path, mode | (direct ? dp_o_direct() : 0))
        if fd < 0 && direct && errno == EINVAL { fd = open(path, mode) }  // no O_DIRECT here
        guard fd >= 0 else { throw DeviceError("Could not open '\(path)': \(String(cString: strerror(errno)))") }
        var st = stat()
        if fstat(fd, &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG {
            sizeBytes = UInt64(st.st_size)
        } else {
            sizeBytes = nil
        }
        fileDescriptor = fd
    }

    deinit { if fileDescriptor >= 0 { close(fileDescriptor) } }
}

/// `10ns`, `100us`, `2ms`, `1s`, or a bare number of nanoseconds; nil for anything else,
/// a negative duration or one past Int64.max nanoseconds.
public func parseDuration(_ text: String) -> Int64? {
    let units: [(String, Int64)] = [("ns", 1), ("us", 1000), ("ms", 1_000_000), ("s", 1_000_000_000)]
    for (suffix, scale) in units where text.hasSuffix(suffix) {
        guard let v = Double(text.dropLast(suffix.count)), v >= 0 else { return nil }
        // Int64(Double) traps past Int64.max (and on infinity): 2^63 is the first double out.
        let ns = v * Double(scale)
        guard ns < 0x1p63 else { return nil }
        return Int64(ns)
    }
    return Int64(text)
}
