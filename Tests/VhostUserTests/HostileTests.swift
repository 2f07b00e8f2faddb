import Aio
import CShims
import Devices
import Glibc
import IOThreads
import TestSupport
import Testing

@testable import VhostUser

/// Drives a ring by hand: descriptor chains a real driver would never build.
final class RawDriver {
    let ring: SplitRing
    let memory: GuestMemory
    let kick: EventNotifier
    var availIdx: UInt16

    init(_ fe: FrontEnd, queue: Int = 0) {
        ring = fe.guests[queue].ring
        memory = fe.ram.memory
        kick = fe.kicks[queue]
        availIdx = ring.availIdx
    }

    func bytes(at gpa: UInt64, _ n: Int) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: memory.pointer(at: gpa, length: n)!, count: n)
    }

    func header(at gpa: UInt64, type: UInt32, sector: UInt64) {
        let h = bytes(at: gpa, 16)
        h.storeBytes(of: type, toByteOffset: 0, as: UInt32.self)
        h.storeBytes(of: 0, toByteOffset: 4, as: UInt32.self)
        h.storeBytes(of: sector, toByteOffset: 8, as: UInt64.self)
    }

    /// Makes `head` available and kicks; returns the used entry once it arrives.
    func post(_ head: Int) -> (id: UInt32, len: UInt32)? {
        let slot = ring.usedIdx
        ring.setAvailEntry(availIdx, UInt16(head))
        availIdx &+= 1
        ring.publishAvailIdx(availIdx)
        kick.set()
        guard eventually(seconds: 5, { ring.usedIdx != slot }) else { return nil }
        return ring.usedEntry(slot)
    }
}

