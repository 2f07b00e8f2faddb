// An IOThread is a Swift executor: actors can pin themselves to it and tasks can prefer it.
//
// Enqueueing a job appends an UnownedJob to a mutex-protected array and schedules one
// persistent BH; the BH swaps the array with a spare one (both keep their capacity) and runs
// the jobs on the IOThread. In steady state nothing is allocated per job.
import Aio
import Synchronization

extension IOThread: SerialExecutor, TaskExecutor {
    public func enqueue(_ job: consuming ExecutorJob) {
        // A job for a stopped IOThread would never run (its task would hang): say so.
        precondition(!isStopped, "BUG DETECTED: a job was enqueued on IOThread '\(id)' after it stopped")
        let unowned = UnownedJob(job)
        jobs.withLock { $0.append(unowned) }
        jobBH.schedule()
    }

    public func asUnownedSerialExecutor() -> UnownedSerialExecutor {
        UnownedSerialExecutor(ordinary: self)
    }

    public func asUnownedTaskExecutor() -> UnownedTaskExecutor {
        UnownedTaskExecutor(ordinary: self)
    }

    public func isSameExclusiveExecutionContext(other: IOThread) -> Bool { self === other }

    public func checkIsolated() {
        precondition(context.isOnHomeThread,
                     "BUG DETECTED: expected to run on IOThread '\(id)'")
    }

    public func isIsolatingCurrentContext() -> Bool? { context.isOnHomeThread }

    /// Runs the queued jobs (the executor BH, on the IOThread).
    func runJobs() {
        // Take the spare array out first: a copy would share its buffer with `spareJobs`
        // until the end of this function, and an enqueue meanwhile would copy it (malloc).
        var batch: [UnownedJob] = []
        swap(&batch, &spareJobs)
        jobs.withLock { swap(&$0, &batch) }
        let serial = asUnownedSerialExecutor()
        let task = asUnownedTaskExecutor()
        for job in batch { job.runSynchronously(isolatedTo: serial, taskExecutor: task) }
        batch.removeAll(keepingCapacity: true)
        spareJobs = batch
    }
}
