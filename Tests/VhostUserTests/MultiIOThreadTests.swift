// An export on two IOThreads (QEMU 9.0+'s `iothread` list): queue q runs on iothreads[q % 2],
// the control socket on the first. Real socket, memfd guest memory and eventfds, as in
// ExportTests.
import Aio
import CShims
import Devices
import Glibc
import IOThreads
import TestSupport
import Testing

@testable import VhostUser

/// A 2-queue export on two fresh IOThreads over a temp disk.
struct TwoThreadRig {
    let threads: [IOThread]
    let disk: DiskImage
    let export: Export
    let ram: GuestRAM
    let path: String

    init(_ fdmon: AioContext.Backend, backend: BlockBackend? = nil) throws {
        threads = [try makeIOThread("iot0", fdmon), try makeIOThread("iot1", fdmon)]
        disk = try DiskImage(size: 1 << 20)
        path = temporarySocketPath("exp0")
        export = try Export(id: "exp0", backend: backend ?? .file(path: disk.path, direct: false), socketPath: path,
                            iothreads: threads, numQueues: 2, writable: true)
        ram = try GuestRAM()
    }

    func frontEnd() throws -> FrontEnd { try FrontEnd(path: path, ram: ram) }

    func finish() async throws {
        if !export.isDeleted { try await export.delete() }
        for t in threads { try t.stop() }
    }
}

