// package-benchmark suite: deterministic counts are gated (allocations per operation),
// wall-clock figures are reported only (2 shared vCPUs). Names have no spaces: the
// threshold files are looked up by name. Run: `make bench-gate` (thresholds check).
import Aio
import Benchmark
import IOThreads
import Synchronization

let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .mallocCountTotal, .throughput],
        maxDuration: .seconds(2),
        maxIterations: 1_000_000
    )

    // Scheduling an existing BH and running it: no allocation (W2's persistent variant).
    Benchmark("ScheduleExistingBH", configuration: .init(
        metrics: [.mallocCountTotal, .wallClock, .throughput],
        thresholds: [.mallocCountTotal: .init(absolute: [.p90: 0])]
    )) { benchmark in
        let ctx = try AioContext()
        let bh = ctx.makeBottomHalf {}
        bh.schedule()
        ctx.poll(blocking: false)
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            bh.schedule()
            ctx.poll(blocking: false)
        }
        benchmark.stopMeasurement()
        bh.delete()
    }

    // A one-shot BH allocates its node (as QEMU's aio_bh_schedule_oneshot does).
    Benchmark("ScheduleOneShotBH") { benchmark in
        let ctx = try AioContext()
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            ctx.scheduleOneShot {}
            ctx.poll(blocking: false)
        }
        benchmark.stopMeasurement()
    }

    // Completion I/O: a nop through the context's ring, reusing one completion closure.
    Benchmark("NopThroughRing", configuration: .init(
        metrics: [.mallocCountTotal, .wallClock, .throughput],
        thresholds: [.mallocCountTotal: .init(absolute: [.p90: 0])]
    )) { benchmark in
        let ctx = try AioContext()
        final class Count: @unchecked Sendable { var n = 0 }  // home thread only
        let count = Count()
        let done: (Int32) -> Void = { _ in count.n += 1 }
        for _ in 0..<64 { ctx.submit(.nop, done) }
        while count.n < 64 { ctx.poll(blocking: true) }
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            let target = count.n + 1
            ctx.submit(.nop, done)
            while count.n < target { ctx.poll(blocking: true) }
        }
        benchmark.stopMeasurement()
    }

    // W1 with polling on: the wake-up round trip to an IOThread.
    Benchmark("W1WakeRTTPollingOn", configuration: .init(metrics: [.wallClock, .mallocCountTotal])) { benchmark in
        let thread = try IOThread(id: "bench")
        let flag = Atomic<Bool>(false)
        let bh = thread.context.makeBottomHalf { flag.store(true, ordering: .releasing) }
        for _ in 0..<10_000 {
            flag.store(false, ordering: .relaxed)
            bh.schedule()
            while !flag.load(ordering: .acquiring) {}
        }
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            flag.store(false, ordering: .relaxed)
            bh.schedule()
            while !flag.load(ordering: .acquiring) {}
        }
        benchmark.stopMeasurement()
        bh.delete()
        thread.stop()
    }
}
