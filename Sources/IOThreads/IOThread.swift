// IOThread: a real thread that owns and runs one AioContext (QEMU iothread.c).
//
// Design note. The thread is a plain joinable pthread named "IO <id>". It creates its
// context itself, so the io_uring ring is created (SINGLE_ISSUER) and only ever entered
// by the thread that submits to it (../shared/spec/PITFALLS.md item 4: requests belong to
// their submitter), which QEMU's merged code does not do (it creates the context on the
// main thread). `start` returns once the thread runs and its kernel thread id is known.
// `stop` schedules a one-shot BH that ends the loop, then joins; the context is destroyed
// on the IOThread before it exits. Properties may be changed while it runs; poll
// parameters take effect on the loop's next iteration.
import Aio
import CShims
import Glibc
import Synchronization

/// A thread running one ``AioContext`` loop until stopped.
///
/// `@unchecked Sendable`: `context`, `threadID` and `startError` are written once by the new
/// thread before it posts `startup`, which the creating thread waits for (sem_post/sem_wait
/// order them), and only read afterwards; `properties` and `state` are behind mutexes; `jobs` (the executor
/// queue) is behind its own mutex.
public final class IOThread: @unchecked Sendable {
    /// The object id (`-object iothread,id=…`).
    public let id: String
    /// The loop this thread runs. Its thread-safe entry points may be used from anywhere.
    public private(set) var context: AioContext!
    /// The kernel thread id (what `query-iothreads` reports as `thread-id`).
    public private(set) var threadID: Int32 = -1

    let props: Locked<IOThreadProperties>
    let state = Locked(State())
    /// Serialises stop(); holds how many stops ran (not zero-sized: TSan mis-tracks inout
    /// access to a zero-sized stored value).
    let stopLock = Locked(0)
    var thread = pthread_t()
    let startup: UnsafeMutablePointer<sem_t>
    var startError: IOThreadError?
    // The loop's own flag; only the IOThread reads and writes it (the stop BH clears it).
    nonisolated(unsafe) var running = true
    /// Holders (Holders.swift).
    struct HolderState {
        var holders: [String] = []
        /// Set by the registry when it deletes the IOThread: no new hold after that.
        var retired = false
    }
    let holderList = Locked(HolderState())
    // Executor support (IOThread+Executor.swift).
    let jobs = Locked<[UnownedJob]>([])
    nonisolated(unsafe) var spareJobs: [UnownedJob] = []
    var jobBH: BottomHalf!

    struct State {
        var stopping = false
        var joined = false
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
                thread = Unmanaged.passUnretained(t)
                affinity = a
                backend = b
            }
        }
        let start = Unmanaged.passRetained(Start(self, cpuAffinity, backend)).toOpaque()
        let rc = pthread_create(&thread, nil, { arg in
            let start = Unmanaged<Start>.fromOpaque(arg!).takeRetainedValue()
            start.thread._withUnsafeGuaranteedRef { $0.run(affinity: start.affinity, backend: start.backend) }
            return nil
        }, start)
        guard rc == 0 else {
            Unmanaged<Start>.fromOpaque(start).release()
            state.withLock { $0.joined = true }  // deinit (which runs now) has nothing to stop
            throw IOThreadError(.resource, "Failed to create thread for iothread '\(id)': \(String(cString: strerror(rc)))")
        }
        while sem_wait(startup) != 0 {}
        if let error = startError {
            pthread_join(thread, nil)
            state.withLock { $0.joined = true }
            throw error
        }
    }

    deinit {
        let left = holderList.withLock { $0.holders }
        precondition(left.isEmpty, "BUG DETECTED: IOThread '\(id)' destroyed while held by \(left)")
        stop()
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
            jobBH = ctx.makeBottomHalf(name: "iothread-executor") { [unowned self] in self.runJobs() }
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
        jobBH.delete()
    }

    /// Stops the loop and joins the thread. Idempotent. Must not be called from the IOThread
    /// itself (it joins).
    public func stop() {
        // Serialised: a second caller returns only once the thread has been joined.
        stopLock.withLock { stops in
            stops += 1
            let first = state.withLock { s -> Bool in
                if s.stopping || s.joined { return false }
                s.stopping = true
                return true
            }
            guard first else { return }
            precondition(pthread_equal(pthread_self(), thread) == 0,
                         "BUG DETECTED: IOThread '\(id)' stopped from its own thread (stop joins it)")
            context.scheduleOneShot(name: "iothread-stop") { [unowned(unsafe) self] in self.running = false }
            pthread_join(thread, nil)
            state.withLock { $0.joined = true }
        }
    }

    /// Whether the thread has been stopped.
    public var isStopped: Bool { state.withLock { $0.stopping || $0.joined } }

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
        guard !state.withLock({ $0.joined }) else { return 0 }
        var clock = clockid_t()
        guard pthread_getcpuclockid(thread, &clock) == 0 else { return 0 }
        var ts = timespec()
        guard clock_gettime(clock, &ts) == 0 else { return 0 }
        return Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
    }

    /// The context's counters (thread-safe).
    public var statistics: AioStatistics { context.statistics }
}