@Suite("vhost-user-blk: hostile rings and messages", .serialized)
struct HostileTests {
    @Test("hostile descriptor chains get an error status or are handed back; nothing outside the file is written",
          .timeLimit(.minutes(1)), arguments: backendsUnderTest)
    func hostileChains(_ fdmon: AioContext.Backend) async throws {
        try await withRig(fdmon, diskSize: 1 << 20) { rig in
            let fe = try rig.frontEnd()
            try fe.connect(queues: 1)
            try fe.start(queues: 1, features: linuxFeatures(try fe.getU64(.getFeatures)))
            let d = RawDriver(fe)
            let r = d.ring
            let before = rig.disk.bytes
            let hdr: UInt64 = 0x300000, status: UInt64 = 0x300100, data: UInt64 = 0x301000
            let W = SplitRingLayout.descWrite, N = SplitRingLayout.descNext
            func statusByte() -> UInt8 { d.bytes(at: status, 1)[0] }
            func resetStatus() { d.bytes(at: status, 1)[0] = 0xEE }

            // A loop: 0 -> 1 -> 0.
            d.header(at: hdr, type: VirtioBlk.typeOut, sector: 0)
            r.setDescriptor(0, addr: hdr, len: 16, flags: N, next: 1)
            r.setDescriptor(1, addr: data, len: 4096, flags: N, next: 0)
            #expect(d.post(0)?.len == 0, "a loop is handed back untouched")
            // A chain that runs through the whole table and loops back (longer than the queue).
            for i in 2..<64 { r.setDescriptor(i, addr: data, len: 512, flags: N, next: UInt16(i + 1 == 64 ? 2 : i + 1)) }
            #expect(d.post(2)?.len == 0)
            // next out of range.
            r.setDescriptor(0, addr: hdr, len: 16, flags: N, next: 200)
            #expect(d.post(0)?.len == 0)
            // Readable after writable.
            resetStatus()
            r.setDescriptor(0, addr: hdr, len: 16, flags: N, next: 1)
            r.setDescriptor(1, addr: status, len: 1, flags: W | N, next: 2)
            r.setDescriptor(2, addr: data, len: 4096, flags: 0, next: 0)
            #expect(d.post(0)?.len == 0)
            // An indirect descriptor (not offered).
            r.setDescriptor(0, addr: data, len: 64, flags: SplitRingLayout.descIndirect, next: 0)
            #expect(d.post(0)?.len == 0)
            // The status byte in the hole between regions: no status to write.
            r.setDescriptor(0, addr: hdr, len: 16, flags: N, next: 1)
            r.setDescriptor(1, addr: 0xb0000, len: 1, flags: W, next: 0)
            #expect(d.post(0)?.len == 0)

            // Header outside every region, good status: IOERR.
            resetStatus()
            r.setDescriptor(0, addr: 0xa0000, len: 16, flags: N, next: 1)
            r.setDescriptor(1, addr: status, len: 1, flags: W, next: 0)
            #expect(d.post(0)?.len == 1)
            #expect(statusByte() == VirtioBlk.statusIOErr)
            // Data straddling the end of the first region into the hole: IOERR.
            resetStatus()
            d.header(at: hdr, type: VirtioBlk.typeOut, sector: 0)
            r.setDescriptor(0, addr: hdr, len: 16, flags: N, next: 1)
            r.setDescriptor(1, addr: 0x9f800, len: 4096, flags: N, next: 2)
            r.setDescriptor(2, addr: status, len: 1, flags: W, next: 0)
            #expect(d.post(0)?.len == 1)
            #expect(statusByte() == VirtioBlk.statusIOErr)
            // Data far outside guest memory.
            resetStatus()
            r.setDescriptor(1, addr: 1 << 40, len: 4096, flags: N, next: 2)
            #expect(d.post(0)?.len == 1)
            #expect(statusByte() == VirtioBlk.statusIOErr)
            // A zero-length buffer.
            resetStatus()
            r.setDescriptor(1, addr: data, len: 0, flags: N, next: 2)
            #expect(d.post(0)?.len == 1)
            #expect(statusByte() == VirtioBlk.statusIOErr)
            // A write past the end of the disk (and one whose sector overflows).
            for sector in [UInt64(2048 - 4), UInt64.max - 2] {
                resetStatus()
                d.header(at: hdr, type: VirtioBlk.typeOut, sector: sector)
                r.setDescriptor(1, addr: data, len: 4096, flags: N, next: 2)
                #expect(d.post(0)?.len == 1)
                #expect(statusByte() == VirtioBlk.statusIOErr)
            }
            // Not a whole number of sectors.
            resetStatus()
            d.header(at: hdr, type: VirtioBlk.typeOut, sector: 0)
            r.setDescriptor(1, addr: data, len: 100, flags: N, next: 2)
            #expect(d.post(0)?.len == 1)
            #expect(statusByte() == VirtioBlk.statusIOErr)
            // A header shorter than 16 bytes.
            resetStatus()
            r.setDescriptor(0, addr: hdr, len: 8, flags: N, next: 2)
            #expect(d.post(0)?.len == 1)
            #expect(statusByte() == VirtioBlk.statusIOErr)

            #expect(rig.disk.bytes == before, "no hostile request wrote anything")
            #expect(rig.disk.currentSize == 1 << 20, "nor past the end of the file")
            #expect(rig.export.queueStatistics(0)?.isBroken == false)

            // A well-formed request whose data straddles two adjacent regions is split and works,
            // and the header may be split from its data anywhere.
            let split: UInt64 = 0x200000 - 1024
            let p = pattern(7)
            p.withUnsafeBytes { src in
                d.bytes(at: split, 1024).copyMemory(from: UnsafeRawBufferPointer(rebasing: src[0..<1024]))
                d.bytes(at: 0x200000, 3072).copyMemory(from: UnsafeRawBufferPointer(rebasing: src[1024...]))
            }
            resetStatus()
            d.header(at: hdr, type: VirtioBlk.typeOut, sector: 8)
            r.setDescriptor(0, addr: hdr, len: 10, flags: N, next: 1)
            r.setDescriptor(1, addr: hdr + 10, len: 6, flags: N, next: 2)
            r.setDescriptor(2, addr: split, len: 4096, flags: N, next: 3)
            r.setDescriptor(3, addr: status, len: 1, flags: W, next: 0)
            #expect(d.post(0)?.len == 1)
            #expect(statusByte() == VirtioBlk.statusOK)
            #expect(rig.disk.read(at: 8 * 512, count: 4096) == p)
            // Read it back into a buffer that also carries the status byte at its end.
            d.header(at: hdr, type: VirtioBlk.typeIn, sector: 8)
            d.bytes(at: 0x310000, 4097).initializeMemory(as: UInt8.self, repeating: 0)
            r.setDescriptor(0, addr: hdr, len: 16, flags: N, next: 1)
            r.setDescriptor(1, addr: 0x310000, len: 4097, flags: W, next: 0)
            #expect(d.post(0)?.len == 4097)
            #expect(Array(d.bytes(at: 0x310000, 4096)) == p)
            #expect(d.bytes(at: 0x310000 + 4096, 1)[0] == VirtioBlk.statusOK)

            // Finally the avail index jumps by more than the queue size: the queue stops, the
            // session and the export live on.
            r.publishAvailIdx(d.availIdx &+ 200)
            d.kick.set()
            #expect(eventually { rig.export.queueStatistics(0)?.isBroken == true })
            #expect(try fe.getU64(.getQueueNum) == 1, "the control channel still answers")
            #expect(try fe.stop(queues: 1).count == 1)
            #expect(rig.export.isConnected)
        }
    }

