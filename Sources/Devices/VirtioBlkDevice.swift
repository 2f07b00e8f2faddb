// A virtio-blk-like device: queues in guest memory, attached to IOThreads.
//
// Attach: take a hold on each IOThread used, then on each queue's IOThread register the kick
// handler, enable kicks and process the queue once. Detach: on each queue's IOThread stop
// taking requests (remove the kick handler, consume a raced kick), wait until every request
// already taken has completed and its completion is visible to the guest, then release the
// holds. Requests not yet taken stay in the avail ring: re-attaching resumes from there.
// Move: hold the new IOThreads, then each queue detaches on its IOThread and, from there,
// schedules its own attach on the new one (no task switch inside the pause); then release
// the IOThreads no queue uses any more.
import Aio
import CShims
import Glibc
import IOThreads
import Synchronization

/// A virtio-blk-like device with one or more virtqueues.
///
/// `@unchecked Sendable`: `phase` and `holds` are behind `lifecycle`; each queue is confined
/// to the IOThread it is attached to (see DeviceQueue); the rest is immutable.
public final class VirtioBlkDevice: @unchecked Sendable {
    public enum Phase: Sendable, Equatable { case detached, attaching, attached, detaching, moving }

    /// The device id (`-device virtio-blk,id=…`).
    public let id: String
    /// The holder path it registers on IOThreads.
    public var holderPath: String { "/machine/peripheral/\(id)" }
    public let backend: BlockBackend
    public let memory: GuestMemory
    /// The layout of each queue in guest memory, for the guest side.
    public let layouts: [SplitRingLayout]
    /// Guest memory after the rings, free for request buffers.
    public let freeMemoryStart: UInt64
    let queues: [DeviceQueue]
    let opened: OpenBlockBackend

    struct Lifecycle {
        var phase: Phase = .detached
        var mapping: [IOThread] = []  // per queue
        var holds: [HoldBox] = []
        var heldThreads: [ObjectIdentifier] = []  // holds[i] is on heldThreads[i]
    }

    /// A hold in a box: arrays need copyable elements, a hold is ~Copyable.
    final class HoldBox: @unchecked Sendable {  // released once, by the detaching task
        var hold: IOThreadHold?
        init(_ hold: consuming IOThreadHold) { self.hold = consume hold }
        func release() {
            if let h = hold.take() { h.release() }
        }
    }
    let lifecycle = Locked(Lifecycle())

    /// Most queues a device may have.
    public static let maxQueues = 64

    /// Creates a detached device.
    /// - Parameters:
    ///   - queueSize: entries per queue (a power of two).
    ///   - bufferBytes: guest memory to leave after the rings for request buffers (default:
    ///     what ``GuestQueue`` needs for every queue).
    public init(id: String, queues queueCount: Int = 1, queueSize: Int = 256, backend: BlockBackend = .null,
                bufferBytes: Int? = nil) throws(DeviceError) {
        guard isWellFormedObjectID(id) else { throw DeviceError("Parameter 'id' expects an identifier") }
        guard queueCount >= 1 && queueCount <= VirtioBlkDevice.maxQueues else {
            throw DeviceError("num-queues must be in [1, \(VirtioBlkDevice.maxQueues)]")
        }
        guard queueSize >= 4 && queueSize <= 32768 && queueSize & (queueSize - 1) == 0 else {
            throw DeviceError("queue-size must be a power of 2 in [4, 32768]")
        }
        self.id = id
        self.backend = backend
        var layouts: [SplitRingLayout] = []
        var end: UInt64 = 0
        for _ in 0..<queueCount {
            let (l, e) = SplitRingLayout.at(end, size: queueSize)
            layouts.append(l)
            end = e
        }
        self.layouts = layouts
        freeMemoryStart = (end + 4095) & ~4095
        // By default, room for every queue's request buffers as GuestQueue lays them out.
        let buffers = bufferBytes ?? Int(GuestQueue.bytesNeeded(queueSize: queueSize)) * queueCount
        memory = try GuestMemory(size: Int(freeMemoryStart) + buffers)
        opened = try OpenBlockBackend(backend)
        var qs: [DeviceQueue] = []
        for (i, l) in layouts.enumerated() {
            let ring = try SplitRing(memory: memory, layout: l)
            do {
                qs.append(DeviceQueue(index: i, ring: ring, memory: memory, backend: opened, serial: id,
                                      kick: try EventNotifier(), interrupt: try EventNotifier(), name: id))
            } catch {
                throw DeviceError("cannot create queue eventfds: \(error)")
            }
        }
        queues = qs
    }

    deinit {
        let phase = lifecycle.withLock { $0.phase }
        precondition(phase == .detached, "BUG DETECTED: device '\(id)' destroyed while \(phase)")
    }

    /// The queue's kick and interrupt eventfds (the guest side uses them).
    public func notifiers(queue: Int) -> (kick: EventNotifier, interrupt: EventNotifier) {
        (queues[queue].kick, queues[queue].interrupt!)
    }

    /// The queue's counters.
    public func statistics(queue: Int) -> QueueStatistics { queues[queue].statistics }

    public var phase: Phase { lifecycle.withLock { $0.phase } }

    /// The IOThread each queue is attached to (empty when detached).
    public var iothreads: [IOThread] { lifecycle.withLock { $0.mapping } }

    /// Attaches every queue to `iothread`.
    public func attach(to iothread: IOThread) async throws(DeviceError) {
        try await attach(mapping: Array(repeating: iothread, count: queues.count))
    }

