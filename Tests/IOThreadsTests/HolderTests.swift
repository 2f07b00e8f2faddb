// Holders: who holds an IOThread, the hold set, and the lifecycle rule that binds them (no
// hold once stopping, no stop while held), alone and under many racing threads.
import Aio
import Glibc
import IOThreads
import Synchronization
import Testing

@Suite("Holders")
struct HolderTests {
    @Test("holds are listed newest first, in the holders union, released by consuming, and block deletion")
    func holdsAndRegistry() throws {
        let r = IOThreadRegistry()
        let t = try r.create(id: "iot0")
        let h1 = try t.hold(.qomObject(path: "/machine/peripheral/disk0"))
        let h2 = try t.hold(.blockNode(name: "disk1"))
        #expect(t.holders == [.blockNode(name: "disk1"), .qomObject(path: "/machine/peripheral/disk0")])
        #expect(t.holders.map(\.kind) == ["block-node", "qom-object"])
        #expect(t.holders.map(\.memberName) == ["node-name", "qom-path"])
        #expect(h1.context === t.context)
        #expect(throws: IOThreadError(.inUse, "object 'iot0' is in use, can not be deleted")) { try r.remove("iot0") }
        h1.release()
        #expect(t.holders == [.blockNode(name: "disk1")])
        h2.release()
        try r.remove("iot0")
        #expect(t.isStopped && r.lookup("iot0") == nil)
    }

