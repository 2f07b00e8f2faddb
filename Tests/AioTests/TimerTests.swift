// Timers beyond QEMU's test-aio checklist: re-arming from the callback, extreme deadlines.
import Glibc
import Testing

@testable import Aio

@Suite("Timers")
struct TimerTests {
    @Test("a timer re-armed in the past from its own callback fires on the next iteration, once per poll",
          arguments: backends)
    func rearmedInThePastFiresNextIteration(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        let runs = Local(0)
        let timer = Local<AioTimer?>(nil)
        timer.value = ctx.makeTimer {
            runs.value += 1
            if runs.value < 1000 { timer.value!.arm(at: 0) }  // bounded, should it loop
        }
        timer.value!.arm(at: 0)
        #expect(ctx.poll(blocking: false))
        #expect(runs.value == 1, "not again in the same pass")
        #expect(timer.value!.isPending)
        #expect(ctx.poll(blocking: true), "due at once: the next blocking poll does not wait")
        #expect(runs.value == 2)
        timer.value!.cancel()
        timer.value = nil
    }

    @Test("a timer that keeps re-arming itself in the past does not starve another due timer",
          arguments: backends)
    func rearmingTimerDoesNotStarveOthers(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        let a = Local(0), b = Local(0)
        let timer = Local<AioTimer?>(nil)
        timer.value = ctx.makeTimer {
            a.value += 1
            if a.value < 1000 { timer.value!.arm(at: 0) }
        }
        let other = ctx.makeTimer { b.value += 1 }
        timer.value!.arm(at: 0)
        other.arm(at: 1)
        #expect(ctx.poll(blocking: false))
        #expect(a.value == 1 && b.value == 1, "both due timers ran once")
        #expect(ctx.poll(blocking: false))
        #expect(a.value == 2 && b.value == 1)
        timer.value!.cancel()
        timer.value = nil
    }

    @Test("arm(after:) with a huge delay saturates instead of wrapping: the timer stays pending",
          arguments: backends)
    func hugeDelayDoesNotWrap(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        let fired = Local(0)
        for clock in AioClock.allCases {
            for delay in [Int64.max, Int64.max - 1, Int64.max / 2 + 1] {
                let t = ctx.makeTimer(clock: clock) { fired.value += 1 }
                t.arm(after: delay)
                while ctx.poll(blocking: false) {}
                #expect(fired.value == 0, "\(clock) +\(delay)")
                #expect(t.isPending)
                #expect((t.expireTime ?? 0) > clock.now)
                t.cancel()
            }
        }
    }

    @Test("a blocking poll with a timer at the far end of time still returns for another event")
    func farDeadlineDoesNotOverflowTheWait() async {
        await #expect(processExitsWith: .success) {
            for backend in backends {
                let ctx = try! AioContext(backend: backend)
                let e = try! EventNotifier()
                let reads = Local(0)
                ctx.setEventNotifier(e, FDHandlerCallbacks(read: { reads.value += 1 }))
                let t = ctx.makeTimer {}
                t.arm(at: Int64.max - 1)
                while ctx.poll(blocking: false) {}
                e.set()
                if !ctx.poll(blocking: true) || reads.value != 1 { exit(3) }
                t.cancel()
                ctx.removeEventNotifier(e)
            }
        }
    }
}
