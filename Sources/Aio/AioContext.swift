// AioContext: one event loop, QEMU's AioContext semantics on io_uring (or epoll).
//
// Design note. A context has one home thread: the thread that created it. Only that thread
// runs `poll(blocking:)`, dispatches callbacks and touches the ring; nested `poll` calls
// from callbacks are allowed. Other threads talk to it through the thread-safe entry points
// only: `notify`, bottom halves, timers, fd-handler registration (queued and applied by the
// home thread at the start of its next iteration) and `stop`-style BHs built on those.
//
// Cross-thread wake-up is QEMU's notify_me / notified protocol (a Dekker pair, see
// `notify()` and `poll(blocking:)`): a producer writes the eventfd only when the loop has
// announced it may block, and — better than QEMU — only the first producer after the loop
// accepted the last notification does (so a burst of schedules to a sleeping loop costs
// one eventfd write).
import CShims
import Glibc
import Synchronization
import Uring

/// One event loop with QEMU's AioContext semantics: bottom halves, fd handlers and event
/// notifiers, timers, completion I/O and adaptive polling, on io_uring or epoll.
///
/// `@unchecked Sendable`: the thread-safe entry points touch only atomics (`notifyMe`,
/// `notified`, `bhList`, the statistics, the poll parameters) or state behind a `Locked` mutex
/// (`timerHeaps`, `pendingChanges`, `liveBottomHalves`); every other stored property is
/// confined to the home thread, which each home-thread entry point checks.
public final class AioContext: @unchecked Sendable {
    /// How to choose the fd-monitoring backend.
    public enum Backend: Sendable, Equatable {
        /// io_uring unless the kernel refuses it, or `DATAPLANE_FDMON=epoll` is set.
        case automatic
        /// io_uring or fail with ``AioError/Code/ioUringUnavailable``.
        case ioUring
        /// epoll.
        case epoll
    }

    /// The backend this context runs on.
    public var backendKind: FDMonitorKind { monitor.kind }
    /// Why io_uring is not used, when ``backendKind`` is epoll.
    public private(set) var fallbackReason: String? = nil
    /// Counters, readable from any thread.
    public let statistics = AioStatistics()

    let homeThread: pthread_t
    // Home-thread state (see the class comment). `@exclusivity(unchecked)`: only the home
    // thread touches these, and never in overlapping accesses (callbacks run after the loop
    // has finished with them); the dynamic checks a class's `var`s get otherwise cost ~45%
    // of an idle loop iteration in perf (swift_beginAccess, AccessSet, a TLS lookup each).
    /// A `let`, set once in init: calls through it take no reference (a stored `var` would
    /// be retained and released around every call, several times per iteration).
    let monitor: FDMonitor
    let notifier: EventNotifier
    @exclusivity(unchecked) var notifierHandler: FDHandler!
    @exclusivity(unchecked) var handlersByFd: [Int32: FDHandler] = [:]
    @exclusivity(unchecked) var handlerSlots: ContiguousArray<FDHandler?> = []
    @exclusivity(unchecked) var freeHandlerSlots: [Int] = []
    @exclusivity(unchecked) var generation: UInt32 = 0
    // Home thread only, never accessed in overlap: the dynamic checks would cost a TLS lookup
    // per access on the dispatch path.
    @exclusivity(unchecked) var readyHandlers: ContiguousArray<FDHandler> = []
    @exclusivity(unchecked) var readyHead = 0
    @exclusivity(unchecked) var pollHandlers: ContiguousArray<FDHandler> = []
    /// Handlers removed since the last top-level iteration began, kept alive until the
    /// next one: the busy-poll loop calls handlers through unretained references (no
    /// reference counting per spin), and a poll callback may remove handlers, its own too.
    @exclusivity(unchecked) var retiredHandlers: ContiguousArray<FDHandler> = []
    @exclusivity(unchecked) var pollStarted = false
    /// Handlers without a poll callback (QEMU `poll_disable_cnt`).
    @exclusivity(unchecked) var pollDisableCount = 0
    @exclusivity(unchecked) var bhSlices = RawArray<Unmanaged<BottomHalf>?>(capacity: 4)
    /// Completion I/O bookkeeping, behind a pointer (see ``RequestTable``).
    let requests: UnsafeMutablePointer<RequestTable>
    @exclusivity(unchecked) var depth = 0
    /// The loop's last references to deleted BHs and to completion targets, dropped in a
    /// nested iteration: a callback of an enclosing iteration may still be running with one
    /// of them (a BH deleted during its callback, a target whose callback's nested poll ran
    /// its last request). Released when the outermost `poll` returns, as `retiredHandlers`.
    /// `Unmanaged`: each entry is a +1 the loop owns, moved here instead of released.
    /// `@exclusivity(unchecked)`: home thread only, as the state above.
    @exclusivity(unchecked) var parkedReleases = RawArray<Unmanaged<AnyObject>>(capacity: 4)

