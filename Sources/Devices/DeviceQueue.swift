// The device side of one virtqueue: pops requests from the avail ring, hands them to the
// backend on the IOThread it is attached to, pushes completions to the used ring and
// signals the guest's interrupt eventfd. The same code serves the load generator's emulated
// guest (VirtioBlkDevice, one anonymous mapping) and a real QEMU guest (VhostUser, a region
// table from the front end).
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
// Guest memory is foreign and hostile: each descriptor field is read once into a local and
// validated there; every buffer is translated region by region (a buffer crossing into an
// adjacent region is split, one crossing into no region fails); a chain may not loop, leave
// the table, put readable after writable buffers, or have more than 1024 pieces. A request
// whose chain is broken but whose status byte is known completes with IOERR; one without a
// usable status byte is handed back with length 0. A ring error (avail index jumping by more
// than the queue size, a head out of range or already in flight) stops the queue: nothing more
// is popped, what is in flight completes.
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
    let _malformed = Atomic<UInt64>(0)
    let _broken = Atomic<Bool>(false)
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
    /// Requests whose descriptor chain was refused (IOERR or handed back unprocessed).
    public var malformed: UInt64 { _malformed.load(ordering: .relaxed) }
    /// The queue met a ring error and stopped taking requests.
    public var isBroken: Bool { _broken.load(ordering: .relaxed) }
}

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
        ctx.setEventNotifier(kick, FdHandlerCallbacks(
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

    /// Parses the chain at `head` and submits it, or completes it at once.
    func start(head: Int) {
        inFlight += 1
        statistics._inFlight.store(inFlight, ordering: .relaxed)
        slots[head].busy = true
        switch parse(head: head) {
        case .malformed:
            statistics._malformed.add(1, ordering: .relaxed)
            complete(head: head, status: nil, written: 0)
            return
        case .ioError:
            statistics._malformed.add(1, ordering: .relaxed)
            complete(head: head, status: VirtioBlk.statusIOErr, written: 0)
            return
        case .ok:
            break
        }
        let req = slots[head]
        let fd = backend.fileDescriptor
        switch req.type {
        case VirtioBlk.typeIn, VirtioBlk.typeOut:
            let isWrite = req.type == VirtioBlk.typeOut
            guard !(isWrite && backend.readOnly), inRange(sector: req.sector, bytes: req.dataLen) else {
                complete(head: head, status: VirtioBlk.statusIOErr, written: 0)
                return
            }
            switch backend.backend {
            case .null:
                complete(head: head, status: VirtioBlk.statusOK, written: isWrite ? 0 : UInt32(req.dataLen))
            case .nop:
                context!.submit(.nop, to: completionTarget!, tag: UInt32(head))
            case .delay(let ns):
                timers[head].arm(after: ns)
            case .file:
                guard req.dataCount > 0 else {
                    complete(head: head, status: VirtioBlk.statusOK, written: 0)
                    return
                }
                let iov = UnsafePointer(iovs[head] + req.dataStart)
                let offset = req.sector &* VirtioBlk.sectorSize
                if isWrite {
                    context!.submit(.writev(fd: fd, iovecs: iov, count: req.dataCount, offset: offset),
                                    to: completionTarget!, tag: UInt32(head))
                } else {
                    context!.submit(.readv(fd: fd, iovecs: iov, count: req.dataCount, offset: offset),
                                    to: completionTarget!, tag: UInt32(head))
                }
            }
        case VirtioBlk.typeFlush:
            if case .file = backend.backend {
                context!.submit(.fsync(fd: fd, dataOnly: true), to: completionTarget!, tag: UInt32(head))
            } else {
                complete(head: head, status: VirtioBlk.statusOK, written: 0)
            }
        case VirtioBlk.typeDiscard, VirtioBlk.typeWriteZeroes:
            startDiscardOrWriteZeroes(head: head)
        case VirtioBlk.typeGetID:
            // The serial, NUL-padded, never more than 20 bytes or than the buffer.
            let n = min(req.dataLen, VirtioBlk.idBytes)
            var copied = 0
            var k = 0
            while copied < n {
                let v = iovs[head][req.dataStart + k]
                k += 1
                let take = min(v.iov_len, n - copied)
                let dst = v.iov_base!.assumingMemoryBound(to: UInt8.self)
                for j in 0..<take { dst[j] = copied + j < serial.count ? serial[copied + j] : 0 }
                copied += take
            }
            complete(head: head, status: VirtioBlk.statusOK, written: UInt32(n))
        default:
            complete(head: head, status: VirtioBlk.statusUnsupported, written: 0)
        }
    }

    /// Discard and write zeroes (virtio 1.x 5.2.6.2), as qemu-storage-daemon 7.2 checks them:
    /// one 16-byte segment (more is UNSUPP), known flags only, no UNMAP on a discard, at most
    /// 32768 sectors, inside the disk, and a writable disk. A file gets an fallocate: a hole
    /// for discard (and for write zeroes that allows unmapping), a zeroed range otherwise.
    func startDiscardOrWriteZeroes(head: Int) {
        let req = slots[head]
        let discard = req.type == VirtioBlk.typeDiscard
        guard !backend.readOnly else { return complete(head: head, status: VirtioBlk.statusIOErr, written: 0) }
        guard req.dataLen <= 16 else { return complete(head: head, status: VirtioBlk.statusUnsupported, written: 0) }
        guard req.dataLen == 16 else { return complete(head: head, status: VirtioBlk.statusIOErr, written: 0) }
        var segment = (UInt64(0), UInt64(0))
        withUnsafeMutableBytes(of: &segment) { out in
            var copied = 0
            var k = req.dataStart
            while copied < 16 {
                let v = iovs[head][k]
                k += 1
                let take = min(v.iov_len, 16 - copied)
                out.baseAddress!.advanced(by: copied).copyMemory(from: v.iov_base!, byteCount: take)
                copied += take
            }
        }
        let sector = UInt64(littleEndian: segment.0)
        let count = UInt64(UInt32(truncatingIfNeeded: UInt64(littleEndian: segment.1)))
        let flags = UInt32(truncatingIfNeeded: UInt64(littleEndian: segment.1) >> 32)
        let unmap = flags & VirtioBlk.writeZeroesFlagUnmap != 0
        guard flags & ~VirtioBlk.writeZeroesFlagUnmap == 0, !(discard && unmap) else {
            return complete(head: head, status: VirtioBlk.statusUnsupported, written: 0)
        }
        guard count <= VirtioBlk.maxDiscardSectors, inRange(sector: sector, bytes: Int(count) * Int(VirtioBlk.sectorSize)) else {
            return complete(head: head, status: VirtioBlk.statusIOErr, written: 0)
        }
        guard case .file = backend.backend, count > 0 else {
            return complete(head: head, status: VirtioBlk.statusOK, written: 0)
        }
        let mode = discard || unmap ? VirtioBlk.fallocPunchHole | VirtioBlk.fallocKeepSize : VirtioBlk.fallocZeroRange | VirtioBlk.fallocKeepSize
        slots[head].sector = sector
        slots[head].extentSectors = count
        slots[head].fallocateMode = mode
        context!.submit(.fallocate(fd: backend.fileDescriptor, mode: mode, offset: sector &* VirtioBlk.sectorSize,
                                   length: count &* VirtioBlk.sectorSize), to: completionTarget!, tag: UInt32(head))
    }

    /// A whole number of 512-byte sectors inside the backend (overflow-safe).
    func inRange(sector: UInt64, bytes: Int) -> Bool {
        guard UInt64(bytes) % VirtioBlk.sectorSize == 0 else { return false }
        guard let size = backend.sizeBytes else { return true }
        let sectors = size / VirtioBlk.sectorSize
        return sector <= sectors && UInt64(bytes) / VirtioBlk.sectorSize <= sectors - sector
    }

    /// Makes room for `count` iovecs in `head`'s array (grows only past its high-water mark).
    @inline(__always)
    func reserveIovecs(_ head: Int, _ count: Int) {
        guard count > iovCapacity[head] else { return }
        let capacity = min(max(count, iovCapacity[head] * 2), DeviceQueue.maxPieces)
        let p = UnsafeMutablePointer<iovec>.allocate(capacity: capacity)
        p.update(from: iovs[head], count: iovCapacity[head])
        iovs[head].deallocate()
        iovs[head] = p
        iovCapacity[head] = capacity
    }

    /// Walks the chain at `head` into the slot's iovecs (readable pieces, then writable
    /// ones), finds the header and the status byte, and fills the slot's request.
    func parse(head: Int) -> Parsed {
        let size = ring.layout.size
        var i = head
        var visited = 0
        var pieces = 0
        var readPieces = 0
        var readBytes = 0
        var writeBytes = 0
        var seenWritable = false
        var badBuffer = false
        var lastOK = false
        while true {
            guard visited < size else { return .malformed }  // longer than the table: a loop
            visited += 1
            let d = ring.descriptor(i)  // each field read once; only the copy is used
            // No VIRTIO_RING_F_INDIRECT_DESC is offered, so an indirect descriptor is an error.
            guard d.flags & SplitRingLayout.descIndirect == 0 else { return .malformed }
            let writable = d.flags & SplitRingLayout.descWrite != 0
            guard writable || !seenWritable else { return .malformed }  // readable after writable
            seenWritable = seenWritable || writable
            lastOK = false
            if d.len == 0 {
                badBuffer = true  // zero-sized buffers are not allowed
            } else {
                let before = pieces
                var addr = d.addr
                var remaining = UInt64(d.len)
                while remaining > 0 {
                    guard let (p, available) = memory.piece(at: addr) else { break }
                    guard pieces < DeviceQueue.maxPieces else { return .malformed }
                    let n = min(available, remaining)
                    reserveIovecs(head, pieces + 1)
                    iovs[head][pieces] = iovec(iov_base: p, iov_len: Int(n))
                    pieces += 1
                    addr &+= n
                    remaining -= n
                }
                if remaining == 0 {
                    lastOK = true
                    if writable { writeBytes += Int(d.len) } else { readBytes += Int(d.len); readPieces = pieces }
                } else {
                    pieces = before  // drop what was translated of this buffer
                    badBuffer = true
                }
            }
            if d.flags & SplitRingLayout.descNext == 0 { break }
            i = Int(d.next)
            guard i < size else { return .malformed }
        }
        // The status byte: the last byte of the last descriptor, which must be writable.
        guard seenWritable, lastOK, pieces > readPieces else { return .malformed }
        let last = iovs[head][pieces - 1]
        slots[head].status = (last.iov_base! + (last.iov_len - 1)).assumingMemoryBound(to: UInt8.self)
        guard !badBuffer, readBytes >= VirtioBlk.headerSize else { return .ioError }
        // The header: the first 16 readable bytes, wherever the guest split them.
        var header = (UInt64(0), UInt64(0))
        withUnsafeMutableBytes(of: &header) { h in
            var copied = 0
            var k = 0
            while copied < VirtioBlk.headerSize {
                let v = iovs[head][k]
                k += 1
                let take = min(v.iov_len, VirtioBlk.headerSize - copied)
                h.baseAddress!.advanced(by: copied).copyMemory(from: v.iov_base!, byteCount: take)
                copied += take
            }
        }
        let type = UInt32(truncatingIfNeeded: UInt64(littleEndian: header.0)) & ~VirtioBlk.typeBarrier
        slots[head].type = type
        slots[head].sector = UInt64(littleEndian: header.1)
        if type == VirtioBlk.typeOut || type == VirtioBlk.typeDiscard || type == VirtioBlk.typeWriteZeroes {
            // Data: the readable bytes after the header.
            var skip = VirtioBlk.headerSize
            var k = 0
            while skip > 0 {
                let v = iovs[head][k]
                if v.iov_len <= skip {
                    skip -= v.iov_len
                    k += 1
                } else {
                    iovs[head][k] = iovec(iov_base: v.iov_base! + skip, iov_len: v.iov_len - skip)
                    skip = 0
                }
            }
            slots[head].dataStart = k
            slots[head].dataCount = readPieces - k
            slots[head].dataLen = readBytes - VirtioBlk.headerSize
        } else {
            // Data: the writable bytes before the status byte.
            var count = pieces - readPieces
            if last.iov_len == 1 {
                count -= 1
            } else {
                iovs[head][pieces - 1].iov_len -= 1
            }
            slots[head].dataStart = readPieces
            slots[head].dataCount = count
            slots[head].dataLen = writeBytes - 1
        }
        return .ok
    }

    func backendCompleted(head: Int, result: Int32) {
        guard finishRequest(head: head, result: result) else { return }
        // Completions of one iteration share one interrupt (the BH runs after them).
        if pendingInterrupt { irqBH?.schedule() }
        // Last: a detach waiting for this completion hands the queue to its next owner, and
        // from then on this thread must not touch it.
        if !accepting && inFlight == 0 && drained != nil { finishDetach() }
    }

    /// Completes the request at `head` from its backend result, or resubmits it (a fallback or
    /// the fdatasync of a write-through write); returns whether it completed.
    func finishRequest(head: Int, result: Int32) -> Bool {
        let req = slots[head]
        let isFile: Bool
        if case .file = backend.backend { isFile = true } else { isFile = false }
        if req.type == VirtioBlk.typeDiscard || req.type == VirtioBlk.typeWriteZeroes {
            if result == -EOPNOTSUPP && req.type == VirtioBlk.typeWriteZeroes && !req.punching {
                // No zeroed ranges on this file system: a hole reads back as zeros too.
                slots[head].punching = true
                context!.submit(.fallocate(fd: backend.fileDescriptor, mode: VirtioBlk.fallocPunchHole | VirtioBlk.fallocKeepSize,
                                           offset: req.sector &* VirtioBlk.sectorSize,
                                           length: req.extentSectors &* VirtioBlk.sectorSize), to: completionTarget!, tag: UInt32(head))
                return false
            }
            slots[head].punching = false
            // A discard is a hint: a file system without holes has done nothing wrong.
            let ok = result >= 0 || (req.type == VirtioBlk.typeDiscard && result == -EOPNOTSUPP)
            complete(head: head, status: ok ? VirtioBlk.statusOK : VirtioBlk.statusIOErr, written: 0)
        } else if req.syncing {
            slots[head].syncing = false
            complete(head: head, status: result < 0 ? VirtioBlk.statusIOErr : VirtioBlk.statusOK, written: 0)
        } else if result < 0 || (isFile && req.type != VirtioBlk.typeFlush && Int(result) != req.dataLen) {
            // An error, or a short transfer (the file shrank under us).
            complete(head: head, status: VirtioBlk.statusIOErr, written: 0)
        } else if isFile && req.type == VirtioBlk.typeOut && writeThrough {
            slots[head].syncing = true
            context!.submit(.fsync(fd: backend.fileDescriptor, dataOnly: true), to: completionTarget!, tag: UInt32(head))
            return false
        } else {
            complete(head: head, status: VirtioBlk.statusOK, written: req.type == VirtioBlk.typeIn ? UInt32(req.dataLen) : 0)
        }
        return true
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
