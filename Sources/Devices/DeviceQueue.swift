// The device side of one virtqueue: pops requests from the avail ring, hands them to the
// backend on the IOThread it is attached to, pushes completions to the used ring and
// signals the guest's interrupt eventfd. The same code serves the load generator's emulated
// guest (VirtioBlkDevice, one anonymous mapping) and a real QEMU guest (VhostUser, a region
// table from the front end).
//
// Three files: this one is the transport (the queue's state, attach and detach on a context,
// popping the avail ring, pushing the used ring, interrupts); DeviceQueue+Chain.swift walks a
// hostile descriptor chain; DeviceQueue+Blk.swift gives a request its virtio-blk meaning and
// sends it to the backend.
//
// Design note. While attached, every field below is touched only by the IOThread's home
// thread: the kick handler, the completions, the interrupt BH and the attach/detach BHs all
// run there. Only QueueBinding moves a queue between threads: the old thread detaches it,
// and the last thing it does with the queue is to call the detach's continuation, which
// schedules the attach on the new thread; so the queue has one owner at a time.
// Requests are tracked per descriptor head in preallocated slots: each slot has its
// completion closure, its timer and an iovec array that grows only when a chain needs more
// pieces than it ever needed before, so the steady state allocates nothing per request.
//
// A request whose chain is broken but whose status byte is known completes with IOERR; one
// without a usable status byte is handed back with length 0. A ring error (avail index
// jumping by more than the queue size, a head out of range or already in flight) stops the
// queue: nothing more is popped, what is in flight completes.
import Aio
import Glibc
import IOThreads
import Synchronization

/// One virtqueue of a virtio-blk device, processed on the IOThread it is attached to.
///
/// `@unchecked Sendable`: confined to the home thread of the context it is attached to (see
/// the design note); handed between contexts only by ``QueueBinding``, which orders the
/// hand-over (the old thread's last access happens before it schedules the new thread's
/// attach BH).
public final class DeviceQueue: @unchecked Sendable {
    struct Request {
        var type: UInt32 = 0
        var sector: UInt64 = 0
        var status: UnsafeMutablePointer<UInt8>? = nil
        /// The data part of the slot's iovecs.
        var dataStart = 0
        var dataCount = 0
        var dataLen = 0
        var busy = false
        /// A write-through write is waiting for its fdatasync.
        var syncing = false
        /// A write-zeroes fell back from zeroing a range to punching a hole.
        var punching = false
        /// Discard / write zeroes: the range and the fallocate mode.
        var extentSectors: UInt64 = 0
        var fallocateMode: Int32 = 0
    }

    enum Parsed {
        case ok
        /// The status byte is known; everything else is not to be trusted.
        case ioError
        /// No usable status byte: hand the buffer back untouched.
        case malformed
    }

    /// The queue's index in its device.
    public let index: Int
    public let ring: SplitRing
    public let memory: GuestMemory
    /// The guest's doorbell.
    public let kick: EventNotifier
    /// The guest's interrupt (nil: never signal, the guest polls).
    @exclusivity(unchecked) public private(set) var interrupt: EventNotifier?
    let backend: OpenBlockBackend
    let serial: [UInt8]
    let name: String
    public let statistics = QueueStatistics()
    /// The most pieces one request may have (Linux's UIO_MAXIOV).
    public static let maxPieces = 1024

    // Home-thread state. `@exclusivity(unchecked)`: only the thread the queue is attached
    // to (or the detaching caller while detached) touches these, and never in overlapping
    // accesses; the dynamic checks otherwise cost a TLS lookup and an access-set insert on
    // every access, several per request.
    /// The next avail entry to take (what vhost-user's GET_VRING_BASE reports).
    @exclusivity(unchecked) public private(set) var lastAvail: UInt16
    @exclusivity(unchecked) var usedIdx: UInt16
    @exclusivity(unchecked) var inFlight = 0
    @exclusivity(unchecked) var accepting = false
    @exclusivity(unchecked) var broken = false
    /// Complete writes only once they are durable (virtio-blk `wce` = 0). Home thread.
    @exclusivity(unchecked) public var writeThrough = false
    @exclusivity(unchecked) var context: AioContext?
    @exclusivity(unchecked) var irqBH: BottomHalf?
    @exclusivity(unchecked) var pendingInterrupt = false
    @exclusivity(unchecked) var slots: [Request]
    @exclusivity(unchecked) var iovs: [UnsafeMutablePointer<iovec>]
    @exclusivity(unchecked) var iovCapacity: [Int]
    /// Where the backend's completions go, tagged with the request's head: one object per
    /// attach, no closure per descriptor and no reference per request.
    @exclusivity(unchecked) var completionTarget: CompletionTarget?
    @exclusivity(unchecked) var timers: [AioTimer] = []
    @exclusivity(unchecked) var drained: (() -> Void)?
    /// Why the queue broke (home thread; for diagnostics).
    @exclusivity(unchecked) public private(set) var brokenReason: String?

