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

/// virtio-blk request constants (virtio 1.x §5.2.6).
public enum VirtioBlk {
    public static let typeIn: UInt32 = 0
    public static let typeOut: UInt32 = 1
    public static let typeFlush: UInt32 = 4
    public static let typeGetID: UInt32 = 8
    public static let statusOK: UInt8 = 0
    public static let statusIOErr: UInt8 = 1
    public static let statusUnsupported: UInt8 = 2
    public static let sectorSize: UInt64 = 512
    public static let headerSize = 16
    public static let idBytes = 20
}
