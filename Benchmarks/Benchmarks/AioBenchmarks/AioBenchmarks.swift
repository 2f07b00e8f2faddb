// package-benchmark suite: deterministic counts are gated (allocations per operation),
// wall-clock figures are reported only (2 shared vCPUs). Names have no spaces: the
// threshold files are looked up by name. Run: `make bench-gate` (thresholds check).
import Aio
import Benchmark
import Devices
import Glibc
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
        let holds = IOThreadHoldSet(holder: .monitor(name: "bench"))  // the way to its context
        try holds.hold([thread])
        let flag = Atomic<Bool>(false)
        let bh = holds.context(of: thread).makeBottomHalf { flag.store(true, ordering: .releasing) }
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
        holds.release()
        try thread.stop()
    }

    // W3 steady state: one request through a null virtio-blk-like device on an IOThread
    // (polling off, the guest waits on the interrupt eventfd): kick, pop, parse, complete,
    // interrupt, reap. Allocates nothing, on either side. 1000 requests per sample.
    Benchmark("W3RequestPollingOff", configuration: .init(
        metrics: [.mallocCountTotal, .wallClock, .throughput],
        scalingFactor: .kilo,
        thresholds: [.mallocCountTotal: .init(absolute: [.p90: 0])]
    )) { benchmark in
        let w3 = W3Fixture.shared
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations { w3.request() }
        benchmark.stopMeasurement()
    }

    // Executor jobs: a task preferring IOThread B calls an actor pinned to IOThread A, so
    // each call enqueues two jobs (to A, then back to B) through IOThread.enqueue, and the
    // enqueue on B may race with B running its previous batch. Allocates nothing.
    // 1000 calls (2000 jobs) per sample.
    Benchmark("ExecutorJobHop", configuration: .init(
        metrics: [.mallocCountTotal, .wallClock, .throughput],
        scalingFactor: .kilo,
        thresholds: [.mallocCountTotal: .init(absolute: [.p90: 0])]
    )) { benchmark async in
        let f = ExecutorFixture.shared
        await withTaskExecutorPreference(f.b) {
            for _ in 0..<1000 { await f.actor.bump() }  // warm: job arrays at capacity
            benchmark.startMeasurement()
            for _ in benchmark.scaledIterations { await f.actor.bump() }
            benchmark.stopMeasurement()
        }
    }
}

// MARK: - Fixtures, made once per process (a device attach and thread start per sample
// would dominate the samples). Their threads live until the process exits.

/// Blocks the calling thread until `body` has run as a task.
func blockOn(_ body: @escaping @Sendable () async throws -> Void) {
    let sem = UnsafeMutablePointer<sem_t>.allocate(capacity: 1)
    sem_init(sem, 0, 0)
    nonisolated(unsafe) let s = sem
    Task.detached {
        do { try await body() } catch { fatalError("fixture: \(error)") }
        sem_post(s)
    }
    while sem_wait(sem) != 0 {}
    sem_destroy(sem)
    sem.deallocate()
}

/// A null device on an IOThread (polling off) and its guest queue. `@unchecked Sendable`:
/// the guest queue is used by one benchmark sample at a time.
final class W3Fixture: @unchecked Sendable {
    static let shared = W3Fixture()

    let thread: IOThread
    let device: VirtioBlkDevice
    let guest: GuestQueue
    var id: UInt64 = 0

    init() {
        var props = IOThreadProperties()
        props.pollMaxNs = 0
        thread = try! IOThread(id: "w3", properties: props)  // a machine without threads cannot run the suite
        device = try! VirtioBlkDevice(id: "disk0", queues: 1, queueSize: 256, backend: .null)
        let (t, d) = (thread, device)
        blockOn { try await d.attach(to: t) }
        guest = try! GuestQueue(device: device, queue: 0)  // the device made room for it
        for _ in 0..<10_000 { request() }
    }

    /// One request, submitted, kicked and waited for.
    func request() {
        id &+= 1
        guest.submit(id: id)
        while guest.reap({ _, _, _, _ in }) == 0 { guest.waitForInterrupt(timeoutMs: 10) }
    }
}

actor PinnedCounter {
    let thread: IOThread
    var calls = 0
    init(_ thread: IOThread) { self.thread = thread }
    nonisolated var unownedExecutor: UnownedSerialExecutor { thread.asUnownedSerialExecutor() }
    func bump() { calls += 1 }
}

final class ExecutorFixture: Sendable {
    static let shared = ExecutorFixture()

    let a = try! IOThread(id: "exec-a")  // a machine without threads cannot run the suite
    let b = try! IOThread(id: "exec-b")
    let actor: PinnedCounter

    init() { actor = PinnedCounter(a) }
}
