// Swift executors over an AioContext: jobs run on the context's home thread, inside one
// persistent bottom half, whenever that thread polls the context. An IOThread is one (its
// own identity, its context's thread); a loop that is not an IOThread (a main loop polled by
// its own thread, such as the QMP monitor's) gets a `ContextExecutor`, so that code on it can
// `await` work done on other threads and continue on the loop.
//
// Enqueueing a job appends an UnownedJob to a mutex-protected array and schedules the BH;
// the BH swaps the array with a spare one (both keep their capacity) and runs the jobs. In
// steady state nothing is allocated per job. The queue is shared by both kinds of executor;
// each runs the jobs isolated to itself (the runtime identifies an executor by its object:
// an executor must hand out references to itself, not to a helper).
import Synchronization

/// The job queue behind an executor on an ``AioContext``.
///
/// `@unchecked Sendable`: `jobs` is behind its mutex; `spareJobs` is touched only by the BH
/// (home thread); `open` is an atomic; `owner` is written once, by the owner's init, before
/// any job can be enqueued.
public final class ExecutorJobQueue: @unchecked Sendable {
    /// The context whose home thread runs the jobs.
    public let context: AioContext
    /// Who owns it, for messages (`IOThread 'iot0'`).
    public let name: String
    let jobs = Locked<[UnownedJob]>([])
    // Home thread only (the BH); swapped with `jobs` so neither array reallocates.
    nonisolated(unsafe) var spareJobs: [UnownedJob] = []
    var bh: BottomHalf!
    var owner: (serial: UnownedSerialExecutor, task: UnownedTaskExecutor)?
    /// Cleared by `close()`; a job after that would never run (its task would hang).
    let open = Atomic<Bool>(true)

    /// A queue on `context`. The owner binds itself with ``bind(serial:task:)`` and calls
    /// ``close()`` before the context's loop ends for good.
    public init(context: AioContext, name: String) {
        self.context = context
        self.name = name
        // Unowned: the BH belongs to the context and is deleted by close() before the queue
        // can go (deinit checks it).
        bh = context.makeBottomHalf(name: "executor") { [unowned self] in runJobs() }
    }

    deinit {
        precondition(!open.load(ordering: .relaxed), "BUG DETECTED: executor of \(name) dropped without close()")
    }

    /// The executor the jobs run isolated to. Once, by the owner, before any job.
    public func bind(serial: UnownedSerialExecutor, task: UnownedTaskExecutor) {
        precondition(owner == nil, "BUG DETECTED: executor of \(name) bound twice")
        owner = (serial, task)
    }

    /// No job may be enqueued any more: deletes the BH. Jobs enqueued and not yet run are
    /// dropped with the loop, as BHs are. Idempotent.
    public func close() {
        // Relaxed: enqueue's check is a diagnostic, and the BH's deletion is itself ordered.
        if open.exchange(false, ordering: .relaxed) { bh.delete() }
    }

    public func enqueue(_ job: consuming ExecutorJob) {
        precondition(open.load(ordering: .relaxed), "BUG DETECTED: a job was enqueued on \(name) after it stopped")
        let unowned = UnownedJob(job)
        jobs.withLock { $0.append(unowned) }
        bh.schedule()
    }

    /// Crashes unless called on the context's home thread.
    public func checkIsolated() {
        precondition(context.isOnHomeThread, "BUG DETECTED: expected to run on \(name)")
    }

    /// Runs the queued jobs (the BH, on the home thread).
    func runJobs() {
        let (serial, task) = owner!
        // Take the spare array out first: a copy would share its buffer with `spareJobs`
        // until the end of this function, and an enqueue meanwhile would copy it (malloc).
        var batch: [UnownedJob] = []
        swap(&batch, &spareJobs)
        jobs.withLock { swap(&$0, &batch) }
        for job in batch { job.runSynchronously(isolatedTo: serial, taskExecutor: task) }
        batch.removeAll(keepingCapacity: true)
        spareJobs = batch
    }
}

/// Runs Swift concurrency jobs on an ``AioContext``'s home thread.
///
/// As a `SerialExecutor`, an actor can pin itself to it; as a `TaskExecutor`, a task can
/// prefer it: the synchronous parts of the task's nonisolated async functions then run on the
/// context, and an `await` on work done elsewhere continues there. Call ``close()`` before the
/// context's loop ends for good.
public final class ContextExecutor: SerialExecutor, TaskExecutor, Sendable {
    let queue: ExecutorJobQueue

    /// An executor on `context`; `name` is for messages.
    public init(context: AioContext, name: String) {
        queue = ExecutorJobQueue(context: context, name: name)
        queue.bind(serial: asUnownedSerialExecutor(), task: asUnownedTaskExecutor())
    }

    /// The context whose home thread runs the jobs.
    public var context: AioContext { queue.context }

    /// No job may be enqueued any more (see ``ExecutorJobQueue/close()``).
    public func close() { queue.close() }

    public func enqueue(_ job: consuming ExecutorJob) { queue.enqueue(job) }

    public func asUnownedSerialExecutor() -> UnownedSerialExecutor { UnownedSerialExecutor(ordinary: self) }

    public func asUnownedTaskExecutor() -> UnownedTaskExecutor { UnownedTaskExecutor(ordinary: self) }

    public func isSameExclusiveExecutionContext(other: ContextExecutor) -> Bool { self === other }

    public func checkIsolated() { queue.checkIsolated() }

    public func isIsolatingCurrentContext() -> Bool? { queue.context.isOnHomeThread }
}
