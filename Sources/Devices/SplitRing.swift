// A virtio split virtqueue laid out in guest memory (virtio 1.x, §2.7): descriptor table,
// available ring, used ring, with the notification-suppression flags
// (VRING_USED_F_NO_NOTIFY, VRING_AVAIL_F_NO_INTERRUPT). No event-idx.
//
// Ordering (what the guest and the device each publish, and how):
// - guest: write descriptors and the avail ring entry, then store-release avail.idx; then a
//   full fence and read used.flags to decide whether to kick (pairs with the device setting
//   NO_NOTIFY before its last poll).
// - device: load-acquire avail.idx before reading entries; write the used entry, then
//   store-release used.idx; then a full fence and read avail.flags to decide whether to
//   interrupt.
import CShims

/// The layout of one split ring inside guest memory.
public struct SplitRingLayout: Sendable, Equatable {
    public let size: Int  // entries (a power of two)
    public let descAddr: UInt64
    public let availAddr: UInt64
    public let usedAddr: UInt64

    /// A layout from the three addresses a driver chose (vhost-user's SET_VRING_ADDR).
    public init(size: Int, descAddr: UInt64, availAddr: UInt64, usedAddr: UInt64) {
        self.size = size
        self.descAddr = descAddr
        self.availAddr = availAddr
        self.usedAddr = usedAddr
    }

    public static let noNotify: UInt16 = 1  // VRING_USED_F_NO_NOTIFY
    public static let noInterrupt: UInt16 = 1  // VRING_AVAIL_F_NO_INTERRUPT
    public static let descNext: UInt16 = 1  // VRING_DESC_F_NEXT
    public static let descWrite: UInt16 = 2  // VRING_DESC_F_WRITE
    public static let descIndirect: UInt16 = 4  // VRING_DESC_F_INDIRECT

    /// Lays a ring of `size` entries out at `base`; returns the layout and the end offset.
    public static func at(_ base: UInt64, size: Int) -> (SplitRingLayout, UInt64) {
        precondition(size > 0 && size & (size - 1) == 0 && size <= 32768, "BUG DETECTED: queue size \(size) is not a power of two <= 32768")
        let desc = (base + 15) & ~15
        let avail = desc + UInt64(16 * size)
        let used = (avail + UInt64(6 + 2 * size) + 3) & ~3
        let end = used + UInt64(6 + 8 * size)
        return (SplitRingLayout(size: size, descAddr: desc, availAddr: avail, usedAddr: used), end)
    }
}

/// Typed access to a ring in mapped memory. All addresses were checked against the region
/// when the view was made (the ring itself lies inside it).
///
/// `@unchecked Sendable`: a view is a pair of pointers; the memory is shared by design and
/// every cross-party field is accessed with the atomics below.
public struct SplitRing: @unchecked Sendable {
    public let layout: SplitRingLayout
    let desc: UnsafeMutableRawPointer
    let avail: UnsafeMutableRawPointer
    let used: UnsafeMutableRawPointer
    let mask: Int

    /// A view of the ring at `layout`, whose addresses are in `space`. Each of the three
    /// parts must lie whole inside one region and be aligned as virtio requires (descriptor
    /// table 16, avail ring 2, used ring 4), in guest and in host addresses: a misaligned load
    /// would trap.
    /// - Throws: ``DeviceError`` naming the part that does not fit or is misaligned.
    public init(memory: GuestMemory, layout: SplitRingLayout, in space: GuestMemory.AddressSpace = .guestPhysical)
        throws(DeviceError)
    {
        guard layout.size > 0, layout.size <= 32768, layout.size & (layout.size - 1) == 0 else {
            throw DeviceError("virtqueue size \(layout.size) is not a power of 2 in [1, 32768]")
        }
        func part(_ name: String, _ addr: UInt64, _ length: Int, _ align: Int) throws(DeviceError) -> UnsafeMutableRawPointer {
            guard let p = memory.pointer(at: addr, length: length, in: space) else {
                throw DeviceError("virtqueue \(name) (\(length) bytes at 0x\(String(addr, radix: 16))) is not inside one guest memory region")
            }
            guard addr % UInt64(align) == 0, Int(bitPattern: p) % align == 0 else {
                throw DeviceError("virtqueue \(name) at 0x\(String(addr, radix: 16)) is not \(align)-byte aligned")
            }
            return p
        }
        let d = try part("descriptor table", layout.descAddr, 16 * layout.size, 16)
        let a = try part("avail ring", layout.availAddr, 6 + 2 * layout.size, 2)
        let u = try part("used ring", layout.usedAddr, 6 + 8 * layout.size, 4)
        self.layout = layout
        desc = d
        avail = a
        used = u
        mask = layout.size - 1
    }

