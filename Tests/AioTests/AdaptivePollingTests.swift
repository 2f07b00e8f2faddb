// QEMU's adaptive polling rule (util/aio-posix.c adjust_polling_time), checked with made-up
// block times: no clock, no threads, the same answer on every machine.
import Glibc
import Testing

@testable import Aio

@Suite("Adaptive polling: QEMU's grow/shrink rule")
struct AdaptivePollingRuleTests {
    let qemuDefaults = PollParameters(maxNs: 32768, grow: 0, shrink: 0)

    @Test("with IOThread defaults a window walks 0, 4000, 8000, 16000, 32000, 32768")
    func growsByDoublingToTheCap() {
        var n: Int64 = 0
        var walk: [Int64] = [n]
        for _ in 0..<6 {
            // The event came a little after the window closed, but within poll-max-ns.
            n = AdaptivePolling.adjust(current: n, blockNs: min(n + 1, qemuDefaults.maxNs - 1), qemuDefaults)
            walk.append(n)
        }
        #expect(walk == [0, 4000, 8000, 16000, 32000, 32768, 32768])
    }

    @Test("an event found within the window leaves it unchanged (the sweet spot)")
    func sweetSpot() {
        #expect(AdaptivePolling.adjust(current: 16000, blockNs: 16000, qemuDefaults) == 16000)
        #expect(AdaptivePolling.adjust(current: 16000, blockNs: 10, qemuDefaults) == 16000)
        #expect(AdaptivePolling.adjust(current: 0, blockNs: 0, qemuDefaults) == 0)
    }

    @Test("a block longer than poll-max-ns resets the window to 0 when poll-shrink is 0")
    func shrinkDefaultResets() {
        #expect(AdaptivePolling.adjust(current: 32768, blockNs: 32769, qemuDefaults) == 0)
        #expect(AdaptivePolling.adjust(current: 8000, blockNs: 1_000_000, qemuDefaults) == 0)
    }

    @Test("poll-shrink divides; 1 never shrinks")
    func shrinkDivisor() {
        let p = PollParameters(maxNs: 32768, grow: 0, shrink: 4)
        #expect(AdaptivePolling.adjust(current: 32000, blockNs: 40000, p) == 8000)
        let never = PollParameters(maxNs: 32768, grow: 0, shrink: 1)
        #expect(AdaptivePolling.adjust(current: 32000, blockNs: 40000, never) == 32000)
    }

    @Test("poll-grow multiplies; 1 stays at 4000 for ever; the cap is poll-max-ns")
    func growFactor() {
        let p = PollParameters(maxNs: 100_000, grow: 3, shrink: 0)
        #expect(AdaptivePolling.adjust(current: 0, blockNs: 50, p) == 4000)
        #expect(AdaptivePolling.adjust(current: 4000, blockNs: 5000, p) == 12000)
        #expect(AdaptivePolling.adjust(current: 40000, blockNs: 50000, p) == 100_000)
        let one = PollParameters(maxNs: 100_000, grow: 1, shrink: 0)
        #expect(AdaptivePolling.adjust(current: 4000, blockNs: 5000, one) == 4000)
    }

    @Test("a block exactly at poll-max-ns changes nothing (QEMU's last branch)")
    func blockAtMax() {
        #expect(AdaptivePolling.adjust(current: 16000, blockNs: 32768, qemuDefaults) == 16000)
    }

    @Test("a huge poll-grow saturates at poll-max-ns instead of wrapping negative")
    func hugeGrowSaturates() {
        let p = PollParameters(maxNs: 1_000_000, grow: .max, shrink: 0)
        #expect(AdaptivePolling.adjust(current: 4000, blockNs: 5000, p) == 1_000_000)
        let q = PollParameters(maxNs: .max, grow: .max / 2, shrink: 0)
        #expect(AdaptivePolling.adjust(current: 8000, blockNs: 9000, q) == .max)
        #expect(AdaptivePolling.adjust(current: 3, blockNs: 4, q) == .max)
    }

