// A test-side vhost-user front end: what QEMU 7.2 does on the socket, over a real UNIX
// socket, with real memfd guest memory and real eventfds passed as SCM_RIGHTS. Its guest side
// is the Devices module's GuestQueue over the same memfd, mapped a second time here.
import Aio
import CShims
import Devices
import Glibc
import IOThreads
import TestSupport
import Testing

@testable import VhostUser

struct TestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// A temporary disk image, removed on deinit.
final class DiskImage {
    let path: String
    let fd: Int32
    let size: Int

    init(size: Int, fill: UInt8 = 0) throws {
        var template = Array("/tmp/dataplane-vhost-disk-XXXXXX".utf8CString)
        fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else { throw TestFailure("mkstemp failed") }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)  // exit tests running meanwhile must not inherit it
        path = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        self.size = size
        let bytes = [UInt8](repeating: fill, count: size)
        _ = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
    }

    deinit {
        close(fd)
        unlink(path)
    }

    func read(at offset: Int, count: Int) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: count)
        _ = b.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
        return b
    }

    var bytes: [UInt8] { read(at: 0, count: size) }

    var currentSize: Int {
        var st = stat()
        fstat(fd, &st)
        return Int(st.st_size)
    }
}

func temporarySocketPath(_ name: String) -> String {
    "/tmp/dp-vhost-\(getpid())-\(name)-\(UInt32.random(in: 0...UInt32.max)).sock"
}

/// Guest RAM as q35 lays it out, scaled down: [0, 640 KiB), a hole, then [768 KiB, 2 MiB)
/// and [2 MiB, 4 MiB) as two adjacent regions, all in one memfd at file offset = gpa.
final class GuestRAM {
    let fd: Int32
    let memory: GuestMemory
    static let size: UInt64 = 4 << 20
    /// The front end's virtual address of gpa 0 (any number: the back end only translates).
    static let userBase: UInt64 = 0x7f00_0000_0000
    let regions: [GuestMemory.Region] = [
        .init(guestPhysicalAddress: 0, size: 0xa0000, userAddress: userBase, mmapOffset: 0),
        .init(guestPhysicalAddress: 0xc0000, size: 0x200000 - 0xc0000, userAddress: userBase + 0xc0000, mmapOffset: 0xc0000),
        .init(guestPhysicalAddress: 0x200000, size: 0x200000, userAddress: userBase + 0x200000, mmapOffset: 0x200000),
    ]

    init() throws {
        fd = dp_memfd_create("guest-ram")
        guard fd >= 0, ftruncate(fd, off_t(GuestRAM.size)) == 0 else { throw TestFailure("memfd") }
        memory = try GuestMemory(regions: regions, fds: [fd, fd, fd])
    }

    deinit { close(fd) }

    /// Ring of queue q: in the second region. Buffers: in the third.
    func ringLayout(queue q: Int, size: Int) -> SplitRingLayout {
        SplitRingLayout.at(0xc0000 + UInt64(q) * 0x10000, size: size).0
    }
    func bufferBase(queue q: Int) -> UInt64 { 0x200000 + UInt64(q) * 0x40000 }
}

/// The front end's end of the socket.
final class FrontEnd {
    let sock: Int32
    let ram: GuestRAM
    var kicks: [EventNotifier] = []
    var calls: [EventNotifier] = []
    var guests: [GuestQueue] = []
    let queueSize: Int

