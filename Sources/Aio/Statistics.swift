import Synchronization

/// Counters of one ``AioContext``, readable from any thread while the loop runs.
///
/// Each counter but ``eventfdWrites`` has one writer, the home thread, which bumps it with
/// a relaxed load and store (a plain `mov`, no locked instruction on the hot path); readers
/// load it relaxed and may see a value a few events old, never a torn one.
public final class AioStatistics: Sendable {
    let _iterations = Atomic<UInt64>(0)
    let _bottomHalvesRun = Atomic<UInt64>(0)
    let _handlerDispatches = Atomic<UInt64>(0)
    let _completions = Atomic<UInt64>(0)
    let _timersFired = Atomic<UInt64>(0)
    let _pollHits = Atomic<UInt64>(0)
    let _pollMisses = Atomic<UInt64>(0)
    let _pollNanoseconds = Atomic<UInt64>(0)
    let _blockedNanoseconds = Atomic<UInt64>(0)
    let _blockingWaits = Atomic<UInt64>(0)
    let _notifierWakeups = Atomic<UInt64>(0)
    let _ringEnters = Atomic<UInt64>(0)
    let _largestSubmissionBatch = Atomic<UInt64>(0)
    /// Written by any thread that notifies; a locked add, but only on the slow path (the
    /// loop announced it may block).
    let _eventfdWrites = Atomic<UInt64>(0)

    /// Each handler's current poll window (fd → ns), published by the home thread when a
    /// window changes (not on every iteration: in the sweet spot it does not change).
    let _pollWindows = Locked<[Int32: Int64]>([:])

    init() {}

    /// The current adaptive-polling window of each handler that has one (fd → ns); the
    /// context's own eventfd is among them.
    public var pollWindows: [Int32: Int64] { _pollWindows.withLock { $0 } }

    func publishPollWindow(fd: Int32, ns: Int64?) {
        _pollWindows.withLock { w in
            if let ns, ns != 0 { w[fd] = ns } else { w.removeValue(forKey: fd) }
        }
    }

    /// Loop iterations (`poll(blocking:)` calls, nested ones included).
    public var iterations: UInt64 { _iterations.load(ordering: .relaxed) }
    /// Bottom-half callbacks run (idle ones included).
    public var bottomHalvesRun: UInt64 { _bottomHalvesRun.load(ordering: .relaxed) }
    /// fd-handler callbacks dispatched (read, write or poll-ready), the context's own
    /// notifier excluded.
    public var handlerDispatches: UInt64 { _handlerDispatches.load(ordering: .relaxed) }
    /// Completion-I/O callbacks run.
    public var completions: UInt64 { _completions.load(ordering: .relaxed) }
    /// Timer callbacks run.
    public var timersFired: UInt64 { _timersFired.load(ordering: .relaxed) }
    /// Busy-poll windows that found work.
    public var pollHits: UInt64 { _pollHits.load(ordering: .relaxed) }
    /// Busy-poll windows that ended without finding work.
    public var pollMisses: UInt64 { _pollMisses.load(ordering: .relaxed) }
    /// Time spent busy-polling, in ns.
    public var pollNanoseconds: UInt64 { _pollNanoseconds.load(ordering: .relaxed) }
    /// Time spent in blocking waits (in the kernel), in ns.
    public var blockedNanoseconds: UInt64 { _blockedNanoseconds.load(ordering: .relaxed) }
    /// Waits that were allowed to block.
    public var blockingWaits: UInt64 { _blockingWaits.load(ordering: .relaxed) }
    /// Times the loop was woken through its own eventfd.
    public var notifierWakeups: UInt64 { _notifierWakeups.load(ordering: .relaxed) }
    /// `io_uring_enter` calls (0 on the epoll backend).
    public var ringEnters: UInt64 { _ringEnters.load(ordering: .relaxed) }
    /// The most SQEs one `io_uring_enter` handed to the kernel so far (0 on the epoll
    /// backend); at most ``AioContext/aioMaxBatch`` while that is set.
    public var largestSubmissionBatch: UInt64 { _largestSubmissionBatch.load(ordering: .relaxed) }
    /// Writes to the context's eventfd by ``AioContext/notify()``.
    public var eventfdWrites: UInt64 { _eventfdWrites.load(ordering: .relaxed) }
}

extension Atomic where Value == UInt64 {
    /// Single-writer increment: the home thread is the only writer (see ``AioStatistics``).
    @inline(__always)
    func bump(_ by: UInt64 = 1) {
        store(load(ordering: .relaxed) &+ by, ordering: .relaxed)
    }
}
