// IOThread: a real thread that owns and runs one AioContext (QEMU iothread.c).
//
// Design note. The thread is a plain joinable pthread named "IO <id>". It creates its
// context itself, so the io_uring ring is created (SINGLE_ISSUER) and only ever entered
// by the thread that submits to it (io_uring requests belong to the task that submitted
// them; see the Aio catalog's ThreadingRules), which QEMU's merged code does not do (it
// creates the context on the main thread). `init` returns once the thread runs and its
// kernel thread id is known.
//
// Lifecycle: running -> stopping -> stopped, under one lock with the holder list. Holds may
// be taken only while running; `stop()` is refused while anything holds the IOThread, so a
// holder's drain always has a running loop to finish on. `stop()` schedules a one-shot BH
// that ends the loop and joins the thread. The context outlives the loop: it stays readable
// (its counters, its backend) until the IOThread itself is destroyed, and its ring is then
// torn down by whichever thread drops the last reference. Properties may be changed while
// it runs; poll parameters take effect on the loop's next iteration.
import Aio
import CShims
import Glibc
import Synchronization

/// A thread running one ``AioContext`` loop until stopped.
///
/// `@unchecked Sendable`: `context`, `jobs`, `threadID` and `startError` are written once
/// by the new thread before it posts `startup`, which the creating thread waits for
/// (sem_post/sem_wait order them), and only read afterwards; `props` and `life` are behind
/// mutexes.
public final class IOThread: @unchecked Sendable {
    /// The object id (`-object iothread,id=…`).
    public let id: String
    /// The loop this thread runs. Not public: a holder reaches it through its hold
    /// (``IOThreadHold/context``, ``IOThreadHoldSet/context(of:)``). Package users that need it
    /// without a holder (this module's executor, statistics and properties; tests of the loop
    /// itself) use it directly, each saying why.
    package private(set) var context: AioContext!
    /// The kernel thread id (what `query-iothreads` reports as `thread-id`).
    public private(set) var threadID: Int32 = -1

    let props: Locked<IOThreadProperties>
    /// The lifecycle and the holders, under one lock (Holders.swift).
    let life = Locked(Life())
    /// Serialises stop(): a second caller returns only once the thread has been joined.
    /// Holds how many stops ran (not zero-sized: TSan mis-tracks inout access to a zero-sized
    /// stored value).
    let stopLock = Locked(0)
    var thread = pthread_t()
    let startup: UnsafeMutablePointer<sem_t>
    var startError: IOThreadError?
    // The loop's own flag; only the IOThread reads and writes it (the stop BH clears it).
    nonisolated(unsafe) var running = true
    /// The executor's job queue (IOThread+Executor.swift); written once before start returns.
    var jobs: ExecutorJobQueue!

    /// running -> stopping -> stopped. Holds are taken only while running.
    enum Phase: Sendable { case running, stopping, stopped }

    struct Life {
        var phase = Phase.running
        /// Newest first, as the holders series prepends.
        var holders: [IOThreadHolder] = []
    }

