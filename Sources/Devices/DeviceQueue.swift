// The device side of one virtqueue: pops requests from the avail ring, hands them to the
// backend on the IOThread it is attached to, pushes completions to the used ring and
// signals the guest's interrupt eventfd.
//
// Design note. While attached, every field below is touched only by the IOThread's home
// thread: the kick handler, the completions, the interrupt BH and the attach/detach BHs all
// run there. Moving to another IOThread is detach (which ends with the old thread releasing
// the queue) then attach (a BH on the new thread), so the queue has one owner at a time.
// Requests are tracked per descriptor head in preallocated slots with preallocated
// completion closures and timers, so the steady state allocates nothing per request.
import Aio
import Glibc
import IOThreads
import Synchronization

/// Counters of one queue, readable from any thread.
public final class QueueStatistics: Sendable {
    let _requests = Atomic<UInt64>(0)
    let _completions = Atomic<UInt64>(0)
    let _interrupts = Atomic<UInt64>(0)
    let _kicks = Atomic<UInt64>(0)
    let _inFlight = Atomic<Int>(0)
    /// Requests popped from the avail ring.
    public var requests: UInt64 { _requests.load(ordering: .relaxed) }
    /// Requests completed (pushed to the used ring).
    public var completions: UInt64 { _completions.load(ordering: .relaxed) }
    /// Interrupts signalled to the guest.
    public var interrupts: UInt64 { _interrupts.load(ordering: .relaxed) }
    /// Kicks received through the kick eventfd.
    public var kicks: UInt64 { _kicks.load(ordering: .relaxed) }
    /// Requests taken and not yet completed.
    public var inFlight: Int { _inFlight.load(ordering: .relaxed) }
}

/// `@unchecked Sendable`: confined to the home thread of the IOThread it is attached to
/// (see the design note); handed between IOThreads by detach/attach, which order the
/// hand-over (the old thread's last write happens before the continuation resumes, which
/// happens before the new thread's attach BH is scheduled).
final class DeviceQueue: @unchecked Sendable {
    struct Request {
        var type: UInt32 = 0
        var statusAddr: UInt64 = 0
        var dataAddr: UInt64 = 0
        var dataLen: UInt32 = 0
        var sector: UInt64 = 0
    }

    let index: Int
    let ring: SplitRing
    let memory: GuestMemory
    let kick: EventNotifier
    let irq: EventNotifier
    let backend: BlockBackend
    let fileFD: Int32
    let deviceID: String
    let statistics = QueueStatistics()

    // Home-thread state.
    var lastAvail: UInt16 = 0
    var usedIdx: UInt16 = 0
    var inFlight = 0
    var accepting = false
    var context: AioContext?
    var irqBH: BottomHalf?
    var pendingInterrupt = false
    var slots: [Request]
    var completions: [(Int32) -> Void] = []
    var timers: [AioTimer] = []
    var drained: (() -> Void)?

    init(index: Int, ring: SplitRing, memory: GuestMemory, backend: BlockBackend, fileFD: Int32,
         deviceID: String) throws(AioError) {
        self.index = index
        self.ring = ring
        self.memory = memory
        self.backend = backend
        self.fileFD = fileFD
        self.deviceID = deviceID
        kick = try EventNotifier()
        irq = try EventNotifier()
        slots = [Request](repeating: Request(), count: ring.layout.size)
    }

    // MARK: - Attach / detach (on the IOThread)

