// fd monitoring on epoll, the fallback when io_uring is refused.
//
// Design note. Level-triggered epoll with the handler's generation-tagged slot in
// `data.u64`, so a stale event for a removed handler is dropped. The wait uses
// epoll_pwait2 (ns timeout, Linux 5.11+) and falls back to epoll_wait with the timeout
// rounded up to whole ms ("better to wait too long than to busy-wait", as QEMU says).
// Unlike QEMU, a non-blocking iteration always asks the kernel (epoll_wait with timeout
// 0): QEMU skips that when every handler can be polled, which can starve fds (its own
// comment admits it). A regular file, which epoll refuses, is always ready, as poll(2) and
// io_uring report it. Completion I/O runs on a worker pool (WorkerPool.swift) that
// hands results back through an event notifier, as QEMU's thread pool does through a BH;
// nops complete at once and timeouts use a context timer.
import CShims
import Glibc
import Synchronization

final class EpollMonitor: FDMonitor {
    let epfd: Int32
    /// Set by `bind(to:)` right after the context is initialised, before any other use.
    unowned(unsafe) var context: AioContext!
    @exclusivity(unchecked) var events: UnsafeMutablePointer<epoll_event>
    let maxEvents: Int32 = 128
    @exclusivity(unchecked) var hasPwait2 = true
    /// Started on the first read, write or fsync.
    @exclusivity(unchecked) var pool: WorkerPool?
    /// Handlers of regular files, which epoll refuses (EPERM) and poll(2) reports always
    /// readable and writable: marked ready on every wait, which then does not block. That is
    /// what io_uring does (a POLL_ADD on a regular file completes at once, and the one-shot
    /// re-arm repeats it every iteration) and what QEMU's ppoll fallback does.
    /// `@exclusivity(unchecked)`: home thread only, and never in overlapping accesses.
    @exclusivity(unchecked) var alwaysReady: ContiguousArray<FDHandler> = []

    func bind(to context: AioContext) { self.context = context }

    init() throws(AioError) {
        let fd = epoll_create1(Int32(EPOLL_CLOEXEC))
        guard fd >= 0 else { throw AioError.syscall("epoll_create1", errno: errno) }
        self.epfd = fd
        self.events = .allocate(capacity: Int(maxEvents))
    }

    /// Joins the worker pool; the context calls this before it goes away.
    func shutdown() { pool?.shutdown() }

    deinit {
        close(epfd)
        events.deallocate()
    }

    var kind: FDMonitorKind { .epoll }
    var ringEnters: UInt64 { 0 }
    var supportsUserspacePolling: Bool { false }
    var ownedDescriptors: [Int32] { [epfd] + (pool.map { [$0.notifier.fileDescriptor] } ?? []) }
    var needsWait: Bool { true }
    /// epoll cannot see readiness from user space: polling is possible only while every
    /// handler can be polled (QEMU `aio_poll_disabled`).
    var eventsReady: Bool { context.pollDisableCount != 0 || !alwaysReady.isEmpty }
    func prepareForPolling() {}

    func applyEngineParameters(_ p: AioContext.EngineParameters) {
        pool?.setLimits(min: p.poolMin, max: p.poolMax)
    }

    func register(_ h: FDHandler) {
        guard h.events != 0 else { return }
        var ev = epoll_event()
        ev.events = h.events & (0x001 | 0x004)  // EPOLLIN | EPOLLOUT; ERR and HUP are implied
        ev.data.u64 = h.userData
        if epoll_ctl(epfd, EPOLL_CTL_ADD, h.fd, &ev) == 0 {
            h.armed = true
        } else {
            h.armed = false
            // EPERM: a regular file, always ready (see `alwaysReady`). EBADF: not an open
            // descriptor, which never fires, as on io_uring (whose POLL_ADD fails with -EBADF
            // and is not re-armed).
            if errno == EPERM { alwaysReady.append(h) }
        }
    }