@Suite("vhost-user-blk export on several IOThreads", .serialized)
struct MultiIOThreadTests {
    @Test("each queue's I/O completes on its own IOThread; both IOThreads hold the export until delete",
          .timeLimit(.minutes(1)), arguments: backendsUnderTest)
    func queuesRunOnTheirIOThreads(_ fdmon: AioContext.Backend) async throws {
        let rig = try TwoThreadRig(fdmon)
        #expect(rig.threads.map { $0.holders.map(\.name) } == [["exp0"], ["exp0"]])
        let fe = try rig.frontEnd()
        try fe.connect(queues: 2)
        try fe.start(queues: 2, features: linuxFeatures(try fe.getU64(.getFeatures)))
        for q in 0..<2 {
            let before = rig.threads.map { $0.statistics.completions }
            for k in 0..<4 {
                fe.guests[q].submit(id: UInt64(k), type: VirtioBlk.typeOut, sector: UInt64((q * 4 + k) * 8)) {
                    pattern(q * 4 + k).withUnsafeBytes($0.copyMemory)
                }
            }
            var ok = 0
            #expect(reap(fe.guests[q], count: 4) { _, s, _, _ in if s == 0 { ok += 1 } } == 4)
            #expect(ok == 4)
            let after = rig.threads.map { $0.statistics.completions }
            // The file I/O of queue q went through iothreads[q]'s ring and nowhere else.
            #expect(after[q] - before[q] >= 4, "queue \(q)'s I/O on iot\(q)")
            #expect(after[1 - q] == before[1 - q], "no I/O of queue \(q) on iot\(1 - q)")
            #expect(rig.export.queueStatistics(q)?.completions == 4)
        }
        for k in 0..<8 { #expect(rig.disk.read(at: k * 8 * 512, count: 4096) == pattern(k)) }
        #expect(try fe.stop(queues: 2) == [4, 4])
        try await rig.export.delete()
        #expect(rig.threads.allSatisfy { $0.holders.isEmpty })
        for t in rig.threads { try t.stop() }
    }

    @Test("delete with requests in flight on both queues drains both IOThreads, then releases both holds",
          .timeLimit(.minutes(1)), arguments: backendsUnderTest)
    func deleteDrainsBothIOThreads(_ fdmon: AioContext.Backend) async throws {
        let rig = try TwoThreadRig(fdmon, backend: .delay(nanoseconds: 50_000_000))
        let fe = try rig.frontEnd()
        try fe.connect(queues: 2)
        try fe.start(queues: 2, features: linuxFeatures(try fe.getU64(.getFeatures)))
        let fired = rig.threads.map { $0.statistics.timersFired }
        for q in 0..<2 { for id in 0..<5 { fe.guests[q].submit(id: UInt64(id)) } }
        #expect(eventually { rig.export.queueStatistics(0)?.inFlight == 5 && rig.export.queueStatistics(1)?.inFlight == 5 })
        #expect(rig.threads.map { $0.holders.map(\.name) } == [["exp0"], ["exp0"]])
        try await rig.export.delete()
        for q in 0..<2 {
            #expect(fe.guests[q].ring.usedIdx == 5, "queue \(q): every request taken completed before delete returned")
            // The delay backend's timers ran on the queue's own IOThread.
            #expect(rig.threads[q].statistics.timersFired - fired[q] >= 5)
        }
        #expect(rig.threads.allSatisfy { $0.holders.isEmpty })
        #expect(access(rig.path, F_OK) != 0)
        #expect(fe.closedByPeer())
        for t in rig.threads { try t.stop() }
    }

    @Test("GET_VRING_BASE of a queue on the second IOThread drains it; the first queue keeps running",
          .timeLimit(.minutes(1)), arguments: backendsUnderTest)
    func getVringBaseDrainsSecondIOThread(_ fdmon: AioContext.Backend) async throws {
        let rig = try TwoThreadRig(fdmon, backend: .delay(nanoseconds: 50_000_000))
        let fe = try rig.frontEnd()
        try fe.connect(queues: 2)
        try fe.start(queues: 2, features: linuxFeatures(try fe.getU64(.getFeatures)))
        let g = fe.guests[1]
        for id in 0..<5 { g.submit(id: UInt64(id)) }
        #expect(eventually { rig.export.queueStatistics(1)?.inFlight == 5 })
        try fe.state(.setVringEnable, index: 1, num: 0)
        try fe.state(.getVringBase, index: 1, num: 0)
        let p = try fe.receive(.getVringBase)
        // When the reply arrived, every completion was already in the used ring.
        #expect(p.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 4, as: UInt32.self) } == 5)
        #expect(g.ring.usedIdx == 5)
        #expect(rig.export.queueStatistics(1) == nil)
        // Queue 0, on the first IOThread, still serves.
        fe.guests[0].submit(id: 9)
        var got: [UInt64] = []
        #expect(reap(fe.guests[0], count: 1) { id, s, _, _ in if s == 0 { got.append(id) } } == 1)
        #expect(got == [9])
        try await rig.finish()
    }

    @Test("a different memory table with requests in flight on both IOThreads is acked after both drained; I/O resumes",
          .timeLimit(.minutes(1)), arguments: backendsUnderTest)
    func memTableChangeDrainsBothIOThreads(_ fdmon: AioContext.Backend) async throws {
        let rig = try TwoThreadRig(fdmon, backend: .delay(nanoseconds: 50_000_000))
        let fe = try rig.frontEnd()
        try fe.connect(queues: 2)
        try fe.start(queues: 2, features: linuxFeatures(try fe.getU64(.getFeatures)))
        for q in 0..<2 { for id in 0..<4 { fe.guests[q].submit(id: UInt64(id)) } }
        #expect(eventually { rig.export.inFlight == 8 })
        // The same memory, described in another order: a different table.
        var p = u32(3) + u32(0)
        for r in rig.ram.regions.reversed() {
            p += u64(r.guestPhysicalAddress) + u64(r.size) + u64(r.userAddress) + u64(r.mmapOffset)
        }
        try fe.send(.setMemTable, flags: 0x9, payload: p, fds: [rig.ram.fd, rig.ram.fd, rig.ram.fd])
        #expect(try fe.receive(.setMemTable) == u64(0))
        for q in 0..<2 {
            #expect(fe.guests[q].ring.usedIdx == 4, "queue \(q) drained on its IOThread before the ack")
        }
        for q in 0..<2 { for id in 4..<6 { fe.guests[q].submit(id: UInt64(id)) } }
        for q in 0..<2 {
            var n = 0
            #expect(reap(fe.guests[q], count: 6) { _, s, _, _ in if s == 0 { n += 1 } } == 6)
            #expect(n == 6)
        }
        try await rig.finish()
    }

    @Test("SET_VRING_CALL while a queue runs on the second IOThread: completions signal the new fd",
          .timeLimit(.minutes(1)), arguments: backendsUnderTest)
    func newCallFDOnSecondIOThread(_ fdmon: AioContext.Backend) async throws {
        let rig = try TwoThreadRig(fdmon)
        let fe = try rig.frontEnd()
        try fe.connect(queues: 2)
        try fe.start(queues: 2, features: linuxFeatures(try fe.getU64(.getFeatures)))
        let call = try EventNotifier()
        try fe.setU64(.setVringCall, 1, ack: true, fds: [call.fileDescriptor])
        #expect(eventually { call.testAndClear() }, "the new call fd is signalled once when installed")
        fe.guests[1].submit(id: 1)
        #expect(eventually { call.testAndClear() }, "the completion's interrupt goes to the new fd")
        var got: [UInt64] = []
        #expect(fe.guests[1].reap { id, s, _, _ in if s == 0 { got.append(id) } } == 1)
        #expect(got == [1])
        try await rig.finish()
    }

    @Test("a front end gone with requests in flight on both IOThreads: both drain before the export listens again",
          .timeLimit(.minutes(1)), arguments: backendsUnderTest)
    func disconnectDrainsBothIOThreads(_ fdmon: AioContext.Backend) async throws {
        let rig = try TwoThreadRig(fdmon, backend: .delay(nanoseconds: 30_000_000))
        var fe: FrontEnd? = try rig.frontEnd()
        try fe!.connect(queues: 2)
        let features = linuxFeatures(try fe!.getU64(.getFeatures))
        try fe!.start(queues: 2, features: features)
        for q in 0..<2 { for id in 0..<4 { fe!.guests[q].submit(id: UInt64(id)) } }
        #expect(eventually { rig.export.inFlight == 8 })
        let guest = fe!.guestSide
        fe = nil  // the connection closes
        #expect(eventually { !rig.export.isConnected })
        for q in 0..<2 { #expect(guest.guests[q].ring.usedIdx == 4, "queue \(q) drained before the session ended") }
        #expect(rig.threads.map { $0.holders.map(\.name) } == [["exp0"], ["exp0"]], "a disconnect keeps the holds")
        // QEMU comes back and resumes both queues on their IOThreads.
        let fe2 = try rig.frontEnd()
        fe2.adoptGuest(guest)
        try fe2.connect(queues: 2)
        try fe2.start(queues: 2, features: features, bases: [4, 4])
        for q in 0..<2 { for id in 4..<6 { fe2.guests[q].submit(id: UInt64(id)) } }
        for q in 0..<2 {
            var n = 0
            #expect(reap(fe2.guests[q], count: 6) { _, s, _, _ in if s == 0 { n += 1 } } == 6)
            #expect(n == 6)
        }
        #expect(try fe2.stop(queues: 2) == [6, 6])
        try await rig.finish()
    }

    @Test("a repeated IOThread is held once; queues still alternate", .timeLimit(.minutes(1)))
    func repeatedIOThreadHeldOnce() async throws {
        let t = try makeIOThread("iot0", .automatic)
        let export = try Export(id: "exp0", backend: .null, socketPath: temporarySocketPath("exp0"), iothreads: [t, t],
                                numQueues: 3)
        #expect(t.holders == [.blockNode(name: "exp0")])
        #expect(export.queueContexts.allSatisfy { $0 === t.context })
        try await export.delete()
        #expect(t.holders.isEmpty)
        try t.stop()
    }
}

@Suite("vhost-user-blk export moved between IOThreads, front end connected", .serialized)
struct ExportMoveTests {
    @Test("a move drains what runs, hands the session and every queue to the new IOThread, and loses nothing",
          .timeLimit(.minutes(1)), arguments: backendsUnderTest)
    func moveWithFrontEndConnected(_ fdmon: AioContext.Backend) async throws {
        let rig = try TwoThreadRig(fdmon)
        let third = try makeIOThread("iot2", fdmon)
        let fe = try rig.frontEnd()
        try fe.connect(queues: 2)
        try fe.start(queues: 2, features: linuxFeatures(try fe.getU64(.getFeatures)))
        /// Writes 4 sectors per queue (numbered from `base`) and checks they all complete.
        func writeRound(_ base: Int) {
            for q in 0..<2 {
                for k in 0..<4 {
                    let n = base + q * 4 + k
                    fe.guests[q].submit(id: UInt64(n), type: VirtioBlk.typeOut, sector: UInt64(n * 8)) {
                        pattern(n).withUnsafeBytes($0.copyMemory)
                    }
                }
                var ok = 0
                #expect(reap(fe.guests[q], count: 4) { _, s, _, _ in if s == 0 { ok += 1 } } == 4)
                #expect(ok == 4, "queue \(q), round \(base)")
            }
        }
        writeRound(0)
        let before = third.statistics.completions
        try await rig.export.move(to: [third])
        #expect(rig.threads.allSatisfy { $0.holders.isEmpty }, "the old IOThreads are released")
        #expect(third.holders == [.blockNode(name: "exp0")])
        #expect(rig.export.iothreads.map(\.id) == ["iot2"] && rig.export.isConnected)
        writeRound(8)
        #expect(third.statistics.completions - before >= 8, "both queues' I/O now completes on iot2")
        // Back to the two IOThreads, then a control message that needs the session's thread.
        try await rig.export.move(to: rig.threads)
        #expect(third.holders.isEmpty && rig.threads.allSatisfy { $0.holders == [.blockNode(name: "exp0")] })
        writeRound(16)
        for n in 0..<24 { #expect(rig.disk.read(at: n * 8 * 512, count: 4096) == pattern(n), "sector group \(n)") }
        #expect(try fe.stop(queues: 2) == [12, 12])
        try await rig.finish()
        try third.stop()
    }

    @Test("requests in flight during a move complete before it returns; a move and a delete exclude each other",
          .timeLimit(.minutes(1)), arguments: backendsUnderTest)
    func moveDrainsInFlight(_ fdmon: AioContext.Backend) async throws {
        let rig = try TwoThreadRig(fdmon, backend: .delay(nanoseconds: 30_000_000))
        let third = try makeIOThread("iot2", fdmon)
        let fe = try rig.frontEnd()
        try fe.connect(queues: 2)
        try fe.start(queues: 2, features: linuxFeatures(try fe.getU64(.getFeatures)))
        for q in 0..<2 { for id in 0..<3 { fe.guests[q].submit(id: UInt64(id)) } }
        #expect(eventually { rig.export.queueStatistics(0)?.inFlight == 3 && rig.export.queueStatistics(1)?.inFlight == 3 })
        let pause = try await rig.export.move(to: [third])
        for q in 0..<2 { #expect(fe.guests[q].ring.usedIdx == 3, "queue \(q) drained by the move") }
        #expect(pause >= 10_000_000, "the pause covers the drain")
        // Requests made after the move run on iot2.
        for q in 0..<2 { fe.guests[q].submit(id: 9) }
        for q in 0..<2 { #expect(reap(fe.guests[q], count: 4) { _, _, _, _ in } == 4) }
        // A stopped IOThread cannot be a destination: nothing changes.
        let gone = try makeIOThread("gone", fdmon)
        try gone.stop()
        await #expect(throws: ExportError("IOThread 'gone' is stopped or being stopped")) { try await rig.export.move(to: [gone]) }
        #expect(third.holders == [.blockNode(name: "exp0")] && rig.export.phase == .serving)
        try await rig.export.delete()
        await #expect(throws: ExportError("Export 'exp0' is already shutting down")) { try await rig.export.move(to: [third]) }
        #expect(third.holders.isEmpty)
        try await rig.finish()
        try third.stop()
    }
}
