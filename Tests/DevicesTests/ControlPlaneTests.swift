// The control plane through the Swift API, under interleavings: many tasks and threads race
// attach, detach and move of several devices and the stop of their IOThreads, with a guest
// keeping requests in flight on one device throughout. Seeded: a failure names its seed, and
// the same seed replays the same choices (the interleaving itself is the scheduler's).
//
// Checked: nothing crashes or hangs; every operation either succeeds or is refused with the
// DeviceError / IOThreadError its state explains; at the quiet point each IOThread's holders
// are exactly the devices whose placement includes it; no request is lost or completed twice.
import Aio
import Glibc
import IOThreads
import Synchronization
import TestSupport
import Testing

@testable import Devices

/// IOThreads that racers may stop; a stopped one is replaced by a fresh one under the lock.
final class Pool: Sendable {
    let threads: Locked<[IOThread]>
    let made = Atomic<Int>(0)
    let backend: AioContext.Backend
    init(_ n: Int, _ backend: AioContext.Backend) throws {
        self.backend = backend
        threads = Locked(try (0..<n).map { try makeIOThread("pool\($0)", backend, pollMaxNs: 0) })
        made.store(n, ordering: .relaxed)
    }
    func pick(_ rng: inout SeededRandom) -> IOThread { threads.withLock { $0[rng.below($0.count)] } }
    /// Tries to stop one; replaces it when it stopped.
    func tryStop(_ rng: inout SeededRandom) -> Result<Void, IOThreadError> {
        let t = pick(&rng)
        do throws(IOThreadError) {
            try t.stop()
        } catch {
            return .failure(error)
        }
        let n = made.add(1, ordering: .relaxed).newValue
        let fresh = try! makeIOThread("pool\(n)", backend, pollMaxNs: 0)
        threads.withLock { ts in
            if let i = ts.firstIndex(where: { $0 === t }) { ts[i] = fresh }
        }
        return .success(())
    }
}

