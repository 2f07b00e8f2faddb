// Timers of one AioContext.
//
// Design note (QEMU util/qemu-timer.c). One min-heap per clock, ordered by (deadline,
// arming sequence) so that equal deadlines fire in the order they were armed, under one
// mutex per context: timers may be armed and cancelled from any thread. Arming a timer
// that becomes the earliest of its clock notifies the loop, so a sleeping loop recomputes
// its timeout. The loop reads each clock once per iteration, pops every expired timer and
// runs its callback with the mutex dropped (a callback may re-arm itself). While it does, the
// heap remembers that clock reading, and a timer armed for a deadline at or before it (from
// its own callback, say) is armed just after it instead: it fires on the next iteration, never
// again in the same pass. QEMU runs such a timer again at once, without bound (a timer that
// keeps re-arming itself in the past starves the loop).
import Synchronization

/// A one-shot timer on a context. Arm it with ``arm(at:)`` or ``arm(after:)`` (re-arm from
/// the callback for periodic behaviour); the callback runs on the home thread.
///
/// `@unchecked Sendable`: `deadline` and `heapIndex` are read and written only
/// with the owning context's timer mutex held; everything else is immutable.
public final class AioTimer: @unchecked Sendable {
    public let clock: AioClock
    let callback: @Sendable () -> Void
    /// Not retained, for the reason given on `BottomHalf.unmanagedContext`.
    let unmanagedContext: Unmanaged<AioContext>
    // Guarded by context.timerHeaps. `@exclusivity(unchecked)`: the mutex already makes the
    // accesses exclusive, and the dynamic checks (a TLS lookup each) cost more than the heap.
    @exclusivity(unchecked) var deadline: Int64 = -1
    @exclusivity(unchecked) var heapIndex: Int = -1

    init(context: AioContext, clock: AioClock, callback: @escaping @Sendable () -> Void) {
        // Unretained: a timer is not used after its context has gone (ThreadingRules).
        self.unmanagedContext = Unmanaged.passUnretained(context)
        self.clock = clock
        self.callback = callback
    }

    /// Arms (or re-arms) the timer to fire at `deadline`, in ns on its clock. A deadline in
    /// the past fires on the next iteration, also when the timer is re-armed from a timer
    /// callback (its own included): it does not run again in the pass that runs timers now.
    /// (Armed during that pass, its ``expireTime`` then reads one ns after the pass's clock
    /// reading.) Thread-safe.
    public func arm(at deadline: Int64) {
        unmanagedContext._withUnsafeGuaranteedRef { $0.armTimer(self, deadline: max(0, deadline)) }
    }

    /// Arms the timer to fire `nanoseconds` from now. A delay that reaches past the end of the
    /// clock (`Int64.max` ns) arms it there, where it never fires; it does not wrap into the
    /// past.
    public func arm(after nanoseconds: Int64) { arm(at: saturatingAdd(clock.now, max(0, nanoseconds))) }

    /// Disarms the timer. Thread-safe; does not wake the loop (waking late is harmless).
    public func cancel() { unmanagedContext._withUnsafeGuaranteedRef { $0.cancelTimer(self) } }

    /// Whether the timer is armed and has not fired yet.
    public var isPending: Bool {
        unmanagedContext._withUnsafeGuaranteedRef { $0.timerHeaps.withLock { _ in heapIndex >= 0 } }
    }

    /// The armed deadline, or nil.
    public var expireTime: Int64? {
        unmanagedContext._withUnsafeGuaranteedRef { $0.timerHeaps.withLock { _ in heapIndex >= 0 ? deadline : nil } }
    }
}

/// A binary min-heap of timers keyed by (deadline, sequence), tracking each timer's index.
///
/// The keys live in the heap's own entries, so a sift compares contiguous memory instead of
/// following a pointer into each timer; entries move with bitwise moves (no reference
/// counting). An entry holds its timer strongly: an armed timer lives until it fires or is
/// cancelled.
struct TimerHeap: ~Copyable {
    struct Entry {
        var deadline: Int64
        var sequence: UInt64
        let timer: AioTimer
    }
    var items = RawArray<Entry>(capacity: 16)
    var nextSequence: UInt64 = 0
    /// While `runTimers` pops this heap: the clock reading it pops against (`.min` otherwise).
    /// A deadline armed at or before it is moved just after it, so it waits for the next pass.
    var passNow: Int64 = .min

    var first: AioTimer? { items.isEmpty ? nil : items[0].timer }
    /// The earliest deadline, or nil when empty.
    var firstDeadline: Int64? { items.isEmpty ? nil : items[0].deadline }

    @inline(__always)
    func less(_ i: Int, _ j: Int) -> Bool {
        let a = items[i].deadline, b = items[j].deadline
        return a < b || (a == b && items[i].sequence < items[j].sequence)
    }

    @inline(__always)
    mutating func swapEntries(_ i: Int, _ j: Int) {
        items.swapAt(i, j)
        items[i].timer.heapIndex = i
        items[j].timer.heapIndex = j
    }

    mutating func insert(_ t: AioTimer) {
        nextSequence &+= 1
        t.heapIndex = items.count
        items.append(Entry(deadline: t.deadline, sequence: nextSequence, timer: t))
        siftUp(items.count - 1)
    }

