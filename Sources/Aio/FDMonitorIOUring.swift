// fd monitoring and completion I/O on io_uring.
//
// Design note. fd readiness is a POLL_ADD per handler whose user_data is the handler's
// generation-tagged slot (never a pointer): a completion for a removed handler finds another
// generation in the slot and is dropped, so removal is safe against CQEs in flight. Event
// notifiers (eventfds the loop clears itself) use multishot POLL_ADD — one SQE for the
// registration's life instead of one per event (QEMU re-arms a one-shot poll every time);
// plain fd handlers keep one-shot re-arming, which gives them the level-triggered semantics
// QEMU's handlers rely on (a handler that does not drain its fd is called again). A kernel
// that refuses multishot (-EINVAL, before 5.13) is detected on the first CQE and the monitor
// falls back to one-shot. SQEs are queued and reach the kernel in one io_uring_enter per
// iteration (or earlier, when the SQ fills).
//
// The one rule that makes it safe: only the home thread touches the ring. The ring is
// created on it (SINGLE_ISSUER) and every method here runs on it.
import Glibc
import Synchronization
import Uring

final class IOUringMonitor: FDMonitor {
    // `@exclusivity(unchecked)` on the state below: home thread only, as AioContext's.
    @exclusivity(unchecked) var ring: Ring
    /// Set by `bind(to:)` right after the context is initialised, before any other use.
    unowned(unsafe) var context: AioContext!
    @exclusivity(unchecked) var multishotSupported = true
    /// Handlers whose POLL_ADD could not be queued (SQ full) or must be re-armed after a
    /// reap (the ring may not be used while reaping).
    @exclusivity(unchecked) var toArm: ContiguousArray<FDHandler> = []
    /// Requests the SQ could not take (full, and the kernel would not drain it just then:
    /// EAGAIN/EBUSY). They keep their order and go to the ring first on the next iteration,
    /// so a refusal delays a request but never loses or fails it.
    @exclusivity(unchecked) var backlog: ContiguousArray<(request: IORequest, userData: UInt64)> = []
    @exclusivity(unchecked) var backlogStart = 0
    /// `ring.largestSubmission` as last published to the statistics.
    @exclusivity(unchecked) var publishedLargestSubmission: UInt32 = 0

    func bind(to context: AioContext) { self.context = context }

    init() throws(UringError) {
        self.ring = try Ring(entries: 256, singleIssuer: true)
    }

    var kind: FDMonitorKind { .ioUring }
    var ringEnters: UInt64 { ring.enterCount }
    var supportsUserspacePolling: Bool { true }
    var ownedDescriptors: [Int32] { [ring.fileDescriptor] }

    func applyEngineParameters(_ p: AioContext.EngineParameters) {
        ring.maxSubmissionBatch = UInt32(clamping: p.maxBatch)
    }

    var needsWait: Bool {
        ring.pendingSubmissions > 0 || ring.readyCompletions > 0 || ring.hasOverflow || !toArm.isEmpty
            || backlogStart < backlog.count
    }

    var eventsReady: Bool { ring.readyCompletions > 0 || ring.hasOverflow }

    func prepareForPolling() {
        flushBacklog()
        armPending()
        ring.submit()
    }

    func register(_ h: FDHandler) {
        guard h.events != 0 else { return }
        h.multishot = h.role != .fd && multishotSupported
        arm(h)
    }

    func arm(_ h: FDHandler) {
        guard !h.deleted else { return }
        if ring.preparePollAdd(fd: h.fd, events: h.events, multishot: h.multishot, userData: h.userData) {
            h.armed = true
        } else {
            toArm.append(h)
        }
    }

    func armPending() {
        guard !toArm.isEmpty else { return }
        let pending = toArm
        toArm.removeAll(keepingCapacity: true)
        for h in pending where !h.deleted && !h.armed { arm(h) }
    }

    func unregister(_ h: FDHandler) {
        guard h.armed else { return }
        h.armed = false
        // The removal's own CQE and the poll's -ECANCELED carry ignorable user_data or a
        // stale generation. If no SQE can be had, the poll stays in the kernel until the
        // ring is torn down; its events are dropped by generation, so this is only a leak
        // of one request, never a wrong dispatch.
        _ = ring.preparePollRemove(target: h.userData, userData: 0)
    }

