// Bottom halves: callbacks scheduled from any thread to run on a context's home thread.
//
// Design note (QEMU util/async.c). A BH carries an atomic flag word. Scheduling sets
// PENDING|SCHEDULED with one fetch-or; only the scheduler that flipped PENDING from 0 pushes
// the BH onto the context's lock-free list (a Treiber stack: push with CAS, the loop takes
// the whole list with one exchange, so there is no ABA). Scheduling a BH that is already
// pending therefore coalesces.
//
// Ownership (no ARC on the hot path). Scheduling an existing BH takes no reference: its
// owner's reference keeps it alive while it is linked, because the owner must `delete()` it
// and may not drop it before (the deinit checks). As in QEMU, `delete()` hands the BH to the
// loop: it takes a +1 for the loop and enqueues the BH with DELETED; the loop, which alone
// unlinks BHs, drops that +1 when it takes the BH off the list. A one-shot BH is created
// with the loop's +1 and dropped the same way after it ran. So the loop is the last user of
// a linked BH, whoever drops their reference first.
//
// Ordering we guarantee (documented in AioContext): the BHs taken in one batch run in the
// order they were first scheduled (FIFO; QEMU runs them LIFO); a BH scheduled while BHs
// run (also by itself) runs in the next batch, i.e. the next `poll`; a nested `poll` first
// finishes the batches of the iterations it is nested in, so each scheduling runs once.
import Synchronization

/// A callback that runs on its context's home thread when scheduled.
///
/// Create one with ``AioContext/makeBottomHalf(name:_:)``; it must be ``delete()``d before
/// its context is destroyed and before its last reference goes away (QEMU aborts on a leaked
/// BH; so do we). Scheduling takes no reference: while linked, the BH lives on its owner's
/// reference, and after `delete()` on the loop's until the loop unlinks it.
///
/// `@unchecked Sendable`: `flags` is atomic; `next` is written only by the thread that won
/// PENDING (before the release-CAS that publishes it) and read only by the home thread after
/// its acquire-exchange of the list; `callback`, `name` and `context` are immutable.
public final class BottomHalf: @unchecked Sendable {
    struct Flags {
        static let pending: UInt32 = 1
        static let scheduled: UInt32 = 2
        static let deleted: UInt32 = 4
        static let oneShot: UInt32 = 8
        static let idle: UInt32 = 16
    }

    let flags: Atomic<UInt32>
    // The lock-free list's link: written by the pusher before its release CAS on the list
    // head, read by the home thread after its acquire exchange (Unmanaged: a linked BH is kept
    // alive by its owner or the loop's +1, not by the link).
    @exclusivity(unchecked) nonisolated(unsafe) var next: Unmanaged<BottomHalf>? = nil
    let callback: @Sendable () -> Void
    /// The name reported when a BH leaks.
    public let name: String
    /// Not retained: a BH must not keep its context alive, and a scheduler on another thread
    /// must not extend the context's life for the length of a call either (its deinit could
    /// then run on that thread). The owner keeps the context alive while others schedule.
    let unmanagedContext: Unmanaged<AioContext>

    init(context: AioContext, name: String, flags: UInt32 = 0, callback: @escaping @Sendable () -> Void) {
        // Unretained: a context outlives its BHs (ThreadingRules, "Lifetimes").
        self.unmanagedContext = Unmanaged.passUnretained(context)
        self.name = name
        self.flags = Atomic(flags)
        self.callback = callback
    }

    deinit {
        // A linked BH holds no reference of its own unless deleted or one-shot: dropping an
        // undeleted one would leave the loop a dangling pointer, so it is a leak we report.
        let f = flags.load(ordering: .relaxed)
        precondition(
            f & (Flags.deleted | Flags.oneShot) != 0,
            "BUG DETECTED: bottom half '\(name)' leaked: its last reference went away before delete()")
    }

    /// Schedules the callback to run once on the home thread. Thread-safe, lock-free. A BH
    /// that is already scheduled is not scheduled twice.
    public func schedule() {
        _ = unmanagedContext._withUnsafeGuaranteedRef { $0.enqueue(self, flags: Flags.scheduled) }
    }

