// QueueBinding: the one place where a virtqueue crosses threads.
//
// A queue runs on one AioContext at a time (its owner), or on none (stopped). Every change of
// owner is one primitive, `relocate(to:)`: stop the queue on the context it runs on (no new
// request is taken; a kick that raced in is consumed; the requests already taken complete and
// are visible to the guest), then, from that context's thread, continue on context Y with the
// last avail index. Attach is a relocation from nowhere, detach one to nowhere, a move one
// from X to Y. Devices (VirtioBlkDevice) and vhost-user sessions are built on it; nobody else
// schedules a queue's attach or detach by hand.
//
// Who may touch what:
// - The DeviceQueue's fields belong to the thread of the context it runs on; the hand-off is
//   the last thing the old thread does with it (DeviceQueue.finishDetach calls the relocation's
//   continuation last), and scheduling the continuation's BH on Y orders that thread's writes
//   before Y's reads.
// - `context` (where the queue runs, or will run once the relocation in flight completes)
//   belongs to the binding's controller: the device's operation in progress (its lifecycle
//   lets one run at a time) or the vhost-user session's thread.
// - One relocation at a time, with one exception: a stop (or a move) may follow a start at
//   once, because the start's attach BH is already on the context where the stop BH will
//   run after it (BHs scheduled from one thread to one context run in that order). Anything
//   else the controller requests only after the previous relocation reported (otherwise it
//   is a programming error and crashes): a start after a stop could run before the old
//   context let go, a stop after a move before the new context took over.
// - `withQueue` bodies requested while a relocation is in flight wait for it and run where
//   it ended, before it reports; otherwise they run in a BH on the queue's context, after
//   everything the controller scheduled there before.
// - A controller on the home thread of the context concerned gets that step done before the
//   call returns (a start registers the queue, a stop removes its kick handler): a vhost-user
//   session whose queue runs beside it then knows, when it answers SET_VRING_ENABLE 0, that
//   the ring takes no more requests. The reports of one binding reach the controller in the
//   order the relocations were requested.
import Aio
import Synchronization

/// One virtqueue and the context it runs on.
///
/// `@unchecked Sendable`: `context` is confined to the controller (see the design note); the
/// queue is handed between threads only by ``relocate(to:reportingOn:_:)``.
public final class QueueBinding: @unchecked Sendable {
    /// What a relocation reports.
    public struct Relocated: Sendable, Equatable {
        /// The next avail entry to take (vhost-user's GET_VRING_BASE answer once stopped).
        public let lastAvail: UInt16
        /// How long no context took the queue's requests, in ns: from the moment its old
        /// context stopped taking them to the moment the new one took over (0 for a start,
        /// and for a stop up to the end of the drain).
        public let pauseNanoseconds: Int64
    }

    /// The queue.
    public let queue: DeviceQueue
    /// Where the queue runs (or will, once the relocation in flight completes); nil when
    /// stopped. Controller only.
    public private(set) var context: AioContext?

    struct Transit {
        /// Relocations requested and not reported yet (at most a start and a stop).
        var inFlight = 0
        /// Of those, the ones that stop the queue somewhere (stops and moves).
        var stopsInFlight = 0
        /// `withQueue` bodies that wait for the relocations in flight.
        var waiting: [@Sendable (DeviceQueue) -> Void] = []
    }
    /// Shared by the controller and the thread that ends a relocation.
    let transit = Locked(Transit())

    public init(_ queue: DeviceQueue) {
        self.queue = queue
    }