    func prepare(_ request: IORequest, userData: UInt64) -> Bool {
        switch request {
        case .nop:
            return ring.prepareNop(userData: userData)
        case .read(let fd, let buffer, let offset):
            return ring.prepareRead(fd: fd, buffer: buffer.baseAddress!, count: UInt32(buffer.count),
                                    offset: offset, userData: userData)
        case .write(let fd, let buffer, let offset):
            return ring.prepareWrite(fd: fd, buffer: buffer.baseAddress!, count: UInt32(buffer.count),
                                     offset: offset, userData: userData)
        case .readv(let fd, let iovecs, let count, let offset):
            return ring.prepareReadv(fd: fd, iovecs: iovecs, count: UInt32(count), offset: offset, userData: userData)
        case .writev(let fd, let iovecs, let count, let offset):
            return ring.prepareWritev(fd: fd, iovecs: iovecs, count: UInt32(count), offset: offset, userData: userData)
        case .fsync(let fd, let dataOnly):
            return ring.prepareFsync(fd: fd, dataOnly: dataOnly, userData: userData)
        case .fallocate(let fd, let mode, let offset, let length):
            return ring.prepareFallocate(fd: fd, mode: mode, offset: offset, length: length, userData: userData)
        case .timeout(let ns):
            return ring.prepareTimeout(nanoseconds: ns, userData: userData)
        }
    }

    func submit(_ request: IORequest, userData: UInt64) -> Bool {
        if backlogStart == backlog.count {
            if prepare(request, userData: userData) { return true }
            // The SQ is full and the kernel would not take more (CQ backpressure): reap, retry.
            reap()
            ring.submit()
            if prepare(request, userData: userData) { return true }
        }
        backlog.append((request, userData))
        return true
    }

    /// Moves backlogged requests to the SQ, in order, as far as it has room.
    func flushBacklog() {
        while backlogStart < backlog.count {
            let (request, userData) = backlog[backlogStart]
            guard prepare(request, userData: userData) else { return }
            backlogStart += 1
        }
        backlog.removeAll(keepingCapacity: true)
        backlogStart = 0
    }

    func wait(timeout: Int64) {
        flushBacklog()
        armPending()
        // A blocking iteration returns only with an event or at its deadline, so a wait that
        // ended with no completion ready is retried with what is left of the timeout, unless
        // it timed out (-ETIME) or the kernel is short of resources for now (-EBUSY/-EAGAIN:
        // the queues are intact and the next iteration retries). A signal shows as -EINTR, or
        // — when the same io_uring_enter also submitted SQEs — as the number it submitted:
        // the kernel returns that count rather than the wait's -EINTR, and liburing 2.3
        // passes it on (QEMU 10.2 fixed the same early return in fdmon-io_uring.c). For the
        // same reason a timed wait that submitted SQEs and then timed out returns a count,
        // not -ETIME: the deadline ends that one.
        let deadline = timeout > 0 ? saturatingAdd(monotonicNanoseconds(), timeout) : 0
        var remaining = timeout
        while true {
            let rc = ring.submitAndWait(timeoutNanoseconds: remaining)
            if timeout == 0 || ring.readyCompletions > 0 || ring.hasOverflow { break }
            if rc == -ETIME || (rc < 0 && rc != -EINTR) { break }
            if timeout > 0 {
                remaining = deadline - monotonicNanoseconds()
                if remaining <= 0 { break }
            }
        }
        context.statistics._ringEnters.store(ring.enterCount, ordering: .relaxed)
        // A high-water mark: it rarely moves, so it is published only when it does.
        if ring.largestSubmission > publishedLargestSubmission {
            publishedLargestSubmission = ring.largestSubmission
            // Relaxed, as every statistic: a reader may see it a little late, never torn.
            context.statistics._largestSubmissionBatch.store(UInt64(publishedLargestSubmission), ordering: .relaxed)
        }
        reap()
        armPending()
    }

    func reap() {
        let ctx = context!
        ring.reap { c in
            switch UserData.kind(c.userData) {
            case UserData.fdHandler:
                guard let h = ctx.handler(for: c.userData) else { return }
                if c.result == -22 /* EINVAL */ && h.multishot {
                    // This kernel has no multishot poll (< 5.13): use one-shot from now on.
                    multishotSupported = false
                    h.multishot = false
                    h.armed = false
                    toArm.append(h)
                    return
                }
                if c.result == -EBADF {
                    // Not an open descriptor: it never fires, as on epoll. Re-armed, it would
                    // fail again at once, costing a system call every iteration.
                    h.armed = false
                    return
                }
                if !c.hasMore {
                    h.armed = false  // one-shot done, or the kernel ended a multishot
                    toArm.append(h)
                }
                if c.result > 0 { ctx.markReady(h, revents: UInt32(c.result)) }
            case UserData.request:
                ctx.requestCompleted(userData: c.userData, result: c.result)
            default:
                break  // poll removals and other internal requests
            }
        }
    }
}