    // Cross-thread state.
    /// The words every wake-up moves between threads, on a cache line of their own (see
    /// ``WakeWords``).
    let wake: UnsafeMutablePointer<WakeWords>
    let timerHeaps = Locked(TimerHeaps())
    /// Each clock's earliest armed deadline, `.max` when none (see `publishEarliest`).
    let earliestMonotonic = Atomic<Int64>(.max)
    let earliestRealtime = Atomic<Int64>(.max)
    let pendingChanges = Locked<[(Int32, FDHandler?)]>([])
    let hasPendingChanges = Atomic<Bool>(false)
    let liveBottomHalves = Locked<[ObjectIdentifier: String]>([:])
    let pollMaxNs = Atomic<Int64>(0)
    let pollGrow = Atomic<Int64>(0)
    let pollShrink = Atomic<Int64>(0)
    /// Which parameters a setter changed since the loop last looked (`ParameterChange` bits):
    /// one load per iteration covers them all.
    let parametersChanged = Atomic<UInt8>(0)
    /// aio-max-batch and the worker pool's bounds, applied by the home thread.
    let engineParameters = Locked(EngineParameters())

    enum ParameterChange {
        static let poll: UInt8 = 1
        static let engine: UInt8 = 2
    }

    /// QEMU's `aio_max_batch`, `thread_pool_min` and `thread_pool_max` of an AioContext, with
    /// `aio_context_new`'s defaults.
    struct EngineParameters {
        var maxBatch = 0
        var poolMin = 0
        var poolMax = 64
    }

    /// The atomics a scheduler and the loop both write on every wake-up. In the class they
    /// shared a cache line with the loop's own counters (`depth` changes twice per
    /// iteration), so each iteration took the line away from schedulers; here they sit
    /// alone on a 64-byte-aligned, 128-byte block (the adjacent-line prefetcher pairs lines).
    struct WakeWords: ~Copyable {
        /// QEMU `notify_me`: 2 × the number of `poll` calls in their "may block" phase.
        /// Written by the home thread only.
        let notifyMe = Atomic<UInt32>(0)
        /// QEMU `notified`: set by `notify`, cleared by the loop before it looks for work.
        let notified = Atomic<Bool>(false)
        /// The lock-free list of scheduled bottom halves (newest first).
        let bhList = Atomic<Unmanaged<BottomHalf>?>(nil)
    }

    struct RequestSlot {
        var generation: UInt32 = 0
        /// The caller's tag, for a request sent to a ``CompletionTarget``.
        var tag: UInt32 = 0
        /// One of these two is set while the request is in flight.
        var completion: ((Int32) -> Void)?
        var target: Unmanaged<CompletionTarget>?
    }

    /// The request slots, free list and completions waiting for dispatch. Home thread only.
    /// It lives behind a pointer rather than in the class's stored `var`s because every
    /// access to those pays a dynamic exclusivity check (swift_beginAccess/endAccess with
    /// a thread-local lookup), several per request; pointer memory carries none. What the
    /// checks guarded — no overlapping access — holds by construction: only the home thread
    /// touches the table, and no completion runs while an access is open.
    struct RequestTable: ~Copyable {
        var slots = RawArray<RequestSlot>()
        var free = RawArray<Int>()
        var ready = RawArray<(userData: UInt64, result: Int32)>()
        var readyHead = 0
        var inFlight = 0
        var hasReady: Bool { readyHead < ready.count }
    }

