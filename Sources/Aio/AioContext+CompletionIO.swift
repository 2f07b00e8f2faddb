// Completion I/O on a context's ring (QEMU's aio_add_sqe): requests submitted on the home
// thread, completions dispatched there with their result. A request is a slot of a
// preallocated table (no copy-on-write per mutation) that names a closure or a
// CompletionTarget and a tag; a target is held only while it has requests in flight, and a
// release that a nested poll would make while a callback of it runs is parked until the
// outermost poll returns.
import CShims
import Glibc
import Synchronization
import Uring

/// A request for completion I/O on a context's ring (QEMU's `aio_add_sqe`).
///
/// Buffers are the caller's: they must stay valid, and not be touched, until the
/// completion callback runs.
public enum IORequest {
    case nop
    case read(fd: Int32, buffer: UnsafeMutableRawBufferPointer, offset: UInt64)
    case write(fd: Int32, buffer: UnsafeRawBufferPointer, offset: UInt64)
    /// `preadv`: scatter into `count` buffers. The iovec array, like the buffers, must stay
    /// valid until the completion callback runs.
    case readv(fd: Int32, iovecs: UnsafePointer<iovec>, count: Int, offset: UInt64)
    /// `pwritev`: gather from `count` buffers (same lifetime rule as ``readv``).
    case writev(fd: Int32, iovecs: UnsafePointer<iovec>, count: Int, offset: UInt64)
    case fsync(fd: Int32, dataOnly: Bool)
    /// `fallocate(2)` with `mode` (a virtio-blk discard punches a hole, write-zeroes zeroes a
    /// range).
    case fallocate(fd: Int32, mode: Int32, offset: UInt64, length: UInt64)
    /// Completes with `-ETIME` after the given number of nanoseconds.
    case timeout(nanoseconds: Int64)
}

extension AioContext {
    // MARK: - Completion I/O

    /// Submits a request on this context's ring; `completion` runs on the home thread with
    /// the result (a byte count, 0, or `-errno`). Home thread only. On the epoll backend
    /// reads, writes and fsyncs run on a worker pool instead (see
    /// ``setThreadPoolLimits(min:max:)``).
    ///
    /// The closure is retained while the request is in flight: for many requests that share
    /// one callback, ``submit(_:to:tag:)`` takes no reference per request.
    ///
    /// Requests still in flight when the context is destroyed never complete (as in QEMU).
    public func submit(_ request: IORequest, _ completion: @escaping (Int32) -> Void) {
        assertOnHomeThread("submit")
        let (slot, generation) = takeRequestSlot()
        requests.pointee.slots[slot].completion = completion
        send(request, userData: UserData.make(kind: UserData.request, generation: generation, slot: slot))
    }

    /// Submits a request whose completion runs `target`'s callback with `tag` and the result
    /// (a byte count, 0, or `-errno`), on the home thread. Home thread only; `target` must
    /// have been made by this context.
    ///
    /// No reference is taken per request: the context holds the target (one retain) from
    /// the moment it has a request in flight until it has none, so the owner may drop it
    /// at any time.
    public func submit(_ request: IORequest, to target: CompletionTarget, tag: UInt32) {
        assertOnHomeThread("submit")
        // Identity only: the opaque pointer is compared, never dereferenced.
        precondition(target.context == Unmanaged.passUnretained(self).toOpaque(),
                     "BUG DETECTED: CompletionTarget used with a context other than the one that made it")
        // The context holds the target while it has requests in flight (released when the
        // last completes), so its owner may drop it at any time.
        if target.inFlight == 0 { _ = Unmanaged.passRetained(target) }
        target.inFlight += 1
        let (slot, generation) = takeRequestSlot()
        requests.pointee.slots[slot].tag = tag
        // Unretained: the +1 above covers every request in flight.
        requests.pointee.slots[slot].target = Unmanaged.passUnretained(target)
        send(request, userData: UserData.make(kind: UserData.request, generation: generation, slot: slot))
    }

    /// A free request slot and its new generation, counted in flight.
    @inline(__always)
    func takeRequestSlot() -> (slot: Int, generation: UInt32) {
        let table = requests
        let slot: Int
        if !table.pointee.free.isEmpty {
            slot = table.pointee.free.removeLast()
        } else {
            slot = table.pointee.slots.count
            table.pointee.slots.append(RequestSlot())
        }
        let generation = table.pointee.slots[slot].generation &+ 1
        table.pointee.slots[slot].generation = generation
        table.pointee.inFlight += 1
        return (slot, generation)
    }

    @inline(__always)
    func send(_ request: IORequest, userData: UInt64) {
        if !monitor.submit(request, userData: userData) {
            // The kernel would not take another request even after a reap: complete it with
            // -EBUSY rather than lose it.
            requestCompleted(userData: userData, result: -EBUSY)
        }
    }

    /// Drops the loop's reference to a deleted BH or a completion target, or, in a nested
    /// iteration, parks it until the outermost one returns: an enclosing iteration may be
    /// running that object's callback through an unretained reference. (A branch on the rare
    /// paths that drop the last reference; nothing on the per-request or per-BH path.)
    @inline(__always)
    func releaseOrPark(_ object: Unmanaged<AnyObject>) {
        if depth > 1 {
            parkedReleases.append(object)
        } else {
            object.release()
        }
    }

    /// Releases what nested iterations parked (see ``parkedReleases``).
    func releaseParked() {
        while !parkedReleases.isEmpty { parkedReleases.removeLast().release() }
    }

    /// Requests submitted and not yet completed (their callbacks not yet run).
    public var pendingRequests: Int {
        assertOnHomeThread("pendingRequests")
        return requests.pointee.inFlight
    }

    @inline(__always)
    func requestCompleted(userData: UInt64, result: Int32) {
        requests.pointee.ready.append((userData, result))
    }

    func dispatchCompletions() -> Bool {
        let table = requests
        var progress = false
        while table.pointee.hasReady {
            let (userData, result) = table.pointee.ready[table.pointee.readyHead]
            table.pointee.readyHead += 1
            let slot = UserData.slot(userData)
            guard slot < table.pointee.slots.count, table.pointee.slots[slot].generation == UserData.generation(userData)
            else { continue }
            // Callbacks may submit: the table is not being accessed while they run.
            if let target = table.pointee.slots[slot].target {
                table.pointee.slots[slot].target = nil
                let tag = table.pointee.slots[slot].tag
                table.pointee.free.append(slot)
                table.pointee.inFlight -= 1
                progress = true
                statistics._completions.bump()
                // The context's hold on the target ends with its last request in flight,
                // after the callback (which may submit again, taking a new hold). Unretained
                // while the body runs: the hold keeps the target, and a nested iteration that
                // drops it parks the release until the outermost one returns.
                let last = target._withUnsafeGuaranteedRef { t in
                    t.inFlight -= 1
                    let last = t.inFlight == 0
                    t.body(tag, result)
                    return last
                }
                if last { releaseOrPark(Unmanaged<AnyObject>.fromOpaque(target.toOpaque())) }
            } else if let completion = table.pointee.slots[slot].completion.take() {
                table.pointee.free.append(slot)
                table.pointee.inFlight -= 1
                progress = true
                statistics._completions.bump()
                completion(result)
            }
        }
        if table.pointee.readyHead > 0 && !table.pointee.hasReady {
            table.pointee.ready.removeAll()
            table.pointee.readyHead = 0
        }
        return progress
    }
}