    /// Registers the kick handler on `ctx` and processes the queue once. Home thread of `ctx`.
    func attachOnHomeThread(_ ctx: AioContext) {
        context = ctx
        irqBH = ctx.makeBottomHalf(name: "\(deviceID)-q\(index)-irq") { [unowned self] in flushInterrupt() }
        completions = (0..<ring.layout.size).map { head in
            { [unowned self] (result: Int32) in backendCompleted(head: head, result: result) }
        }
        if case .delay = backend {
            timers = (0..<ring.layout.size).map { head in
                ctx.makeTimer { [unowned self] in backendCompleted(head: head, result: 0) }
            }
        }
        accepting = true
        ctx.setEventNotifier(kick, FdHandlerCallbacks(
            read: { [unowned self] in
                statistics._kicks.add(1, ordering: .relaxed)
                process()
            },
            poll: { [unowned self] in ring.availIdx != lastAvail },
            pollReady: { [unowned self] in process() },
            pollBegin: { [unowned self] in ring.setUsedFlags(SplitRingLayout.noNotify) },
            pollEnd: { [unowned self] in ring.setUsedFlags(0) }))
        ring.setUsedFlags(0)  // kicks on
        process()  // a request may have been queued (and kicked) before the handler existed
    }

    /// Stops taking requests; calls `done` on this thread once every request already taken
    /// has completed and its completion is visible to the guest. Home thread.
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

    func finishDetach() {
        flushInterrupt()  // the last completions' interrupt goes out before we let go
        irqBH?.delete()
        irqBH = nil
        for t in timers { t.cancel() }
        timers = []
        completions = []
        context = nil
        let done = drained
        drained = nil
        done?()
    }

    // MARK: - Requests

    /// Pops every available request and starts it. Home thread.
    func process() {
        guard accepting else { return }
        let avail = ring.availIdx
        while lastAvail != avail {
            let head = Int(ring.availEntry(lastAvail))
            lastAvail &+= 1
            statistics._requests.add(1, ordering: .relaxed)
            start(head: head & (ring.layout.size - 1), rawHead: head)
        }
        if pendingInterrupt { flushInterrupt() }
    }

    /// Parses the chain at `head` and submits it, or completes it at once with an error.
    func start(head: Int, rawHead: Int) {
        inFlight += 1
        statistics._inFlight.store(inFlight, ordering: .relaxed)
        guard rawHead < ring.layout.size, let req = parse(head: head) else {
            // A malformed chain: nothing to write a status into; hand the buffer back.
            complete(head: head, status: nil, written: 0)
            return
        }
        slots[head] = req
        switch req.type {
        case VirtioBlk.typeIn, VirtioBlk.typeOut:
            switch backend {
            case .null:
                complete(head: head, status: VirtioBlk.statusOK, written: req.type == VirtioBlk.typeIn ? req.dataLen : 0)
            case .nop:
                context!.submit(.nop, completions[head])
            case .delay(let ns):
                timers[head].arm(after: ns)
            case .file:
                guard let p = memory.pointer(at: req.dataAddr, length: Int(req.dataLen)) else {
                    complete(head: head, status: VirtioBlk.statusIOErr, written: 0)
                    return
                }
                let offset = req.sector &* VirtioBlk.sectorSize
                if req.type == VirtioBlk.typeIn {
                    context!.submit(.read(fd: fileFD, buffer: UnsafeMutableRawBufferPointer(start: p, count: Int(req.dataLen)),
                                          offset: offset), completions[head])
                } else {
                    context!.submit(.write(fd: fileFD, buffer: UnsafeRawBufferPointer(start: p, count: Int(req.dataLen)),
                                           offset: offset), completions[head])
                }
            }
        case VirtioBlk.typeFlush:
            if case .file = backend {
                context!.submit(.fsync(fd: fileFD, dataOnly: true), completions[head])
            } else {
                complete(head: head, status: VirtioBlk.statusOK, written: 0)
            }
        case VirtioBlk.typeGetID:
            let n = min(Int(req.dataLen), VirtioBlk.idBytes)
            if let p = memory.pointer(at: req.dataAddr, length: n) {
                let bytes = Array(deviceID.utf8.prefix(n)) + [UInt8](repeating: 0, count: max(0, n - deviceID.utf8.count))
                bytes.withUnsafeBytes { p.copyMemory(from: $0.baseAddress!, byteCount: n) }
                complete(head: head, status: VirtioBlk.statusOK, written: UInt32(n))
            } else {
                complete(head: head, status: VirtioBlk.statusIOErr, written: 0)
            }
        default:
            complete(head: head, status: VirtioBlk.statusUnsupported, written: 0)
        }
    }