    /// Creates a context whose home thread is the calling thread.
    /// - Parameter backend: which fd-monitoring backend to use.
    /// - Throws: ``AioError`` when the kernel has no descriptors or memory for the eventfd,
    ///   the ring or the epoll instance, or io_uring was required and refused.
    public init(backend: Backend = .automatic) throws(AioError) {
        homeThread = pthread_self()
        notifier = try EventNotifier()
        var choice = backend
        if choice == .automatic, let env = getenv("DATAPLANE_FDMON"), String(cString: env) == "epoll" {
            choice = .epoll
        }
        var reason: String? = nil
        var monitor: FDMonitor? = nil
        if choice != .epoll {
            do {
                monitor = try IOUringMonitor()
            } catch {
                let why = UringProbe.explain(errno: error.errno)
                if choice == .ioUring {
                    throw AioError(code: .ioUringUnavailable, errno: error.errno, message: why)
                }
                reason = why
            }
        } else {
            reason = backend == .epoll ? "epoll requested" : "DATAPLANE_FDMON=epoll"
        }
        if monitor == nil { monitor = try EpollMonitor() }
        self.monitor = monitor!
        // After the last throw: from here on deinit runs, and frees these.
        requests = .allocate(capacity: 1)
        requests.initialize(to: RequestTable())
        wake = UnsafeMutableRawPointer.allocate(byteCount: 128, alignment: 64).bindMemory(to: WakeWords.self, capacity: 1)
        wake.initialize(to: WakeWords())
        self.monitor.bind(to: self)
        self.fallbackReason = reason
        // The context's own notifier: its read clears the eventfd, its poll reads `notified`;
        // neither counts as progress. Unlike QEMU it is in the poll list from the start, so a
        // BH scheduled during a poll window is seen at once, with no system call.
        let n = FDHandler(
            fd: notifier.fileDescriptor, role: .contextNotifier,
            callbacks: FDHandlerCallbacks(poll: { false }, pollReady: {}), notifier: notifier)
        notifierHandler = n
        install(n)
        n.inPollList = true
        pollHandlers.append(n)
    }

    deinit {
        let leaked = liveBottomHalves.withLock { $0 }
        precondition(
            leaked.isEmpty,
            "BUG DETECTED: bottom half '\(leaked.values.sorted().first ?? "?")' leaked: delete every bottom half before its AioContext goes away (\(leaked.count) left)")
        (monitor as? EpollMonitor)?.shutdown()
        // Targets with requests that will never complete: drop the context's hold on them.
        for i in 0..<requests.pointee.slots.count {
            guard let target = requests.pointee.slots[i].target else { continue }
            let last = target._withUnsafeGuaranteedRef { t in
                t.inFlight -= 1
                return t.inFlight == 0
            }
            if last { target.release() }
        }
        requests.deinitialize(count: 1)
        requests.deallocate()
        releaseParked()
        defer {
            wake.deinitialize(count: 1)
            wake.deallocate()
        }
        // Drop BHs still linked that the loop owns (one-shots never run, deleted ones): release
        // the loop's +1. Any other linked BH is live and was reported above.
        func dropOwned(_ first: Unmanaged<BottomHalf>?) {
            var node = first
            while let n = node {
                let (next, owned) = n._withUnsafeGuaranteedRef {
                    ($0.next, $0.flags.load(ordering: .relaxed) & (BottomHalf.Flags.oneShot | BottomHalf.Flags.deleted) != 0)
                }
                node = next
                if owned { n.release() }
            }
        }
        dropOwned(wake.pointee.bhList.exchange(nil, ordering: .acquiring))
        for i in 0..<bhSlices.count { dropOwned(bhSlices[i]) }
    }

    /// Every descriptor the context owns: its eventfd and the backend's (ring or epoll
    /// instance, worker-pool notifier). For leak checks.
    var ownedDescriptors: [Int32] { [notifier.fileDescriptor] + monitor.ownedDescriptors }

    // MARK: - Threads

    /// Whether the calling thread is this context's home thread.
    public var isOnHomeThread: Bool { pthread_equal(pthread_self(), homeThread) != 0 }

