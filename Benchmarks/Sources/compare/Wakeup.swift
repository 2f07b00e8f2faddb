// W1 wake-rtt, W2 bh-throughput and W5 timers on Dataplane (Benchmarks/WORKLOADS.md).
import Aio
import CBenchSupport
import Glibc
import IOThreads
import Synchronization

/// Mallocs (all threads) while `body` runs.
func countingMallocs(_ body: () throws -> Void) rethrows -> UInt64 {
    let m0 = dp_malloc_count()
    dp_malloc_count_enable(1)
    defer { dp_malloc_count_enable(0) }
    try body()
    return dp_malloc_count() - m0
}

// W1: a client thread schedules a BH on an IOThread; the BH sets a flag; the client spins.
func dataplaneW1(pollMaxNs: Int64) throws -> [String: Double] {
    var props = IOThreadProperties()
    props.pollMaxNs = pollMaxNs
    let thread = try IOThread(id: "w1", properties: props)
    defer { try? thread.stop() }
    // The benchmark holds the IOThread it uses: the way to its context.
    let holds = IOThreadHoldSet(holder: .monitor(name: "bench"))
    try holds.hold([thread])
    defer { holds.release() }
    let ctx = holds.context(of: thread)
    let flag = Atomic<Bool>(false)
    let bh = ctx.makeBottomHalf(name: "w1") { flag.store(true, ordering: .releasing) }
    defer { bh.delete() }
    let warm = 20_000, n = 200_000
    var samples = [Int64](repeating: 0, count: n)
    var w0: UInt64 = 0, e0: UInt64 = 0
    for i in 0..<(warm + n) {
        if i == warm { w0 = thread.statistics.eventfdWrites; e0 = thread.statistics.ringEnters }
        flag.store(false, ordering: .relaxed)
        let t0 = monotonicNanoseconds()
        bh.schedule()
        while !flag.load(ordering: .acquiring) {}
        if i >= warm { samples[i - warm] = monotonicNanoseconds() - t0 }
    }
    samples.sort()
    return ["p50": percentile(samples, 0.5), "p99": percentile(samples, 0.99), "p999": percentile(samples, 0.999),
            "eventfd_per_op": Double(thread.statistics.eventfdWrites - w0) / Double(n),
            "enters_per_op": Double(thread.statistics.ringEnters - e0) / Double(n)]
}

/// A counter the W2 callbacks bump (one shared closure context, allocated once).
final class Counter: Sendable {
    let value = Atomic<Int>(0)
}

// W2, one-shot: one producer schedules 2M one-shot BHs as fast as it can; the IOThread runs them.
func dataplaneW2OneShot() throws -> [String: Double] {
    var props = IOThreadProperties()
    props.pollMaxNs = 0
    let thread = try IOThread(id: "w2", properties: props)
    defer { try? thread.stop() }
    // The benchmark holds the IOThread it uses: the way to its context.
    let holds = IOThreadHoldSet(holder: .monitor(name: "bench"))
    try holds.hold([thread])
    defer { holds.release() }
    let ctx = holds.context(of: thread)
    return oneShotThroughput { ctx.scheduleOneShot($0) }
}

/// W2 one-shot, for any API that takes a closure to run on another thread (a one-shot BH,
/// NIO's `execute`): 2M closures as fast as one producer can hand them over, timed until the
/// last one ran; then allocations per closure, counted in a separate (untimed) pass.
func oneShotThroughput(_ submit: (@escaping @Sendable () -> Void) -> Void) -> [String: Double] {
    let ran = Counter()
    let n = 2_000_000
    let t0 = monotonicNanoseconds()
    for _ in 0..<n { submit { ran.value.add(1, ordering: .relaxed) } }
    while ran.value.load(ordering: .relaxed) < n {}
    let dt = monotonicNanoseconds() - t0
    let m = 100_000
    let mallocs = countingMallocs {
        for _ in 0..<m { submit { ran.value.add(1, ordering: .relaxed) } }
        while ran.value.load(ordering: .relaxed) < n + m {}
    }
    return ["per_second": Double(n) * 1e9 / Double(dt), "mallocs_per_op": Double(mallocs) / Double(m)]
}

