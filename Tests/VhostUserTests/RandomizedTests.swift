// Randomized (seeded, so any failure replays) hostile input at unit level: descriptor chains
// drawn at random over the whole table, and random vhost-user messages. The properties: the
// process never crashes, the host file never grows (nothing is written outside it), and the
// export still serves a well-behaved front end afterwards.
import Aio
import CShims
import Devices
import Glibc
import IOThreads
import TestSupport
import Testing

@testable import VhostUser

/// The file's size now (it must never grow: a write outside it would extend it).
func fileSize(_ fd: Int32) -> Int {
    var st = stat()
    return fstat(fd, &st) == 0 ? Int(st.st_size) : -1
}

/// Whether the connection is still open once the export has handled everything sent on it so
/// far: sends a GET_CONFIG that no random message can be mistaken for (a marker in its flags
/// word, which the reply echoes) and reads replies until its answer (true) or the end of the
/// connection (false); nil if the export stopped answering (the receive timeout).
func handledAndOpen(_ fe: FrontEnd) throws -> Bool? {
    let marker: UInt32 = 0x5eed_c0de
    do {
        try fe.send(.getConfig, payload: u32(0) + u32(4) + u32(marker) + [0, 0, 0, 0])
    } catch {
        return false  // the export had closed it already
    }
    while true {
        let header: [UInt8], payload: [UInt8]
        do {
            header = try fe.readExactly(12)
            payload = try fe.readExactly(Int(header.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 8, as: UInt32.self) }))
        } catch let e as TestFailure {
            if e.description == "recv: errno \(EAGAIN)" { return nil }
            return false  // end of file, or reset by the export's close
        }
        let request = header.withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) }
        if request == VhostUserRequest.getConfig.rawValue && payload.count >= 12 && Array(payload[8..<12]) == u32(marker) {
            return true
        }
    }
}

/// Zeroes queue 0's rings in guest memory, as a guest driver does when it sets a queue up:
/// a new session starting from base 0 then sees avail.idx 0, not the last session's.
func resetRings(_ ram: GuestRAM, size: Int = 64) {
    let l = ram.ringLayout(queue: 0, size: size)
    for (addr, bytes) in [(l.descAddr, 16 * size), (l.availAddr, 6 + 2 * size), (l.usedAddr, 6 + 8 * size)] {
        if let p = ram.memory.pointer(at: addr, length: bytes) { memset(p, 0, bytes) }
    }
}

/// A well-behaved write and read-back on a fresh connection: the export still works.
func exportStillServes(_ rig: Rig, seed: Int) throws -> Bool {
    let fe = try rig.frontEnd()
    try fe.connect(queues: 1)
    resetRings(rig.ram)
    try fe.start(queues: 1, features: linuxFeatures(try fe.getU64(.getFeatures)))
    let g = fe.guests[0]
    g.submit(id: 1, type: VirtioBlk.typeOut, sector: 16) { pattern(seed).withUnsafeBytes($0.copyMemory) }
    var ok = reap(g, count: 1) { _, _, _, _ in } == 1
    g.submit(id: 2, type: VirtioBlk.typeIn, sector: 16)
    var back: [UInt8] = []
    ok = ok && reap(g, count: 1) { _, status, _, slot in if status == VirtioBlk.statusOK { back = Array(g.data(slot: slot)) } } == 1
    _ = try fe.stop(queues: 1)
    if !(ok && back == pattern(seed)) {
        print("DIAG exportStillServes ok=\(ok) back=\(back.count) errors=\(rig.export.errors.suffix(3)) connections=\(rig.export.connectionCount)")
    }
    return ok && back == pattern(seed)
}

