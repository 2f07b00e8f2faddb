// One front end's session on an export: the control socket, the negotiated features, the
// memory table and the per-queue vring state, all confined to the export's IOThread.
//
// Design note. The socket is read by a non-blocking fd handler that assembles one message at a
// time (header, then exactly `size` payload bytes, collecting SCM_RIGHTS fds from every read,
// at most 8), so a front end that sends half a message stalls nobody. A ring is processed by
// the shared DeviceQueue while it is started (SET_VRING_KICK), enabled (SET_VRING_ENABLE 1)
// and memory is mapped; it is stopped by detaching the queue, which drains the requests it
// already took. Every message whose effect must not overlap running requests (GET_VRING_BASE,
// a different SET_MEM_TABLE, ring reconfiguration of a running queue, RESET_OWNER, and the
// disconnect itself) goes through one primitive, `quiesce`: stop reading the socket, detach
// the queues concerned, and only when the last of their requests has completed and is
// visible in the used ring, apply the change, reply, and read on. So GET_VRING_BASE answers
// with no request in flight (QEMU 7.2's own daemon does not), and guest memory is unmapped
// only once nothing points into it.
//
// The one rule that makes it safe: everything here runs on the export's first IOThread (the
// session's context), so there is no lock; the queues' statistics are the only things other
// threads read. A queue may run on another IOThread (an export with an `iothread` list): its
// DeviceQueue is then confined to that IOThread from attach to the end of detach, and the
// session touches it only through one-shot BHs scheduled there (attach, detach, a new call
// fd, the write-cache mode); a detach reports back with a BH on the session's context. BHs
// from one thread to a context run in the order they were scheduled, so a detach never
// overtakes the attach before it. `quiesce` is unchanged: it waits for those reports, so a
// reply (GET_VRING_BASE, a new memory table, a disconnect) still goes out only once the
// queues concerned have no request in flight on their own IOThreads.
import Aio
import CShims
import Devices
import Glibc

/// The state of one vring as the front end configured it. Home thread.
final class Vring {
    let index: Int
    /// The context the queue runs on (the session's, or another IOThread's).
    let queueContext: AioContext
    var size = 0
    var descAddr: UInt64 = 0
    var availAddr: UInt64 = 0
    var usedAddr: UInt64 = 0
    var hasAddresses = false
    /// The next avail entry to process (SET_VRING_BASE; GET_VRING_BASE's answer).
    var base: UInt16 = 0
    var kick: EventNotifier?
    var call: EventNotifier?
    var err: EventNotifier?
    var started = false
    var enabled = false
    /// The queue while it runs or drains.
    var queue: DeviceQueue?
    var draining = false
    /// Run once the queue has drained (in order).
    var waiters: [() -> Void] = []

    init(index: Int, queueContext: AioContext) {
        self.index = index
        self.queueContext = queueContext
    }

    func forgetFDs() {
        kick = nil
        call = nil
        err = nil
    }
}

/// `@unchecked Sendable`: confined to the export's first IOThread (its closures are registered
/// on that context and every method runs there). The BHs it schedules on a queue's other
/// IOThread only carry it through to the BH that comes back; they touch the DeviceQueue, not
/// the session.
final class Session: @unchecked Sendable {
    enum Outcome {
        /// Done; ack if the front end asked (REPLY_ACK).
        case ack
        /// A failure the front end may survive; nack if it asked, else the session goes on.
        case nack(String)
        /// The message had its own reply.
        case replied
        /// The handler replies or acks later (after a drain).
        case later
    }

    /// Strong: the export drops its session (breaking the cycle) once the session closed.
    let export: Export
    let ctx: AioContext
    let fd: Int32
    let description: BlkDeviceDescription
    var writeCache: Bool
    var vrings: [Vring]
    var memory: GuestMemory?
    var features: UInt64 = 0
    var protocolFeatures: UInt64 = 0
    var protocolFeaturesNegotiated: Bool { features & VhostUser.protocolFeaturesBit != 0 }
    var replyAck: Bool { protocolFeatures & VhostUser.protocolReplyAck != 0 }