/// The floor under any one-shot closure API (W2's one-shot row, and NIO's `execute`): the
/// cheapest hand-off of a closure there is, a preallocated single-producer ring with no
/// allocation and no lock. What is left is the closure itself: it captures shared state
/// (here `ran`, as W2's does), so the scheduling thread retains that and the running thread
/// releases it, one contended cache line per closure.
func closureHandOffFloor() -> [String: Double] {
    final class Ring: @unchecked Sendable {  // slot i is written before `tail` passes it, read after
        let size = 4096
        let slots: UnsafeMutablePointer<(() -> Void)?>
        let head = Atomic<Int>(0), tail = Atomic<Int>(0)
        init() {
            slots = .allocate(capacity: size)
            slots.initialize(repeating: nil, count: size)
        }
        deinit {
            slots.deinitialize(count: size)
            slots.deallocate()
        }
    }
    let ring = Ring()
    let ran = Counter()
    let n = 2_000_000
    let consumer = PThread {
        var k = 0
        while k < n {
            let t = ring.tail.load(ordering: .acquiring)
            while k < t {
                let f = ring.slots[k & (ring.size - 1)].take()
                f?()
                k += 1
            }
            ring.head.store(k, ordering: .releasing)
        }
    }
    let t0 = monotonicNanoseconds()
    for i in 0..<n {
        while i - ring.head.load(ordering: .acquiring) >= ring.size {}
        ring.slots[i & (ring.size - 1)] = { ran.value.add(1, ordering: .relaxed) }
        ring.tail.store(i + 1, ordering: .releasing)
    }
    consumer.join()
    let dt = monotonicNanoseconds() - t0
    precondition(ran.value.load(ordering: .relaxed) == n)
    return ["per_second": Double(n) * 1e9 / Double(dt)]
}

/// W2 with existing BHs: 2M BHs made beforehand (the C loop's preallocated nodes), each
/// scheduled once per round by one producer; the IOThread runs them. Rounds reuse them.
///
/// The producer walks them two ways. `unmanaged`: an array of `Unmanaged<BottomHalf>`, as
/// the C loop walks raw pointers; this is the row the goal is judged on. `[BottomHalf]`: a
/// plain `for bh in bhs`, where the caller's compiler retains and releases each element
/// around the call (two more locked instructions per BH, outside the library); reported
/// beside it so the difference is visible.
final class ExistingBHs {
    let thread: IOThread
    let holds = IOThreadHoldSet(holder: .monitor(name: "bench"))
    let ran = Counter()
    var bhs: [BottomHalf] = []
    var refs: [Unmanaged<BottomHalf>] = []
    let n = 2_000_000
    var rounds = 0

    init() throws {
        var props = IOThreadProperties()
        props.pollMaxNs = 0
        thread = try IOThread(id: "w2e", properties: props)
        let ran = self.ran
        let callback: @Sendable () -> Void = { ran.value.add(1, ordering: .relaxed) }
        bhs.reserveCapacity(n)
        try holds.hold([thread])
        let ctx = holds.context(of: thread)
        for _ in 0..<n { bhs.append(ctx.makeBottomHalf(name: "w2", callback)) }
        refs = bhs.map { Unmanaged.passUnretained($0) }
        // One untimed, uncounted round: whatever the loop grows once (its batch arrays) is
        // not a per-BH cost.
        for bh in bhs { bh.schedule() }
        while ran.value.load(ordering: .relaxed) < n {}
        rounds = 1
    }