@Suite("Control plane under interleavings (Swift API)", .serialized)
struct ControlPlaneTests {
    @Test("racing attach, detach, move and stop keep holders exact and lose no request",
          .timeLimit(.minutes(2)), arguments: backendsUnderTest, [UInt64(11), 12])
    func racing(_ fdmon: AioContext.Backend, _ seed: UInt64) async throws {
        let pool = try Pool(3, fdmon)
        let devices = try [
            VirtioBlkDevice(id: "d0", queues: 1, queueSize: 64),
            VirtioBlkDevice(id: "d1", queues: 2, queueSize: 16),
            VirtioBlkDevice(id: "d2", queues: 3, queueSize: 16, backend: .delay(nanoseconds: 200_000)),
        ]
        // d0 carries a guest for the whole run.
        var first = SeededRandom(state: seed)
        try await devices[0].attach(to: pool.pick(&first))
        let guest = try NumberingGuest(device: devices[0], depth: 8, spinning: false)
        guest.start()
        let unexplained = Locked<[String]>([])
        let counts = Locked([String: Int]())
        @Sendable func count(_ what: String) { counts.withLock { $0[what, default: 0] += 1 } }

        /// One racer: random operations on random devices and IOThreads.
        @Sendable func race(_ r: Int) async {
            var rng = SeededRandom(state: seed &* 1000 &+ UInt64(r))
            for _ in 0..<60 {
                let dev = devices[rng.below(devices.count)]
                let mapping = (0..<dev.layouts.count).map { _ in pool.pick(&rng) }
                do throws(DeviceError) {
                    switch rng.below(4) {
                    case 0: try await dev.attach(mapping: mapping); count("attach")
                    case 1: try await dev.detach(); count("detach")
                    case 2: try await dev.move(mapping: mapping); count("move")
                    default:
                        switch pool.tryStop(&rng) {
                        case .success: count("stop")
                        case .failure(let e) where e.kind == .inUse: count("stop refused")
                        case .failure(let e): unexplained.withLock { $0.append("stop: \(e)") }
                        }
                    }
                } catch {
                    // Refusals that the device's state (or a stopped IOThread) explains.
                    let m = error.message
                    let explained = m.hasSuffix("is already attached") || m.hasSuffix("is not attached")
                        || m.hasSuffix("is being attached") || m.hasSuffix("is being moved")
                        || m.hasSuffix("is being detached") || m.hasSuffix("is stopped or being stopped")
                    if explained { count("refused") } else { unexplained.withLock { $0.append(m) } }
                }
            }
        }
        await withTaskGroup(of: Void.self) { group in
            for r in 0..<8 { group.addTask { await race(r) } }
        }
        // Quiet point: every device is at rest, and the holders are exactly what they imply.
        for d in devices { #expect(d.phase == .detached || d.phase == .attached, "\(d.id): \(d.phase)") }
        let all = pool.threads.withLock { $0 }
        for t in all {
            let expected = Set(devices.filter { d in d.heldIOThreads.contains { $0 === t } }.map(\.holder))
            #expect(Set(t.holders) == expected, "seed \(seed): \(t.id) held by \(t.holders), devices imply \(expected)")
            #expect(t.holders.count == expected.count, "seed \(seed): \(t.id) holds a device twice: \(t.holders)")
        }
        #expect(unexplained.withLock { $0 }.isEmpty, "seed \(seed): \(unexplained.withLock { $0 })")
        let c = counts.withLock { $0 }
        #expect((c["attach"] ?? 0) + (c["move"] ?? 0) > 0 && (c["refused"] ?? 0) > 0, "seed \(seed): a real race: \(c)")
        // The guest's requests: re-attach if a racer left d0 detached, then drain.
        if devices[0].phase == .detached { try await devices[0].attach(to: all[0]) }
        guest.finish()
        let (submitted, lost, twice) = guest.outcome
        #expect(lost == 0 && twice == 0, "seed \(seed): lost \(lost), twice \(twice)")
        for d in devices where d.phase == .attached { try await d.detach() }
        for t in all {
            #expect(t.holders.isEmpty)
            try t.stop()
        }
        print("control plane \(fdmon) seed \(seed): \(c), \(submitted) requests")
    }

    @Test("an iothread-vq-mapping entry that serves no queue is held too, until detach")
    func mappingEntryWithoutQueue() async throws {
        let a = try makeIOThread("a", .automatic), b = try makeIOThread("b", .automatic)
        let mapping = try resolveIOThreadVQMapping([.init(iothread: "a"), .init(iothread: "b")], numQueues: 1) {
            $0 == "a" ? a : $0 == "b" ? b : nil
        }
        #expect(mapping.queues.map(\.id) == ["a"] && mapping.iothreads.map(\.id) == ["a", "b"])
        let dev = try VirtioBlkDevice(id: "d0")
        try await dev.attach(mapping)
        #expect(a.holders == [dev.holder] && b.holders == [dev.holder], "QEMU references every entry")
        #expect(throws: IOThreadError.self) { try b.stop() }
        try await dev.move(mapping: [b], placement: [a, b])
        #expect(a.holders == [dev.holder] && b.holders == [dev.holder])
        try await dev.move(mapping: [b])
        #expect(a.holders.isEmpty && b.holders == [dev.holder])
        try await dev.detach()
        #expect(a.holders.isEmpty && b.holders.isEmpty)
        try a.stop()
        try b.stop()
    }
}

@Suite("Moves with completions in flight", .serialized)
struct MoveHandOffTests {
    /// Completions that arrive asynchronously (a nop through the ring, or a timer) reach the
    /// queue through `backendCompleted`; the one that ends a move's drain hands the queue to
    /// the next IOThread. Before the fix the old IOThread then still read and wrote
    /// `pendingInterrupt` and the interrupt BH while the new one used them: a data race that
    /// this test shows under the thread sanitizer (make test runs the suite under TSan).
    @Test("500 moves with asynchronous completions in flight lose nothing, complete nothing twice, race nothing",
          .timeLimit(.minutes(2)), arguments: backendsUnderTest, [BlockBackend.nop, .delay(nanoseconds: 20_000)])
    func movesWithAsyncCompletions(_ fdmon: AioContext.Backend, _ backend: BlockBackend) async throws {
        let a = try makeIOThread("iothread0", fdmon, pollMaxNs: 0)
        let b = try makeIOThread("iothread1", fdmon, pollMaxNs: 0)
        let dev = try VirtioBlkDevice(id: "disk0", queueSize: 64, backend: backend)
        try await dev.attach(to: a)
        let guest = try NumberingGuest(device: dev, depth: 16, spinning: false)
        guest.start()
        for i in 0..<500 {
            try await dev.move(to: i % 2 == 0 ? b : a)
        }
        guest.finish()
        try await dev.detach()
        let (submitted, lost, twice) = guest.outcome
        #expect(submitted > 0)
        #expect(lost == 0 && twice == 0, "lost: \(lost), twice: \(twice)")
        #expect(guest.guest.unexpectedCompletions == 0)
        #expect(a.holders.isEmpty && b.holders.isEmpty)
        try a.stop()
        try b.stop()
    }
}
