// The guest side of one virtqueue, as a vCPU thread would drive it: numbered requests of
// three descriptors (header, 4 KiB data, status) in preallocated guest buffers, a kick
// unless the device suppressed kicks, and completions reaped from the used ring, waiting
// either on the interrupt eventfd (blocking) or by spinning on the used index.
//
// Confined to one guest thread. It checks what a guest can check: every completion names a
// request that was in flight (a duplicate or unknown completion is counted, not trusted).
import Aio
import Glibc

public final class GuestQueue {
    public let ring: SplitRing
    let memory: GuestMemory
    let kick: EventNotifier
    let irq: EventNotifier
    let bufferBase: UInt64
    public let capacity: Int  // requests that fit at once
    // `@exclusivity(unchecked)`: confined to the guest thread, and no access is open while
    // a reap callback runs (it may submit); the dynamic checks cost a TLS lookup and an
    // access-set insert per access, several per request.
    @exclusivity(unchecked) var freeSlots: [Int]
    @exclusivity(unchecked) var slotRequest: [UInt64]
    @exclusivity(unchecked) var slotBusy: [Bool]
    @exclusivity(unchecked) var availIdx: UInt16 = 0
    @exclusivity(unchecked) var lastUsed: UInt16 = 0

    /// Kicks written to the kick eventfd.
    @exclusivity(unchecked) public private(set) var kicks: UInt64 = 0
    /// Completions for a slot that was not in flight (must stay 0).
    @exclusivity(unchecked) public private(set) var unexpectedCompletions: UInt64 = 0

    public static let dataBytes = 4096

    /// The guest side of `device`'s queue `queue`, using guest memory from `bufferBase`.
    public convenience init(device: VirtioBlkDevice, queue: Int, bufferBase: UInt64? = nil) throws(DeviceError) {
        let layout = device.layouts[queue]
        let perQueue = GuestQueue.bytesNeeded(queueSize: layout.size)
        let (kick, irq) = device.notifiers(queue: queue)
        try self.init(memory: device.memory, layout: layout, kick: kick, interrupt: irq,
                      bufferBase: bufferBase ?? (device.freeMemoryStart + UInt64(queue) * perQueue))
    }

    /// The guest side of a ring at `layout` (guest-physical addresses) in `memory`, with
    /// its request buffers from `bufferBase` (``bytesNeeded(queueSize:)`` bytes). A
    /// vhost-user test front end drives a real back end with it.
    public init(memory: GuestMemory, layout: SplitRingLayout, kick: EventNotifier, interrupt: EventNotifier,
                bufferBase: UInt64) throws(DeviceError) {
        ring = try SplitRing(memory: memory, layout: layout)
        self.memory = memory
        self.kick = kick
        irq = interrupt
        capacity = layout.size / 3
        let perQueue = GuestQueue.bytesNeeded(queueSize: layout.size)
        self.bufferBase = bufferBase
        guard memory.pointer(at: bufferBase, length: Int(perQueue)) != nil else {
            throw DeviceError("guest memory too small for \(capacity) requests")
        }
        freeSlots = Array((0..<capacity).reversed())
        slotRequest = [UInt64](repeating: 0, count: capacity)
        slotBusy = [Bool](repeating: false, count: capacity)
    }

    /// Guest memory one queue's request buffers take: headers and status bytes, then 4 KiB
    /// data buffers on a page boundary.
    public static func bytesNeeded(queueSize: Int) -> UInt64 {
        let capacity = UInt64(queueSize / 3)
        return (capacity * 17 + 4095) / 4096 * 4096 + capacity * UInt64(dataBytes)
    }

    func headerAddr(_ slot: Int) -> UInt64 { bufferBase + UInt64(slot * 16) }
    func statusAddr(_ slot: Int) -> UInt64 { bufferBase + UInt64(capacity * 16 + slot) }
    public func dataAddr(_ slot: Int) -> UInt64 {
        bufferBase + (UInt64(capacity * 17) + 4095) / 4096 * 4096 + UInt64(slot * GuestQueue.dataBytes)
    }

    /// Requests in flight.
    public var inFlight: Int { capacity - freeSlots.count }

