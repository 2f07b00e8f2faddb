import IOThreads

/// One entry of `iothread-vq-mapping`: an IOThread and, optionally, the queues it serves.
public struct IOThreadVQMappingEntry: Sendable, Equatable {
    public var iothread: String
    public var vqs: [Int]?
    public init(iothread: String, vqs: [Int]? = nil) {
        self.iothread = iothread
        self.vqs = vqs
    }
}

/// A resolved `iothread-vq-mapping`: where each queue runs, and every IOThread the mapping
/// names (each is held, also one that serves no queue, as QEMU references every entry).
public struct IOThreadVQMapping {
    /// The IOThread of each queue.
    public let queues: [IOThread]
    /// The IOThread of each entry, in list order.
    public let iothreads: [IOThread]

    public init(queues: [IOThread], iothreads: [IOThread]) {
        self.queues = queues
        self.iothreads = iothreads
    }
}

/// QEMU's `iothread-vq-mapping` (hw/virtio/iothread-vq-mapping.c): validation with its
/// exact messages, then either the explicit assignment or round robin (entry k of K gets
/// queues k, k+K, k+2K, …).
public func resolveIOThreadVQMapping(
    _ entries: [IOThreadVQMappingEntry], numQueues: Int, lookup: (String) -> IOThread?
) throws(DeviceError) -> IOThreadVQMapping {
    var threads: [IOThread] = []
    var names: Set<String> = []
    for e in entries {
        guard let t = lookup(e.iothread) else { throw DeviceError("IOThread \"\(e.iothread)\" object does not exist") }
        guard names.insert(e.iothread).inserted else {
            throw DeviceError("duplicate IOThread name \"\(e.iothread)\" in iothread-vq-mapping")
        }
        threads.append(t)
    }
    guard !entries.isEmpty else { throw DeviceError("iothread-vq-mapping must not be empty") }
    let withVqs = entries.filter { $0.vqs != nil }.count
    guard withVqs == 0 || withVqs == entries.count else {
        throw DeviceError("either all items in iothread-vq-mapping must have vqs or none of them must have it")
    }
    var assigned = [IOThread?](repeating: nil, count: numQueues)
    if withVqs == 0 {
        for q in 0..<numQueues { assigned[q] = threads[q % threads.count] }
    } else {
        for (e, t) in zip(entries, threads) {
            for vq in e.vqs! {
                guard vq >= 0 && vq < numQueues else {
                    throw DeviceError("vq index \(vq) for IOThread \"\(e.iothread)\" must be less than num_queues \(numQueues) in iothread-vq-mapping")
                }
                guard assigned[vq] == nil else {
                    throw DeviceError("cannot assign vq \(vq) to IOThread \"\(e.iothread)\" because it is already assigned")
                }
                assigned[vq] = t
            }
        }
        if let missing = assigned.firstIndex(where: { $0 == nil }) {
            throw DeviceError("missing vq \(missing) IOThread assignment in iothread-vq-mapping")
        }
    }
    return IOThreadVQMapping(queues: assigned.map { $0! }, iothreads: threads)
}