@Suite("vhost-user-blk: randomized hostile input", .serialized)
struct RandomizedTests {
    @Test("random descriptor chains: no crash, the file never grows, the export keeps serving",
          .timeLimit(.minutes(2)), arguments: backendsUnderTest)
    func randomChains(_ fdmon: AioContext.Backend) async throws {
        try await withRig(fdmon, diskSize: 1 << 20) { rig in
            var rng = SeededRandom(state: 0x5eed_0001)
            let W = SplitRingLayout.descWrite, N = SplitRingLayout.descNext
            // Addresses a hostile driver would aim at: mapped buffers, region edges, the hole
            // between regions (0xa0000..<0xc0000), the rings themselves, the end of memory,
            // and far outside.
            let targets: [UInt64] = [0x300000, 0x300100, 0x301000, 0x3ff000, 0x9fff0, 0xa0000, 0xbfff8,
                                     0x1ffff0, 0x200000, 0x3ffff8, 0x400000, 0x7fff_ffff_f000, .max - 8]
            let flagChoices: [UInt16] = [0, N, W, N | W, SplitRingLayout.descIndirect, N | SplitRingLayout.descIndirect, 0xffff]
            let sessions = 60
            var sessionsAnswered = 0
            for session in 0..<sessions {
                do {
                    let fe = try rig.frontEnd()
                    try fe.connect(queues: 1)
                    resetRings(rig.ram)
                    try fe.start(queues: 1, features: linuxFeatures(try fe.getU64(.getFeatures)))
                    let d = RawDriver(fe)
                    let r = d.ring
                    // Some plausible request headers in mapped memory, with random types and sectors
                    // (beyond the disk too).
                    for h: UInt64 in [0x300000, 0x301000, 0x3ff000] {
                        d.header(at: h, type: UInt32.random(in: 0...12, using: &rng) | (Bool.random(using: &rng) ? 0x8000_0000 : 0),
                                 sector: Bool.random(using: &rng) ? UInt64.random(in: 0..<4096, using: &rng) : UInt64.random(in: 0...UInt64.max, using: &rng))
                    }
                    for i in 0..<r.layout.size {
                        let base = targets.randomElement(using: &rng)!
                        let addr = base &+ UInt64.random(in: 0..<64, using: &rng) * 8
                        let len = [UInt32(0), 1, 16, 512, 4096, 65536, UInt32.random(in: 0...UInt32.max, using: &rng)].randomElement(using: &rng)!
                        r.setDescriptor(i, addr: addr, len: len, flags: flagChoices.randomElement(using: &rng)!,
                                        next: UInt16.random(in: 0..<UInt16(r.layout.size + 16), using: &rng))
                    }
                    // Post a few random heads (some beyond the table) and kick.
                    let posts = Int.random(in: 1...4, using: &rng)
                    for _ in 0..<posts {
                        r.setAvailEntry(d.availIdx, UInt16.random(in: 0..<UInt16(r.layout.size + 8), using: &rng))
                        d.availIdx &+= 1
                    }
                    r.publishAvailIdx(d.availIdx)
                    d.kick.set()
                    // The export is done with the posts once it answered every head in the used ring,
                    // or found the ring broken (it then takes nothing more) and finished what it took.
                    // The queue's counters are this session's: the last session's went when it closed.
                    let done = eventually {
                        guard let q = rig.export.queueStatistics(0) else { return false }  // not started yet
                        return q.isBroken ? q.inFlight == 0 : r.usedIdx == UInt16(posts)
                    }
                    #expect(done, "session \(session): every head posted was answered, or the ring was found broken")
                    if r.usedIdx != 0 { sessionsAnswered += 1 }
                    #expect(fileSize(rig.disk.fd) == 1 << 20, "session \(session): the file did not grow")
                }  // the front end goes away: the export drains what it took, then listens again
                // The next one connects once the export has let this one go: the export refuses a
                // front end that connects while it still counts the last one as connected.
                #expect(eventually { !rig.export.isConnected }, "session \(session) ended")
            }
            print("random chains \(fdmon): \(sessionsAnswered) of \(sessions) sessions got a used entry")
            // With the seed fixed and each session waited for, this count is the same on every run.
            #expect(sessionsAnswered > sessions / 4, "the export looked at the chains (\(sessionsAnswered) of \(sessions) sessions got a used entry)")
            #expect(eventually { !rig.export.isConnected })
            #expect(try exportStillServes(rig, seed: 3), "a well-behaved front end is served after \(sessions) hostile ones")
            #expect(fileSize(rig.disk.fd) == 1 << 20)
        }
    }

    @Test("random messages: no crash, every fd they carried released, the export keeps serving",
          .timeLimit(.minutes(2)), arguments: backendsUnderTest)
    func randomMessages(_ fdmon: AioContext.Backend) async throws {
        try await withRig(fdmon) { rig in
            var rng = SeededRandom(state: 0x5eed_0002)
            // Which messages carry fds, from a generator of its own: the messages themselves are
            // the ones this seed always drew.
            var fdRng = SeededRandom(state: 0x5eed_0003)
            // The fds they carry: copies of a memfd of the test's own, so that descriptors other
            // tests open meanwhile do not count.
            let tracer = dp_memfd_create("random-messages")
            defer { close(tracer) }
            var carried = 0
            var closedCount = 0
            var fe: FrontEnd! = try rig.frontEnd()
            for i in 0..<400 {
                // Half the time a negotiated session first, so later requests reach deeper states.
                if i % 40 == 0 && Bool.random(using: &rng) { _ = try? fe.connect(queues: 1) }
                let request = UInt32.random(in: 0...45, using: &rng)
                let flags: UInt32 = [1, 1, 1, 0x9, 0x5, 0x2, UInt32.random(in: 0...UInt32.max, using: &rng)].randomElement(using: &rng)!
                let size = [0, 4, 8, 12, 40, 200, Int.random(in: 0...300, using: &rng)].randomElement(using: &rng)!
                let payload = (0..<size).map { _ in UInt8.random(in: 0...255, using: &rng) }
                let fds = [Int32](repeating: tracer, count: [0, 0, 0, 1, 2].randomElement(using: &fdRng)!)
                carried += fds.count
                let sent = (try? fe.send(request, flags: flags, payload: payload, fds: fds)) != nil
                // Whether the message closed the connection, known before the next one is sent.
                guard let open = try sent ? handledAndOpen(fe) : false else {
                    Issue.record("message \(i) (request \(request)): the export stopped answering")
                    break
                }
                if !open {
                    closedCount += 1
                    fe = try rig.frontEnd()
                }
            }
            print("random messages \(fdmon): \(closedCount) of 400 closed the connection, \(carried) fds carried")
            #expect(closedCount > 50, "many of the random messages were refused by closing (\(closedCount))")
            #expect(eventually { rig.export.connectionCount > closedCount })
            fe = nil
            #expect(eventually { !rig.export.isConnected }, "the last random connection is gone")
            // Every fd a message carried was closed by the back end (the session is gone).
            #expect(carried > 0)
            #expect(eventually { openFDs(sameAs: tracer) == 1 }, "back-end copies left: \(openFDs(sameAs: tracer) - 1)")
            #expect(try exportStillServes(rig, seed: 4))
        }
    }
}
