// One front end's session on an export: the control socket, the negotiated features, the
// memory table and the per-queue vring state, all confined to the export's home IOThread.
//
// Three files: this one handles the front end's messages; Session+Channel.swift reads them off
// the socket (with their SCM_RIGHTS fds) and writes the replies; Session+Rings.swift is the
// rings' lifecycle, the quiesce primitive, a move to other IOThreads and the disconnect.
//
// Design note. The socket is read by a non-blocking fd handler that assembles one message at a
// time (header, then exactly `size` payload bytes, collecting SCM_RIGHTS fds from every read,
// at most 8), so a front end that sends half a message stalls nobody.
//
// Each ring has an explicit lifecycle, driven only from the session's thread:
//   stopped -> starting -> running -> stopping -> stopped   (and starting -> stopping)
// A ring should run while it is started (SET_VRING_KICK), enabled (SET_VRING_ENABLE 1),
// memory is mapped, the session is open and no quiesce holds it stopped; `reconcile` moves it
// towards that, one transition at a time, and again whenever a transition reports back. Its
// queue moves between threads only through QueueBinding's primitive: starting is a relocation
// from nowhere to the ring's IOThread, stopping one from there to nowhere (no new request;
// those taken complete and are visible in the used ring; the last avail index comes back).
// Both report on the session's thread.
//
// Every message whose effect must not overlap running requests (GET_VRING_BASE, a different
// SET_MEM_TABLE, ring reconfiguration of a running queue, RESET_OWNER, the disconnect itself,
// and a move of the whole export to other IOThreads) goes through one primitive, `quiesce`:
// stop reading the socket, hold the rings concerned stopped, and once none of them is
// running, starting or stopping, apply the change, reply, and read on. Quiesces nest (the
// socket is read again when the last one ends). So GET_VRING_BASE answers with no request in
// flight (QEMU 7.2's own daemon does not), and guest memory is unmapped only once nothing
// points into it.
//
// A queue may run on another IOThread than the session (an export with an `iothread` list):
// the session then touches its DeviceQueue only through QueueBinding (`withQueue` for a new
// call fd or the write-cache mode). The queues' statistics are the only things other threads
// read.
import Aio
import CShims
import Devices
import Glibc

/// The state of one vring as the front end configured it. Home thread.
final class Vring {
    /// Where the ring's queue is in its lifecycle (see the design note).
    enum State { case stopped, starting, running, stopping }

    let index: Int
    /// The context the queue runs on (the session's, or another IOThread's); changed only by
    /// a move of the export, while the ring is stopped.
    var queueContext: AioContext
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
    var state = State.stopped
    /// The queue and where it runs, from the start of `starting` to the end of `stopping`.
    var binding: QueueBinding?
    /// Quiesces that hold the ring stopped.
    var holds = 0
    /// Run once the ring is stopped (in order).
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

/// `@unchecked Sendable`: confined to the export's home IOThread (its closures are registered
/// on that context and every method runs there; a move of the export hands it to the new home
/// with a BH, as the last thing the old one does). The bodies it passes to QueueBinding run
/// where a queue lives and touch only that queue.
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
    /// The home context (the export's first IOThread's); changed only by a move, while the
    /// session is quiesced.
    var ctx: AioContext
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
    /// Quiesces in progress: the socket is not read while there is one.
    var pauses = 0
    var paused: Bool { pauses > 0 }
    /// A move to other IOThreads is in progress; a disconnect meanwhile is deferred.
    var moving = false
    var closeAfterMove: String?
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
                if let b = v.binding {
                    let call = notifier
                    b.withQueue { $0.setInterrupt(call) }  // signals the new fd once
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
                v.binding?.withQueue { $0.writeThrough = writeThrough }
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
        let running = vrings.filter { $0.state != .stopped }
        quiesce(running) { [self] in
            memory = newMemory  // the rings that ran restart against the new table on release
            ack(m, 0)
        }
        return .later
    }

}
