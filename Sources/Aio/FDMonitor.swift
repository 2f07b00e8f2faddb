/// Which fd-monitoring backend a context runs on.
public enum FDMonitorKind: String, Sendable, CustomStringConvertible {
    case ioUring = "io_uring"
    case epoll = "epoll"
    public var description: String { rawValue }
}

/// The backend interface (QEMU's `FDMonOps`). Home thread only: registration changes from
/// other threads are queued by the context and applied on its home thread.
protocol FDMonitor: AnyObject {
    var kind: FDMonitorKind { get }
    /// Gives the monitor its context, once, as the context's init ends (the context holds
    /// the monitor in a `let`, so the monitor exists before the context does).
    func bind(to context: AioContext)
    /// Starts watching `handler.fd` for `handler.events`; results carry `handler.userData`.
    func register(_ handler: FDHandler)
    /// Stops watching. Events already in flight for it are dropped by their generation.
    func unregister(_ handler: FDHandler)
    /// Waits up to `timeout` ns (-1: for ever; 0: just collect) and hands what is ready to
    /// the context (`markReady`, `requestCompleted`).
    func wait(timeout: Int64)
    /// Whether a non-blocking iteration must still call ``wait(timeout:)`` (QEMU `need_wait`).
    var needsWait: Bool { get }
    /// Whether busy polling must stop because the backend has events ready.
    var eventsReady: Bool { get }
    /// Readiness is visible from user space (QEMU `fdmon_supports_polling`): polling can
    /// keep going with fds outside the poll list, and idle pollers may leave the list.
    var supportsUserspacePolling: Bool { get }
    /// Called before a busy-poll window (io_uring: hand queued SQEs to the kernel now).
    func prepareForPolling()
    /// Submits completion I/O; returns false if it cannot take it now.
    func submit(_ request: IORequest, userData: UInt64) -> Bool
    /// Applies aio-max-batch (io_uring) and the worker pool's bounds (epoll).
    func applyEngineParameters(_ p: AioContext.EngineParameters)
    /// io_uring enters so far (0 for epoll).
    var ringEnters: UInt64 { get }
    /// The descriptors the backend owns (for leak checks).
    var ownedDescriptors: [Int32] { get }
}