    func unregister(_ h: FDHandler) {
        if !alwaysReady.isEmpty, let i = alwaysReady.firstIndex(where: { $0 === h }) {
            alwaysReady.remove(at: i)
            return
        }
        guard h.armed else { return }
        h.armed = false
        // ENOENT/EBADF when the owner already closed the fd: the kernel dropped it already.
        _ = epoll_ctl(epfd, EPOLL_CTL_DEL, h.fd, nil)
    }

    func wait(timeout requested: Int64) {
        let timeout = alwaysReady.isEmpty ? requested : 0
        // A signal (EINTR) does not end a wait early: retry with what is left of the timeout,
        // as QEMU does, so a blocking iteration returns only with an event or at its deadline.
        let deadline = timeout > 0 ? saturatingAdd(monotonicNanoseconds(), timeout) : 0
        var remaining = timeout
        var n: Int32
        while true {
            n = waitOnce(timeout: remaining)
            guard n == -EINTR else { break }
            if timeout > 0 { remaining = max(0, deadline - monotonicNanoseconds()) }
        }
        for h in alwaysReady where !h.deleted { context.markReady(h, revents: h.events & (0x001 | 0x004)) }
        guard n > 0 else { return }
        for i in 0..<Int(n) {
            let ev = events[i]
            guard let h = context.handler(for: ev.data.u64) else { continue }
            context.markReady(h, revents: ev.events)
        }
    }

    /// One epoll_pwait2 / epoll_wait; returns the event count or -errno.
    func waitOnce(timeout: Int64) -> Int32 {
        if timeout > 0 && hasPwait2 {
            var ts = timespec(tv_sec: Int(timeout / 1_000_000_000), tv_nsec: Int(timeout % 1_000_000_000))
            let n = dp_epoll_pwait2(epfd, events, maxEvents, &ts)
            if n != -ENOSYS { return n }
            hasPwait2 = false
        }
        let ms: Int32 = timeout < 0 ? -1 : Int32(clamping: timeout / 1_000_000 + (timeout % 1_000_000 != 0 ? 1 : 0))
        let n = epoll_wait(epfd, events, maxEvents, ms)
        return n >= 0 ? n : -errno
    }

    func submit(_ request: IORequest, userData: UInt64) -> Bool {
        switch request {
        case .nop:
            context.requestCompleted(userData: userData, result: 0)
        case .timeout(let ns):
            let ctx = context!
            // A one-shot timer completes it with -ETIME, as the ring's timeout does. The
            // armed timer is kept alive by the context's timer heap until it fires.
            ctx.makeTimer { [unowned(unsafe) ctx] in
                ctx.requestCompleted(userData: userData, result: -ETIME)
            }.arm(after: ns)
        case .read, .write, .readv, .writev, .fsync, .fallocate:
            if pool == nil {
                guard let p = try? WorkerPool() else { return false }
                let ctx = context!
                // The handler holds the pool (not the other way round): no cycle. It has a
                // poll callback, as every handler should on epoll: one without switches
                // adaptive polling off for the context's life (QEMU's thread pool completes
                // through a BH, which leaves polling alone). `unowned(unsafe) ctx`: the handler
                // is the context's and dies with it, so the context outlives every call.
                ctx.setEventNotifier(p.notifier, FDHandlerCallbacks(
                    read: { [p, unowned(unsafe) ctx] in
                        for (userData, result) in p.takeResults() { ctx.requestCompleted(userData: userData, result: result) }
                    },
                    poll: { [p] in p.hasResults.load(ordering: .relaxed) },  // relaxed: see hasResults
                    pollReady: { [p, unowned(unsafe) ctx] in
                        // Found by polling, so the notifier is still set: clear it first, so that
                        // a result finished after the take below sets it again.
                        p.notifier.testAndClear()
                        for (userData, result) in p.takeResults() { ctx.requestCompleted(userData: userData, result: result) }
                    }))
                pool = p
                // QEMU creates its pool on first use too, and starts thread-pool-min workers then.
                let limits = ctx.engineParameters.withLock { $0 }
                p.setLimits(min: limits.poolMin, max: limits.poolMax)
            }
            pool!.run(request, userData: userData)
        }
        return true
    }
}