    init(path: String, ram: GuestRAM, queueSize: Int = 64) throws {
        var fd: Int32 = -1
        // The export's listener is registered asynchronously; retry briefly.
        _ = eventually(seconds: 5) {
            fd = dp_unix_connect(path)
            return fd >= 0
        }
        guard fd >= 0 else { throw TestFailure("cannot connect to \(path): \(-fd)") }
        sock = fd
        self.ram = ram
        self.queueSize = queueSize
        var tv = timeval(tv_sec: 10, tv_usec: 0)  // a test never hangs on a missing reply
        setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { close(sock) }

    /// Takes over the guest side of a front end that went away (QEMU reconnecting keeps its
    /// guest, its rings and its eventfds).
    func adoptGuest(_ guest: (kicks: [EventNotifier], calls: [EventNotifier], guests: [GuestQueue])) {
        kicks = guest.kicks
        calls = guest.calls
        guests = guest.guests
    }

    var guestSide: (kicks: [EventNotifier], calls: [EventNotifier], guests: [GuestQueue]) { (kicks, calls, guests) }

    func send(_ request: UInt32, flags: UInt32 = VhostUser.version, payload: [UInt8] = [], fds: [Int32] = [],
              sizeField: UInt32? = nil) throws {
        var bytes = [UInt8](repeating: 0, count: 12)
        bytes.withUnsafeMutableBytes { h in
            h.storeBytes(of: request, toByteOffset: 0, as: UInt32.self)
            h.storeBytes(of: flags, toByteOffset: 4, as: UInt32.self)
            h.storeBytes(of: sizeField ?? UInt32(payload.count), toByteOffset: 8, as: UInt32.self)
        }
        bytes += payload
        let n = bytes.withUnsafeBytes { b in fds.withUnsafeBufferPointer { dp_send_with_fds(sock, b.baseAddress, b.count, $0.baseAddress, Int32(fds.count)) } }
        guard n == bytes.count else { throw TestFailure("send \(request): \(n)") }
    }

    func send(_ r: VhostUserRequest, flags: UInt32 = VhostUser.version, payload: [UInt8] = [], fds: [Int32] = []) throws {
        try send(r.rawValue, flags: flags, payload: payload, fds: fds)
    }

    func readExactly(_ n: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: n)
        var got = 0
        while got < n {
            let r = out.withUnsafeMutableBytes { recv(sock, $0.baseAddress! + got, n - got, 0) }
            if r == 0 { throw TestFailure("connection closed") }
            if r < 0 {
                if errno == EINTR { continue }
                throw TestFailure("recv: errno \(errno)")
            }
            got += r
        }
        return out
    }

