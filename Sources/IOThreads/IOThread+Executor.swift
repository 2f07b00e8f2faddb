// An IOThread is a Swift executor: actors can pin themselves to it and tasks can prefer it.
// Its jobs run on its context's thread through Aio's ExecutorJobQueue (one persistent BH, no
// allocation per job in steady state), isolated to the IOThread itself: the runtime knows an
// executor by its object, so the IOThread hands out references to itself.
import Aio

extension IOThread: SerialExecutor, TaskExecutor {
    public func enqueue(_ job: consuming ExecutorJob) {
        jobs.enqueue(job)
    }

    public func asUnownedSerialExecutor() -> UnownedSerialExecutor {
        UnownedSerialExecutor(ordinary: self)
    }

    public func asUnownedTaskExecutor() -> UnownedTaskExecutor {
        UnownedTaskExecutor(ordinary: self)
    }

    public func isSameExclusiveExecutionContext(other: IOThread) -> Bool { self === other }

    public func checkIsolated() { jobs.checkIsolated() }

    public func isIsolatingCurrentContext() -> Bool? { context.isOnHomeThread }
}