    /// A queue over `ring`, whose buffers live in `memory`.
    /// - Parameters:
    ///   - serial: what GET_ID returns (at most 20 bytes are used).
    ///   - lastAvail: the next avail entry to take (vhost-user's SET_VRING_BASE).
    ///   - usedIdx: the next used entry to fill (the used index in guest memory).
    ///   - name: for bottom-half names.
    public init(index: Int, ring: SplitRing, memory: GuestMemory, backend: OpenBlockBackend, serial: String,
                kick: EventNotifier, interrupt: EventNotifier?, lastAvail: UInt16 = 0, usedIdx: UInt16 = 0,
                name: String) {
        self.index = index
        self.ring = ring
        self.memory = memory
        self.backend = backend
        self.serial = Array(serial.utf8.prefix(VirtioBlk.idBytes))
        self.kick = kick
        self.interrupt = interrupt
        self.lastAvail = lastAvail
        self.usedIdx = usedIdx
        self.name = name
        let n = ring.layout.size
        slots = [Request](repeating: Request(), count: n)
        iovs = (0..<n).map { _ in .allocate(capacity: 4) }
        iovCapacity = [Int](repeating: 4, count: n)
    }

    deinit {
        for p in iovs { p.deallocate() }
    }

    /// Replaces the interrupt eventfd (vhost-user SET_VRING_CALL while running) and signals
    /// the new one once, so that a guest that missed an interrupt looks at the used ring.
    /// Home thread of the context it is attached to, or while detached.
    public func setInterrupt(_ notifier: EventNotifier?) {
        precondition(context?.isOnHomeThread ?? true, "BUG DETECTED: DeviceQueue.setInterrupt called off the queue's IOThread")
        interrupt = notifier
        notifier?.set()
    }

    // MARK: - Attach / detach (on the IOThread)

    /// What an attach to a context allocates, made on any thread ahead of time: a move makes
    /// it before the queue stops, so that the pause holds no allocation.
    struct AttachPreparation: @unchecked Sendable {  // handed to the home thread once
        let context: AioContext
        let irqBH: BottomHalf
        let completionTarget: CompletionTarget
        let timers: [AioTimer]
    }

    /// Makes what attaching to `ctx` needs. Any thread; pass the result to `register(_:)` on
    /// `ctx`'s home thread.
    func prepareAttach(_ ctx: AioContext) -> AttachPreparation {
        var timers: [AioTimer] = []
        if case .delay = backend.backend {
            timers = (0..<ring.layout.size).map { head in
                ctx.makeTimer { [unowned self] in backendCompleted(head: head, result: 0) }
            }
        }
        return AttachPreparation(
            context: ctx,
            irqBH: ctx.makeBottomHalf(name: "\(name)-q\(index)-irq") { [unowned self] in flushInterrupt() },
            completionTarget: ctx.makeCompletionTarget { [unowned self] tag, result in
                backendCompleted(head: Int(tag), result: result)
            },
            timers: timers)
    }