    func round(unmanaged: Bool = true) -> [String: Double] {
        rounds += 1
        let target = rounds * n
        let refs = self.refs, bhs = self.bhs
        var dt: Int64 = 0
        let mallocs = countingMallocs {
            let t0 = monotonicNanoseconds()
            if unmanaged {
                for bh in refs { bh._withUnsafeGuaranteedRef { $0.schedule() } }
            } else {
                for bh in bhs { bh.schedule() }
            }
            while ran.value.load(ordering: .relaxed) < target {}
            dt = monotonicNanoseconds() - t0
        }
        return ["per_second": Double(n) * 1e9 / Double(dt), "mallocs": Double(mallocs), "ops": Double(n)]
    }

    func close() {
        for bh in bhs { bh.delete() }
        bhs = []
        holds.release()
        try? thread.stop()
    }
}

// W5: 10k one-shot timers, deadlines uniform in 0–10 ms (after a 20 ms lead for arming).
func dataplaneW5() throws -> [String: Double] {
    let thread = try IOThread(id: "w5")
    defer { try? thread.stop() }
    // The benchmark holds the IOThread it uses: the way to its context.
    let holds = IOThreadHoldSet(holder: .monitor(name: "bench"))
    try holds.hold([thread])
    defer { holds.release() }
    let ctx = holds.context(of: thread)
    let n = 10_000
    final class Results: @unchecked Sendable {  // written on the IOThread only, read after `done`
        var late = [Int64](repeating: 0, count: 10_000)
        var timers: [AioTimer] = []
        var fired = 0
        var armNs: Int64 = 0
    }
    let results = Results()
    let done = Atomic<Bool>(false)
    var rng = SystemRandomNumberGenerator()
    let offsets = (0..<n).map { _ in Int64.random(in: 0..<10_000_000, using: &rng) }
    ctx.scheduleOneShot {
        let start = monotonicNanoseconds() + 20_000_000
        for i in 0..<n {
            let deadline = start + offsets[i]
            let t = ctx.makeTimer {
                results.late[i] = monotonicNanoseconds() - deadline
                results.fired += 1
                if results.fired == n { done.store(true, ordering: .releasing) }
            }
            t.arm(at: deadline)
            results.timers.append(t)
        }
        results.armNs = monotonicNanoseconds() - (start - 20_000_000)
    }
    while !done.load(ordering: .acquiring) { usleep(1000) }
    let sorted = results.late.sorted()
    return ["p50": percentile(sorted, 0.5), "p99": percentile(sorted, 0.99), "max": Double(sorted.last!),
            "arm_ns": Double(results.armNs)]
}

// Executor jobs: a task that prefers IOThread B calls an actor pinned to IOThread A, so each
// call enqueues two jobs (to A, and back to B), both through IOThread.enqueue.
actor PinnedCounter {
    let thread: IOThread
    var calls = 0
    init(_ thread: IOThread) { self.thread = thread }
    nonisolated var unownedExecutor: UnownedSerialExecutor { thread.asUnownedSerialExecutor() }
    func bump() { calls += 1 }
}

func dataplaneExecutorJobs() throws -> [String: Double] {
    let a = try IOThread(id: "exec-a")
    let b = try IOThread(id: "exec-b")
    defer {
        try? a.stop()
        try? b.stop()
    }
    let actor = PinnedCounter(a)
    let n = 100_000
    // Warm up (the job arrays reach their capacity), then count.
    let result = try blockOn { () async -> [String: Double] in
        await withTaskExecutorPreference(b) {
            for _ in 0..<10_000 { await actor.bump() }
            let m0 = dp_malloc_count()
            dp_malloc_count_enable(1)
            let t0 = monotonicNanoseconds()
            for _ in 0..<n { await actor.bump() }
            let dt = monotonicNanoseconds() - t0
            dp_malloc_count_enable(0)
            let m = dp_malloc_count() - m0
            return ["mallocs_per_job": Double(m) / Double(2 * n), "ns_per_hop": Double(dt) / Double(2 * n)]
        }
    }
    return result
}

