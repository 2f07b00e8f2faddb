// aio-max-batch, thread-pool-min and thread-pool-max reach the context (QEMU's
// event-loop-base update_params, iothread_set_aio_context_params).
import Aio

extension IOThread {
    /// Applies `aio-max-batch` and the worker pool's bounds to `ctx`: when the context is
    /// created, and after any of the three changes. Under the properties' lock, so that two
    /// setters racing apply in the order they stored.
    func applyEngineParameters(to ctx: AioContext) {
        props.withLock { p in
            ctx.setAioMaxBatch(Int(p.aioMaxBatch))
            ctx.setThreadPoolLimits(min: Int(p.threadPoolMin), max: Int(p.threadPoolMax))
        }
    }
}