    // Reading.
    let rx: UnsafeMutableRawPointer
    var rxFill = 0
    var rxFDs: [Int32] = []
    let fdScratch: UnsafeMutablePointer<Int32>
    // Writing (replies that did not fit in the socket buffer).
    var tx: [UInt8] = []
    var writing = false
    /// Not reading the socket until a drain finishes.
    var paused = false
    var closed = false
    var onClosed: (() -> Void)?

    init(export: Export, ctx: AioContext, fd: Int32, description: BlkDeviceDescription) {
        self.export = export
        self.ctx = ctx
        self.fd = fd
        self.description = description
        writeCache = description.writeCache
        vrings = (0..<description.numQueues).map { Vring(index: $0, queueContext: export.queueContexts[$0]) }
        rx = .allocate(byteCount: VhostUser.headerSize + VhostUser.maxPayload, alignment: 8)
        fdScratch = .allocate(capacity: VhostUser.maxFDs)
    }

    deinit {
        rx.deallocate()
        fdScratch.deallocate()
        for f in rxFDs { close(f) }
    }

    func start() { watch() }

    // Closures registered on the context or queued as waiters hold the session strongly: a
    // message or a drain may end the session (the export drops it) while one of them runs.
    // Every one of them is removed or run by the time the session closes.
    func watch() {
        var write: (@Sendable () -> Void)? = nil
        if writing { write = { [self] in flush() } }
        ctx.setFdHandler(fd, FdHandlerCallbacks(read: { [self] in readable() }, write: write))
    }

    // MARK: - Reading messages

    enum ReadResult { case incomplete, message(VhostUserMessage), failed(String) }

    func readable() {
        while !paused && !closed {
            switch readMessage() {
            case .incomplete:
                return
            case .failed(let why):
                disconnect(why)
                return
            case .message(let m):
                dispatch(m)
            }
        }
    }