    /// Schedules the BH as an idle BH: it runs within 10 ms (or sooner if the loop wakes for
    /// something else) and does not count as progress.
    public func scheduleIdle() {
        _ = unmanagedContext._withUnsafeGuaranteedRef { $0.enqueue(self, flags: Flags.scheduled | Flags.idle) }
    }

    /// Cancels a scheduled run. Thread-safe; as in QEMU, a cancel racing with the loop that
    /// is about to run the BH may lose (call it from the home thread to be sure).
    public func cancel() { flags.bitwiseAnd(~Flags.scheduled, ordering: .relaxed) }

    /// Deletes the BH: its callback will not run again. Allowed from its own callback.
    /// Thread-safe. Deleting twice is a programming error.
    public func delete() {
        // The loop's +1, dropped when it unlinks the BH (QEMU's qemu_bh_delete enqueues too).
        let loopReference = Unmanaged.passRetained(self)
        unmanagedContext._withUnsafeGuaranteedRef { context in
            if !context.enqueue(self, flags: Flags.deleted) {
                loopReference.release()
                preconditionFailure("BUG DETECTED: bottom half '\(name)' deleted twice")
            }
            context.forget(self)
        }
    }

    /// Whether the BH is scheduled and has not run yet.
    public var isScheduled: Bool {
        let f = flags.load(ordering: .relaxed)
        return f & (Flags.scheduled | Flags.deleted) == Flags.scheduled
    }
}

extension AioContext {
    /// Pushes `bh` with `newFlags` (QEMU `aio_bh_enqueue`), then notifies. Returns false, and
    /// does nothing, if the BH was already deleted.
    @discardableResult
    func enqueue(_ bh: BottomHalf, flags newFlags: UInt32) -> Bool {
        // Acquire-release: our writes before scheduling are visible to the callback (pairs
        // with the acquiring read-modify-write in runBottomHalves).
        //
        // The common case first: a BH at rest has no flags set, so one compare-exchange that
        // expects that does it (a fetch-or that must return the old value compiles to a load
        // and a cmpxchg loop on x86).
        var old: UInt32 = 0
        let desired = BottomHalf.Flags.pending | newFlags
        if !bh.flags.compareExchange(expected: 0, desired: desired, ordering: .acquiringAndReleasing).exchanged {
            old = bh.flags.bitwiseOr(desired, ordering: .acquiringAndReleasing).oldValue
        }
        if old & BottomHalf.Flags.deleted != 0 {
            // Already handed to the loop: our flags are harmless (it drops the BH unrun).
            return false
        }
        if old & BottomHalf.Flags.pending == 0 {
            let node = Unmanaged.passUnretained(bh)
            var head = wake.pointee.bhList.load(ordering: .relaxed)
            while true {
                bh.next = head
                // Sequentially consistent (a locked cmpxchg on x86 either way): publishes
                // `next` to the home thread, and orders the push before the load of
                // `notified` (see notifyAfterSequentiallyConsistentPublish).
                let (done, current) = wake.pointee.bhList.compareExchange(
                    expected: head, desired: node, successOrdering: .sequentiallyConsistent, failureOrdering: .relaxed)
                if done { break }
                head = current
            }
        }
        notifyAfterSequentiallyConsistentPublish()
        return true
    }

    /// Takes every BH scheduled so far as one batch, in first-scheduled order.
    func takeBottomHalves() -> Unmanaged<BottomHalf>? {
        // Acquire pairs with the (sequentially consistent) CAS in enqueue. An empty list is seen with a plain
        // load (no locked exchange); a BH pushed right after comes with a notify.
        guard wake.pointee.bhList.load(ordering: .acquiring) != nil else { return nil }
        var node = wake.pointee.bhList.exchange(nil, ordering: .acquiring)
        // The stack is newest first: reverse it so BHs run in the order they were scheduled.
        var reversed: Unmanaged<BottomHalf>? = nil
        while let n = node {
            let bh = n._withUnsafeGuaranteedRef { $0 }
            node = bh.next
            bh.next = reversed
            reversed = n
        }
        return reversed
    }

