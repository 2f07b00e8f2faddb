import Aio
import CShims
import Devices
import Glibc
import IOThreads
import TestSupport
import Testing

@testable import VhostUser

/// An export on a fresh IOThread over a temp disk, and a connected front end.
struct Rig {
    let thread: IOThread
    let disk: DiskImage
    let export: Export
    let ram: GuestRAM
    let path: String

    init(_ fdmon: AioContext.Backend, queues: Int = 1, writable: Bool = true, diskSize: Int = 1 << 20,
         backend: BlockBackend? = nil) throws {
        thread = try makeIOThread("iot0", fdmon)
        disk = try DiskImage(size: diskSize)
        path = temporarySocketPath("exp0")
        export = try Export(id: "exp0", backend: backend ?? .file(path: disk.path, direct: false), socketPath: path,
                            iothread: thread, numQueues: queues, writable: writable)
        ram = try GuestRAM()
    }

    func frontEnd() throws -> FrontEnd { try FrontEnd(path: path, ram: ram) }

    func finish() async throws {
        try await export.delete()
        try thread.stop()
    }
}

/// Runs `body` with a rig and always deletes the export and stops the IOThread afterwards
/// (an export dropped without delete() is a programming error that crashes).
func withRig(_ fdmon: AioContext.Backend, queues: Int = 1, writable: Bool = true, diskSize: Int = 1 << 20,
             backend: BlockBackend? = nil, _ body: (Rig) async throws -> Void) async throws {
    let rig = try Rig(fdmon, queues: queues, writable: writable, diskSize: diskSize, backend: backend)
    do {
        try await body(rig)
    } catch {
        if !rig.export.isDeleted { try? await rig.export.delete() }
        try rig.thread.stop()
        throw error
    }
    if !rig.export.isDeleted { try await rig.export.delete() }
    try rig.thread.stop()
}

/// The features QEMU 7.2 acks for a Linux guest, masked to what we offer.
func linuxFeatures(_ offered: UInt64) -> UInt64 { offered & 0x1_7000_7e46 }