    @inline(__always)
    func assertOnHomeThread(_ what: StaticString) {
        precondition(isOnHomeThread, "BUG DETECTED: AioContext.\(what) called off the context's home thread")
    }

    // MARK: - Notify (QEMU aio_notify / aio_notify_accept)

    /// Wakes the loop if it sleeps, or makes its next wait non-blocking. Thread-safe; makes
    /// no system call unless the loop announced that it may block.
    public func notify() {
        // Producer half of the Dekker pair. The seq_cst exchange orders the caller's earlier
        // writes (e.g. a BH push) before it and is ordered before the load of notifyMe below
        // (pairs with the seq_cst add of notifyMe and the load of `notified` in poll). If the
        // flag was already set, another notifier ran since the loop last accepted: either
        // that one wrote the eventfd or the loop will see the flag before it blocks.
        if wake.pointee.notified.exchange(true, ordering: .sequentiallyConsistent) { return }
        if wake.pointee.notifyMe.load(ordering: .sequentiallyConsistent) != 0 {
            statistics._eventfdWrites.add(1, ordering: .relaxed)
            notifier.set()
        }
    }

    /// ``notify()`` for a caller that published its work with a sequentially consistent
    /// read-modify-write (the BH push). While the loop is busy the flag is usually set
    /// already, and reading a line the loop writes once per iteration costs far less than a
    /// locked exchange per call. Seeing it set is enough: the publish precedes this seq_cst
    /// load, which reads a value before the loop's clear, which precedes the loop's seq_cst
    /// fence; so the publish precedes that fence in the single total order and the loop's
    /// reads after it see the work. (A release store would not do: x86 may reorder it
    /// after the load.)
    @inline(__always)
    func notifyAfterSequentiallyConsistentPublish() {
        if wake.pointee.notified.load(ordering: .sequentiallyConsistent) { return }
        notify()
    }

    /// Clears `notified` before the loop looks for work, so that work published after this
    /// point sets it again and the next iteration does not block.
    func notifyAccept() {
        wake.pointee.notified.store(false, ordering: .relaxed)
        // Full fence: orders the clear before the reads of BH flags, the BH list and the
        // handler queue that follow (pairs with the seq_cst exchange in notify).
        atomicMemoryFence(ordering: .sequentiallyConsistent)
    }

    // MARK: - Adaptive polling parameters

    /// The polling parameters in force.
    public var pollParameters: PollParameters {
        PollParameters(maxNs: pollMaxNs.load(ordering: .relaxed), grow: pollGrow.load(ordering: .relaxed),
                       shrink: pollShrink.load(ordering: .relaxed))
    }

    /// Sets the polling parameters; every handler's window restarts from 0 (QEMU
    /// `aio_context_set_poll_params`). Thread-safe; takes effect on the next iteration.
    /// Values are not validated here (the IOThread properties validate them).
    public func setPollParameters(_ p: PollParameters) {
        // Relaxed: as QEMU says, it does not matter if a stale value is used once; the flag's
        // release/acquire makes the new values visible by the time the windows are reset.
        pollMaxNs.store(p.maxNs, ordering: .relaxed)
        pollGrow.store(p.grow, ordering: .relaxed)
        pollShrink.store(p.shrink, ordering: .relaxed)
        parametersChanged.bitwiseOr(ParameterChange.poll, ordering: .releasing)  // pairs with the loop's acquire
        notify()
    }

    // MARK: - Engine parameters (QEMU aio_context_set_aio_params, ..._set_thread_pool_params)

    /// The most requests one submission hands to the kernel (QEMU's `aio-max-batch`); 0, the
    /// default, lets the engine choose: as many as are queued, up to the ring's 256.
    public var aioMaxBatch: Int { engineParameters.withLock { $0.maxBatch } }