    /// Attaches queue k to `mapping[k]`; each distinct IOThread is held once by this device.
    /// - Throws: ``DeviceError`` when the device is not detached or the mapping has the
    ///   wrong length.
    public func attach(mapping: [IOThread]) async throws(DeviceError) {
        guard mapping.count == queues.count else {
            throw DeviceError("device '\(id)' has \(queues.count) queues, mapping has \(mapping.count)")
        }
        try lifecycle.withLock { s throws(DeviceError) in
            guard s.phase == .detached else { throw DeviceError("device '\(id)' is already attached") }
            s.phase = .attaching
            s.mapping = mapping
            for t in mapping where !s.heldThreads.contains(ObjectIdentifier(t)) {
                s.heldThreads.append(ObjectIdentifier(t))
                s.holds.append(HoldBox(t.hold(holderPath)))
            }
        }
        for (q, t) in zip(queues, mapping) {
            let ctx = t.context!
            await onHomeThread(ctx) { q.attachOnHomeThread(ctx) }
        }
        lifecycle.withLock { $0.phase = .attached }
    }

    /// Detaches: no new requests are taken; returns once every request already taken has
    /// completed and its completion is visible to the guest; then releases the holds.
    /// Never blocks a thread, so it may be awaited from a task running on the device's own
    /// IOThread.
    /// - Throws: ``DeviceError`` when the device is not attached (detaching twice).
    public func detach() async throws(DeviceError) {
        let mapping = try lifecycle.withLock { s throws(DeviceError) -> [IOThread] in
            guard s.phase == .attached else { throw DeviceError("device '\(id)' is not attached") }
            s.phase = .detaching
            return s.mapping
        }
        for (q, t) in zip(queues, mapping) {
            let ctx = t.context!
            await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
                ctx.scheduleOneShot(name: "detach") { q.detachOnHomeThread { done.resume() } }
            }
        }
        let holds = lifecycle.withLock { s -> [HoldBox] in
            s.phase = .detached
            s.mapping = []
            let h = s.holds
            s.holds = []
            s.heldThreads = []
            return h
        }
        for h in holds { h.release() }
    }

    /// Moves every queue to `iothread` and returns the pause in ns (see ``move(mapping:)``).
    @discardableResult
    public func move(to iothread: IOThread) async throws(DeviceError) -> Int64 {
        try await move(mapping: Array(repeating: iothread, count: queues.count))
    }

    /// Moves queue k to `mapping[k]` and returns the pause: the longest time, over the
    /// queues, during which no IOThread took the queue's requests, in ns.
    ///
    /// Each queue hands itself over: its IOThread stops taking requests, waits for those
    /// already taken to complete (as ``detach()`` does), and then schedules the attach on
    /// the new IOThread itself, so no task switch lies inside the pause. The new IOThreads
    /// are held before the first queue stops; an old one is released after the last queue
    /// has left it.
    /// - Throws: ``DeviceError`` when the device is not attached or the mapping has the
    ///   wrong length.
    @discardableResult
    public func move(mapping: [IOThread]) async throws(DeviceError) -> Int64 {
        guard mapping.count == queues.count else {
            throw DeviceError("device '\(id)' has \(queues.count) queues, mapping has \(mapping.count)")
        }
        let old = try lifecycle.withLock { s throws(DeviceError) -> [IOThread] in
            guard s.phase == .attached else { throw DeviceError("device '\(id)' is not attached") }
            s.phase = .moving
            for t in mapping where !s.heldThreads.contains(ObjectIdentifier(t)) {
                s.heldThreads.append(ObjectIdentifier(t))
                s.holds.append(HoldBox(t.hold(holderPath)))
            }
            return s.mapping
        }
        let pauses = Locked([Int64]())
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            let remaining = Atomic<Int>(queues.count)
            for (k, q) in queues.enumerated() {
                let from = old[k].context!, to = mapping[k].context!
                let prepared = q.prepareAttach(to)  // allocations before the pause, not in it
                from.scheduleOneShot(name: "move") {
                    let stopped = monotonicNanoseconds()
                    q.detachOnHomeThread {
                        to.scheduleOneShot(name: "move") {
                            q.register(prepared)
                            let pause = monotonicNanoseconds() - stopped
                            q.process()  // the requests queued during the pause
                            pauses.withLock { $0.append(pause) }
                            // Acquire-release: the last queue's resume sees every pause.
                            if remaining.subtract(1, ordering: .acquiringAndReleasing).newValue == 0 { done.resume() }
                        }
                    }
                }
            }
        }
        let released = lifecycle.withLock { s -> [HoldBox] in
            s.phase = .attached
            s.mapping = mapping
            let keep = Set(mapping.map(ObjectIdentifier.init))
            var gone: [HoldBox] = []
            for i in s.heldThreads.indices.reversed() where !keep.contains(s.heldThreads[i]) {
                gone.append(s.holds.remove(at: i))
                s.heldThreads.remove(at: i)
            }
            return gone
        }
        for h in released { h.release() }
        return pauses.withLock { $0.max() ?? 0 }
    }
}

/// Runs `body` on `ctx`'s home thread (a one-shot BH) and waits without blocking a thread.
func onHomeThread(_ ctx: AioContext, _ body: @escaping @Sendable () -> Void) async {
    await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
        ctx.scheduleOneShot {
            body()
            done.resume()
        }
    }
}