    /// Reads one reply and checks QEMU's rules: request echoed, flags exactly 0x5.
    func receive(_ r: VhostUserRequest) throws -> [UInt8] {
        let h = try readExactly(12)
        let request = h.withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) }
        let flags = h.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 4, as: UInt32.self) }
        let size = h.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 8, as: UInt32.self) }
        guard request == r.rawValue else { throw TestFailure("Received unexpected msg type. Expected \(r.rawValue) received \(request)") }
        guard flags == 0x5 else { throw TestFailure("Flags 0x\(String(flags, radix: 16)) instead of 0x5") }
        return try readExactly(Int(size))
    }

    func getU64(_ r: VhostUserRequest) throws -> UInt64 {
        try send(r)
        let p = try receive(r)
        guard p.count == 8 else { throw TestFailure("Received bad msg size.") }
        return p.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }
    }

    func setU64(_ r: VhostUserRequest, _ v: UInt64, ack: Bool = false, fds: [Int32] = []) throws {
        try send(r, flags: ack ? 0x9 : 0x1, payload: u64(v), fds: fds)
        if ack {
            let p = try receive(r)
            guard p == u64(0) else { throw TestFailure("\(r) nacked: \(p)") }
        }
    }

    func state(_ r: VhostUserRequest, index: Int, num: UInt32) throws {
        try send(r, payload: u32(UInt32(index)) + u32(num))
    }

    /// Whether the back end closed the connection (reads EOF within the receive timeout).
    func closedByPeer() -> Bool {
        var b = [UInt8](repeating: 0, count: 64)
        while true {
            let r = recv(sock, &b, 64, 0)
            if r == 0 { return true }
            if r < 0 {
                if errno == EINTR { continue }
                if errno != ECONNRESET { lastErrno = errno }
                return errno == ECONNRESET
            }
        }
    }
    /// The errno of the last failed closedByPeer (diagnostics).
    var lastErrno: Int32 = 0

    // MARK: - QEMU 7.2's sequences (hw/virtio/vhost-user.c, as traced against QEMU 7.2)

    /// A. Connect: what QEMU does at device realize. Returns the config bytes.
    @discardableResult
    func connect(queues: Int, configBytes: Int = 57) throws -> [UInt8] {
        let features = try getU64(.getFeatures)
        guard features & VirtioBlkFeature.version1 != 0, features & VhostUser.protocolFeaturesBit != 0 else {
            throw TestFailure("features 0x\(String(features, radix: 16))")
        }
        let pf = try getU64(.getProtocolFeatures)
        try setU64(.setProtocolFeatures, pf & 0xffff)
        let n = try getU64(.getQueueNum)
        guard n >= UInt64(queues) else { throw TestFailure("The maximum number of queues supported by the backend is \(n)") }
        try send(.setOwner)
        _ = try getU64(.getFeatures)
        // The guest's eventfds (KVM's ioeventfd and irqfd) outlive a back-end reconnect.
        if kicks.isEmpty {
            kicks = try (0..<queues).map { _ in try EventNotifier() }
            calls = try (0..<queues).map { _ in try EventNotifier() }
        }
        for q in 0..<queues {
            try setU64(.setVringCall, UInt64(q), fds: [calls[q].fileDescriptor])
            let err = try EventNotifier()
            try setU64(.setVringErr, UInt64(q), fds: [err.fileDescriptor])
        }
        try send(.getConfig, payload: u32(0) + u32(UInt32(configBytes)) + u32(0) + [UInt8](repeating: 0, count: configBytes))
        let c = try receive(.getConfig)
        guard c.count == 12 + configBytes else { throw TestFailure("Received bad msg size.") }
        return Array(c[12...])
    }

    /// B. Device start, with each queue resuming at `bases[q]`.
    func start(queues: Int, features: UInt64, bases: [UInt16]? = nil) throws {
        try setU64(.setFeatures, features)
        for q in 0..<queues { try setU64(.setVringCall, UInt64(q), fds: [calls[q].fileDescriptor]) }
        try setU64(.setFeatures, features)
        try setMemTable()
        let keepGuests = guests.count == queues  // the guest side survives a reconnect
        if !keepGuests { guests = [] }
        for q in 0..<queues {
            let l = ram.ringLayout(queue: q, size: queueSize)
            try state(.setVringNum, index: q, num: UInt32(queueSize))
            try state(.setVringBase, index: q, num: UInt32(bases?[q] ?? 0))
            try setVringAddr(q, l)
            try setU64(.setVringKick, UInt64(q), fds: [kicks[q].fileDescriptor])
            if !keepGuests {
                guests.append(try GuestQueue(memory: ram.memory, layout: l, kick: kicks[q], interrupt: calls[q],
                                             bufferBase: ram.bufferBase(queue: q)))
            }
        }
        for q in 0..<queues { try state(.setVringEnable, index: q, num: 1) }
    }

    func setMemTable(ack: Bool = true) throws {
        var p = u32(UInt32(ram.regions.count)) + u32(0)
        for r in ram.regions { p += u64(r.guestPhysicalAddress) + u64(r.size) + u64(r.userAddress) + u64(r.mmapOffset) }
        try send(.setMemTable, flags: ack ? 0x9 : 0x1, payload: p, fds: ram.regions.map { _ in ram.fd })
        if ack {
            let a = try receive(.setMemTable)
            guard a == u64(0) else { throw TestFailure("SET_MEM_TABLE nacked") }
        }
    }

    func setVringAddr(_ q: Int, _ l: SplitRingLayout) throws {
        let u = GuestRAM.userBase
        try send(.setVringAddr, payload: u32(UInt32(q)) + u32(0) + u64(u + l.descAddr) + u64(u + l.usedAddr)
                 + u64(u + l.availAddr) + u64(l.usedAddr))
    }

    /// C. Device stop: disable every queue, then GET_VRING_BASE for each started one.
    func stop(queues: Int) throws -> [UInt32] {
        for q in 0..<queues { try state(.setVringEnable, index: q, num: 0) }
        var bases: [UInt32] = []
        for q in 0..<queues {
            try state(.getVringBase, index: q, num: 0)
            let p = try receive(.getVringBase)
            guard p.count == 8 else { throw TestFailure("Received bad msg size.") }
            bases.append(p.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 4, as: UInt32.self) })
        }
        return bases
    }
}

func u32(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
func u64(_ v: UInt64) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }

func pattern(_ seed: Int, _ count: Int = 4096) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: seed &* 131 &+ $0 &* 7 &+ 1) }
}