    @Test("bad messages close the connection and release their fds; the export keeps listening",
          .timeLimit(.minutes(1)), arguments: backendsUnderTest)
    func badMessages(_ fdmon: AioContext.Backend) async throws {
        try await withRig(fdmon) { rig in
            // The fds the bad messages carry: a memfd of its own (and the guest RAM's), so that
            // descriptors other tests open meanwhile do not count.
            let tracer = dp_memfd_create("tracer")
            defer { close(tracer) }
            let e = (fileDescriptor: tracer, ())
            let ram = rig.ram
            let regions = ram.regions
            func table(_ rs: [GuestMemory.Region], count: Int? = nil) -> [UInt8] {
                var p = u32(UInt32(count ?? rs.count)) + u32(0)
                for r in rs { p += u64(r.guestPhysicalAddress) + u64(r.size) + u64(r.userAddress) + u64(r.mmapOffset) }
                return p
            }
            let cases: [(String, (FrontEnd) throws -> Void)] = [
                ("GET_FEATURES with a payload", { try $0.send(.getFeatures, payload: u64(0)) }),
                ("GET_FEATURES with an fd", { try $0.send(.getFeatures, fds: [e.fileDescriptor]) }),
                ("SET_VRING_NUM with 4 bytes", { try $0.send(.setVringNum, payload: u32(0)) }),
                ("size beyond the bound", { try $0.send(VhostUserRequest.getFeatures.rawValue, sizeField: 5000) }),
                ("an unknown request", { try $0.send(99) }),
                ("VHOST_USER_NONE", { try $0.send(0) }),
                ("version 2", { try $0.send(.getFeatures, flags: 0x2) }),
                ("a request flagged as a reply", { try $0.send(.getFeatures, flags: 0x5) }),
                ("queue index out of range", { try $0.state(.setVringNum, index: 5, num: 64) }),
                ("queue size not a power of 2", { try $0.state(.setVringNum, index: 0, num: 100) }),
                ("queue size too large", { try $0.state(.setVringNum, index: 0, num: 65536) }),
                ("SET_MEM_TABLE with fewer fds than regions", { try $0.send(.setMemTable, payload: table(regions), fds: [ram.fd]) }),
                ("SET_MEM_TABLE with a lying count", { try $0.send(.setMemTable, payload: table(regions, count: 9), fds: [ram.fd]) }),
                ("SET_MEM_TABLE region overflowing 64 bits", {
                    try $0.send(.setMemTable, payload: table([.init(guestPhysicalAddress: .max - 10, size: 4096, userAddress: 0, mmapOffset: 0)]),
                                fds: [ram.fd])
                }),
                ("SET_MEM_TABLE region beyond the memfd", {
                    try $0.send(.setMemTable, payload: table([.init(guestPhysicalAddress: 0, size: 1 << 40, userAddress: 0, mmapOffset: 0)]),
                                fds: [ram.fd])
                }),
                ("SET_VRING_ADDR before any memory table", {
                    try $0.state(.setVringNum, index: 0, num: 64)
                    try $0.setVringAddr(0, ram.ringLayout(queue: 0, size: 64))
                }),
                ("SET_VRING_ADDR outside every region", {
                    try $0.setMemTable(ack: false)
                    try $0.state(.setVringNum, index: 0, num: 64)
                    try $0.setVringAddr(0, SplitRingLayout(size: 64, descAddr: 0xa0000, availAddr: 0xa1000, usedAddr: 0xa2000))
                }),
                ("SET_VRING_ADDR straddling two regions", {
                    try $0.setMemTable(ack: false)
                    try $0.state(.setVringNum, index: 0, num: 64)
                    try $0.setVringAddr(0, SplitRingLayout(size: 64, descAddr: 0x200000 - 512, availAddr: 0x300000, usedAddr: 0x301000))
                }),
                ("SET_VRING_ADDR misaligned", {
                    try $0.setMemTable(ack: false)
                    try $0.state(.setVringNum, index: 0, num: 64)
                    try $0.setVringAddr(0, SplitRingLayout(size: 64, descAddr: 0x300000, availAddr: 0x301000, usedAddr: 0x302001))
                }),
                ("SET_VRING_KICK with two fds", { try $0.setU64(.setVringKick, 0, fds: [e.fileDescriptor, e.fileDescriptor]) }),
                ("SET_VRING_CALL for queue 7", { try $0.setU64(.setVringCall, 7, fds: [e.fileDescriptor]) }),
                ("SET_LOG_BASE (not offered)", { try $0.send(.setLogBase, payload: u64(0) + u64(0), fds: [e.fileDescriptor]) }),
                ("SET_PROTOCOL_FEATURES with bits not offered", { try $0.setU64(.setProtocolFeatures, 1 << 12) }),
                ("SET_FEATURES with bits not offered", { try $0.setU64(.setFeatures, 1 << 28) }),
                ("SET_VRING_ENABLE with 2", { try $0.state(.setVringEnable, index: 0, num: 2) }),
                ("GET_CONFIG beyond the config space", { try $0.send(.getConfig, payload: u32(250) + u32(10) + u32(0) + [UInt8](repeating: 0, count: 10)) }),
                ("nine fds on one message", { fe in
                    // Split over two sendmsg calls: the header bytes carry 8 fds, the rest 1.
                    let fds = [Int32](repeating: e.fileDescriptor, count: 8)
                    var h = u32(VhostUserRequest.getFeatures.rawValue) + u32(1) + u32(0)
                    _ = h.withUnsafeBytes { b in fds.withUnsafeBufferPointer { dp_send_with_fds(fe.sock, b.baseAddress, 6, $0.baseAddress, 8) } }
                    h.removeFirst(6)
                    _ = h.withUnsafeBytes { b in [e.fileDescriptor].withUnsafeBufferPointer { dp_send_with_fds(fe.sock, b.baseAddress, 6, $0.baseAddress, 1) } }
                }),
            ]
            for (name, body) in cases {
                let fe = try rig.frontEnd()
                try body(fe)
                #expect(fe.closedByPeer(), "\(name): the connection is closed (errno \(fe.lastErrno))")
                #expect(eventually { !rig.export.isConnected }, "\(name)")
            }
            // Every fd the bad messages carried was closed by the back end.
            #expect(eventually { openFDs(sameAs: tracer) == 1 && openFDs(sameAs: ram.fd) == 1 },
                    "back-end copies left: \(openFDs(sameAs: tracer) - 1) and \(openFDs(sameAs: ram.fd) - 1)")
            // A message split across reads is fine; the export still serves a front end.
            let fe = try rig.frontEnd()
            let h = u32(VhostUserRequest.getQueueNum.rawValue) + u32(1) + u32(0)
            _ = h.withUnsafeBytes { send(fe.sock, $0.baseAddress, 5, 0) }
            // The second part only once the export has read the first (our send queue is empty
            // then), so that the message really arrives in two reads.
            #expect(eventually { unreadBytes(fe.sock) == 0 }, "the export read the first 5 bytes")
            _ = h.withUnsafeBytes { send(fe.sock, $0.baseAddress! + 5, 7, 0) }
            #expect(try fe.receive(.getQueueNum) == u64(1))
            try fe.connect(queues: 1)
            #expect(rig.export.connectionCount == cases.count + 1)
            #expect(rig.export.errors.count >= cases.count)

        }
    }

    @Test("a second front end is refused at once while the first is served", .timeLimit(.minutes(1)))
    func secondFrontEnd() async throws {
        try await withRig(.automatic) { rig in
            let fe = try rig.frontEnd()
            #expect(try fe.getU64(.getQueueNum) == 1)
            let second = try rig.frontEnd()
            #expect(second.closedByPeer())
            #expect(try fe.getU64(.getQueueNum) == 1, "the first is still served")
            #expect(rig.export.refusedConnections == 1)
        }
    }

    @Test("a front end that closes and connects again at once is served, not refused as a second one",
          .timeLimit(.minutes(1)), arguments: backendsUnderTest)
    func immediateReconnect(_ fdmon: AioContext.Backend) async throws {
        try await withRig(fdmon) { rig in
            for round in 0..<100 {
                // Each front end is dropped (its socket closed) at the end of the round, and the
                // next one connects at once: the export may see the new connection before the
                // end of the old one.
                let fe = try rig.frontEnd()
                #expect(try fe.getU64(.getQueueNum) == 1, "round \(round)")
            }
            #expect(rig.export.refusedConnections == 0)
            #expect(rig.export.connectionCount == 100)
        }
    }

    @Test("an identical memory table while rings run is just acked; I/O goes on", .timeLimit(.minutes(1)),
          arguments: backendsUnderTest)
    func memTableAgain(_ fdmon: AioContext.Backend) async throws {
        try await withRig(fdmon) { rig in
            let fe = try rig.frontEnd()
            try fe.connect(queues: 1)
            try fe.start(queues: 1, features: linuxFeatures(try fe.getU64(.getFeatures)))
            try fe.setMemTable()
            let g = fe.guests[0]
            g.submit(id: 1, type: VirtioBlk.typeOut, sector: 0) { pattern(3).withUnsafeBytes($0.copyMemory) }
            var s: UInt8 = 0xFF
            #expect(reap(g, count: 1) { _, st, _, _ in s = st } == 1)
            #expect(s == VirtioBlk.statusOK)
            #expect(rig.export.connectionCount == 1 && rig.export.isConnected)
        }
    }
}

/// What this end of a UNIX stream socket sent that the peer has not read yet (SIOCOUTQ: the
/// memory of the messages still queued, 0 once the peer has read them all); -1 on error.
func unreadBytes(_ sock: Int32) -> Int32 {
    var n: Int32 = 0
    return ioctl(sock, UInt(TIOCOUTQ), &n) == 0 ? n : -1
}

/// Descriptors open in this process on the same file as `fd` (counting `fd`).
func openFDs(sameAs fd: Int32) -> Int {
    var ref = stat()
    guard fstat(fd, &ref) == 0, let d = opendir("/proc/self/fd") else { return -1 }
    defer { closedir(d) }
    var n = 0
    while let entry = readdir(d) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        guard let other = Int32(name) else { continue }
        var st = stat()
        if fstat(other, &st) == 0 && st.st_dev == ref.st_dev && st.st_ino == ref.st_ino { n += 1 }
    }
    return n
}