    /// Reads what the socket has towards the current message; never blocks.
    func readMessage() -> ReadResult {
        while true {
            let want: Int
            if rxFill < VhostUser.headerSize {
                want = VhostUser.headerSize - rxFill
            } else {
                let size = Int(rx.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
                let total = VhostUser.headerSize + size
                if rxFill == total { break }
                want = total - rxFill
            }
            var nfds: Int32 = 0
            let n = dp_recv_with_fds(fd, rx + rxFill, want, fdScratch, Int32(VhostUser.maxFDs), &nfds)
            if n == -Int(EAGAIN) { return .incomplete }
            if n == -Int(EMSGSIZE) { return .failed("more than \(VhostUser.maxFDs) fds on one message") }
            if n < 0 { return .failed("receive: \(String(cString: strerror(Int32(-n))))") }
            if n == 0 { return .failed(rxFill == 0 ? "front end closed the connection" : "end of file inside a message") }
            for i in 0..<Int(nfds) { rxFDs.append(fdScratch[i]) }
            if rxFDs.count > VhostUser.maxFDs {
                return .failed("A maximum of \(VhostUser.maxFDs) fds are allowed, however got \(rxFDs.count) fds now")
            }
            rxFill += n
            if rxFill == VhostUser.headerSize {
                let flags = rx.loadUnaligned(fromByteOffset: 4, as: UInt32.self)
                let size = rx.loadUnaligned(fromByteOffset: 8, as: UInt32.self)
                if size > UInt32(VhostUser.maxPayload) { return .failed("too big message request: size \(size)") }
                if flags & VhostUser.versionMask != VhostUser.version {
                    return .failed("bad version in flags 0x\(String(flags, radix: 16))")
                }
                if flags & VhostUser.replyFlag != 0 { return .failed("a request with the reply flag set") }
            }
        }
        let m = VhostUserMessage(
            request: rx.loadUnaligned(as: UInt32.self),
            flags: rx.loadUnaligned(fromByteOffset: 4, as: UInt32.self),
            payload: UnsafeRawBufferPointer(start: rx + VhostUser.headerSize, count: rxFill - VhostUser.headerSize),
            fds: rxFDs)
        rxFill = 0
        rxFDs = []
        return .message(m)
    }

    // MARK: - Dispatch

    func dispatch(_ m: VhostUserMessage) {
        var fds = m.fds
        defer { for f in fds where f >= 0 { close(f) } }  // whatever a handler did not take
        let outcome: Outcome
        do throws(VhostUserProtocolError) {
            guard let request = VhostUserRequest(rawValue: m.request) else {
                throw VhostUserProtocolError("Unhandled request: \(m.request)")
            }
            outcome = try handle(request, m, &fds)
        } catch {
            disconnect(error.message)
            return
        }
        switch outcome {
        case .ack:
            ack(m, 0)
        case .nack(let why):
            export.recordError(why)
            ack(m, 1)
        case .replied, .later:
            break
        }
    }

    func ack(_ m: VhostUserMessage, _ value: UInt64) {
        guard m.needsReply && replyAck else { return }
        reply(m.request, u64: value)
    }

    func reply(_ request: UInt32, u64 value: UInt64) {
        withUnsafeBytes(of: value.littleEndian) { reply(request, payload: $0) }
    }

    func reply(_ request: UInt32, payload: UnsafeRawBufferPointer) {
        guard !closed else { return }
        var bytes = [UInt8](repeating: 0, count: VhostUser.headerSize)
        bytes.withUnsafeMutableBytes { h in
            h.storeBytes(of: request, toByteOffset: 0, as: UInt32.self)
            h.storeBytes(of: VhostUser.replyFlags, toByteOffset: 4, as: UInt32.self)
            h.storeBytes(of: UInt32(payload.count), toByteOffset: 8, as: UInt32.self)
        }
        bytes += payload
        tx += bytes
        flush()
    }

    func flush() {
        while !tx.isEmpty && !closed {
            let n = tx.withUnsafeBytes { dp_send_with_fds(fd, $0.baseAddress, $0.count, nil, 0) }
            if n > 0 {
                tx.removeFirst(n)
                continue
            }
            if n == -Int(EAGAIN) {
                guard tx.count <= 65536 else { return disconnect("front end does not read its replies") }
                if !writing {
                    writing = true
                    if !paused { watch() }
                }
                return
            }
            return disconnect("send: \(String(cString: strerror(Int32(-n))))")
        }
        if writing && tx.isEmpty && !closed {
            writing = false
            if !paused { watch() }
        }
    }

    func expectSize(_ m: VhostUserMessage, _ n: Int, _ request: VhostUserRequest) throws(VhostUserProtocolError) {
        guard m.payload.count == n else {
            throw VhostUserProtocolError("\(request): payload of \(m.payload.count) bytes, expected \(n)")
        }
    }

    func expectNoFDs(_ fds: [Int32], _ request: VhostUserRequest) throws(VhostUserProtocolError) {
        guard fds.isEmpty else { throw VhostUserProtocolError("Invalid fds in request: \(request) carries \(fds.count)") }
    }

    func vring(_ index: UInt64, _ request: VhostUserRequest) throws(VhostUserProtocolError) -> Vring {
        guard index < UInt64(vrings.count) else {
            throw VhostUserProtocolError("Invalid queue index: \(index) in \(request) (\(vrings.count) queues)")
        }
        return vrings[Int(index)]
    }

    func handle(_ request: VhostUserRequest, _ m: VhostUserMessage, _ fds: inout [Int32]) throws(VhostUserProtocolError) -> Outcome {
        switch request {
        case .setMemTable, .setVringKick, .setVringCall, .setVringErr:
            break  // these carry fds
        default:
            try expectNoFDs(fds, request)
        }
        switch request {
        case .getFeatures:
            try expectSize(m, 0, request)
            reply(m.request, u64: description.features)
            return .replied
        case .setFeatures:
            try expectSize(m, 8, request)
            let f = m.u64()
            guard f & ~description.features == 0 else {
                throw VhostUserProtocolError("SET_FEATURES: 0x\(String(f, radix: 16)) has bits we did not offer")
            }
            features = f
            return .ack
        case .getProtocolFeatures:
            try expectSize(m, 0, request)
            reply(m.request, u64: VhostUser.offeredProtocolFeatures)
            return .replied
        case .setProtocolFeatures:
            try expectSize(m, 8, request)
            let f = m.u64()
            guard f & ~VhostUser.offeredProtocolFeatures == 0 else {
                throw VhostUserProtocolError("SET_PROTOCOL_FEATURES: 0x\(String(f, radix: 16)) has bits we did not offer")
            }
            protocolFeatures = f
            return .ack
        case .getQueueNum:
            try expectSize(m, 0, request)
            reply(m.request, u64: UInt64(vrings.count))
            return .replied
        case .setOwner:
            try expectSize(m, 0, request)
            return .ack
        case .resetOwner, .resetDevice:
            try expectSize(m, 0, request)
            quiesce(vrings) { [self] in
                for v in vrings {
                    v.started = false
                    v.enabled = false
                    v.hasAddresses = false
                    v.base = 0
                    v.forgetFDs()
                }
                features = 0
                ack(m, 0)
            }
            return .later
        case .setMemTable:
            return try setMemTable(m, &fds)
        case .setVringNum:
            try expectSize(m, 8, request)
            let v = try vring(UInt64(m.u32(at: 0)), request)
            let num = Int(m.u32(at: 4))
            guard num > 0, num <= VhostUser.maxQueueSize, num & (num - 1) == 0 else {
                throw VhostUserProtocolError("SET_VRING_NUM: \(num) is not a power of 2 in [1, \(VhostUser.maxQueueSize)]")
            }
            return reconfigure(v, m) { v.size = num }
        case .setVringAddr:
            try expectSize(m, 40, request)
            let v = try vring(UInt64(m.u32(at: 0)), request)
            let desc = m.u64(at: 8), used = m.u64(at: 16), avail = m.u64(at: 24)
            // Check now that the ring translates (the whole extent, the alignment), as far as
            // the size is known; it is checked again when the ring starts.
            if let memory, v.size > 0 {
                do {
                    _ = try SplitRing(memory: memory, layout: SplitRingLayout(size: v.size, descAddr: desc, availAddr: avail, usedAddr: used),
                                      in: .frontEnd)
                } catch {
                    throw VhostUserProtocolError("Invalid vring_addr message: \(error.message)")
                }
            } else if memory == nil {
                throw VhostUserProtocolError("Invalid vring_addr message: no memory table yet")
            }
            return reconfigure(v, m) {
                v.descAddr = desc
                v.usedAddr = used
                v.availAddr = avail
                v.hasAddresses = true
            }
        case .setVringBase:
            try expectSize(m, 8, request)
            let v = try vring(UInt64(m.u32(at: 0)), request)
            let num = m.u32(at: 4)
            guard num <= 0xFFFF else { throw VhostUserProtocolError("SET_VRING_BASE: \(num) is not a 16-bit index") }
            return reconfigure(v, m) { v.base = UInt16(num) }
        case .getVringBase:
            try expectSize(m, 8, request)
            let v = try vring(UInt64(m.u32(at: 0)), request)
            v.started = false
            quiesce([v]) { [self] in
                var state = (UInt32(v.index).littleEndian, UInt32(v.base).littleEndian)
                v.forgetFDs()
                withUnsafeBytes(of: &state) { reply(m.request, payload: $0) }
            }
            return .later
        case .setVringKick, .setVringCall, .setVringErr:
            try expectSize(m, 8, request)
            let value = m.u64()
            let v = try vring(value & VhostUser.vringIndexMask, request)
            var notifier: EventNotifier? = nil
            if value & VhostUser.vringNoFDFlag != 0 {
                guard fds.isEmpty else { throw VhostUserProtocolError("\(request) with the no-fd bit carries an fd") }
                // Polling a ring without a kick fd is not supported: a blk front end (QEMU)
                // always passes one.
                if request == .setVringKick { throw VhostUserProtocolError("SET_VRING_KICK without an fd is not supported") }
            } else {
                guard fds.count == 1 else { throw VhostUserProtocolError("\(request) carries \(fds.count) fds, expected 1") }
                do {
                    notifier = try EventNotifier(adopting: fds[0])
                } catch {
                    throw VhostUserProtocolError("\(request): \(error.message)")
                }
                fds[0] = -1  // owned by the notifier now
            }
            switch request {
            case .setVringKick:
                return reconfigure(v, m) { [self] in
                    v.kick = notifier
                    v.started = true
                    // Without protocol features a ring is enabled as soon as it starts.
                    if !protocolFeaturesNegotiated { v.enabled = true }
                }
            case .setVringCall:
                v.call = notifier
                if let q = v.queue {
                    let call = notifier
                    onQueueThread(v) { q.setInterrupt(call) }  // signals the new fd once
                } else {
                    notifier?.set()  // in case of an I/O hang after reconnecting (as libvhost-user)
                }
                return .ack
            default:
                v.err = notifier
                return .ack
            }
        case .setVringEnable:
            try expectSize(m, 8, request)
            let v = try vring(UInt64(m.u32(at: 0)), request)
            let num = m.u32(at: 4)
            guard num <= 1 else { throw VhostUserProtocolError("Invalid vring_enable value: \(num)") }
            v.enabled = num == 1
            try reconcile(v)
            return .ack
        case .getConfig:
            guard m.payload.count >= 12 else { throw VhostUserProtocolError("GET_CONFIG: payload of \(m.payload.count) bytes") }
            let offset = Int(m.u32(at: 0)), size = Int(m.u32(at: 4))
            guard m.payload.count == 12 + size, size > 0, size <= BlkDeviceDescription.configSpaceLimit,
                  offset <= BlkDeviceDescription.configSpaceLimit - size
            else { throw VhostUserProtocolError("GET_CONFIG: bad range offset \(offset) size \(size)") }
            var d = description
            d.writeCache = writeCache
            var out = Array(m.payload[0..<12])
            out += d.config(offset: offset, count: size)
            out.withUnsafeBytes { reply(m.request, payload: $0) }
            return .replied
        case .setConfig:
            guard m.payload.count >= 12 else { throw VhostUserProtocolError("SET_CONFIG: payload of \(m.payload.count) bytes") }
            let offset = m.u32(at: 0), size = m.u32(at: 4), flags = m.u32(at: 8)
            guard m.payload.count == 12 + Int(size) else {
                throw VhostUserProtocolError("SET_CONFIG: size \(size) does not match the payload")
            }
            // Only the write-cache byte is writable, and only by the front end (flags 0).
            guard offset == 32, size == 1, flags == 0, m.payload[12] <= 1 else {
                return .nack("SET_CONFIG: only wce (offset 32, 1 byte, 0 or 1) may be set")
            }
            writeCache = m.payload[12] == 1
            let writeThrough = !writeCache
            for v in vrings {
                if let q = v.queue { onQueueThread(v) { q.writeThrough = writeThrough } }
            }
            return .ack
        case .none, .setLogBase, .setLogFD, .sendRARP, .netSetMTU, .setSlaveReqFD, .iotlbMsg, .setVringEndian,
             .getInflightFD, .setInflightFD, .getMaxMemSlots, .addMemReg, .remMemReg:
            throw VhostUserProtocolError("Unhandled request: \(request) (\(request.rawValue)): its feature was not offered")
        }
    }

    // MARK: - Memory

    func setMemTable(_ m: VhostUserMessage, _ fds: inout [Int32]) throws(VhostUserProtocolError) -> Outcome {
        guard m.payload.count >= 8 else { throw VhostUserProtocolError("SET_MEM_TABLE: payload of \(m.payload.count) bytes") }
        let n = Int(m.u32(at: 0))
        guard n >= 1, n <= VhostUser.maxMemoryRegions else {
            throw VhostUserProtocolError("SET_MEM_TABLE: \(n) regions (1...\(VhostUser.maxMemoryRegions) allowed)")
        }
        guard m.payload.count == 8 + 32 * n else {
            throw VhostUserProtocolError("SET_MEM_TABLE: payload of \(m.payload.count) bytes for \(n) regions")
        }
        guard fds.count == n else { throw VhostUserProtocolError("SET_MEM_TABLE: \(n) regions but \(fds.count) fds") }
        var regions: [GuestMemory.Region] = []
        var files: [GuestMemory.FileIdentity] = []
        for i in 0..<n {
            let o = 8 + 32 * i
            regions.append(GuestMemory.Region(guestPhysicalAddress: m.u64(at: o), size: m.u64(at: o + 8),
                                              userAddress: m.u64(at: o + 16), mmapOffset: m.u64(at: o + 24)))
            var st = stat()
            guard fstat(fds[i], &st) == 0 else { throw VhostUserProtocolError("SET_MEM_TABLE: fd \(i) is not open") }
            files.append(GuestMemory.FileIdentity(device: UInt64(st.st_dev), inode: UInt64(st.st_ino)))
        }
        // QEMU 7.2 sends the same table again while rings run: nothing to do.
        if let memory, memory.isSame(regions: regions, files: files) { return .ack }
        let newMemory: GuestMemory
        do {
            newMemory = try GuestMemory(regions: regions, fds: fds)
        } catch {
            throw VhostUserProtocolError("SET_MEM_TABLE: \(error.message)")
        }
        // The mappings stay after the fds close (on return, with the other leftovers).
        let running = vrings.filter { $0.queue != nil }
        quiesce(running) { [self] in
            memory = newMemory
            // Re-translate the rings that ran against the new table.
            for v in running {
                do throws(VhostUserProtocolError) {
                    try reconcile(v)
                } catch {
                    disconnect(error.message)
                    return
                }
            }
            ack(m, 0)
        }
        return .later
    }

    // MARK: - Starting and stopping rings

    /// Applies a change to a ring's configuration, stopping it first if it runs.
    func reconfigure(_ v: Vring, _ m: VhostUserMessage, _ change: @escaping () -> Void) -> Outcome {
        guard v.queue != nil else {
            change()
            do throws(VhostUserProtocolError) { try reconcile(v) } catch { disconnect(error.message) }
            return .ack
        }
        quiesce([v]) { [self] in
            change()
            do throws(VhostUserProtocolError) { try reconcile(v) } catch {
                disconnect(error.message)
                return
            }
            ack(m, 0)
        }
        return .later
    }

    /// Starts the ring's queue if it should run and does not, or stops it (asynchronously:
    /// the queue drains) if it runs and should not.
    func reconcile(_ v: Vring) throws(VhostUserProtocolError) {
        let shouldRun = v.started && v.enabled && memory != nil && !closed
        if shouldRun && v.queue == nil {
            guard v.size > 0, v.hasAddresses, let kick = v.kick, let memory else {
                throw VhostUserProtocolError("queue \(v.index) started before its size and addresses were set")
            }
            let ring: SplitRing
            do {
                ring = try SplitRing(memory: memory, layout: SplitRingLayout(size: v.size, descAddr: v.descAddr,
                                                                             availAddr: v.availAddr, usedAddr: v.usedAddr),
                                     in: .frontEnd)
            } catch {
                throw VhostUserProtocolError("Invalid vring_addr message: \(error.message)")
            }
            let q = DeviceQueue(index: v.index, ring: ring, memory: memory, backend: export.backend, serial: export.serial,
                                kick: kick, interrupt: v.call, lastAvail: v.base, usedIdx: ring.usedIdx, name: export.id)
            q.writeThrough = !writeCache
            v.queue = q
            export.publish(queue: v.index, q.statistics)
            let qctx = v.queueContext
            onQueueThread(v) { q.attachOnHomeThread(qctx) }
        } else if !shouldRun, v.queue != nil, !v.draining {
            stop(v)
        }
    }

    /// Detaches the running queue of `v`; its waiters run once it drained.
    func stop(_ v: Vring) {
        guard let q = v.queue, !v.draining else { return }
        v.draining = true
        guard v.queueContext !== ctx else {
            // Strong self: the last waiter may end the session (the export drops it) while
            // this closure still runs.
            q.detachOnHomeThread { [self] in stopped(v, lastAvail: q.lastAvail) }
            return
        }
        // The queue drains on its own IOThread; `lastAvail` is read there, after the last
        // completion, and handed back with the BH (scheduling orders the two threads).
        // The closures that run on the queue's IOThread read nothing of the session: only `q`
        // (theirs until the detach ends) and immutable values captured here.
        let index = v.index, home = ctx, name = "\(export.id)-q\(v.index)"
        v.queueContext.scheduleOneShot(name: "\(name)-detach") { [self] in
            q.detachOnHomeThread { [self] in
                let base = q.lastAvail
                home.scheduleOneShot(name: "\(name)-detached") { [self] in
                    stopped(vrings[index], lastAvail: base)
                }
            }
        }
    }

    /// The queue of `v` drained and let go of its IOThread. Session thread.
    func stopped(_ v: Vring, lastAvail: UInt16) {
        guard let q = v.queue else { return }
        v.base = lastAvail
        v.queue = nil
        v.draining = false
        export.retire(queue: v.index, q.statistics)
        let w = v.waiters
        v.waiters = []
        for body in w { body() }
        // The ring may have been enabled again while it drained (ENABLE 0 then 1).
        if !closed && !paused {
            do throws(VhostUserProtocolError) { try reconcile(v) } catch { disconnect(error.message) }
        }
    }

    /// Runs `body` where the queue of `v` lives: at once if that is the session's context,
    /// else in a one-shot BH on the queue's IOThread (in order with the queue's attach and
    /// detach, which are scheduled the same way). Session thread.
    func onQueueThread(_ v: Vring, _ body: @escaping @Sendable () -> Void) {
        if v.queueContext === ctx {
            body()
        } else {
            v.queueContext.scheduleOneShot(name: "\(export.id)-q\(v.index)", body)
        }
    }

    /// Stops the queues of `rings` and runs `body` once none of them has a request in flight.
    /// The socket is not read meanwhile, so no other message overtakes the change.
    func quiesce(_ rings: [Vring], _ body: @escaping () -> Void) {
        let busy = rings.filter { $0.queue != nil }
        if busy.isEmpty {
            body()
            return
        }
        pause()
        final class Countdown { var left: Int; init(_ n: Int) { left = n } }
        let countdown = Countdown(busy.count)
        for v in busy {
            v.waiters.append { [self] in
                countdown.left -= 1
                guard countdown.left == 0 else { return }
                body()
                resume()
            }
            stop(v)
        }
    }

    func pause() {
        guard !paused else { return }
        paused = true
        if !closed { ctx.removeFdHandler(fd) }
    }

    func resume() {
        guard paused else { return }
        paused = false
        guard !closed else { return }
        watch()  // level-triggered: a message already waiting is read at once
    }

    // MARK: - Disconnect

    /// Ends the session: stops reading, drains every queue, then unmaps guest memory, closes
    /// every fd and calls `onClosed`. Idempotent.
    func disconnect(_ reason: String) {
        guard !closed else { return }
        export.recordError(reason)
        closed = true
        export.sessionEnding()
        ctx.removeFdHandler(fd)
        close(fd)
        tx = []
        let all = vrings
        quiesceForClose(all)
    }

    func quiesceForClose(_ rings: [Vring]) {
        let busy = rings.filter { $0.queue != nil }
        let finish = { [self] in
            for v in vrings { v.forgetFDs() }
            memory = nil
            let done = onClosed
            onClosed = nil
            done?()
        }
        if busy.isEmpty { return finish() }
        final class Countdown { var left: Int; init(_ n: Int) { left = n } }
        let countdown = Countdown(busy.count)
        for v in busy {
            v.waiters.append {
                countdown.left -= 1
                if countdown.left == 0 { finish() }
            }
            stop(v)
        }
    }
}