    /// Creates the IOThread and starts its thread; returns once the loop runs.
    /// - Parameters:
    ///   - id: a well-formed object id (a letter, then letters, digits, `-`, `.`, `_`).
    ///   - properties: QEMU's iothread properties (validated as QEMU validates them).
    ///   - cpuAffinity: CPUs to pin the thread to (default: inherit, as QEMU does).
    ///   - backend: the context's fd-monitoring backend.
    /// - Throws: ``IOThreadError`` for a bad id or value, or when the kernel refuses the
    ///   thread or its context (nothing is left behind then).
    public init(
        id: String, properties: IOThreadProperties = IOThreadProperties(), cpuAffinity: [Int]? = nil,
        backend: AioContext.Backend = .automatic
    ) throws(IOThreadError) {
        guard isWellFormedObjectID(id) else {
            throw IOThreadError(.invalidID, "Parameter 'id' expects an identifier")
        }
        try properties.validate()
        self.id = id
        self.props = Locked(properties)
        self.startup = .allocate(capacity: 1)
        sem_init(startup, 0, 0)

        // The thread refers to the IOThread unretained: whoever drops the last reference
        // runs deinit, which stops and joins the thread; an IOThread nobody references does
        // not keep running. (init waits below until the thread has started.)
        final class Start {
            let thread: Unmanaged<IOThread>
            let affinity: [Int]?
            let backend: AioContext.Backend
            init(_ t: IOThread, _ a: [Int]?, _ b: AioContext.Backend) {
                // Unretained: deinit joins the thread, so the IOThread outlives it.
                thread = Unmanaged.passUnretained(t)
                affinity = a
                backend = b
            }
        }
        // Retained for the new thread, which takes the reference back as its first act.
        let start = Unmanaged.passRetained(Start(self, cpuAffinity, backend)).toOpaque()
        let rc = pthread_create(&thread, nil, { arg in
            // The reference passed above: released when the thread's body returns.
            let start = Unmanaged<Start>.fromOpaque(arg!).takeRetainedValue()
            start.thread._withUnsafeGuaranteedRef { $0.run(affinity: start.affinity, backend: start.backend) }
            return nil
        }, start)
        guard rc == 0 else {
            // No thread took the reference passed to it: release it here.
            Unmanaged<Start>.fromOpaque(start).release()
            life.withLock { $0.phase = .stopped }  // deinit (which runs now) has nothing to stop
            throw IOThreadError(.resource, "Failed to create thread for iothread '\(id)': \(String(cString: strerror(rc)))")
        }
        while sem_wait(startup) != 0 {}
        if let error = startError {
            pthread_join(thread, nil)
            life.withLock { $0.phase = .stopped }
            throw error
        }
    }

    deinit {
        let left = life.withLock { $0.holders.map(\.name) }
        precondition(left.isEmpty, "BUG DETECTED: IOThread '\(id)' destroyed while held by \(left)")
        try? stop()  // cannot throw: nothing holds it
        sem_destroy(startup)
        startup.deallocate()
    }

    /// The thread's body: name, affinity, context, loop, teardown — all on this thread.
    func run(affinity: [Int]?, backend: AioContext.Backend) {
        _ = dp_set_thread_name("IO \(id)")
        // 1 ns of timer slack instead of Linux's 50 µs, as QEMU's init_clocks does: timers and
        // wait timeouts on this thread are µs-scale.
        _ = dp_set_timer_slack(1)
        if let affinity {
            let rc = affinity.map(Int32.init).withUnsafeBufferPointer { dp_set_affinity($0.baseAddress, Int32($0.count)) }
            if rc != 0 {
                startError = IOThreadError(.invalidValue, "cannot pin iothread '\(id)' to CPUs \(affinity): \(String(cString: strerror(-rc)))")
                sem_post(startup)
                return
            }
        }
        do {
            let ctx = try AioContext(backend: backend)
            ctx.setPollParameters(props.withLock { $0.pollParameters })
            applyEngineParameters(to: ctx)
            context = ctx
            jobs = ExecutorJobQueue(context: ctx, name: "IOThread '\(id)'")
            jobs.bind(serial: asUnownedSerialExecutor(), task: asUnownedTaskExecutor())
        } catch {
            startError = IOThreadError(.resource, "Failed to create AioContext for iothread '\(id)': \(error.message)")
            sem_post(startup)
            return
        }
        threadID = dp_gettid()
        sem_post(startup)
        while running { context.poll(blocking: true) }
        // Jobs enqueued after the stop BH ran are dropped with the loop, as BHs are. The
        // context itself stays (it is written once, before start returns, and read from any
        // thread without a lock) and goes with the IOThread; the ring it owns may be torn
        // down by any thread.
        jobs.close()
    }

