// Guest memory: one shared mapping that a guest and a device both address by offset
// (guest-physical address = offset into the region). Every access the device makes on the
// guest's behalf goes through `pointer(at:length:)`, which checks the range: a hostile or
// buggy guest gets an error status, never an access outside the region.
import Glibc

/// A region of guest memory (MAP_SHARED, so another process could map it too).
///
/// `@unchecked Sendable`: the mapping's address and size never change; what lives in it is
/// shared with the guest by design and accessed with the ring protocol's atomics.
public final class GuestMemory: @unchecked Sendable {
    public let base: UnsafeMutableRawPointer
    public let size: Int

    /// Maps `size` bytes of zeroed shared memory.
    public init(size: Int) throws(DeviceError) {
        let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0)
        guard let p, p != MAP_FAILED else { throw DeviceError("cannot map \(size) bytes of guest memory: errno \(errno)") }
        base = p
        self.size = size
    }

    deinit { munmap(base, size) }

    /// The host address of guest range [addr, addr+length), or nil if it leaves the region.
    @inline(__always)
    public func pointer(at addr: UInt64, length: Int) -> UnsafeMutableRawPointer? {
        guard length >= 0, addr <= UInt64(size), UInt64(length) <= UInt64(size) - addr else { return nil }
        return base + Int(addr)
    }
}

/// An error a device reports to its caller (bad configuration, wrong state).
public struct DeviceError: Error, Equatable, CustomStringConvertible, Sendable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