    /// Sets ``aioMaxBatch``. Thread-safe; takes effect on the loop's next iteration. On io_uring
    /// no `io_uring_enter` then hands the kernel more than `n` SQEs (a full batch is submitted
    /// before the next request joins it; ``AioStatistics/largestSubmissionBatch`` shows it).
    /// On epoll there is nothing to batch (the worker pool takes requests one by one), so it
    /// has no effect there.
    /// - Precondition: `n >= 0` (the IOThread property checks QEMU's range and text).
    public func setAioMaxBatch(_ n: Int) {
        precondition(n >= 0, "BUG DETECTED: aio-max-batch must not be negative")
        engineParameters.withLock { $0.maxBatch = n }
        // Release, pairing with the loop's acquire (the value itself is behind the lock).
        parametersChanged.bitwiseOr(ParameterChange.engine, ordering: .releasing)
        notify()
    }

    /// The worker pool's bounds (QEMU's `thread-pool-min` and `thread-pool-max`), 0 and 64 by
    /// default.
    public var threadPoolLimits: (min: Int, max: Int) { engineParameters.withLock { ($0.poolMin, $0.poolMax) } }

    /// Sets ``threadPoolLimits``. Thread-safe; takes effect on the loop's next iteration, as
    /// QEMU's `thread_pool_update_params` does: the pool starts workers up to `min` at once,
    /// and those above `max` exit (idle ones at once, busy ones when their request is done);
    /// a worker idle for 10 s exits while there are more than `min`. A request that finds no
    /// idle worker starts one while there are fewer than `max`. Only the epoll backend has a
    /// pool (io_uring does its I/O in the kernel); it is created, with these bounds, by the
    /// first read, write, fsync or fallocate.
    /// - Precondition: `0 <= min <= max` and `max > 0` (the IOThread properties check QEMU's
    ///   limits and text).
    public func setThreadPoolLimits(min: Int, max: Int) {
        precondition(min >= 0 && min <= max && max > 0, "BUG DETECTED: thread pool limits need 0 <= min <= max, max > 0")
        engineParameters.withLock {
            $0.poolMin = min
            $0.poolMax = max
        }
        // Release, pairing with the loop's acquire (the values themselves are behind the lock).
        parametersChanged.bitwiseOr(ParameterChange.engine, ordering: .releasing)
        notify()
    }

    /// Applies what setters changed (home thread, at the start of an iteration). Out of line:
    /// it runs only after a setter.
    @inline(never)
    func applyParameterChanges() {
        // Acquire: the values stored before the setter's release are visible.
        let changed = parametersChanged.exchange(0, ordering: .acquiring)
        if changed & ParameterChange.poll != 0 {
            for case let h? in handlerSlots where h.pollNs != 0 {
                h.pollNs = 0
                statistics.publishPollWindow(fd: h.fd, ns: 0)
            }
        }
        if changed & ParameterChange.engine != 0 {
            monitor.applyEngineParameters(engineParameters.withLock { $0 })
        }
    }

    // MARK: - Bottom halves

    /// Creates a bottom half. Thread-safe. It must be ``BottomHalf/delete()``d before the
    /// context goes away.
    public func makeBottomHalf(name: String = "bh", _ callback: @escaping @Sendable () -> Void) -> BottomHalf {
        let bh = BottomHalf(context: self, name: name, callback: callback)
        liveBottomHalves.withLock { $0[ObjectIdentifier(bh)] = name }
        return bh
    }

    /// Schedules `callback` to run once on the home thread (QEMU `aio_bh_schedule_oneshot`).
    /// Thread-safe, lock-free.
    public func scheduleOneShot(name: String = "oneshot", _ callback: @escaping @Sendable () -> Void) {
        let bh = BottomHalf(context: self, name: name, flags: BottomHalf.Flags.oneShot, callback: callback)
        // The loop's +1: the list owns a one-shot until it ran (see BottomHalf's ownership note).
        _ = Unmanaged.passRetained(bh)
        enqueue(bh, flags: BottomHalf.Flags.scheduled)
    }

    /// Makes a target for ``submit(_:to:tag:)``: `body` runs on the home thread with the
    /// request's tag and result. Thread-safe to create; used on the home thread.
    public func makeCompletionTarget(_ body: @escaping (_ tag: UInt32, _ result: Int32) -> Void) -> CompletionTarget {
        CompletionTarget(context: self, body: body)
    }

    func forget(_ bh: BottomHalf) {
        _ = liveBottomHalves.withLock { $0.removeValue(forKey: ObjectIdentifier(bh)) }
    }

}