    /// Stops the queue where it runs, if it runs, then continues it on `next` (nil: it stays
    /// stopped), and reports the last avail index and the pause through `done`, on
    /// `home`'s thread (a one-shot BH there) or, without `home`, on the thread where the
    /// relocation ended. Controller only. Called on the home thread of the context the queue
    /// runs on (or, for a start, will run on), that step happens before it returns; the rest
    /// goes on asynchronously.
    ///
    /// What the new context needs is allocated here, before the queue stops, so that the
    /// pause holds no allocation.
    public func relocate(to next: AioContext?, reportingOn home: AioContext? = nil,
                         _ done: @escaping @Sendable (Relocated) -> Void) {
        let queue = self.queue
        let stops = context != nil
        let alone = transit.withLock { t -> Bool? in
            // A start only when nothing is in flight; a stop or move unless one is in flight.
            guard stops ? t.stopsInFlight == 0 : t.inFlight == 0 else { return nil }
            defer {
                t.inFlight += 1
                if stops { t.stopsInFlight += 1 }
            }
            return t.inFlight == 0
        }
        precondition(alone != nil, "BUG DETECTED: queue \(queue.index) of '\(queue.name)' relocated while a relocation is in flight")
        let transit = self.transit
        // Where the relocation ends (on the queue's new owner, or its old one once stopped):
        // when it is the last in flight, the waiting bodies run there; then the controller
        // hears of it.
        let report: @Sendable (Relocated) -> Void = { r in
            while let bodies = transit.withLock({ t -> [@Sendable (DeviceQueue) -> Void]? in
                if t.inFlight > 1 || t.waiting.isEmpty {
                    t.inFlight -= 1
                    if stops { t.stopsInFlight -= 1 }
                    return nil
                }
                defer { t.waiting = [] }
                return t.waiting
            }) {
                for body in bodies { body(queue) }
            }
            if let home {
                home.scheduleOneShot(name: "\(queue.name)-q\(queue.index)-relocated") { done(r) }
            } else {
                done(r)
            }
        }
        let prepared = next.map { queue.prepareAttach($0) }
        // The queue starts on `next` (its home thread): from here on that context takes its
        // requests; then what queued up meanwhile is taken.
        let attach: @Sendable (_ stopped: Int64?) -> Void = { stopped in
            queue.register(prepared!)
            let pause = stopped.map { monotonicNanoseconds() - $0 } ?? 0
            queue.process()
            report(Relocated(lastAvail: queue.lastAvail, pauseNanoseconds: pause))
        }
        guard let from = context else {
            context = next
            guard let next else {
                report(Relocated(lastAvail: queue.lastAvail, pauseNanoseconds: 0))
                return
            }
            // On `next`'s own thread the queue starts at once (a stop requested next can then
            // be immediate too); elsewhere a BH does it.
            if next.isOnHomeThread {
                attach(nil)
            } else {
                next.scheduleOneShot(name: "\(queue.name)-q\(queue.index)-attach") { attach(nil) }
            }
            return
        }
        context = next
        let stop: @Sendable () -> Void = {
            let stopped = monotonicNanoseconds()
            queue.detachOnHomeThread {
                // Still on `from`, after the last completion: the queue's last moment here.
                guard let next else {
                    report(Relocated(lastAvail: queue.lastAvail, pauseNanoseconds: monotonicNanoseconds() - stopped))
                    return
                }
                next.scheduleOneShot(name: "\(queue.name)-q\(queue.index)-attach") { attach(stopped) }
            }
        }
        // On `from`'s own thread, with nothing ahead of it, the queue stops taking requests at
        // once: a controller on that thread (a vhost-user session whose queue runs beside it)
        // knows that no request is taken after this call. Elsewhere, or behind a start whose
        // BH is still queued there, a BH does it, in order.
        if alone! && from.isOnHomeThread {
            stop()
        } else {
            from.scheduleOneShot(name: "\(queue.name)-q\(queue.index)-stop", stop)
        }
    }

    /// ``relocate(to:reportingOn:_:)``, awaited. Never blocks a thread, so it may be awaited
    /// from a task running on either context.
    public func relocate(to next: AioContext?) async -> Relocated {
        await withCheckedContinuation { (c: CheckedContinuation<Relocated, Never>) in
            relocate(to: next) { c.resume(returning: $0) }
        }
    }

    /// Relocates every binding of `moves` at once and returns when all are done, in order.
    public static func relocate(_ moves: [(QueueBinding, AioContext?)]) async -> [Relocated] {
        guard !moves.isEmpty else { return [] }
        let results = Locked([Relocated?](repeating: nil, count: moves.count))
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let remaining = Atomic<Int>(moves.count)
            for (i, (binding, next)) in moves.enumerated() {
                binding.relocate(to: next) { r in
                    results.withLock { $0[i] = r }
                    // Acquire-release: the last one to finish sees every other result.
                    if remaining.subtract(1, ordering: .acquiringAndReleasing).newValue == 0 { c.resume() }
                }
            }
        }
        return results.withLock { $0.map { $0! } }
    }

    /// Runs `body` with the queue where it lives: after the relocation in flight if there is
    /// one (where it ends), else in a one-shot BH on its context, or at once when it is
    /// stopped. Controller only.
    public func withQueue(_ body: @escaping @Sendable (DeviceQueue) -> Void) {
        let queue = self.queue
        let deferred = transit.withLock { t -> Bool in
            guard t.inFlight > 0 else { return false }
            t.waiting.append(body)
            return true
        }
        if deferred { return }
        guard let ctx = context else { return body(queue) }
        ctx.scheduleOneShot(name: "\(queue.name)-q\(queue.index)") { body(queue) }
    }
}
