// Devices over QMP: device_add, device_del with DEVICE_DELETED, and the live move of a
// device's queues (qom-set of `iothread`), with QEMU's texts. Monitor thread.
//
// A device's lifecycle in the monitor: attaching -> attached -> moving -> attached ...
// -> unplugging -> gone. attaching and moving last only as long as their command (no other
// command runs meanwhile); unplugging lasts from device_del's answer to DEVICE_DELETED, and
// every command that names the device checks it.
import Aio
import Devices
import IOThreads

/// A device and what the monitor keeps about it.
///
/// `@unchecked Sendable`: confined to the monitor's thread (carried through its tasks).
final class DeviceEntry: @unchecked Sendable {
    enum State: Equatable { case attaching, attached, moving, unplugging }
    let device: VirtioBlkDevice
    /// `virtio-blk` or `virtio-blk-pci`.
    let driver: String
    /// `/machine/peripheral/ID`: what DEVICE_DELETED names.
    let qomPath: String
    var state = State.attaching
    init(device: VirtioBlkDevice, driver: String, qomPath: String) {
        self.device = device
        self.driver = driver
        self.qomPath = qomPath
    }

    /// The holder's path: the device's, or for a PCI proxy its virtio backend child's (as in
    /// the holders series' example).
    var holderPath: String { device.holderPath }

    /// The IOThread of every queue, when they share one.
    var singleIOThread: IOThread? {
        let threads = device.iothreads
        guard let first = threads.first, threads.allSatisfy({ $0 === first }), device.heldIOThreads.count == 1 else { return nil }
        return first
    }
}

extension Monitor {
    static var deviceAddArguments: [String: QMPArgumentType] {
        ["driver": .string, "id": .string, "iothread": .string, "iothread-vq-mapping": .array,
         "num-queues": .int, "queue-size": .int, "backend": .string]
    }

    /// Creates the device, holds its IOThreads (before anything is scheduled there) and
    /// attaches its queues; answered once the queues run.
    func deviceAdd(_ a: QMPArguments) async throws(QMPError) {
        let driver = a.string("driver")!
        guard driver == "virtio-blk" || driver == "virtio-blk-pci" else {
            throw QMPError("'\(driver)' is not a valid device model name")
        }
        let id = a.string("id")!
        guard isWellFormedObjectID(id) else { throw QMPError("Parameter 'id' expects an identifier") }
        guard devices[id] == nil else { throw QMPError("Duplicate device ID '\(id)'") }
        let queues = Int(a["num-queues"]?.intValue ?? 1)
        guard queues > 0 else { throw QMPError("num-queues property must be larger than 0") }
        // Before the mapping, which has an entry per queue: a huge count must not allocate.
        guard queues <= VirtioBlkDevice.maxQueues else {
            throw QMPError("num-queues must be in [1, \(VirtioBlkDevice.maxQueues)]")
        }
        let size = Int(a["queue-size"]?.intValue ?? 256)
        guard size > 2 else { throw QMPError("invalid queue-size property (\(size)), must be > 2") }
        guard size & (size - 1) == 0 && size <= 1024 else {
            throw QMPError("invalid queue-size property (\(size)), must be a power of 2 (max 1024)")
        }
        let backend: BlockBackend
        do throws(DeviceError) { backend = try BlockBackend(parsing: a.string("backend") ?? "null") } catch {
            throw QMPError(error.message)
        }
        let placement: IOThreadVQMapping
        switch (a.string("iothread"), a["iothread-vq-mapping"]) {
        case (.some, .some):
            throw QMPError("iothread and iothread-vq-mapping properties cannot be set at the same time")
        case (.some(let name), nil):
            let t = try iothreadLink(name)
            placement = IOThreadVQMapping(queues: Array(repeating: t, count: queues), iothreads: [t])
        case (nil, .some(.array(let items))):
            var entries: [IOThreadVQMappingEntry] = []
            for item in items {
                guard case .object = item, let name = item["iothread"]?.stringValue else {
                    throw QMPError("Invalid parameter type for 'iothread-vq-mapping', expected: IOThreadVirtQueueMapping")
                }
                var vqs: [Int]? = nil
                if case .array(let v)? = item["vqs"] { vqs = v.compactMap { $0.intValue.map(Int.init) } }
                entries.append(IOThreadVQMappingEntry(iothread: name, vqs: vqs))
            }
            do throws(DeviceError) {
                placement = try resolveIOThreadVQMapping(entries, numQueues: queues) { [registry] in registry.lookup($0) }
            } catch { throw QMPError(error.message) }
        default:
            throw QMPError("virtio-blk needs 'iothread' or 'iothread-vq-mapping' (this runtime has no main-loop dataplane)")
        }
        let qomPath = "/machine/peripheral/\(id)"
        let holder = IOThreadHolder.qomObject(path: driver == "virtio-blk-pci" ? qomPath + "/virtio-backend" : qomPath)
        let device: VirtioBlkDevice
        do throws(DeviceError) {
            device = try VirtioBlkDevice(id: id, queues: queues, queueSize: size, backend: backend, holder: holder)
        } catch { throw QMPError(error.message) }
        let entry = DeviceEntry(device: device, driver: driver, qomPath: qomPath)
        devices[id] = entry
        deviceOrder.append(id)
        do throws(DeviceError) {
            // The holds are taken synchronously, before the first suspension.
            try await device.attach(placement)
        } catch {
            assertOnMonitorThread()
            forgetDevice(id)
            throw QMPError(error.message)
        }
        assertOnMonitorThread()
        entry.state = .attached
    }

