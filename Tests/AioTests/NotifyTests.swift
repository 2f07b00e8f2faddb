import Glibc
import Synchronization
import Testing

@testable import Aio

@Suite("notify: the notify_me / notified protocol")
struct NotifyTests {
    @Test("a burst of cross-thread BH schedules to a sleeping loop writes the eventfd once",
          .timeLimit(.minutes(1)), arguments: backends)
    func burstWakesOnce(_ backend: AioContext.Backend) throws {
        let ran = Atomic<Int>(0)
        let ctxBox = Locked<AioContext?>(nil)
        let polled = Atomic<Bool>(false)
        let burstDone = Atomic<Bool>(false)
        let count = 1000
        // The loop thread makes exactly one blocking iteration during the burst, so that every
        // eventfd write we count happened while that one sleep was announced.
        let thread = try spawn {
            let ctx = try! AioContext(backend: backend)
            while ctx.poll(blocking: false) {}
            ctxBox.withLock { $0 = ctx }
            ctx.poll(blocking: true)
            polled.store(true, ordering: .releasing)
            while !burstDone.load(ordering: .acquiring) { usleep(100) }
            while ran.load(ordering: .relaxed) < count { ctx.poll(blocking: true) }
            ctxBox.withLock { $0 = nil }
        }
        var ctx: AioContext? = nil
        while ctx == nil { ctx = ctxBox.withLock { $0 }; usleep(100) }
        // Wait until the loop announced that it may block (notify_me != 0), then burst.
        while ctx!.wake.pointee.notifyMe.load(ordering: .acquiring) == 0 { usleep(100) }
        let before = ctx!.statistics.eventfdWrites
        for _ in 0..<count { ctx!.scheduleOneShot { ran.add(1, ordering: .relaxed) } }
        while !polled.load(ordering: .acquiring) { usleep(100) }
        let writes = ctx!.statistics.eventfdWrites - before
        burstDone.store(true, ordering: .releasing)
        ctx = nil
        pthread_join(thread, nil)
        #expect(writes == 1)
        #expect(ran.load(ordering: .relaxed) == count)
    }

    @Test("notify on a running loop makes no system call; a bare notify is not progress",
          arguments: backends)
    func notifyWithoutSleeperWritesNothing(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        let before = ctx.statistics.eventfdWrites
        for _ in 0..<100 { ctx.notify() }
        #expect(ctx.statistics.eventfdWrites == before)
        #expect(!ctx.poll(blocking: false), "a bare notify is not progress")
        #expect(!ctx.poll(blocking: false))
    }

    @Test("a notify before a blocking poll makes it return at once", arguments: backends)
    func notifyBeforeBlockingPoll(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        ctx.notify()
        #expect(!ctx.poll(blocking: true), "returns (without progress) instead of sleeping")
    }
}

/// Starts a joinable pthread running `body`.
func spawn(_ body: @escaping @Sendable () -> Void) throws -> pthread_t {
    final class Box: @unchecked Sendable {  // handed to the thread once, read there only
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }
    var thread = pthread_t()
    let rc = pthread_create(&thread, nil, { arg in
        Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue().body()
        return nil
    }, Unmanaged.passRetained(Box(body)).toOpaque())
    guard rc == 0 else { throw AioError.syscall("pthread_create", errno: rc) }
    return thread
}