    /// Suppresses (or re-enables) interrupts: a spinning guest does not need them.
    public func setInterruptsSuppressed(_ suppressed: Bool) {
        ring.setAvailFlags(suppressed ? SplitRingLayout.noInterrupt : 0)
    }

    /// Queues request `id`; returns the slot, or nil when every slot is in flight. Kicks
    /// unless the device asked not to be kicked. `fill` may write the data buffer (OUT).
    @discardableResult
    public func submit(id: UInt64, type: UInt32 = VirtioBlk.typeIn, sector: UInt64 = 0, kickNow: Bool = true,
                       fill: ((UnsafeMutableRawBufferPointer) -> Void)? = nil) -> Int? {
        guard let slot = freeSlots.popLast() else { return nil }
        slotRequest[slot] = id
        slotBusy[slot] = true
        let h = memory.pointer(at: headerAddr(slot), length: 16)!
        h.storeBytes(of: type, as: UInt32.self)
        h.storeBytes(of: 0, toByteOffset: 4, as: UInt32.self)
        h.storeBytes(of: sector, toByteOffset: 8, as: UInt64.self)
        memory.pointer(at: statusAddr(slot), length: 1)!.storeBytes(of: 0xFF, as: UInt8.self)
        if let fill { fill(UnsafeMutableRawBufferPointer(start: memory.pointer(at: dataAddr(slot), length: GuestQueue.dataBytes)!, count: GuestQueue.dataBytes)) }
        let d = slot * 3
        let dataWritable = type == VirtioBlk.typeIn || type == VirtioBlk.typeGetID
        ring.setDescriptor(d, addr: headerAddr(slot), len: 16, flags: SplitRingLayout.descNext, next: UInt16(d + 1))
        ring.setDescriptor(d + 1, addr: dataAddr(slot), len: UInt32(GuestQueue.dataBytes),
                           flags: SplitRingLayout.descNext | (dataWritable ? SplitRingLayout.descWrite : 0), next: UInt16(d + 2))
        ring.setDescriptor(d + 2, addr: statusAddr(slot), len: 1, flags: SplitRingLayout.descWrite, next: 0)
        ring.setAvailEntry(availIdx, UInt16(d))
        availIdx &+= 1
        ring.publishAvailIdx(availIdx)  // release: descriptors and entry before the index
        if kickNow { kickIfAllowed() }
        return slot
    }

    /// Kicks unless the device suppressed kicks (it is polling the ring).
    public func kickIfAllowed() {
        fullFence()  // our avail index before the read of the device's flag
        if ring.usedFlags & SplitRingLayout.noNotify == 0 {
            kicks += 1
            kick.set()
        }
    }

    /// Hands each new completion to `body` (request id, status byte, bytes written, slot);
    /// returns how many.
    @discardableResult
    public func reap(_ body: (UInt64, UInt8, UInt32, Int) -> Void) -> Int {
        let used = ring.usedIdx  // acquire: status and data before the index
        var n = 0
        while lastUsed != used {
            let e = ring.usedEntry(lastUsed)
            lastUsed &+= 1
            let slot = Int(e.id) / 3
            guard Int(e.id) % 3 == 0, slot < capacity, slotBusy[slot] else {
                unexpectedCompletions += 1
                continue
            }
            slotBusy[slot] = false
            freeSlots.append(slot)
            let status = memory.pointer(at: statusAddr(slot), length: 1)!.load(as: UInt8.self)
            body(slotRequest[slot], status, e.len, slot)
            n += 1
        }
        return n
    }

    /// The data buffer of `slot` (valid until the slot is reused).
    public func data(slot: Int) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(start: memory.pointer(at: dataAddr(slot), length: GuestQueue.dataBytes)!, count: GuestQueue.dataBytes)
    }

    /// Waits until the device signals an interrupt or `timeoutMs` passes; returns whether
    /// it was signalled (and clears it).
    @discardableResult
    public func waitForInterrupt(timeoutMs: Int32) -> Bool {
        var p = pollfd(fd: irq.fileDescriptor, events: Int16(POLLIN), revents: 0)
        _ = Glibc.poll(&p, 1, timeoutMs)
        return irq.testAndClear()
    }

    /// Whether completions are waiting in the used ring.
    public var hasCompletions: Bool { ring.usedIdx != lastUsed }
}