    /// The attach without its first pass over the queue: from here on the IOThread takes
    /// the queue's requests (a move's pause ends here).
    func register(_ prepared: AttachPreparation) {
        let ctx = prepared.context
        context = ctx
        irqBH = prepared.irqBH
        completionTarget = prepared.completionTarget
        timers = prepared.timers
        accepting = true
        // `unowned(unsafe)`: the handler is removed (on this thread) in detachOnHomeThread,
        // before the queue can go (a device is destroyed only detached), and a removed
        // handler is never called again; checked `unowned` would cost an atomic
        // retain/release on every poll spin.
        ctx.setEventNotifier(kick, FDHandlerCallbacks(
            read: { [unowned(unsafe) self] in
                statistics._kicks.add(1, ordering: .relaxed)
                process()
            },
            // Unmanaged: `unowned(unsafe)` still copies self to a strong reference (a
            // retain and release) on every call, and this one runs on every poll spin.
            poll: { [me = Unmanaged.passUnretained(self)] in
                me._withUnsafeGuaranteedRef { $0.ring.availIdx != $0.lastAvail }
            },
            pollReady: { [unowned(unsafe) self] in process() },
            pollBegin: { [unowned(unsafe) self] in ring.setUsedFlags(SplitRingLayout.noNotify) },
            pollEnd: { [unowned(unsafe) self] in
                ring.setUsedFlags(0)
                // The flag before the final poll's read of avail.idx (store→load needs a real
                // fence; pairs with the guest's fence between publishing and reading flags).
                fullFence()
            }))
        ring.setUsedFlags(0)  // kicks on
        fullFence()
    }

    /// Stops taking requests; calls `done` on this thread once every request already taken
    /// has completed and its completion is visible to the guest. Home thread. `done` is the
    /// last thing this thread does with the queue: it may hand it to another thread.
    func detachOnHomeThread(_ done: @escaping () -> Void) {
        accepting = false
        let ctx = context!
        ctx.removeEventNotifier(kick)  // applied at once: we are on the home thread
        // A kick that raced with the removal is consumed; its requests stay in the avail
        // ring, where the next attach (here or on another IOThread) finds them.
        kick.testAndClear()
        ring.setUsedFlags(0)  // if we were polling, let the guest kick the next owner
        drained = done
        if inFlight == 0 { finishDetach() }
    }

    /// The drain is over: the last interrupt goes out, then the queue lets go of this
    /// context, and hands itself over last. Callers do nothing with the queue afterwards.
    func finishDetach() {
        flushInterrupt()  // the last completions' interrupt goes out before we let go
        let oldBH = irqBH, oldTimers = timers
        irqBH = nil
        timers = []
        completionTarget = nil
        context = nil
        let done = drained
        drained = nil
        done?()  // a move schedules the attach on the next IOThread here
        // What the next owner does not need is let go after the hand-off, to keep a move's
        // pause short. Only locals from here on: the queue may be gone once `done` ran.
        oldBH?.delete()
        for t in oldTimers { t.cancel() }
    }

    // MARK: - Requests

    /// Pops every available request and starts it. Home thread.
    func process() {
        guard accepting && !broken else { return }
        let avail = ring.availIdx  // acquire: entries and descriptors before it are visible
        let size = ring.layout.size
        if Int(avail &- lastAvail) > size {
            breakQueue("guest moved the avail index from \(lastAvail) to \(avail)")
            return
        }
        while lastAvail != avail {
            let head = Int(ring.availEntry(lastAvail))
            guard head < size else {
                breakQueue("guest says index \(head) is available")
                return
            }
            guard !slots[head].busy else {
                breakQueue("guest made head \(head) available while it is in flight")
                return
            }
            lastAvail &+= 1
            statistics._requests.add(1, ordering: .relaxed)
            start(head: head)
        }
        if pendingInterrupt { flushInterrupt() }
    }

    func breakQueue(_ reason: String) {
        broken = true
        brokenReason = reason
        statistics._broken.store(true, ordering: .relaxed)
    }

    /// Writes the status, pushes the used entry and publishes it.
    func complete(head: Int, status: UInt8?, written: UInt32) {
        if let status, let p = slots[head].status { p.pointee = status }
        slots[head].busy = false
        slots[head].status = nil
        ring.setUsedEntry(usedIdx, id: UInt32(head), len: written + (status == nil ? 0 : 1))
        usedIdx &+= 1
        ring.publishUsedIdx(usedIdx)  // release: status and data before the index
        inFlight -= 1
        statistics._inFlight.store(inFlight, ordering: .relaxed)
        statistics._completions.add(1, ordering: .relaxed)
        pendingInterrupt = true
    }

    /// Signals the guest unless it asked not to be interrupted (it polls the used ring).
    func flushInterrupt() {
        guard pendingInterrupt else { return }
        pendingInterrupt = false
        fullFence()  // the used index before the read of the guest's flag
        if ring.availFlags & SplitRingLayout.noInterrupt == 0, let irq = interrupt {
            statistics._interrupts.add(1, ordering: .relaxed)
            irq.set()
        }
    }
}
