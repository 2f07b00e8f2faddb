// aio-max-batch and the worker pool's bounds on a bare context (QEMU's
// aio_context_set_aio_params and aio_context_set_thread_pool_params), shown with counts: SQEs
// per io_uring_enter, and worker threads.
import Glibc
import Synchronization
import TestSupport
import Testing

@testable import Aio

/// Threads of this process named `name` (/proc/self/task/*/comm).
func threadsNamed(_ name: String) -> Int {
    procEntries("/proc/self/task").filter { tid in
        let fd = open("/proc/self/task/\(tid)/comm", O_RDONLY)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var buf = [UInt8](repeating: 0, count: 32)
        let n = read(fd, &buf, buf.count)
        return n > 0 && String(decoding: buf[0..<n], as: UTF8.self) == name + "\n"
    }.count
}

@Suite("Engine parameters")
struct EngineParameterTests {
    @Test("aio-max-batch bounds the SQEs per io_uring_enter; 0 lets one enter take the whole batch",
          arguments: backends)
    func aioMaxBatchBoundsSubmissions(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        func nops(_ n: Int) -> Int {
            let done = Local(0)
            for _ in 0..<n { ctx.submit(.nop) { _ in done.value += 1 } }
            run(ctx) { done.value == n }
            return done.value
        }
        ctx.setAioMaxBatch(8)
        ctx.poll(blocking: false)  // applied from the next iteration on: this one
        #expect(ctx.aioMaxBatch == 8)
        #expect(nops(64) == 64)
        let bounded = ctx.statistics.largestSubmissionBatch
        ctx.setAioMaxBatch(0)
        ctx.poll(blocking: false)
        #expect(nops(64) == 64)
        let unbounded = ctx.statistics.largestSubmissionBatch
        if ctx.backendKind == .ioUring {
            #expect(bounded >= 1 && bounded <= 8, "64 nops queued at once went at most 8 per enter")
            #expect(unbounded >= 64, "unbounded, one enter took them all")
        } else {
            #expect(bounded == 0 && unbounded == 0, "epoll batches nothing")
        }
    }

    @Test("the worker pool grows to thread-pool-min, shrinks to thread-pool-max, and idle workers above the minimum exit")
    func workerPoolFollowsItsBounds() async {
        await #expect(processExitsWith: .success) {
            // QEMU: 10 s. Relaxed: stored before any worker exists (thread creation orders it).
            WorkerPool.idleTimeoutNanoseconds.store(20_000_000, ordering: .relaxed)
            let ctx = try! AioContext(backend: .epoll)
            guard let fd = anonymousFile(size: 4096) else { exit(2) }
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
            func reads(_ n: Int) -> Bool {
                let results = Local<[Int32]>([])
                for _ in 0..<n { ctx.submit(.read(fd: fd, buffer: buffer, offset: 0)) { results.value.append($0) } }
                run(ctx) { results.value.count == n }
                return results.value == [Int32](repeating: 4096, count: n)
            }
            /// The pool's counts, read under its lock: workers, timed-out idle waits, peak.
            func pool() -> (workers: Int, idleTimeouts: Int, peak: Int) {
                let p = (ctx.monitor as! EpollMonitor).pool!
                p.lock()
                defer { p.unlock() }
                return (p.curThreads, p.idleTimeouts, p.peakThreads)
            }
            func resetPeak() {
                let p = (ctx.monitor as! EpollMonitor).pool!
                p.lock()
                p.peakThreads = p.curThreads
                p.unlock()
            }
            /// Waits until every worker has timed out waiting for work `rounds` more times.
            func idleFor(rounds: Int) -> Bool {
                let start = pool()
                return eventually { pool().idleTimeouts >= start.idleTimeouts + rounds * start.workers }
            }
            // Defaults 0 and 64: the first read starts one worker, which exits once idle.
            if !reads(1) { exit(3) }
            if !eventually({ pool().workers == 0 && threadsNamed("worker") == 0 }) { exit(4) }
            // thread-pool-min 3: three workers at once, and they stay.
            ctx.setThreadPoolLimits(min: 3, max: 64)
            ctx.poll(blocking: false)
            if !eventually({ threadsNamed("worker") == 3 }) { exit(5) }
            if !idleFor(rounds: 2) || threadsNamed("worker") != 3 { exit(6) }
            // thread-pool-max 2: one exits at once; then, idle above the new minimum of 1, another.
            ctx.setThreadPoolLimits(min: 1, max: 2)
            ctx.poll(blocking: false)
            if !eventually({ threadsNamed("worker") == 1 }) { exit(7) }
            if !idleFor(rounds: 2) || threadsNamed("worker") != 1 || pool().workers != 1 { exit(8) }
            // A burst of 16 reads stays within the maximum.
            resetPeak()
            if !reads(16) { exit(9) }
            if pool().peak > 2 { exit(10) }
            buffer.deallocate()
        }
    }
}
