import Aio
import Glibc
import IOThreads
import Synchronization
import TestSupport
import Testing

@testable import Devices

@Suite("Devices: backends and requests")
struct BackendTests {
    @Test("backend strings parse, and bad ones are refused with a clear message")
    func parsing() throws {
        #expect(try BlockBackend(parsing: "null") == .null)
        #expect(try BlockBackend(parsing: "nop") == .nop)
        #expect(try BlockBackend(parsing: "file:/tmp/x") == .file(path: "/tmp/x", direct: false))
        #expect(try BlockBackend(parsing: "file+direct:/tmp/x") == .file(path: "/tmp/x", direct: true))
        #expect(try BlockBackend(parsing: "delay:100us") == .delay(nanoseconds: 100_000))
        #expect(try BlockBackend(parsing: "delay:2ms") == .delay(nanoseconds: 2_000_000))
        #expect(throws: DeviceError("unknown backend 'floppy': expected null, nop, file:PATH or delay:DURATION")) {
            try BlockBackend(parsing: "floppy")
        }
        #expect(throws: DeviceError("backend 'delay:' needs a duration such as 100us, 2ms or 1s")) {
            try BlockBackend(parsing: "delay:soon")
        }
        #expect(throws: DeviceError("backend 'file:' needs a path")) { try BlockBackend(parsing: "file:") }
    }

    @Test("null, nop and delay complete every request with status OK", .timeLimit(.minutes(1)),
          arguments: backendsUnderTest, [BlockBackend.null, .nop, .delay(nanoseconds: 200_000)])
    func completes(_ fdmon: AioContext.Backend, _ backend: BlockBackend) async throws {
        let t = try makeIOThread("io", fdmon)
        let dev = try VirtioBlkDevice(id: "disk0", queueSize: 64, backend: backend)
        try await dev.attach(to: t)
        let guest = try GuestQueue(device: dev, queue: 0)
        for id in 0..<UInt64(guest.capacity) { guest.submit(id: id) }
        var seen = Set<UInt64>()
        var statuses = Set<UInt8>()
        let n = reap(guest, count: guest.capacity) { id, status, len, _ in
            seen.insert(id)
            statuses.insert(status)
            #expect(len == 4097, "4 KiB read plus the status byte")
        }
        #expect(n == guest.capacity)
        #expect(seen.count == guest.capacity)
        #expect(statuses == [VirtioBlk.statusOK])
        #expect(guest.unexpectedCompletions == 0)
        try await dev.detach()
        try t.stop()
    }

    @Test("the file backend writes a pattern and reads it back", .timeLimit(.minutes(1)),
          arguments: backendsUnderTest)
    func fileRoundTrip(_ fdmon: AioContext.Backend) async throws {
        var template = Array("/tmp/dataplane-disk-XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        let path = String(cString: template)
        defer { close(fd); unlink(path) }
        #expect(ftruncate(fd, 1 << 20) == 0)
        let t = try makeIOThread("io", fdmon)
        let dev = try VirtioBlkDevice(id: "disk0", queueSize: 64, backend: .file(path: path, direct: false))
        try await dev.attach(to: t)
        let guest = try GuestQueue(device: dev, queue: 0)
        func pattern(_ sector: UInt64) -> [UInt8] { (0..<4096).map { UInt8(truncatingIfNeeded: Int(sector) &* 31 &+ $0) } }
        let sectors: [UInt64] = [0, 8, 64, 1000]
        for (i, s) in sectors.enumerated() {
            guest.submit(id: UInt64(i), type: VirtioBlk.typeOut, sector: s) { buf in
                pattern(s).withUnsafeBytes { buf.copyMemory(from: $0) }
            }
        }
        var writeStatus: [UInt8] = []
        _ = reap(guest, count: sectors.count) { _, status, _, _ in writeStatus.append(status) }
        #expect(writeStatus == [0, 0, 0, 0])
        guest.submit(id: 99, type: VirtioBlk.typeFlush)
        var flushStatus: UInt8 = 0xFF
        _ = reap(guest, count: 1) { _, status, _, _ in flushStatus = status }
        #expect(flushStatus == VirtioBlk.statusOK)
        // The host file holds the pattern.
        var onDisk = [UInt8](repeating: 0, count: 4096)
        #expect(pread(fd, &onDisk, 4096, 64 * 512) == 4096)
        #expect(onDisk == pattern(64))
        // Read back through the device.
        for (i, s) in sectors.enumerated() { guest.submit(id: UInt64(100 + i), type: VirtioBlk.typeIn, sector: s) }
        var ok = 0
        _ = reap(guest, count: sectors.count) { id, status, _, slot in
            let s = sectors[Int(id) - 100]
            if status == 0 && Array(guest.data(slot: slot)) == pattern(s) { ok += 1 }
        }
        #expect(ok == sectors.count)
        try await dev.detach()
        try t.stop()
    }

    @Test("GET_ID returns the device id; an unknown type gets UNSUPP", .timeLimit(.minutes(1)))
    func getIDAndUnsupported() async throws {
        let t = try makeIOThread("io", .automatic)
        let dev = try VirtioBlkDevice(id: "disk7", queueSize: 64)
        try await dev.attach(to: t)
        let guest = try GuestQueue(device: dev, queue: 0)
        guest.submit(id: 1, type: VirtioBlk.typeGetID)
        guest.submit(id: 2, type: 77)
        var results: [UInt64: (UInt8, String)] = [:]
        _ = reap(guest, count: 2) { id, status, _, slot in
            let text = String(decoding: guest.data(slot: slot).prefix(while: { $0 != 0 }).prefix(20), as: UTF8.self)
            results[id] = (status, text)
        }
        #expect(results[1]?.0 == VirtioBlk.statusOK && results[1]?.1 == "disk7")
        #expect(results[2]?.0 == VirtioBlk.statusUnsupported)
        try await dev.detach()
        try t.stop()
    }

    @Test("a hostile chain (address outside guest memory, loops) is refused and the device keeps working",
          .timeLimit(.minutes(1)), arguments: backendsUnderTest)
    func hostileChains(_ fdmon: AioContext.Backend) async throws {
        let t = try makeIOThread("io", fdmon)
        let dev = try VirtioBlkDevice(id: "disk0", queueSize: 16)
        try await dev.attach(to: t)
        let guest = try GuestQueue(device: dev, queue: 0)
        let ring = guest.ring
        // Descriptor 0: header far outside guest memory, with a good status byte.
        // Descriptors 3-4: a loop.
        let statusAddr = guest.dataAddr(1)
        guest.memory.pointer(at: statusAddr, length: 1)!.storeBytes(of: 0xFF, as: UInt8.self)
        ring.setDescriptor(0, addr: 1 << 40, len: 16, flags: SplitRingLayout.descNext, next: 1)
        ring.setDescriptor(1, addr: statusAddr, len: 1, flags: SplitRingLayout.descWrite, next: 0)
        ring.setDescriptor(3, addr: guest.dataAddr(0), len: 16, flags: SplitRingLayout.descNext, next: 4)
        ring.setDescriptor(4, addr: guest.dataAddr(0), len: 16, flags: SplitRingLayout.descNext, next: 3)
        ring.setAvailEntry(0, 0)
        ring.setAvailEntry(1, 3)
        ring.publishAvailIdx(2)
        dev.notifiers(queue: 0).kick.set()
        #expect(eventually { dev.statistics(queue: 0).completions == 2 })
        #expect(ring.usedIdx == 2)
        #expect(ring.usedEntry(0).len == 1, "IOERR in the status byte, nothing else written")
        #expect(guest.memory.pointer(at: statusAddr, length: 1)!.load(as: UInt8.self) == VirtioBlk.statusIOErr)
        #expect(ring.usedEntry(1).len == 0, "the loop has no trustworthy status byte: handed back")
        #expect(dev.statistics(queue: 0).malformed == 2)
        // The device keeps working: a well-formed request completes right after the hostile
        // ones, and again after a re-attach (which resumes at the next avail entry). The
        // guest driver carries on after the two entries posted by hand.
        guest.availIdx = ring.availIdx
        guest.lastUsed = ring.usedIdx
        func readCompletes(_ id: UInt64) -> Bool {
            guest.submit(id: id)
            var done: [(UInt64, UInt8, UInt32)] = []
            _ = reap(guest, count: 1) { id, status, len, _ in done.append((id, status, len)) }
            return done.count == 1 && done[0].0 == id && done[0].1 == VirtioBlk.statusOK && done[0].2 == 4097
        }
        #expect(readCompletes(10), "a read right after the hostile chains")
        try await dev.detach()
        try await dev.attach(to: t)
        #expect(readCompletes(11), "a read after a re-attach")
        #expect(ring.usedIdx == 4 && guest.unexpectedCompletions == 0)
        try await dev.detach()
        try t.stop()
    }
}

