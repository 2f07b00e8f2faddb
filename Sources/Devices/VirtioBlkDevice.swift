// A virtio-blk-like device: queues in guest memory, attached to IOThreads.
//
// Lifecycle (under one lock): detached -> attaching -> attached -> moving -> attached ...
// -> detaching -> detached. One operation at a time: a call that finds the device in a
// state it cannot start from throws a DeviceError and changes nothing, so any number of
// tasks and threads may race attach, move and detach.
// - attach: holds every IOThread of the placement (synchronously, before any work is
//   scheduled there), then starts each queue on its IOThread (QueueBinding.relocate).
// - move: holds the new IOThreads, relocates each queue from its IOThread to the new one
//   (the old one drains, then hands the queue over itself: no task switch inside the
//   pause), then releases the IOThreads no queue or mapping entry uses any more.
// - detach: relocates each queue to nowhere (no new requests; those taken complete and are
//   visible to the guest), then releases every hold. Requests not yet taken stay in the
//   avail ring: re-attaching resumes from there.
import Aio
import CShims
import Glibc
import IOThreads
import Synchronization

/// A virtio-blk-like device with one or more virtqueues.
///
/// `@unchecked Sendable`: `phase` and `mapping` are behind `lifecycle`; the queue bindings are
/// driven only by the one operation the lifecycle lets run (attach, move or detach); each
/// queue is confined to the context it runs on (see ``QueueBinding``); the rest is
/// immutable.
public final class VirtioBlkDevice: @unchecked Sendable {
    public enum Phase: Sendable, Equatable { case detached, attaching, attached, detaching, moving }

    /// The device id (`-device virtio-blk,id=…`).
    public let id: String
    /// Who holds its IOThreads (by default the QOM path `/machine/peripheral/ID`).
    public let holder: IOThreadHolder
    /// The holder's path or name.
    public var holderPath: String { holder.name }
    public let backend: BlockBackend
    public let memory: GuestMemory
    /// The layout of each queue in guest memory, for the guest side.
    public let layouts: [SplitRingLayout]
    /// Guest memory after the rings, free for request buffers.
    public let freeMemoryStart: UInt64
    let queues: [DeviceQueue]
    let bindings: [QueueBinding]
    let opened: OpenBlockBackend
    let holds: IOThreadHoldSet

    struct Lifecycle {
        var phase: Phase = .detached
        /// The IOThread of each queue (empty when detached).
        var mapping: [IOThread] = []
    }
    let lifecycle = Locked(Lifecycle())

    /// Most queues a device may have.
    public static let maxQueues = 64