    /// Runs scheduled BHs (QEMU `aio_bh_poll`). Returns whether a non-idle BH ran.
    func runBottomHalves() -> Bool {
        let batch = takeBottomHalves()
        // A handler change queued by another thread before it scheduled one of these BHs is
        // visible now (its flag store happens-before the BH push we acquired): apply it first,
        // so a BH never sees a handler that its scheduler had already removed.
        applyPendingChanges()
        // Most iterations have nothing to run, and no enclosing iteration's slice is left.
        if batch == nil && bhSlices.isEmpty { return false }
        bhSlices.append(batch)
        var progress = false
        while !bhSlices.isEmpty {
            guard let node = bhSlices[0] else {
                bhSlices.removeFirst()
                continue
            }
            // No retain: a linked BH is alive until the loop drops it (see the ownership note).
            let old = node._withUnsafeGuaranteedRef { bh in
                // Read `next` before clearing PENDING: afterwards another thread may push the
                // BH again and rewrite it.
                bhSlices[0] = bh.next
                bh.next = nil
                // The common case first, as in enqueue: a BH scheduled and nothing else.
                let mask = BottomHalf.Flags.pending | BottomHalf.Flags.scheduled | BottomHalf.Flags.idle
                var old = BottomHalf.Flags.pending | BottomHalf.Flags.scheduled
                if !bh.flags.compareExchange(expected: old, desired: 0, ordering: .acquiringAndReleasing).exchanged {
                    old = bh.flags.bitwiseAnd(~mask, ordering: .acquiringAndReleasing).oldValue
                }
                if old & (BottomHalf.Flags.scheduled | BottomHalf.Flags.deleted) == BottomHalf.Flags.scheduled {
                    if old & BottomHalf.Flags.idle == 0 { progress = true }
                    statistics._bottomHalvesRun.bump()
                    // The callback may delete the BH (so may another thread): that links it
                    // again with the loop's +1. A nested poll in the callback that unlinks it
                    // parks that +1 (see below), so the BH outlives this call.
                    bh.callback()
                }
                return old
            }
            // A one-shot that ran, or a deleted BH: drop the loop's +1. A one-shot is never
            // scheduled again, and a deleted BH never linked again, so this is the last use
            // here. But a deleted BH's callback may still be running in an enclosing
            // iteration (it deleted itself, or was deleted, and then called `poll`): in a
            // nested iteration the release waits until the outermost one returns. A one-shot
            // cannot be in that position (it is linked once, and released by the level that
            // ran it, after its callback), so it goes at once.
            // (One test on the common path, a persistent BH, as before.)
            if old & (BottomHalf.Flags.oneShot | BottomHalf.Flags.deleted) != 0 {
                if old & BottomHalf.Flags.deleted != 0 {
                    releaseOrPark(Unmanaged<AnyObject>.fromOpaque(node.toOpaque()))
                } else {
                    node.release()
                }
            }
        }
        return progress
    }

    /// The BH part of the timeout: 0 if a non-idle BH is scheduled, 10 ms if only idle ones
    /// are, -1 if none (QEMU `aio_compute_bh_timeout`).
    func bottomHalfTimeout() -> Int64 {
        var timeout: Int64 = -1
        // Walks a list the home thread owns; every node on it is kept alive by the list.
        func scan(_ first: Unmanaged<BottomHalf>?) -> Bool {
            var node = first
            while let n = node {
                let bh = n._withUnsafeGuaranteedRef { $0 }
                let f = bh.flags.load(ordering: .relaxed)
                if f & (BottomHalf.Flags.scheduled | BottomHalf.Flags.deleted) == BottomHalf.Flags.scheduled {
                    if f & BottomHalf.Flags.idle != 0 {
                        timeout = 10_000_000
                    } else {
                        return true
                    }
                }
                node = bh.next
            }
            return false
        }
        // Nodes on the shared list are only ever unlinked by this (the home) thread, so
        // walking from an acquired head is safe while other threads push.
        if scan(wake.pointee.bhList.load(ordering: .acquiring)) { return 0 }
        for i in 0..<bhSlices.count where scan(bhSlices[i]) { return 0 }
        return timeout
    }
}
