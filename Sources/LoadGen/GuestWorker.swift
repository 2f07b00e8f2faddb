// The guest side of a load run: one thread per virtqueue, driving it as a vCPU would.
import Aio
import Devices
import Glibc
import Histogram
import Synchronization

/// A guest thread driving one virtqueue, as a vCPU would: it keeps `depth` requests
/// outstanding (closed loop) or issues them at a fixed rate (open loop, latency counted from
/// the scheduled time), kicks unless the device suppressed kicks, and waits for completions
/// on the interrupt eventfd or by spinning on the used ring. The load generator runs one
/// per queue; `make bench` runs the same one for W3 and W6.
///
/// `@unchecked Sendable`: everything but the atomics and `published` is touched by the
/// guest thread only, and read by others after ``join()``.
public final class GuestWorker: @unchecked Sendable {
    public let guest: GuestQueue
    let depth: Int
    let spinning: Bool
    /// ns between issues in an open loop, 0 in a closed one.
    let interval: Int64
    let live: Bool
    /// Latency of the completions reaped while ``measuring`` was set, in ns.
    public private(set) var histogram = Histogram<UInt64>(highestTrackableValue: 60_000_000_000,
                                                          numberOfSignificantValueDigits: .three)
    var issueTime: [Int64]
    public private(set) var submitted: UInt64 = 0
    public private(set) var completed: UInt64 = 0
    public private(set) var measuredCompletions: UInt64 = 0
    /// Completions are recorded in ``histogram`` while this is set.
    public let measuring = Atomic<Bool>(false)
    let stop = Atomic<Bool>(false)
    let completedTotal = Atomic<UInt64>(0)
    /// A copy of the histogram the live line reads, refreshed about 4 times a second.
    let published = Locked<Histogram<UInt64>?>(nil)
    var thread = pthread_t()
    /// Whether the thread runs (or ran and was not joined yet). Touched by the owner only.
    var started = false
    /// False if the device stopped answering after a stop was requested (reported as lost).
    public private(set) var drained = true

    /// - Parameters:
    ///   - depth: requests kept outstanding (closed loop; with `rate`, at most this many).
    ///   - spinning: spin on the used ring instead of waiting for interrupts (which are then
    ///     suppressed).
    ///   - rate: requests per second for an open loop; nil for a closed one.
    ///   - live: keep the counters and histogram copy a live report reads (an atomic add per
    ///     reap and a histogram copy 4 times a second); off for allocation-free measuring.
    public init(guest: GuestQueue, depth: Int, spinning: Bool, rate: Double? = nil, live: Bool = true) {
        self.guest = guest
        self.depth = depth
        self.spinning = spinning
        self.interval = rate.map { Int64(1e9 / $0) } ?? 0
        self.live = live
        issueTime = [Int64](repeating: 0, count: guest.capacity)
        guest.setInterruptsSuppressed(spinning)
    }

    convenience init(guest: GuestQueue, config: LoadConfig) {
        self.init(guest: guest, depth: config.rate == nil ? config.queueDepth : guest.capacity,
                  spinning: config.guest == .spinning, rate: config.rate)
    }

    /// Starts the guest thread. The thread keeps the worker alive until it returns.
    /// - Throws: ``DeviceError`` when the kernel refuses the thread.
    public func start() throws(DeviceError) {
        precondition(!started, "BUG DETECTED: a GuestWorker was started twice")
        // Retained for the thread, which takes the reference back when it starts.
        let me = Unmanaged.passRetained(self).toOpaque()
        let rc = pthread_create(&thread, nil, { arg in
            // The reference passed above: the worker lives while its thread runs.
            let w = Unmanaged<GuestWorker>.fromOpaque(arg!).takeRetainedValue()
            w.run()
            return nil
        }, me)
        guard rc == 0 else {
            Unmanaged<GuestWorker>.fromOpaque(me).release()  // the thread that would have taken it never ran
            throw DeviceError("cannot start a guest thread: \(String(cString: strerror(rc)))")
        }
        started = true
    }

    /// Waits for the guest thread, after ``requestStop()`` (at once if it never started).
    public func join() {
        guard started else { return }
        pthread_join(thread, nil)
        started = false
    }

    func run() {
        var next = monotonicNanoseconds()  // open loop: the next scheduled issue time
        var lastPublish = next
        var id: UInt64 = 0
        while true {
            let stopping = stop.load(ordering: .acquiring)
            let now = monotonicNanoseconds()
            if !stopping {
                var submittedNow = false
                while guest.inFlight < depth {
                    var issueAt = now
                    if interval > 0 {
                        guard next <= now else { break }
                        issueAt = next  // latency counts from when it was meant to go
                        next += interval
                    }
                    guard let slot = guest.submit(id: id, kickNow: false) else { break }
                    issueTime[slot] = issueAt
                    id &+= 1
                    submitted &+= 1
                    submittedNow = true
                }
                if submittedNow { guest.kickIfAllowed() }
            }
            let recording = measuring.load(ordering: .relaxed)
            let done = monotonicNanoseconds()
            let n = guest.reap { _, _, _, slot in
                if recording {
                    _ = histogram.record(UInt64(max(1, done - issueTime[slot])))
                    measuredCompletions &+= 1
                }
            }
            completed &+= UInt64(n)
            if live && n > 0 { completedTotal.add(UInt64(n), ordering: .relaxed) }
            if live && done - lastPublish > 250_000_000 {
                lastPublish = done
                let copy = histogram
                published.withLock { $0 = copy }
            }
            if stopping && guest.inFlight == 0 { break }
            if stopping && done - stopAt > 10_000_000_000 {
                drained = false  // the device stopped answering: reported as lost
                break
            }
            if n == 0 {
                if spinning {
                    if guest.inFlight >= depth || interval > 0 { continue }
                } else {
                    var waitMs: Int32 = 10
                    if interval > 0 && guest.inFlight < depth {
                        let until = next - monotonicNanoseconds()
                        if until <= 1_000_000 { continue }
                        waitMs = Int32(min(10, until / 1_000_000))
                    }
                    guest.waitForInterrupt(timeoutMs: waitMs)
                }
            }
        }
    }

    var stopAt: Int64 = .max

    /// Stops issuing; the thread ends once every request in flight has completed (or after
    /// 10 s without an answer, with ``drained`` false).
    public func requestStop() {
        stopAt = monotonicNanoseconds()
        stop.store(true, ordering: .releasing)
    }
}