    @inline(__always) func u16(_ p: UnsafeMutableRawPointer) -> UnsafeMutablePointer<UInt16> {
        p.assumingMemoryBound(to: UInt16.self)
    }

    // Descriptors (written by the guest before it publishes avail.idx).
    @inline(__always) public func descriptor(_ i: Int) -> (addr: UInt64, len: UInt32, flags: UInt16, next: UInt16) {
        let p = desc + 16 * (i & mask)
        return (p.loadUnaligned(as: UInt64.self), p.loadUnaligned(fromByteOffset: 8, as: UInt32.self),
                p.loadUnaligned(fromByteOffset: 12, as: UInt16.self), p.loadUnaligned(fromByteOffset: 14, as: UInt16.self))
    }

    @inline(__always) public func setDescriptor(_ i: Int, addr: UInt64, len: UInt32, flags: UInt16, next: UInt16) {
        let p = desc + 16 * (i & mask)
        p.storeBytes(of: addr, as: UInt64.self)
        p.storeBytes(of: len, toByteOffset: 8, as: UInt32.self)
        p.storeBytes(of: flags, toByteOffset: 12, as: UInt16.self)
        p.storeBytes(of: next, toByteOffset: 14, as: UInt16.self)
    }

    // Available ring.
    @inline(__always) public var availFlags: UInt16 { dp_load_relaxed_u16(u16(avail)) }
    @inline(__always) public func setAvailFlags(_ v: UInt16) { dp_store_relaxed_u16(u16(avail), v) }
    /// Acquire: the entries and descriptors before it are visible.
    @inline(__always) public var availIdx: UInt16 { dp_load_acquire_u16(u16(avail + 2)) }
    /// Release: publishes the entries and descriptors written before.
    @inline(__always) public func publishAvailIdx(_ v: UInt16) { dp_store_release_u16(u16(avail + 2), v) }
    @inline(__always) public func availEntry(_ i: UInt16) -> UInt16 { u16(avail + 4)[Int(i) & mask] }
    @inline(__always) public func setAvailEntry(_ i: UInt16, _ head: UInt16) { u16(avail + 4)[Int(i) & mask] = head }

    // Used ring.
    @inline(__always) public var usedFlags: UInt16 { dp_load_relaxed_u16(u16(used)) }
    @inline(__always) public func setUsedFlags(_ v: UInt16) { dp_store_relaxed_u16(u16(used), v) }
    @inline(__always) public var usedIdx: UInt16 { dp_load_acquire_u16(u16(used + 2)) }
    @inline(__always) public func publishUsedIdx(_ v: UInt16) { dp_store_release_u16(u16(used + 2), v) }
    @inline(__always) public func usedEntry(_ i: UInt16) -> (id: UInt32, len: UInt32) {
        let p = used + 4 + 8 * (Int(i) & mask)
        return (p.load(as: UInt32.self), p.load(fromByteOffset: 4, as: UInt32.self))
    }
    @inline(__always) public func setUsedEntry(_ i: UInt16, id: UInt32, len: UInt32) {
        let p = used + 4 + 8 * (Int(i) & mask)
        p.storeBytes(of: id, as: UInt32.self)
        p.storeBytes(of: len, toByteOffset: 4, as: UInt32.self)
    }
}

/// A full fence (the "then read the other side's flags" step of the protocol).
@inline(__always) public func fullFence() { dp_fence_seq_cst() }