    mutating func remove(_ t: AioTimer) {
        let i = t.heapIndex
        precondition(i >= 0 && i < items.count && items[i].timer === t, "BUG DETECTED: timer heap corrupted")
        let last = items.count - 1
        if i != last { swapEntries(i, last) }
        _ = items.removeLast()
        t.heapIndex = -1
        if i < items.count {
            siftDown(i)
            siftUp(i)
        }
    }

    mutating func siftUp(_ start: Int) {
        var i = start
        while i > 0 {
            let parent = (i - 1) / 2
            guard less(i, parent) else { break }
            swapEntries(i, parent)
            i = parent
        }
    }

    mutating func siftDown(_ start: Int) {
        var i = start
        let n = items.count
        while true {
            let l = 2 * i + 1, r = l + 1
            var m = i
            if l < n && less(l, m) { m = l }
            if r < n && less(r, m) { m = r }
            if m == i { return }
            swapEntries(i, m)
            i = m
        }
    }
}

/// One heap per clock.
struct TimerHeaps: ~Copyable {
    var monotonic = TimerHeap()
    var realtime = TimerHeap()
}

extension AioContext {
    /// Creates a timer on this context. Thread-safe.
    public func makeTimer(clock: AioClock = .monotonic, _ callback: @escaping @Sendable () -> Void) -> AioTimer {
        AioTimer(context: self, clock: clock, callback: callback)
    }

    func armTimer(_ t: AioTimer, deadline: Int64) {
        let becameFirst = timerHeaps.withLock { heaps -> Bool in
            func arm(_ heap: inout TimerHeap) -> Bool {
                if t.heapIndex >= 0 { heap.remove(t) }
                // Already due in the pass that runs timers now: the next pass fires it.
                t.deadline = deadline <= heap.passNow ? heap.passNow &+ 1 : deadline
                heap.insert(t)
                return heap.first === t
            }
            let first = t.clock == .monotonic ? arm(&heaps.monotonic) : arm(&heaps.realtime)
            publishEarliest(heaps)
            return first
        }
        if becameFirst { notify() }
    }

    func cancelTimer(_ t: AioTimer) {
        timerHeaps.withLock { heaps in
            guard t.heapIndex >= 0 else { return }
            if t.clock == .monotonic { heaps.monotonic.remove(t) } else { heaps.realtime.remove(t) }
            publishEarliest(heaps)
        }
    }

    /// Publishes each heap's earliest deadline (`.max`: none), under the heaps' lock, so that
    /// the loop can skip the lock on the many iterations with no timer due. Release: a
    /// thread that armed an earlier timer then notifies, and the loop's acquire of
    /// `notified` makes this store visible to its next look.
    func publishEarliest(_ heaps: borrowing TimerHeaps) {
        earliestMonotonic.store(heaps.monotonic.firstDeadline ?? .max, ordering: .releasing)
        earliestRealtime.store(heaps.realtime.firstDeadline ?? .max, ordering: .releasing)
    }

    /// ns until the earliest timer (0 if one has expired), or -1 if none is armed.
    func timerTimeout() -> Int64 {
        let m = earliestMonotonic.load(ordering: .acquiring)
        let r = earliestRealtime.load(ordering: .acquiring)
        var timeout: Int64 = -1
        if m != .max { timeout = soonest(timeout, max(0, m - AioClock.monotonic.now)) }
        if r != .max { timeout = soonest(timeout, max(0, r - AioClock.realtime.now)) }
        return timeout
    }

    /// Runs every expired timer; returns whether any ran (QEMU `timerlistgroup_run_timers`).
    func runTimers() -> Bool {
        var progress = false
        for clock in AioClock.allCases {
            // Without the lock or a clock read: most iterations have nothing armed. A timer
            // armed meanwhile by another thread comes with a notify, hence another iteration.
            let earliest = clock == .monotonic
                ? earliestMonotonic.load(ordering: .acquiring) : earliestRealtime.load(ordering: .acquiring)
            guard earliest != .max else { continue }
            let now = clock.now
            guard earliest <= now else { continue }
            // The pass's clock reading goes into the heap with the first pop and the enclosing
            // pass's (a nested poll's pass runs inside a timer callback) comes back with the
            // last, all under the locks the pops take anyway.
            var enclosingPassNow: Int64? = nil
            while true {
                let due: AioTimer? = timerHeaps.withLock { h in
                    func pop(_ heap: inout TimerHeap) -> AioTimer? {
                        if enclosingPassNow == nil {
                            enclosingPassNow = heap.passNow
                            heap.passNow = now
                        }
                        guard let d = heap.firstDeadline, d <= now, let t = heap.first else {
                            heap.passNow = enclosingPassNow!
                            return nil
                        }
                        heap.remove(t)
                        return t
                    }
                    let due = clock == .monotonic ? pop(&h.monotonic) : pop(&h.realtime)
                    if due != nil { publishEarliest(h) }
                    return due
                }
                guard let t = due else { break }
                progress = true
                statistics._timersFired.bump()
                t.callback()
            }
        }
        return progress
    }
}
