import CShims
import Glibc
import Testing

@testable import Uring

let uringAvailable = UringProbe.check().isAvailable

@Suite("Ring", .enabled(if: uringAvailable, "io_uring is refused on this machine"))
struct RingTests {
    @Test("a nop goes through the ring with its user data")
    func nopRoundTrip() throws {
        var ring = try Ring(entries: 8)
        let queued = ring.prepareNop(userData: 42)
        let pending = ring.pendingSubmissions
        let rc = ring.submitAndWait(timeoutNanoseconds: -1)
        var seen: [Completion] = []
        ring.reap { seen.append($0) }
        let left = ring.readyCompletions
        #expect(queued && pending == 1 && rc >= 0)
        #expect(seen == [Completion(userData: 42, result: 0, flags: 0)])
        #expect(left == 0)
    }

    @Test("a timeout completes with -ETIME; a wait with a timeout returns -ETIME when nothing comes")
    func timeouts() throws {
        var ring = try Ring(entries: 8)
        let queued = ring.prepareTimeout(nanoseconds: 1_000_000, userData: 7)
        _ = ring.submitAndWait(timeoutNanoseconds: -1)
        var seen: [Completion] = []
        ring.reap { seen.append($0) }
        let idle = ring.submitAndWait(timeoutNanoseconds: 1_000_000)
        #expect(queued)
        #expect(seen.map(\.userData) == [7])
        #expect(seen.first?.result == -ETIME)
        #expect(idle == -ETIME)
    }

    @Test("a multishot poll on an eventfd posts one CQE per wake-up, flagged MORE")
    func multishotPoll() throws {
        var ring = try Ring(entries: 8)
        let fd = eventfd(0, Int32(EFD_NONBLOCK | EFD_CLOEXEC))
        defer { close(fd) }
        let queued = ring.preparePollAdd(fd: fd, events: PollEvents.readable, multishot: true, userData: 9)
        ring.submit()
        var one: UInt64 = 1
        var seen: [Completion] = []
        for _ in 0..<3 {
            _ = write(fd, &one, 8)
            _ = ring.submitAndWait(timeoutNanoseconds: 1_000_000_000)
            ring.reap { seen.append($0) }
            var value: UInt64 = 0
            _ = read(fd, &value, 8)
        }
        let removeQueued = ring.preparePollRemove(target: 9, userData: 10)
        _ = ring.submitAndWait(timeoutNanoseconds: 1_000_000_000)
        var after: [Completion] = []
        ring.reap { after.append($0) }
        #expect(queued && removeQueued)
        #expect(seen.count == 3)
        #expect(seen.allSatisfy { $0.userData == 9 && $0.hasMore && UInt32($0.result) & PollEvents.readable != 0 })
        // The removal's own CQE, and the poll's last one without MORE (-ECANCELED).
        #expect(after.contains { $0.userData == 10 && $0.result == 0 })
        #expect(after.contains { $0.userData == 9 && !$0.hasMore })
    }

    @Test("a full submission queue is submitted to make room")
    func fullQueueFlushes() throws {
        var ring = try Ring(entries: 4)
        var queued = 0
        for i in 0..<20 where ring.prepareNop(userData: UInt64(i)) { queued += 1 }
        _ = ring.submitAndWait(timeoutNanoseconds: -1)
        var ids: [UInt64] = []
        for _ in 0..<100 where ids.count < 20 {
            ring.reap { ids.append($0.userData) }
            if ids.count < 20 { _ = ring.submitAndWait(timeoutNanoseconds: 1_000_000_000) }
        }
        let enters = ring.enterCount
        #expect(queued == 20)
        #expect(ids.sorted() == (0..<20).map(UInt64.init))
        #expect(enters >= 5, "the SQ of 4 was submitted as it filled")
    }
}

@Suite("Ring: SQEs per io_uring_enter", .enabled(if: uringAvailable, "io_uring is refused on this machine"))
struct RingBatchTests {
    /// Queues `count` nops, submits, and reaps them all; returns what the ring counted.
    func run(_ ring: inout Ring, nops count: Int) -> (queued: Int, reaped: Int) {
        var queued = 0
        for i in 0..<count where ring.prepareNop(userData: UInt64(i)) { queued += 1 }
        var reaped = 0
        for _ in 0..<100 where reaped < count {
            _ = ring.submitAndWait(timeoutNanoseconds: 1_000_000_000)
            reaped += ring.reap { _ in }
        }
        return (queued, reaped)
    }

    @Test("unbounded, one io_uring_enter hands the kernel every queued SQE, and the ring counts them")
    func unboundedBatch() throws {
        var ring = try Ring(entries: 64)
        let (queued, reaped) = run(&ring, nops: 40)
        let largest = ring.largestSubmission, submitted = ring.submittedCount, enters = ring.enterCount
        #expect(queued == 40 && reaped == 40)
        #expect(largest == 40 && submitted == 40 && enters == 1)
    }

    @Test("a batch bound of 4 hands at most 4 SQEs to each io_uring_enter")
    func boundedBatch() throws {
        var ring = try Ring(entries: 64)
        ring.maxSubmissionBatch = 4
        let (queued, reaped) = run(&ring, nops: 40)
        let largest = ring.largestSubmission, submitted = ring.submittedCount, enters = ring.enterCount
        #expect(queued == 40 && reaped == 40)
        #expect(largest == 4 && submitted == 40)
        #expect(enters >= 10, "40 SQEs, 4 at a time")
    }
}

@Suite("UringProbe")
struct UringProbeTests {
    @Test("the probe agrees with creating a ring")
    func probeMatchesRing() {
        let ringWorks = (try? Ring(entries: 2)) != nil
        #expect(UringProbe.check().isAvailable == ringWorks)
    }

    @Test("refusals are explained")
    func explanations() {
        #expect(UringProbe.explain(errno: ENOSYS).contains("no io_uring"))
        #expect(UringProbe.explain(errno: EPERM).contains("EPERM"))
        #expect(UringProbe.explain(errno: ENOMEM).contains("RLIMIT_MEMLOCK"))
        #expect(UringProbe.explain(errno: EMFILE).contains("EMFILE"))
    }
}