    /// An IOThread named by a link property: an id, or `/objects/ID`.
    func iothreadLink(_ name: String) throws(QMPError) -> IOThread {
        guard let t = registry.lookup(name.hasPrefix("/objects/") ? String(name.dropFirst(9)) : name) else {
            throw QMPError("DeviceNotFound", "Device '\(name)' not found")
        }
        return t
    }

    func forgetDevice(_ id: String) {
        devices.removeValue(forKey: id)
        deviceOrder.removeAll { $0 == id }
    }

    /// The device named by an id or a QOM path.
    func device(named idOrPath: String) throws(QMPError) -> (String, DeviceEntry) {
        var id = idOrPath
        if id.hasPrefix("/machine/peripheral/") {
            id = String(id.dropFirst(20))
            if id.hasSuffix("/virtio-backend") { id.removeLast(15) }
        }
        guard let entry = devices[id] else { throw QMPError("DeviceNotFound", "Device '\(idOrPath)' not found") }
        return (id, entry)
    }

    /// Refuses a command on a device that is not attached, with QEMU's text for one that is
    /// being unplugged.
    func requireAttached(_ id: String, _ entry: DeviceEntry) throws(QMPError) {
        switch entry.state {
        case .unplugging: throw QMPError("Device \(id) is already in the process of unplug")
        case .attaching, .moving: throw QMPError("Device \(id) is busy")  // not reachable: commands run one at a time
        case .attached: break
        }
    }

    /// Answers at once; the drain runs on, and DEVICE_DELETED follows once every request the
    /// device took has completed and its IOThreads are released (QEMU's order).
    func deviceDel(_ idOrPath: String) throws(QMPError) {
        let (id, entry) = try device(named: idOrPath)
        try requireAttached(id, entry)
        entry.state = .unplugging
        unplugs[id] = spawn { [self] in
            do throws(DeviceError) {
                try await entry.device.detach()
            } catch {
                preconditionFailure("BUG DETECTED: unplugging device '\(id)' failed: \(error)")
            }
            assertOnMonitorThread()
            unplugs.removeValue(forKey: id)
            forgetDevice(id)
            emit("DEVICE_DELETED", .object([("device", .string(id)), ("path", .string(entry.qomPath))]))
        }
    }

    /// Moves every queue of the device to the IOThread `name`, live.
    func moveDevice(_ id: String, _ entry: DeviceEntry, to name: String) async throws(QMPError) {
        let t = try iothreadLink(name)
        try requireAttached(id, entry)
        entry.state = .moving
        defer { entry.state = .attached }
        do throws(DeviceError) {
            try await entry.device.move(to: t)
        } catch {
            throw QMPError(error.message)
        }
        assertOnMonitorThread()
    }

    /// Detaches every device (shutdown; no command runs and no unplug is left).
    func detachAllDevices() async {
        for id in deviceOrder {
            guard let entry = devices[id] else { continue }
            do throws(DeviceError) {
                try await entry.device.detach()
            } catch {
                preconditionFailure("BUG DETECTED: detaching device '\(id)' at shutdown failed: \(error)")
            }
        }
        devices.removeAll()
        deviceOrder.removeAll()
    }
}
