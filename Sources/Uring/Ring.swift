// Ring: the one owner of one io_uring instance.
//
// Design note. A `Ring` is `~Copyable`: exactly one value owns the kernel ring, its mmaps
// and its descriptor, and `deinit` tears them down. The `io_uring` struct itself lives on
// the heap so that moving the Swift value never moves what liburing points into.
//
// The one rule that makes it safe: a ring is used by one thread at a time — the thread
// that created it when `singleIssuer` is on (the kernel enforces that with -EEXIST). The
// `Aio` module creates each context's ring on the context's home thread and only that
// thread submits: io_uring requests belong to the thread that submitted them, and complete
// with -ECANCELED when it exits.
import CLiburing
import Glibc

public struct Ring: ~Copyable {
    @usableFromInline let ring: UnsafeMutablePointer<io_uring>
    /// One `__kernel_timespec` per SQ slot, for timeout requests: the kernel reads it when
    /// the SQE is submitted, so it must outlive `prepare…` until then. Indexing by the SQE's
    /// slot means it is never reused before the kernel has consumed its SQE.
    @usableFromInline let timespecs: UnsafeMutablePointer<__kernel_timespec>
    /// Scratch space CQEs are copied into before the CQ is advanced.
    @usableFromInline let cqeScratch: UnsafeMutablePointer<io_uring_cqe>
    @usableFromInline let cqeScratchCount: UInt32
    @usableFromInline let sqEntries: UInt32

    /// The setup flags the ring was created with (`IORING_SETUP_*`).
    public let setupFlags: UInt32
    /// The features the kernel reported (`IORING_FEAT_*`).
    public let features: UInt32
    /// How many times this ring entered the kernel (submit or wait). Home thread only.
    @usableFromInline var _enterCount: UInt64 = 0
    public var enterCount: UInt64 { _enterCount }
    /// SQEs handed to the kernel so far. Home thread only.
    public private(set) var submittedCount: UInt64 = 0
    /// The most SQEs one `io_uring_enter` handed to the kernel. Home thread only.
    public private(set) var largestSubmission: UInt32 = 0
    /// At most this many SQEs go to the kernel per `io_uring_enter` (QEMU's `aio-max-batch`);
    /// 0: as many as are queued (up to the SQ's size). When that many are queued, preparing
    /// one more first submits them. (A refused submission can leave more queued: the next
    /// enter takes them all.)
    public var maxSubmissionBatch: UInt32 = 0
    /// Fault injection, for tests: each entry is an errno that the next `io_uring_enter` (from
    /// ``submit()`` or ``submitAndWait(timeoutNanoseconds:)``) returns instead of entering the
    /// kernel, as the kernel does on a signal (EINTR) or a resource shortage (EAGAIN, EBUSY).
    /// The SQEs stay queued, as after a real refusal. Empty in production: one branch per enter.
    public var injectedEnterErrors: [Int32] = []

    /// Creates a ring.
    /// - Parameters:
    ///   - entries: submission queue size (rounded up to a power of two by the kernel);
    ///     the completion queue is twice that.
    ///   - singleIssuer: ask for `IORING_SETUP_SINGLE_ISSUER` (one submitting thread, less
    ///     locking in the kernel). Falls back to no flags on kernels that refuse it.
    /// - Throws: `UringError` with the kernel's errno (ENOSYS: no io_uring; EPERM: refused by
    ///   seccomp or `kernel.io_uring_disabled`; ENOMEM: locked-memory limit; EMFILE: no fd).
    public init(entries: UInt32 = 256, singleIssuer: Bool = true) throws(UringError) {
        let ring = UnsafeMutablePointer<io_uring>.allocate(capacity: 1)
        ring.initialize(to: io_uring())
        var flags: UInt32 = IORING_SETUP_SUBMIT_ALL
        if singleIssuer { flags |= IORING_SETUP_SINGLE_ISSUER }
        var rc = io_uring_queue_init(entries, ring, flags)
        if rc == -EINVAL && flags != 0 {
            // Older kernels (< 6.0 for SINGLE_ISSUER, < 5.18 for SUBMIT_ALL) reject unknown flags.
            flags = 0
            rc = io_uring_queue_init(entries, ring, flags)
        }
        guard rc == 0 else {
            ring.deallocate()
            throw UringError(errno: -rc, operation: "io_uring_queue_init")
        }
        self.ring = ring
        self.setupFlags = flags
        self.features = ring.pointee.features
        self.sqEntries = ring.pointee.sq.ring_entries
        self.timespecs = .allocate(capacity: Int(sqEntries))
        self.timespecs.initialize(repeating: __kernel_timespec(), count: Int(sqEntries))
        self.cqeScratchCount = 256
        self.cqeScratch = .allocate(capacity: Int(cqeScratchCount))
    }

    deinit {
        io_uring_queue_exit(ring)
        ring.deallocate()
        timespecs.deallocate()
        cqeScratch.deallocate()
    }

