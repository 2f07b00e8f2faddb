// A virtio-blk-like device: queues in guest memory, attached to IOThreads.
//
// Attach: take a hold on each IOThread used, then on each queue's IOThread register the kick
// handler, enable kicks and process the queue once. Detach: on each queue's IOThread stop
// taking requests (remove the kick handler, consume a raced kick), wait until every request
// already taken has completed and its completion is visible to the guest, then release the
// holds. Requests not yet taken stay in the avail ring: re-attaching resumes from there.
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
    public enum Phase: Sendable, Equatable { case detached, attaching, attached, detaching }

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
            var seen: [ObjectIdentifier] = []
            for t in mapping where !seen.contains(ObjectIdentifier(t)) {
                seen.append(ObjectIdentifier(t))
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
            return h
        }
        for h in holds { h.release() }
    }

    /// Moves every queue to `iothread` (detach, then attach) and returns the pause: the time
    /// during which no IOThread took requests from this device, in ns.
    @discardableResult
    public func move(to iothread: IOThread) async throws(DeviceError) -> Int64 {
        let t0 = monotonicNanoseconds()
        try await detach()
        try await attach(to: iothread)
        return monotonicNanoseconds() - t0
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
