// Guest memory: a table of mapped regions that a guest and a device both address.
//
// Two kinds of table share one type, so that one virtqueue implementation serves both:
// - one anonymous shared mapping (the load generator's emulated guest), where a
//   guest-physical address is an offset into it;
// - a vhost-user front end's region table (SET_MEM_TABLE): up to 8 regions, each mapped from
//   an fd it passed, each with a guest-physical address (what descriptors carry) and a
//   front-end virtual address (what SET_VRING_ADDR carries).
//
// Every access the device makes on the guest's behalf is translated here and bounds-checked
// against one region: a range that leaves every region, or straddles two, gets nil from
// `pointer(at:length:)`; `piece(at:length:)` returns the part inside one region so that a
// caller may split a buffer that crosses into an adjacent region. A hostile or buggy guest gets
// an error status, never an access outside the mappings. A table never changes once made: a
// new SET_MEM_TABLE makes a new GuestMemory, and the old one is unmapped when its last user
// (a drained queue) lets go of it.
import CShims
import Glibc

/// Guest memory: one or more mapped regions (MAP_SHARED, so another process can map them
/// too).
///
/// `@unchecked Sendable`: the region table and the mappings never change after init; what
/// lives in the mappings is shared with the guest by design and accessed with the ring
/// protocol's atomics.
public final class GuestMemory: @unchecked Sendable {
    /// One region as a vhost-user front end describes it.
    public struct Region: Sendable, Equatable {
        /// Where the guest sees it (descriptor addresses).
        public var guestPhysicalAddress: UInt64
        /// Its length in bytes.
        public var size: UInt64
        /// Where the front end has it mapped (ring addresses of SET_VRING_ADDR).
        public var userAddress: UInt64
        /// Where it starts inside the passed fd.
        public var mmapOffset: UInt64

        public init(guestPhysicalAddress: UInt64, size: UInt64, userAddress: UInt64, mmapOffset: UInt64) {
            self.guestPhysicalAddress = guestPhysicalAddress
            self.size = size
            self.userAddress = userAddress
            self.mmapOffset = mmapOffset
        }
    }

    /// Which address a caller has: descriptors carry guest-physical addresses, a vhost-user
    /// front end's ring addresses are its own virtual addresses.
    public enum AddressSpace: Sendable { case guestPhysical, frontEnd }

    struct Mapped {
        var region: Region
        /// The host address of the region's first byte.
        var host: UnsafeMutableRawPointer
        /// What to munmap (the mapping starts at a page boundary at or before `host`).
        var mapStart: UnsafeMutableRawPointer
        var mapLength: Int
    }

    let table: ContiguousArray<Mapped>
    /// The regions, in the order given.
    public var regions: [Region] { table.map(\.region) }
    /// Identity of the file behind each region (device, inode), to recognise a table that
    /// is sent again unchanged.
    public let backingFiles: [FileIdentity]

    /// A file's identity.
    public struct FileIdentity: Sendable, Equatable {
        public var device: UInt64
        public var inode: UInt64
        public init(device: UInt64, inode: UInt64) {
            self.device = device
            self.inode = inode
        }
    }

    /// The host address of the first region (for the single-mapping case).
    public var base: UnsafeMutableRawPointer { table[0].host }
    /// Total bytes mapped over all regions.
    public var size: Int { table.reduce(0) { $0 + Int($1.region.size) } }