    @Test("a held IOThread cannot be stopped; a stopped one cannot be held; nothing changes on refusal")
    func lifecycle() throws {
        let t = try IOThread(id: "iot0")
        let h = try t.hold(.monitor(name: "mon0"))
        #expect(throws: IOThreadError(.inUse, "IOThread 'iot0' is held by [\"mon0\"]; release its holds before stopping it")) {
            try t.stop()
        }
        #expect(!t.isStopped && t.holders == [.monitor(name: "mon0")])
        h.release()
        try t.stop()
        try t.stop()  // idempotent
        #expect(throws: IOThreadError(.stopped, "IOThread 'iot0' is stopped or being stopped")) {
            _ = try t.hold(.monitor(name: "late"))
        }
        #expect(t.holders.isEmpty)
    }

    @Test("a hold set holds each IOThread once, all or nothing, and moves by holding first")
    func holdSet() throws {
        let a = try IOThread(id: "a"), b = try IOThread(id: "b"), c = try IOThread(id: "c")
        let set = IOThreadHoldSet(holder: .qomObject(path: "/machine/peripheral/d0"))
        try set.hold([a, a, b, a])
        #expect(a.holders.count == 1 && b.holders.count == 1 && set.threads.map(\.id) == ["a", "b"])
        try c.stop()
        // c is stopped: nothing of this call is kept (b is not held twice, no new hold on a).
        #expect(throws: IOThreadError(.stopped, "IOThread 'c' is stopped or being stopped")) { try set.hold([b, c]) }
        #expect(a.holders.count == 1 && b.holders.count == 1 && set.threads.map(\.id) == ["a", "b"])
        #expect(set.context(of: b) === b.context)
        set.release(keeping: [b])
        #expect(a.holders.isEmpty && b.holders.count == 1 && set.threads.map(\.id) == ["b"])
        set.release()
        #expect(b.holders.isEmpty && set.threads.isEmpty)
        try a.stop()
        try b.stop()
    }

    @Test("releasing a holder that does not hold crashes with a message")
    func unknownHolder() async {
        let result = await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            let t = try! IOThread(id: "iot0")
            let set = IOThreadHoldSet(holder: .qomObject(path: "/machine/peripheral/ghost"))
            _ = set.context(of: t)  // not held
        }
        let stderr = String(decoding: result?.standardErrorContent ?? [], as: UTF8.self)
        #expect(stderr.contains("BUG DETECTED: holder '/machine/peripheral/ghost' used IOThread 'iot0' without holding it"))
    }

    @Test("destroying an IOThread that still has holders crashes with a message")
    func destroyedWhileHeld() async {
        let result = await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            var t: IOThread? = try! IOThread(id: "iot0")
            _ = try! t!.hold(.qomObject(path: "/machine/peripheral/disk0"))  // dropped without release
            t = nil
        }
        let stderr = String(decoding: result?.standardErrorContent ?? [], as: UTF8.self)
        #expect(stderr.contains("BUG DETECTED: IOThread 'iot0' destroyed while held by [\"/machine/peripheral/disk0\"]"))
    }

    @Test("dropping a hold set that still holds crashes with a message")
    func setDroppedHolding() async {
        let result = await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            let t = try! IOThread(id: "iot0")
            var set: IOThreadHoldSet? = IOThreadHoldSet(holder: .blockNode(name: "disk0"))
            try! set!.hold([t])
            set = nil
        }
        let stderr = String(decoding: result?.standardErrorContent ?? [], as: UTF8.self)
        #expect(stderr.contains("BUG DETECTED: holder 'disk0' dropped its holds on [\"iot0\"] without releasing them"))
    }

    /// Threads racing holds, releases and stops on a few IOThreads, seeded. Checked: a stop
    /// succeeds exactly when nothing holds (no hold is ever seen on a stopped IOThread), a hold
    /// succeeds exactly while running, and every hold taken is released (nothing left).
    @Test("holds, releases and stops racing on many threads keep the rule", .timeLimit(.minutes(1)),
          arguments: [UInt64(1), 2, 3])
    func racing(_ seed: UInt64) throws {
        let threads = try (0..<4).map { try IOThread(id: "race\($0)") }
        final class Racer: @unchecked Sendable {  // fields written by its pthread, read after join
            let threads: [IOThread]
            var rng: UInt64
            var held: [Int: Int] = [:]  // IOThread index -> holds taken by this racer
            var taken = 0, refusedHolds = 0, stops = 0, refusedStops = 0
            var violation: String?
            init(_ threads: [IOThread], seed: UInt64) { self.threads = threads; rng = seed }
            func next() -> UInt64 {
                rng = rng &* 6364136223846793005 &+ 1442695040888963407
                return rng >> 33
            }
            func run(id: Int) {
                let holder = IOThreadHolder.qomObject(path: "/machine/peripheral/racer\(id)")
                let set = IOThreadHoldSet(holder: holder)
                for _ in 0..<3000 {
                    let i = Int(next() % UInt64(threads.count))
                    let t = threads[i]
                    switch next() % 10 {
                    case 0...5:
                        do throws(IOThreadError) {
                            try set.hold([t])
                            taken += 1
                            if t.isStopped { violation = "held \(t.id) after it stopped" }
                        } catch {
                            refusedHolds += 1
                            if !t.isStopped { violation = "hold on running \(t.id) refused: \(error)" }
                        }
                    case 6...8:
                        set.release(keeping: set.threads.filter { $0 !== t })
                    default:
                        do throws(IOThreadError) {
                            try t.stop()
                            stops += 1
                            if set.holds(t) { violation = "\(t.id) stopped while this racer held it" }
                        } catch {
                            refusedStops += 1
                            if error.kind != .inUse { violation = "stop refused with \(error)" }
                        }
                    }
                    if violation != nil { break }
                }
                set.release()
            }
        }
        let racers = (0..<4).map { Racer(threads, seed: seed &* 31 &+ UInt64($0)) }
        var pthreads = [pthread_t](repeating: pthread_t(), count: racers.count)
        for (i, r) in racers.enumerated() {
            final class Arg { let r: Racer; let i: Int; init(_ r: Racer, _ i: Int) { self.r = r; self.i = i } }
            pthread_create(&pthreads[i], nil, { p in
                let a = Unmanaged<Arg>.fromOpaque(p!).takeRetainedValue()
                a.r.run(id: a.i)
                return nil
            }, Unmanaged.passRetained(Arg(r, i)).toOpaque())
        }
        for p in pthreads { pthread_join(p, nil) }
        for r in racers { #expect(r.violation == nil, "seed \(seed): \(r.violation ?? "")") }
        #expect(racers.reduce(0) { $0 + $1.taken } > 0, "seed \(seed): some holds were taken")
        for t in threads {
            #expect(t.holders.isEmpty)
            try t.stop()
        }
    }
}