    /// The ring's file descriptor.
    public var fileDescriptor: Int32 { ring.pointee.ring_fd }
    /// Submission queue size.
    public var submissionQueueEntries: UInt32 { sqEntries }
    /// SQEs prepared and not yet handed to the kernel.
    @inlinable public var pendingSubmissions: UInt32 { io_uring_sq_ready(ring) }
    /// CQEs posted by the kernel and not yet reaped (a user-space read, no system call).
    @inlinable public var readyCompletions: UInt32 { io_uring_cq_ready(ring) }
    /// The kernel holds completions it could not post because the CQ was full.
    @inlinable public var hasOverflow: Bool { io_uring_cq_has_overflow(ring) }

    // MARK: - Preparing requests

    /// Returns a free SQE, submitting what is queued first when the SQ is full.
    @inlinable
    mutating func nextSQE() -> UnsafeMutablePointer<io_uring_sqe>? {
        // A full batch goes to the kernel before the next SQE joins it. Unbounded (the
        // default), this is one compare per SQE.
        if maxSubmissionBatch != 0 && io_uring_sq_ready(ring) >= maxSubmissionBatch { _ = submit() }
        if let sqe = io_uring_get_sqe(ring) { return sqe }
        _ = submit()
        return io_uring_get_sqe(ring)
    }

    @inlinable
    mutating func prepare(
        userData: UInt64, _ body: (UnsafeMutablePointer<io_uring_sqe>) -> Void
    ) -> Bool {
        guard let sqe = nextSQE() else { return false }
        body(sqe)
        io_uring_sqe_set_data64(sqe, userData)
        return true
    }

    /// Queues a no-op. Returns false when no SQE can be had (the SQ is full and the kernel
    /// would not take it); the caller retries after reaping.
    @inlinable
    public mutating func prepareNop(userData: UInt64) -> Bool {
        prepare(userData: userData) { io_uring_prep_nop($0) }
    }

    /// Queues a `pread` of `count` bytes at `offset` (-1: the file position) into `buffer`,
    /// which must stay valid until the completion is reaped.
    @inlinable
    public mutating func prepareRead(
        fd: Int32, buffer: UnsafeMutableRawPointer, count: UInt32, offset: UInt64, userData: UInt64
    ) -> Bool {
        prepare(userData: userData) { io_uring_prep_read($0, fd, buffer, count, offset) }
    }

    /// Queues a `pwrite` of `count` bytes from `buffer` (valid until the completion is reaped).
    @inlinable
    public mutating func prepareWrite(
        fd: Int32, buffer: UnsafeRawPointer, count: UInt32, offset: UInt64, userData: UInt64
    ) -> Bool {
        prepare(userData: userData) { io_uring_prep_write($0, fd, buffer, count, offset) }
    }

    /// Queues a `preadv` into `count` buffers described by `iovecs` (the array and the
    /// buffers must stay valid until the completion is reaped).
    @inlinable
    public mutating func prepareReadv(
        fd: Int32, iovecs: UnsafePointer<iovec>, count: UInt32, offset: UInt64, userData: UInt64
    ) -> Bool {
        prepare(userData: userData) { io_uring_prep_readv($0, fd, iovecs, count, offset) }
    }

    /// Queues a `pwritev` from `count` buffers described by `iovecs` (valid until the
    /// completion is reaped).
    @inlinable
    public mutating func prepareWritev(
        fd: Int32, iovecs: UnsafePointer<iovec>, count: UInt32, offset: UInt64, userData: UInt64
    ) -> Bool {
        prepare(userData: userData) { io_uring_prep_writev($0, fd, iovecs, count, offset) }
    }

    /// Queues an `fallocate` (`mode` as fallocate(2): punch a hole, zero a range...).
    @inlinable
    public mutating func prepareFallocate(fd: Int32, mode: Int32, offset: UInt64, length: UInt64, userData: UInt64) -> Bool {
        prepare(userData: userData) {
            io_uring_prep_fallocate($0, fd, mode, off_t(Int64(bitPattern: offset)), off_t(Int64(bitPattern: length)))
        }
    }

    /// Queues an `fsync` (or `fdatasync` when `dataOnly`).
    @inlinable
    public mutating func prepareFsync(fd: Int32, dataOnly: Bool, userData: UInt64) -> Bool {
        prepare(userData: userData) {
            io_uring_prep_fsync($0, fd, dataOnly ? IORING_FSYNC_DATASYNC : 0)
        }
    }

    /// Queues a relative timeout that completes with `-ETIME` after `nanoseconds`
    /// (`IORING_TIMEOUT_ETIME_SUCCESS` is not set, so it counts no other completions).
    @inlinable
    public mutating func prepareTimeout(nanoseconds: Int64, userData: UInt64) -> Bool {
        let ts = timespecs
        let base = ring.pointee.sq.sqes!
        return prepare(userData: userData) { sqe in
            let slot = ts + (sqe - base)
            slot.pointee.tv_sec = nanoseconds / 1_000_000_000
            slot.pointee.tv_nsec = nanoseconds % 1_000_000_000
            io_uring_prep_timeout(sqe, slot, 0, 0)
        }
    }