    /// Maps `size` bytes of zeroed anonymous shared memory as one region at guest-physical
    /// (and front-end) address 0.
    public init(size: Int) throws(DeviceError) {
        let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0)
        guard let p, p != MAP_FAILED else { throw DeviceError("cannot map \(size) bytes of guest memory: errno \(errno)") }
        table = [Mapped(region: Region(guestPhysicalAddress: 0, size: UInt64(size), userAddress: 0, mmapOffset: 0),
                        host: p, mapStart: p, mapLength: size)]
        backingFiles = []
    }

    /// Maps a vhost-user region table: region k from `fds[k]` at its `mmapOffset`. The fds
    /// are not closed here (the caller owns them; the mappings stay valid after they close).
    /// - Throws: ``DeviceError`` for an empty table, a region of size 0, a range that
    ///   overflows 64 bits, regions that overlap (in either address space), or an mmap the
    ///   kernel refuses (nothing stays mapped then).
    public init(regions: [Region], fds: [Int32]) throws(DeviceError) {
        guard !regions.isEmpty, regions.count == fds.count else {
            throw DeviceError("memory table needs one fd per region (\(regions.count) regions, \(fds.count) fds)")
        }
        for (i, r) in regions.enumerated() {
            guard r.size > 0, r.size <= UInt64(Int.max),
                  r.guestPhysicalAddress <= UInt64.max - r.size, r.userAddress <= UInt64.max - r.size,
                  r.mmapOffset <= UInt64(Int64.max) - r.size
            else { throw DeviceError("memory region \(i) is empty or its range overflows") }
            for s in regions[..<i] {
                let gpaOverlap = r.guestPhysicalAddress < s.guestPhysicalAddress + s.size
                    && s.guestPhysicalAddress < r.guestPhysicalAddress + r.size
                let uaOverlap = r.userAddress < s.userAddress + s.size && s.userAddress < r.userAddress + r.size
                guard !gpaOverlap && !uaOverlap else { throw DeviceError("memory region \(i) overlaps another") }
            }
        }
        var mapped = ContiguousArray<Mapped>()
        var files: [FileIdentity] = []
        func unmapAll() { for m in mapped { munmap(m.mapStart, m.mapLength) } }
        for (i, (r, fd)) in zip(regions, fds).enumerated() {
            // A mapping past the end of a file maps, but touching it kills the process with
            // SIGBUS: refuse a region the file does not hold.
            var st = stat()
            if fstat(fd, &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG && r.mmapOffset + r.size > UInt64(st.st_size) {
                unmapAll()
                throw DeviceError("memory region \(i) (\(r.size) bytes at offset \(r.mmapOffset)) is beyond the end of its file (\(st.st_size) bytes)")
            }
            let page = filePageSize(fd)
            let alignedOffset = r.mmapOffset / page * page
            let delta = Int(r.mmapOffset - alignedOffset)
            let length = Int(r.size) + delta
            let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, off_t(alignedOffset))
            guard let p, p != MAP_FAILED else {
                let e = errno
                unmapAll()
                throw DeviceError("cannot map guest memory region (\(r.size) bytes at offset \(r.mmapOffset)): \(String(cString: strerror(e)))")
            }
            mapped.append(Mapped(region: r, host: p + delta, mapStart: p, mapLength: length))
            if fstat(fd, &st) == 0 {
                files.append(FileIdentity(device: UInt64(st.st_dev), inode: UInt64(st.st_ino)))
            } else {
                files.append(FileIdentity(device: 0, inode: 0))
            }
        }
        table = mapped
        backingFiles = files
    }

    deinit { for m in table { munmap(m.mapStart, m.mapLength) } }

    /// Whether `regions` backed by `files` describe exactly this table (a front end sending
    /// the same table again).
    public func isSame(regions: [Region], files: [FileIdentity]) -> Bool {
        self.regions == regions && backingFiles == files
    }

    /// The host address of the range [addr, addr+length) in guest-physical space, or nil if it
    /// does not lie inside one region.
    @inline(__always)
    public func pointer(at addr: UInt64, length: Int) -> UnsafeMutableRawPointer? {
        pointer(at: addr, length: length, in: .guestPhysical)
    }

    /// The host address of [addr, addr+length) in `space`, or nil if the range does not lie
    /// inside one region.
    @inline(__always)
    public func pointer(at addr: UInt64, length: Int, in space: AddressSpace) -> UnsafeMutableRawPointer? {
        guard length >= 0, let (p, available) = piece(at: addr, in: space), UInt64(length) <= available else {
            return nil
        }
        return p
    }

    /// The host address of `addr` and how many bytes from there lie in the same region, or
    /// nil if `addr` is in no region. A buffer that continues past the returned length
    /// continues at `addr + length`, which may be in another region (or in none).
    @inline(__always)
    public func piece(at addr: UInt64, in space: AddressSpace = .guestPhysical) -> (UnsafeMutableRawPointer, UInt64)? {
        var i = 0
        while i < table.count {
            let m = table[i]
            let start = space == .guestPhysical ? m.region.guestPhysicalAddress : m.region.userAddress
            if addr >= start && addr - start < m.region.size {
                let off = addr - start
                return (m.host + Int(off), m.region.size - off)
            }
            i += 1
        }
        return nil
    }
}

/// The page size of the file behind `fd` (a mapping's file offset must be a multiple of it).
func filePageSize(_ fd: Int32) -> UInt64 { UInt64(max(4096, dp_file_page_size(fd))) }
