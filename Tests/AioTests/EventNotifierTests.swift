// Event notifiers beyond QEMU's test-aio checklist.
import Glibc
import Testing

@testable import Aio

@Suite("Event notifiers")
struct EventNotifierTests {
    @Test("a kick to an event notifier registered with only poll callbacks runs its poll-ready work",
          arguments: backends)
    func pollOnlyNotifierDoesNotSwallowKicks(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        let e = try EventNotifier()
        let readyRuns = Local(0)
        ctx.setEventNotifier(e, FDHandlerCallbacks(poll: { false }, pollReady: { readyRuns.value += 1 }))
        #expect(!ctx.poll(blocking: false))
        e.set()
        #expect(ctx.poll(blocking: true), "the kick is work")
        #expect(readyRuns.value == 1)
        #expect(!ctx.poll(blocking: false), "once per kick")
        e.set()
        #expect(ctx.poll(blocking: true))
        #expect(readyRuns.value == 2)
        ctx.removeEventNotifier(e)
    }
}
