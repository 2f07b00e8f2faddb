import Glibc
import Testing

@testable import Aio

@Suite("Bottom halves: ordering, idle BHs, nesting")
struct BottomHalfOrderTests {
    @Test("BHs of one batch run in the order they were first scheduled (FIFO)", arguments: backends)
    func fifo(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        let order = Local<[Int]>([])
        let bhs = (0..<5).map { i in ctx.makeBottomHalf { order.value.append(i) } }
        for i in [3, 1, 4, 0, 2] { bhs[i].schedule() }
        bhs[3].schedule()  // already pending: keeps its place, runs once
        #expect(ctx.poll(blocking: false))
        #expect(order.value == [3, 1, 4, 0, 2])
        bhs.forEach { $0.delete() }
    }

    @Test("an idle BH runs but is not progress, and bounds the wait to 10 ms", arguments: backends)
    func idleBottomHalf(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        let n = Local(0)
        let bh = ctx.makeBottomHalf { n.value += 1 }
        bh.scheduleIdle()
        #expect(ctx.computeTimeout() == 10_000_000)
        while ctx.poll(blocking: false) {}
        #expect(n.value == 1)
        bh.scheduleIdle()
        // Scheduling notified the loop (which was not waiting: no eventfd write): accept that,
        // so that the next poll's wait is bounded by the idle BH alone.
        ctx.notifyAccept()
        #expect(ctx.computeTimeout() == 10_000_000)
        let waits = ctx.statistics.blockingWaits
        #expect(!ctx.poll(blocking: true), "an idle BH is not progress")
        #expect(ctx.statistics.blockingWaits - waits == 1, "the poll waited in the kernel, once")
        #expect(n.value == 2, "and, with nothing else to wake it, returned to run the idle BH")
        bh.delete()
    }

    @Test("a nested poll runs the parent's remaining BHs, and every BH runs once", arguments: backends)
    func nestedPollRunsParentsBHs(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        let order = Local<[String]>([])
        let second = ctx.makeBottomHalf { order.value.append("second") }
        let third = ctx.makeBottomHalf { order.value.append("third") }
        let first = ctx.makeBottomHalf {
            order.value.append("first")
            ctx.poll(blocking: false)  // nested: drains the rest of this batch
            order.value.append("first done")
        }
        first.schedule()
        second.schedule()
        third.schedule()
        #expect(ctx.poll(blocking: false))
        #expect(order.value == ["first", "second", "third", "first done"])
        #expect(!ctx.poll(blocking: false))
        [first, second, third].forEach { $0.delete() }
    }

    @Test("one-shot BHs from many threads each run exactly once", .timeLimit(.minutes(1)),
          arguments: backends)
    func oneShotsFromManyThreads(_ backend: AioContext.Backend) throws {
        let loop = LoopThread(backend: backend)
        let ctx = loop.context!
        let perThread = 5000
        let counts = Local([Int](repeating: 0, count: 4))
        var threads: [pthread_t] = []
        for k in 0..<4 {
            threads.append(try spawn {
                for _ in 0..<perThread { ctx.scheduleOneShot { counts.value[k] += 1 } }
            })
        }
        for t in threads { pthread_join(t, nil) }
        loop.sync {}
        // All were scheduled before the sync BH, so all ran before it (on the loop thread,
        // which owns `counts`).
        let seen = Local<[Int]>([])
        loop.sync { seen.value = counts.value }
        #expect(seen.value == [perThread, perThread, perThread, perThread])
        loop.join()
    }
}