    @Test("poll-max-ns 0: any block shrinks, nothing grows")
    func disabled() {
        for window: Int64 in [0, 1, 4000, 32768, 1_000_000] {
            for block: Int64 in [1, 4001, 32769, 1_000_000_000] where block > window {
                #expect(AdaptivePolling.adjust(current: window, blockNs: block, .disabled) == 0, "window \(window), block \(block)")
            }
        }
        // A block within the window is QEMU's sweet spot: no change, whatever poll-max-ns is.
        #expect(AdaptivePolling.adjust(current: 4000, blockNs: 10, .disabled) == 4000)
        #expect(AdaptivePolling.adjust(current: 0, blockNs: 0, .disabled) == 0)
    }
}

@Suite("Adaptive polling in the loop")
struct AdaptivePollingLoopTests {
    @Test("a handler joins the poll list after firing once; only handlers that fired are adjusted",
          arguments: backends)
    func onlyFiredHandlersJoinAndAdjust(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        // poll-max-ns of 1 s: any iteration here is shorter, so a fired handler always grows.
        ctx.setPollParameters(PollParameters(maxNs: 1_000_000_000, grow: 0, shrink: 0))
        let fired = try EventNotifier()
        let idle = try EventNotifier()
        let begins = Local(0)
        let ends = Local(0)
        ctx.setEventNotifier(fired, FDHandlerCallbacks(
            read: {}, poll: { false }, pollReady: {}, pollBegin: { begins.value += 1 }, pollEnd: { ends.value += 1 }))
        ctx.setEventNotifier(idle, FDHandlerCallbacks(read: {}, poll: { false }, pollReady: {}))
        while ctx.poll(blocking: false) {}
        let f = ctx.handlersByFd[fired.fileDescriptor]!
        let i = ctx.handlersByFd[idle.fileDescriptor]!
        #expect(!f.inPollList && !i.inPollList, "nobody polls before firing")
        fired.set()
        #expect(ctx.poll(blocking: true))
        #expect(f.inPollList, "joined after firing once")
        #expect(f.pollNs == AdaptivePolling.initialNs, "first growth step")
        #expect(!i.inPollList && i.pollNs == 0, "the idle handler was not adjusted")
        // Now a blocking poll busy-polls (the window is 4 µs) before sleeping: poll-begin, then
        // poll-end and one final poll before it blocks. A timer wakes it.
        let timer = ctx.makeTimer {}
        timer.arm(after: 2_000_000)
        while ctx.poll(blocking: false) {}  // consume the notify of arming the timer
        #expect(ctx.poll(blocking: true))
        #expect(begins.value == 1)
        #expect(ends.value == 1, "poll-end before blocking, paired with poll-begin")
        // Changing the parameters restarts every window from 0 (QEMU resets poll.ns).
        ctx.setPollParameters(PollParameters(maxNs: 1000, grow: 0, shrink: 0))
        ctx.poll(blocking: false)
        #expect(f.pollNs == 0)
        ctx.removeEventNotifier(fired)
        ctx.removeEventNotifier(idle)
    }

    @Test("while polling, work found by a poll callback is dispatched through poll-ready",
          arguments: backends)
    func pollReadyRunsWork(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        ctx.setPollParameters(PollParameters(maxNs: 1_000_000_000, grow: 0, shrink: 0))
        let n = try EventNotifier()
        let pending = Local(0)
        let readyRuns = Local(0)
        let reads = Local(0)
        ctx.setEventNotifier(n, FDHandlerCallbacks(
            read: { reads.value += 1; pending.value = 0 },
            poll: { pending.value > 0 },
            pollReady: { readyRuns.value += 1; pending.value = 0 }))
        while ctx.poll(blocking: false) {}
        n.set()
        #expect(ctx.poll(blocking: true))  // fires through the fd: joins the poll list
        #expect(reads.value == 1)
        pending.value = 1  // work appears without any fd event (a guest wrote a ring)
        #expect(ctx.poll(blocking: true), "found by polling, without blocking")
        #expect(readyRuns.value == 1)
        #expect(reads.value == 1)
        #expect(ctx.statistics.pollHits >= 1)
        ctx.removeEventNotifier(n)
    }
}