@Suite("vhost-user-blk export", .serialized)
struct ExportTests {
    @Test("negotiates like QEMU 7.2; OUT, IN, FLUSH, GET_ID and an unknown type on a real file",
          .timeLimit(.minutes(1)), arguments: backendsUnderTest)
    func basicIO(_ fdmon: AioContext.Backend) async throws {
        let rig = try Rig(fdmon)
        #expect(rig.thread.holders == [.blockNode(name: "exp0")])
        let fe = try rig.frontEnd()
        let config = try fe.connect(queues: 1)
        // capacity (512-byte sectors), seg_max, blk_size, wce, num_queues.
        let cfg = config.withUnsafeBytes { c in
            (c.loadUnaligned(as: UInt64.self), c.loadUnaligned(fromByteOffset: 12, as: UInt32.self),
             c.loadUnaligned(fromByteOffset: 20, as: UInt32.self), c[32], c.loadUnaligned(fromByteOffset: 34, as: UInt16.self))
        }
        #expect(cfg.0 == 2048 && cfg.1 == 126 && cfg.2 == 512 && cfg.3 == 1 && cfg.4 == 1)
        let offered = try fe.getU64(.getFeatures)
        #expect(offered & VirtioBlkFeature.readOnly == 0)
        #expect(offered & (VirtioBlkFeature.flush | VirtioBlkFeature.multiQueue | VirtioBlkFeature.configWCE) != 0)
        try fe.start(queues: 1, features: linuxFeatures(offered))
        let g = fe.guests[0]
        let sectors: [UInt64] = [0, 8, 1000, 2040]
        for (i, s) in sectors.enumerated() {
            g.submit(id: UInt64(i), type: VirtioBlk.typeOut, sector: s) { pattern(Int(s)).withUnsafeBytes($0.copyMemory) }
        }
        var st: [UInt64: (UInt8, UInt32)] = [:]
        #expect(reap(g, count: 4) { id, s, len, _ in st[id] = (s, len) } == 4)
        #expect(st.values.allSatisfy { $0.0 == VirtioBlk.statusOK && $0.1 == 1 }, "\(st)")
        for s in sectors { #expect(rig.disk.read(at: Int(s) * 512, count: 4096) == pattern(Int(s))) }
        g.submit(id: 10, type: VirtioBlk.typeFlush)
        g.submit(id: 11, type: VirtioBlk.typeGetID)
        g.submit(id: 12, type: 77)
        for (i, s) in sectors.enumerated() { g.submit(id: UInt64(20 + i), type: VirtioBlk.typeIn, sector: s) }
        var data: [UInt64: [UInt8]] = [:]
        st = [:]
        #expect(reap(g, count: 7) { id, s, len, slot in
            st[id] = (s, len)
            data[id] = Array(g.data(slot: slot))
        } == 7)
        #expect(st[10]?.0 == VirtioBlk.statusOK)
        #expect(st[11]?.0 == VirtioBlk.statusOK && st[11]?.1 == 21)
        #expect(Array(data[11]!.prefix(20)) == Array("vhost_user_blk".utf8) + [0, 0, 0, 0, 0, 0])
        #expect(st[12]?.0 == VirtioBlk.statusUnsupported)
        for (i, s) in sectors.enumerated() {
            #expect(st[UInt64(20 + i)]?.0 == VirtioBlk.statusOK && st[UInt64(20 + i)]?.1 == 4097)
            #expect(data[UInt64(20 + i)] == pattern(Int(s)))
        }
        #expect(g.unexpectedCompletions == 0)
        // Stop as QEMU does: GET_VRING_BASE answers the next avail index.
        #expect(try fe.stop(queues: 1) == [11])
        try await rig.finish()
        #expect(rig.thread.holders.isEmpty)
        #expect(access(rig.path, F_OK) != 0, "the socket file is removed")
    }

    @Test("discard and write zeroes: one segment, known flags, inside the disk; the file reads zeros after",
          .timeLimit(.minutes(1)), arguments: backendsUnderTest)
    func discardAndWriteZeroes(_ fdmon: AioContext.Backend) async throws {
        try await withRig(fdmon) { rig in
            let fe = try rig.frontEnd()
            let config = try fe.connect(queues: 1)
            let limits = config.withUnsafeBytes { c in
                (c.loadUnaligned(fromByteOffset: 36, as: UInt32.self), c.loadUnaligned(fromByteOffset: 40, as: UInt32.self),
                 c.loadUnaligned(fromByteOffset: 48, as: UInt32.self), c.loadUnaligned(fromByteOffset: 52, as: UInt32.self))
            }
            #expect(limits == (32768, 1, 32768, 1))
            let offered = try fe.getU64(.getFeatures)
            #expect(offered & VirtioBlkFeature.discard != 0 && offered & VirtioBlkFeature.writeZeroes != 0)
            try fe.start(queues: 1, features: linuxFeatures(offered))
            let ones = [UInt8](repeating: 0xA5, count: 1 << 20)
            _ = ones.withUnsafeBytes { pwrite(rig.disk.fd, $0.baseAddress, $0.count, 0) }
            let d = RawDriver(fe)
            let r = d.ring
            let hdr: UInt64 = 0x300000, seg: UInt64 = 0x300040, status: UInt64 = 0x300100
            let N = SplitRingLayout.descNext
            func request(_ type: UInt32, sector: UInt64, count: UInt32, flags: UInt32, segments: Int = 1) -> UInt8? {
                d.header(at: hdr, type: type, sector: 0)
                let b = d.bytes(at: seg, 32)
                for k in 0..<2 {
                    b.storeBytes(of: sector, toByteOffset: 16 * k, as: UInt64.self)
                    b.storeBytes(of: count, toByteOffset: 16 * k + 8, as: UInt32.self)
                    b.storeBytes(of: flags, toByteOffset: 16 * k + 12, as: UInt32.self)
                }
                d.bytes(at: status, 1)[0] = 0xEE
                r.setDescriptor(0, addr: hdr, len: 16, flags: N, next: 1)
                r.setDescriptor(1, addr: seg, len: UInt32(16 * segments), flags: N, next: 2)
                r.setDescriptor(2, addr: status, len: 1, flags: SplitRingLayout.descWrite, next: 0)
                guard d.post(0)?.len == 1 else { return nil }
                return d.bytes(at: status, 1)[0]
            }
            #expect(request(VirtioBlk.typeWriteZeroes, sector: 8, count: 16, flags: 0) == VirtioBlk.statusOK)
            #expect(rig.disk.read(at: 8 * 512, count: 16 * 512) == [UInt8](repeating: 0, count: 16 * 512))
            #expect(rig.disk.read(at: 0, count: 8 * 512) == [UInt8](repeating: 0xA5, count: 8 * 512), "only the range")
            #expect(request(VirtioBlk.typeWriteZeroes, sector: 64, count: 8, flags: VirtioBlk.writeZeroesFlagUnmap) == VirtioBlk.statusOK)
            #expect(rig.disk.read(at: 64 * 512, count: 8 * 512) == [UInt8](repeating: 0, count: 8 * 512))
            #expect(request(VirtioBlk.typeDiscard, sector: 256, count: 128, flags: 0) == VirtioBlk.statusOK)
            #expect(request(VirtioBlk.typeDiscard, sector: 0, count: 8, flags: VirtioBlk.writeZeroesFlagUnmap) == VirtioBlk.statusUnsupported)
            #expect(request(VirtioBlk.typeWriteZeroes, sector: 0, count: 8, flags: 2) == VirtioBlk.statusUnsupported)
            #expect(request(VirtioBlk.typeDiscard, sector: 0, count: 8, flags: 0, segments: 2) == VirtioBlk.statusUnsupported)
            #expect(request(VirtioBlk.typeWriteZeroes, sector: 0, count: 40000, flags: 0) == VirtioBlk.statusIOErr)
            #expect(request(VirtioBlk.typeWriteZeroes, sector: 2047, count: 2, flags: 0) == VirtioBlk.statusIOErr)
            #expect(rig.disk.read(at: 0, count: 8 * 512) == [UInt8](repeating: 0xA5, count: 8 * 512))
            #expect(rig.disk.currentSize == 1 << 20)
        }
    }

    @Test("two queues each serve their own requests", .timeLimit(.minutes(1)), arguments: backendsUnderTest)
    func twoQueues(_ fdmon: AioContext.Backend) async throws {
        let rig = try Rig(fdmon, queues: 2)
        let fe = try rig.frontEnd()
        let config = try fe.connect(queues: 2)
        #expect(config.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 34, as: UInt16.self) } == 2)
        try fe.start(queues: 2, features: linuxFeatures(try fe.getU64(.getFeatures)))
        for q in 0..<2 {
            fe.guests[q].submit(id: UInt64(q), type: VirtioBlk.typeOut, sector: UInt64(q * 8)) { pattern(q).withUnsafeBytes($0.copyMemory) }
        }
        for q in 0..<2 {
            var got: [UInt64] = []
            #expect(reap(fe.guests[q], count: 1) { id, s, _, _ in if s == 0 { got.append(id) } } == 1)
            #expect(got == [UInt64(q)])
            #expect(rig.disk.read(at: q * 8 * 512, count: 4096) == pattern(q))
            #expect(rig.export.queueStatistics(q)?.completions == 1)
        }
        #expect(try fe.stop(queues: 2) == [1, 1])
        try await rig.finish()
    }

    @Test("a read-only export offers VIRTIO_BLK_F_RO and fails writes with IOERR, leaving the file alone",
          .timeLimit(.minutes(1)))
    func readOnly() async throws {
        let rig = try Rig(.automatic, writable: false)
        let fe = try rig.frontEnd()
        try fe.connect(queues: 1)
        let offered = try fe.getU64(.getFeatures)
        #expect(offered & VirtioBlkFeature.readOnly != 0)
        try fe.start(queues: 1, features: offered & ~VhostUser.protocolFeaturesBit | VhostUser.protocolFeaturesBit)
        let before = rig.disk.bytes
        fe.guests[0].submit(id: 1, type: VirtioBlk.typeOut, sector: 0) { pattern(1).withUnsafeBytes($0.copyMemory) }
        fe.guests[0].submit(id: 2, type: VirtioBlk.typeIn, sector: 0)
        var st: [UInt64: UInt8] = [:]
        #expect(reap(fe.guests[0], count: 2) { id, s, _, _ in st[id] = s } == 2)
        #expect(st == [1: VirtioBlk.statusIOErr, 2: VirtioBlk.statusOK])
        #expect(rig.disk.bytes == before)
        try await rig.finish()
    }

    @Test("SET_CONFIG toggles wce as QEMU sends it; anything else is nacked", .timeLimit(.minutes(1)))
    func setConfig() async throws {
        let rig = try Rig(.automatic)
        let fe = try rig.frontEnd()
        try fe.connect(queues: 1)
        try fe.send(.setConfig, flags: 0x9, payload: u32(32) + u32(1) + u32(0) + [0])
        #expect(try fe.receive(.setConfig) == u64(0))
        try fe.send(.getConfig, payload: u32(32) + u32(1) + u32(0) + [0xAA])
        #expect(try fe.receive(.getConfig) == u32(32) + u32(1) + u32(0) + [0])
        try fe.send(.setConfig, flags: 0x9, payload: u32(0) + u32(8) + u32(0) + [UInt8](repeating: 1, count: 8))
        #expect(try fe.receive(.setConfig) == u64(1), "capacity is not writable")
        // Writes still work with the write cache off (each is made durable before completing).
        try fe.start(queues: 1, features: linuxFeatures(try fe.getU64(.getFeatures)))
        fe.guests[0].submit(id: 1, type: VirtioBlk.typeOut, sector: 16) { pattern(16).withUnsafeBytes($0.copyMemory) }
        var status: UInt8 = 0xFF
        #expect(reap(fe.guests[0], count: 1) { _, s, _, _ in status = s } == 1)
        #expect(status == VirtioBlk.statusOK)
        #expect(rig.disk.read(at: 16 * 512, count: 4096) == pattern(16))
        // And back on.
        try fe.send(.setConfig, flags: 0x9, payload: u32(32) + u32(1) + u32(0) + [1])
        #expect(try fe.receive(.setConfig) == u64(0))
        try fe.send(.getConfig, payload: u32(32) + u32(1) + u32(0) + [0xAA])
        #expect(try fe.receive(.getConfig) == u32(32) + u32(1) + u32(0) + [1])
        try await rig.finish()
    }

    @Test("GET_VRING_BASE drains: it answers only once every request taken has completed",
          .timeLimit(.minutes(1)), arguments: backendsUnderTest)
    func getVringBaseDrains(_ fdmon: AioContext.Backend) async throws {
        let rig = try Rig(fdmon, backend: .delay(nanoseconds: 50_000_000))
        let fe = try rig.frontEnd()
        try fe.connect(queues: 1)
        try fe.start(queues: 1, features: linuxFeatures(try fe.getU64(.getFeatures)))
        let g = fe.guests[0]
        for id in 0..<5 { g.submit(id: UInt64(id)) }
        #expect(eventually { rig.export.inFlight == 5 })
        let bases = try fe.stop(queues: 1)
        // When the reply arrived, every completion was already in the used ring.
        #expect(bases == [5])
        #expect(g.ring.usedIdx == 5)
        #expect(rig.export.inFlight == 0)
        try await rig.finish()
    }

    @Test("a different memory table while requests are in flight is acked only after they completed; I/O resumes",
          .timeLimit(.minutes(1)), arguments: backendsUnderTest)
    func memTableChangeDrains(_ fdmon: AioContext.Backend) async throws {
        try await withRig(fdmon, backend: .delay(nanoseconds: 50_000_000)) { rig in
            let fe = try rig.frontEnd()
            try fe.connect(queues: 1)
            try fe.start(queues: 1, features: linuxFeatures(try fe.getU64(.getFeatures)))
            let g = fe.guests[0]
            for id in 0..<4 { g.submit(id: UInt64(id)) }
            #expect(eventually { rig.export.inFlight == 4 })
            // The same memory, described in another order: a different table.
            var p = u32(3) + u32(0)
            for r in rig.ram.regions.reversed() {
                p += u64(r.guestPhysicalAddress) + u64(r.size) + u64(r.userAddress) + u64(r.mmapOffset)
            }
            try fe.send(.setMemTable, flags: 0x9, payload: p, fds: [rig.ram.fd, rig.ram.fd, rig.ram.fd])
            #expect(try fe.receive(.setMemTable) == u64(0))
            #expect(g.ring.usedIdx == 4, "the ack came after every request on the old mappings completed")
            // The rings were re-translated against the new table and run again.
            for id in 4..<6 { g.submit(id: UInt64(id)) }
            var n = 0
            #expect(reap(g, count: 6) { _, s, _, _ in if s == 0 { n += 1 } } == 6)
            #expect(n == 6)
        }
    }

    @Test("requests queued while a ring is disabled stay in it and run once it is enabled again",
          .timeLimit(.minutes(1)), arguments: backendsUnderTest)
    func disabledRingFetchesNothing(_ fdmon: AioContext.Backend) async throws {
        try await withRig(fdmon) { rig in
            let fe = try rig.frontEnd()
            try fe.connect(queues: 1)
            try fe.start(queues: 1, features: linuxFeatures(try fe.getU64(.getFeatures)))
            // The counters of the queue the enable started (a queue started again is a new one,
            // with counters of its own).
            #expect(eventually { rig.export.queueStatistics(0) != nil })
            let disabled = try #require(rig.export.queueStatistics(0))
            // With REPLY_ACK: once the ack is here, the ring takes no more requests (the session
            // stops the queue beside it before it answers).
            try fe.send(.setVringEnable, flags: 0x9, payload: u32(0) + u32(0))
            #expect(try fe.receive(.setVringEnable) == u64(0))
            let g = fe.guests[0]
            for id in 0..<3 { g.submit(id: UInt64(id)) }
            // A correct export does nothing here, so there is no event to wait for. A round trip
            // through the export's thread instead of a sleep: a ring that still watched its kick
            // would have taken the requests by the time this is answered (the kicks were written
            // first, so its loop sees them no later than this message), and the counters below
            // keep that for good.
            #expect(try fe.getU64(.getQueueNum) == 1)
            try fe.state(.setVringEnable, index: 0, num: 1)
            var n = 0
            #expect(reap(g, count: 3) { _, s, _, _ in if s == 0 { n += 1 } } == 3)
            #expect(n == 3)
            let enabled = try #require(rig.export.queueStatistics(0))
            let restarted = enabled !== disabled
            #expect(restarted, "enabling the ring again started a queue")
            // All three stayed in the ring: the disabled ring's queue took none of them, the
            // queue the enable started took all three.
            #expect(disabled.requests == 0, "a disabled ring takes no request")
            #expect(enabled.requests == 3)
        }
    }

    @Test("a ring disabled and enabled again while it drains runs again afterwards", .timeLimit(.minutes(1)),
          arguments: backendsUnderTest)
    func reenabledWhileDraining(_ fdmon: AioContext.Backend) async throws {
        try await withRig(fdmon, backend: .delay(nanoseconds: 30_000_000)) { rig in
            let fe = try rig.frontEnd()
            try fe.connect(queues: 1)
            try fe.start(queues: 1, features: linuxFeatures(try fe.getU64(.getFeatures)))
            let g = fe.guests[0]
            for id in 0..<3 { g.submit(id: UInt64(id)) }
            #expect(eventually { rig.export.inFlight == 3 })
            try fe.state(.setVringEnable, index: 0, num: 0)
            try fe.state(.setVringEnable, index: 0, num: 1)
            for id in 3..<6 { g.submit(id: UInt64(id)) }
            var n = 0
            #expect(reap(g, count: 6) { _, s, _, _ in if s == 0 { n += 1 } } == 6)
            #expect(n == 6)
        }
    }

    @Test("delete with requests in flight drains them, then releases the IOThread and removes the socket",
          .timeLimit(.minutes(1)), arguments: backendsUnderTest)
    func deleteDrains(_ fdmon: AioContext.Backend) async throws {
        let rig = try Rig(fdmon, backend: .delay(nanoseconds: 50_000_000))
        let fe = try rig.frontEnd()
        try fe.connect(queues: 1)
        try fe.start(queues: 1, features: linuxFeatures(try fe.getU64(.getFeatures)))
        let g = fe.guests[0]
        for id in 0..<5 { g.submit(id: UInt64(id)) }
        #expect(eventually { rig.export.inFlight == 5 })
        #expect(rig.thread.holders == [.blockNode(name: "exp0")])
        try await rig.export.delete()
        #expect(g.ring.usedIdx == 5, "every request taken completed before delete returned")
        #expect(rig.thread.holders.isEmpty)
        #expect(access(rig.path, F_OK) != 0)
        #expect(fe.closedByPeer())
        await #expect(throws: ExportError("Export 'exp0' is already shutting down")) { try await rig.export.delete() }
        try rig.thread.stop()
    }

    @Test("delete from a task on the export's own IOThread does not deadlock (qemu-storage-daemon 7.2 does)",
          .timeLimit(.minutes(1)))
    func deleteFromOwnIOThread() async throws {
        let rig = try Rig(.automatic)
        let fe = try rig.frontEnd()
        try fe.connect(queues: 1)
        try fe.start(queues: 1, features: linuxFeatures(try fe.getU64(.getFeatures)))
        let export = rig.export
        try await Task(executorPreference: rig.thread) { try await export.delete() }.value
        #expect(rig.thread.holders.isEmpty)
        try rig.thread.stop()
    }

    // (A disconnect with requests in flight drains them first: MultiIOThreadTests.)
    @Test("disconnect unmaps guest memory; a reconnect (QEMU's replay) finds every completed write",
          .timeLimit(.minutes(1)), arguments: backendsUnderTest)
    func reconnect(_ fdmon: AioContext.Backend) async throws {
        let rig = try Rig(fdmon)
        let ownMapping = rig.ram.mappedBytes  // the test's own view of guest RAM
        #expect(ownMapping > 0)
        var fe: FrontEnd? = try rig.frontEnd()
        try fe!.connect(queues: 1)
        let features = linuxFeatures(try fe!.getU64(.getFeatures))
        try fe!.start(queues: 1, features: features)
        #expect(rig.ram.mappedBytes == 2 * ownMapping, "the export mapped the memory table")
        for i in 0..<8 {
            fe!.guests[0].submit(id: UInt64(i), type: VirtioBlk.typeOut, sector: UInt64(i * 8)) { pattern(100 + i).withUnsafeBytes($0.copyMemory) }
        }
        #expect(reap(fe!.guests[0], count: 8) { _, _, _, _ in } == 8)
        let used = fe!.guests[0].ring.usedIdx
        #expect(used == 8)
        let guest = fe!.guestSide
        fe = nil  // the connection closes
        #expect(eventually { !rig.export.isConnected })
        #expect(eventually { rig.ram.mappedBytes == ownMapping }, "the export unmapped guest memory")
        let fe2 = try rig.frontEnd()
        fe2.adoptGuest(guest)
        #expect(rig.export.inFlight == 0)
        // QEMU comes back: replays the connect and the start, resuming at the used index.
        try fe2.connect(queues: 1)
        try fe2.start(queues: 1, features: features, bases: [used])
        #expect(rig.export.connectionCount == 2)
        let g = fe2.guests[0]
        for i in 0..<8 { g.submit(id: UInt64(i), type: VirtioBlk.typeIn, sector: UInt64(i * 8)) }
        var ok = 0
        #expect(reap(g, count: 8) { id, s, _, slot in
            if s == 0 && Array(g.data(slot: slot)) == pattern(100 + Int(id)) { ok += 1 }
        } == 8)
        #expect(ok == 8, "every completed write is read back after the reconnect")
        #expect(try fe2.stop(queues: 1) == [16])
        try await rig.finish()
        for i in 0..<8 { #expect(rig.disk.read(at: i * 8 * 512, count: 4096) == pattern(100 + i)) }
    }
}

extension GuestRAM {
    /// Bytes of this guest RAM mapped in the process now (/proc/self/maps, by the memfd's
    /// inode): the test's own mapping, plus the export's while a session has a memory table.
    var mappedBytes: Int {
        var st = stat()
        guard fstat(fd, &st) == 0, let f = fopen("/proc/self/maps", "r") else { return -1 }
        defer { fclose(f) }
        var line: UnsafeMutablePointer<CChar>? = nil
        var capacity = 0
        defer { free(line) }
        var total = 0
        while getline(&line, &capacity, f) > 0 {
            // start-end perms offset dev inode path
            let fields = String(cString: line!).split(separator: " ", omittingEmptySubsequences: true)
            guard fields.count >= 5, UInt64(fields[4]) == UInt64(st.st_ino) else { continue }
            let range = fields[0].split(separator: "-")
            if range.count == 2, let start = UInt(range[0], radix: 16), let end = UInt(range[1], radix: 16) {
                total += Int(end - start)
            }
        }
        return total
    }
}