    /// header (readable, 16 bytes) [, data] , status (writable, >= 1 byte). Every address is
    /// checked against guest memory and the chain may not be longer than the queue.
    func parse(head: Int) -> Request? {
        var descs: [(addr: UInt64, len: UInt32, flags: UInt16)] = []
        descs.reserveCapacity(3)
        var i = head
        for _ in 0..<ring.layout.size {
            let d = ring.descriptor(i)
            guard memory.pointer(at: d.addr, length: Int(d.len)) != nil else { return nil }
            descs.append((d.addr, d.len, d.flags))
            if d.flags & SplitRingLayout.descNext == 0 { break }
            guard descs.count < 3 else { return nil }  // header, one data buffer, status
            i = Int(d.next)
            guard i < ring.layout.size else { return nil }
        }
        guard descs.count >= 2, descs.count <= 3,
              let last = descs.last, last.flags & SplitRingLayout.descNext == 0,
              descs[0].len >= UInt32(VirtioBlk.headerSize), descs[0].flags & SplitRingLayout.descWrite == 0,
              last.flags & SplitRingLayout.descWrite != 0, last.len >= 1,
              let header = memory.pointer(at: descs[0].addr, length: VirtioBlk.headerSize)
        else { return nil }
        var req = Request()
        req.type = header.loadUnaligned(as: UInt32.self)
        req.sector = header.loadUnaligned(fromByteOffset: 8, as: UInt64.self)
        req.statusAddr = last.addr
        if descs.count == 3 {
            let data = descs[1]
            let writable = data.flags & SplitRingLayout.descWrite != 0
            // IN and GET_ID write guest memory; OUT reads it.
            if (req.type == VirtioBlk.typeIn || req.type == VirtioBlk.typeGetID) != writable && req.type != VirtioBlk.typeFlush {
                return nil
            }
            req.dataAddr = data.addr
            req.dataLen = data.len
        }
        return req
    }

    func backendCompleted(head: Int, result: Int32) {
        let req = slots[head]
        if result < 0 {
            complete(head: head, status: VirtioBlk.statusIOErr, written: 0)
        } else {
            // A file read wrote `result` bytes; nop and delay stand for a full read.
            let read: UInt32
            if case .file = backend { read = UInt32(result) } else { read = req.dataLen }
            complete(head: head, status: VirtioBlk.statusOK, written: req.type == VirtioBlk.typeIn ? read : 0)
        }
        // Completions of one iteration share one interrupt (the BH runs after them).
        if pendingInterrupt { irqBH?.schedule() }
    }

    /// Writes the status, pushes the used entry and publishes it.
    func complete(head: Int, status: UInt8?, written: UInt32) {
        if let status, let p = memory.pointer(at: slots[head].statusAddr, length: 1) {
            p.storeBytes(of: status, as: UInt8.self)
        }
        ring.setUsedEntry(usedIdx, id: UInt32(head), len: written + (status == nil ? 0 : 1))
        usedIdx &+= 1
        ring.publishUsedIdx(usedIdx)  // release: status and data before the index
        inFlight -= 1
        statistics._inFlight.store(inFlight, ordering: .relaxed)
        statistics._completions.add(1, ordering: .relaxed)
        pendingInterrupt = true
        if !accepting && inFlight == 0 && drained != nil { finishDetach() }
    }

    /// Signals the guest unless it asked not to be interrupted (it polls the used ring).
    func flushInterrupt() {
        guard pendingInterrupt else { return }
        pendingInterrupt = false
        fullFence()  // the used index before the read of the guest's flag
        if ring.availFlags & SplitRingLayout.noInterrupt == 0 {
            statistics._interrupts.add(1, ordering: .relaxed)
            irq.set()
        }
    }
}