    /// Queues a poll for `events` on `fd`. A multishot poll stays armed and posts a CQE with
    /// `IORING_CQE_F_MORE` for every wake-up; a one-shot poll completes once.
    @inlinable
    public mutating func preparePollAdd(fd: Int32, events: UInt32, multishot: Bool, userData: UInt64) -> Bool {
        prepare(userData: userData) {
            if multishot {
                io_uring_prep_poll_multishot($0, fd, events)
            } else {
                io_uring_prep_poll_add($0, fd, events)
            }
        }
    }

    /// Queues the removal of the poll request submitted with `target` as its user data.
    @inlinable
    public mutating func preparePollRemove(target: UInt64, userData: UInt64) -> Bool {
        prepare(userData: userData) { io_uring_prep_poll_remove($0, target) }
    }

    /// Queues the cancellation of any request submitted with `target` as its user data.
    @inlinable
    public mutating func prepareCancel(target: UInt64, userData: UInt64) -> Bool {
        prepare(userData: userData) { io_uring_prep_cancel64($0, target, 0) }
    }

    // MARK: - Submitting and waiting

    /// Hands queued SQEs to the kernel without waiting. Returns how many were submitted or
    /// `-errno`; `-EINTR` is retried here. With nothing queued this makes no system call.
    @discardableResult
    public mutating func submit() -> Int32 {
        if io_uring_sq_ready(ring) == 0 && !io_uring_cq_has_overflow(ring) { return 0 }
        while true {
            _enterCount &+= 1
            let queued = io_uring_sq_ready(ring)
            let rc = injectedEnterErrors.isEmpty ? io_uring_submit(ring) : -injectedEnterErrors.removeFirst()
            countSubmitted(queuedBefore: queued)
            if rc != -EINTR { return rc }
        }
    }

    /// Counts what the enter just made took from the SQ: the queue's length before it, less
    /// what is still queued (the kernel advances the SQ head past what it consumed).
    @usableFromInline
    mutating func countSubmitted(queuedBefore: UInt32) {
        let n = queuedBefore &- io_uring_sq_ready(ring)
        submittedCount &+= UInt64(n)
        if n > largestSubmission { largestSubmission = n }
    }

    /// Submits what is queued and waits until at least one completion is ready or
    /// `timeoutNanoseconds` pass (-1 waits for ever, 0 does not wait).
    ///
    /// Returns `-ETIME` on timeout, `-EINTR` when a signal interrupted the wait, another
    /// `-errno`, or 0 or a positive count. A count does not mean a completion is ready: when
    /// this call also submitted SQEs, the kernel returns how many it submitted even if the
    /// wait then timed out or was interrupted (liburing 2.3 passes that on). Check
    /// ``readyCompletions``.
    /// The timeout travels in the system call itself (`IORING_ENTER_EXT_ARG` on kernels that
    /// have it, 5.11+), so no timespec has to outlive this call — the bug QEMU fixed in 10.2.
    public mutating func submitAndWait(timeoutNanoseconds: Int64) -> Int32 {
        if timeoutNanoseconds == 0 { return submit() }
        if io_uring_cq_ready(ring) > 0 { return submit() }
        _enterCount &+= 1
        if !injectedEnterErrors.isEmpty { return -injectedEnterErrors.removeFirst() }
        let queued = io_uring_sq_ready(ring)
        defer { countSubmitted(queuedBefore: queued) }
        if timeoutNanoseconds < 0 {
            return io_uring_submit_and_wait(ring, 1)
        }
        var ts = __kernel_timespec(
            tv_sec: timeoutNanoseconds / 1_000_000_000, tv_nsec: timeoutNanoseconds % 1_000_000_000)
        var cqe: UnsafeMutablePointer<io_uring_cqe>? = nil
        return io_uring_submit_and_wait_timeout(ring, &cqe, 1, &ts, nil)
    }

    /// Copies the ready completions out of the ring, advances the CQ past them, then hands
    /// each to `body` in order, until the CQ is empty. Flushes a CQ overflow first. `body`
    /// must not use the ring (the `Aio` loop only queues the completion there and dispatches
    /// it afterwards). Returns how many were reaped.
    @inlinable
    @discardableResult
    public mutating func reap(_ body: (Completion) -> Void) -> Int {
        if io_uring_cq_has_overflow(ring) {
            // Completions the kernel held back (IORING_FEAT_NODROP) are posted on entry.
            _enterCount &+= 1
            _ = io_uring_get_events(ring)
        }
        var total = 0
        while true {
            let n = dp_cq_take(ring, cqeScratch, cqeScratchCount)
            if n == 0 { return total }
            for i in 0..<Int(n) {
                let c = cqeScratch[i]
                body(Completion(userData: c.user_data, result: c.res, flags: c.flags))
            }
            total += Int(n)
        }
    }
}