    /// Creates a detached device.
    /// - Parameters:
    ///   - queueSize: entries per queue (a power of two).
    ///   - bufferBytes: guest memory to leave after the rings for request buffers (default:
    ///     what ``GuestQueue`` needs for every queue).
    ///   - holder: who holds the IOThreads (default: the QOM path `/machine/peripheral/ID`).
    public init(id: String, queues queueCount: Int = 1, queueSize: Int = 256, backend: BlockBackend = .null,
                bufferBytes: Int? = nil, holder: IOThreadHolder? = nil) throws(DeviceError) {
        guard isWellFormedObjectID(id) else { throw DeviceError("Parameter 'id' expects an identifier") }
        guard queueCount >= 1 && queueCount <= VirtioBlkDevice.maxQueues else {
            throw DeviceError("num-queues must be in [1, \(VirtioBlkDevice.maxQueues)]")
        }
        guard queueSize >= 4 && queueSize <= 32768 && queueSize & (queueSize - 1) == 0 else {
            throw DeviceError("queue-size must be a power of 2 in [4, 32768]")
        }
        self.id = id
        self.holder = holder ?? .qomObject(path: "/machine/peripheral/\(id)")
        holds = IOThreadHoldSet(holder: self.holder)
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
        bindings = qs.map(QueueBinding.init)
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

    /// Every IOThread the device holds: each queue's, and the mapping entries that serve no
    /// queue (empty when detached).
    public var heldIOThreads: [IOThread] { holds.threads }

    /// Attaches every queue to `iothread`.
    public func attach(to iothread: IOThread) async throws(DeviceError) {
        try await attach(mapping: Array(repeating: iothread, count: queues.count))
    }

    /// Attaches queue k to `mapping[k]`; each distinct IOThread, and each of `placement`
    /// (the entries of an `iothread-vq-mapping`, also those that serve no queue), is held
    /// once by this device.
    /// - Throws: ``DeviceError`` when the device is not detached, the mapping has the wrong
    ///   length, or an IOThread is stopped (nothing is held then).
    public func attach(mapping: [IOThread], placement: [IOThread] = []) async throws(DeviceError) {
        try checkLength(mapping)
        try begin(.attaching, from: .detached, otherwise: "device '\(id)' is already attached")
        _ = try await place(mapping, placement, undo: .detached)
    }

    /// Attaches as an `iothread-vq-mapping` says: each queue to its IOThread, every entry held.
    public func attach(_ mapping: IOThreadVQMapping) async throws(DeviceError) {
        try await attach(mapping: mapping.queues, placement: mapping.iothreads)
    }

    /// Detaches: no new requests are taken; returns once every request already taken has
    /// completed and its completion is visible to the guest; then releases the holds.
    /// Never blocks a thread, so it may be awaited from a task running on the device's own
    /// IOThread.
    /// - Throws: ``DeviceError`` when the device is not attached (detaching twice, or while
    ///   another operation runs).
    public func detach() async throws(DeviceError) {
        try begin(.detaching, from: .attached, otherwise: "device '\(id)' is not attached")
        _ = await QueueBinding.relocate(bindings.map { ($0, nil) })
        holds.release()
        lifecycle.withLock {
            $0.phase = .detached
            $0.mapping = []
        }
    }

    /// Moves every queue to `iothread` and returns the pause in ns (see ``move(mapping:placement:)``).
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
    /// (and `placement`) are held before the first queue stops; an old one is released after
    /// the last queue has left it.
    /// - Throws: ``DeviceError`` when the device is not attached, the mapping has the wrong
    ///   length, or a new IOThread is stopped (the device stays where it was then).
    @discardableResult
    public func move(mapping: [IOThread], placement: [IOThread] = []) async throws(DeviceError) -> Int64 {
        try checkLength(mapping)
        try begin(.moving, from: .attached, otherwise: "device '\(id)' is not attached")
        return try await place(mapping, placement, undo: .attached)
    }

    /// Attach and move: holds `placement` and every IOThread of `mapping` (or, if one is
    /// stopped, goes back to `undo` and throws), relocates queue k to `mapping[k]`, releases
    /// what is no longer used, and ends attached there. Returns the longest pause.
    func place(_ mapping: [IOThread], _ placement: [IOThread], undo: Phase) async throws(DeviceError) -> Int64 {
        do {
            try holds.hold(placement + mapping)
        } catch {
            lifecycle.withLock { $0.phase = undo }
            throw DeviceError(error.message)
        }
        let contexts = mapping.map { holds.context(of: $0) }
        let moved = await QueueBinding.relocate(Array(zip(bindings, contexts.map(Optional.some))))
        holds.release(keeping: placement + mapping)
        lifecycle.withLock {
            $0.phase = .attached
            $0.mapping = mapping
        }
        return moved.map(\.pauseNanoseconds).max() ?? 0
    }

    func checkLength(_ mapping: [IOThread]) throws(DeviceError) {
        guard mapping.count == queues.count else {
            throw DeviceError("device '\(id)' has \(queues.count) queues, mapping has \(mapping.count)")
        }
    }

    /// The transition that starts an operation: atomic, so one operation runs at a time.
    func begin(_ next: Phase, from: Phase, otherwise message: String) throws(DeviceError) {
        try lifecycle.withLock { s throws(DeviceError) in
            guard s.phase == from else {
                switch s.phase {
                case .attaching: throw DeviceError("device '\(id)' is being attached")
                case .moving: throw DeviceError("device '\(id)' is being moved")
                case .detaching: throw DeviceError("device '\(id)' is being detached")
                case .detached, .attached: throw DeviceError(message)
                }
            }
            s.phase = next
        }
    }
}