    /// Stops the loop and joins the thread. Idempotent: a later call returns once the thread
    /// has been joined. Must not be called from the IOThread itself (it joins).
    /// - Throws: ``IOThreadError`` `.inUse` while anything holds the IOThread (its holders'
    ///   work needs the loop to drain); nothing changes then.
    public func stop() throws(IOThreadError) {
        try stopLock.withLock { stops throws(IOThreadError) in
            stops += 1
            let join = try life.withLock { l throws(IOThreadError) -> Bool in
                switch l.phase {
                case .stopped:
                    return false
                case .stopping:
                    return true  // retired by its registry: the join is ours
                case .running:
                    guard l.holders.isEmpty else {
                        throw IOThreadError(.inUse, "IOThread '\(id)' is held by \(l.holders.map(\.name)); release its holds before stopping it")
                    }
                    l.phase = .stopping
                    return true
                }
            }
            guard join else { return }
            precondition(pthread_equal(pthread_self(), thread) == 0,
                         "BUG DETECTED: IOThread '\(id)' stopped from its own thread (stop joins it)")
            // unowned(unsafe): the join below outlasts the BH, and self outlives the join.
            context.scheduleOneShot(name: "iothread-stop") { [unowned(unsafe) self] in self.running = false }
            pthread_join(thread, nil)
            life.withLock { $0.phase = .stopped }
        }
    }

    /// Moves a running IOThread that nobody holds to stopping (atomically with `hold`), so
    /// that no hold can slip in between the check and the stop. The registry's delete.
    /// - Throws: ``IOThreadError`` `.inUse` when it is held.
    func retire() throws(IOThreadError) {
        try life.withLock { l throws(IOThreadError) in
            guard l.holders.isEmpty else { throw IOThreadError(.inUse, "object '\(id)' is in use, can not be deleted") }
            if l.phase == .running { l.phase = .stopping }
        }
    }

    /// Whether the thread is stopping or stopped.
    public var isStopped: Bool { life.withLock { $0.phase != .running } }

    // MARK: - Properties

    /// The current properties.
    public var properties: IOThreadProperties { props.withLock { $0 } }

    /// Sets a property by its QEMU name (`poll-max-ns`, `poll-grow`, `poll-shrink`,
    /// `aio-max-batch`, `thread-pool-min`, `thread-pool-max`). Thread-safe; the poll
    /// parameters take effect on the loop's next iteration (every handler's window restarts
    /// from 0, as in QEMU). On error nothing changes (QEMU keeps a rejected value in the
    /// object; we do not).
    public func setProperty(_ name: String, to value: Int64) throws(IOThreadError) {
        let poll = try props.withLock { p throws(IOThreadError) -> PollParameters? in
            try p.set(name, to: value)
            return name.hasPrefix("poll-") ? p.pollParameters : nil
        }
        if let poll { context.setPollParameters(poll) }
        if !name.hasPrefix("poll-") { applyEngineParameters(to: context) }
    }

    /// Reads a property by its QEMU name.
    public func property(_ name: String) throws(IOThreadError) -> Int64 {
        try props.withLock { p throws(IOThreadError) in try p.value(of: name) }
    }

    /// CPU time the thread has used, in ns, from the kernel's per-thread clock
    /// (`pthread_getcpuclockid`). Thread-safe; 0 once the thread is gone.
    public var cpuTimeNanoseconds: Int64 {
        guard life.withLock({ $0.phase != .stopped }) else { return 0 }
        var clock = clockid_t()
        guard pthread_getcpuclockid(thread, &clock) == 0 else { return 0 }
        var ts = timespec()
        guard clock_gettime(clock, &ts) == 0 else { return 0 }
        return Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
    }

    /// The context's counters (thread-safe; the context outlives the loop, so they stay
    /// readable after `stop()`).
    public var statistics: AioStatistics { context.statistics }

    /// The fd-monitoring backend the loop runs on.
    public var backendKind: FDMonitorKind { context.backendKind }
    /// Why the loop does not run on io_uring, when ``backendKind`` is epoll.
    public var fallbackReason: String? { context.fallbackReason }
}
