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
}
