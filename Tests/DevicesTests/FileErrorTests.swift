import Aio
import IOThreads
import TestSupport
import Testing

@testable import Devices

@Suite("Devices: backend errors")
struct FileErrorTests {
    @Test("a write error reaches the guest as IOERR and the device keeps working",
          .timeLimit(.minutes(1)), arguments: backendsUnderTest)
    func writeErrorsAreReported(_ fdmon: AioContext.Backend) async throws {
        // /dev/full: every write fails with ENOSPC, reads return zeros.
        let t = try makeIOThread("io", fdmon)
        let dev = try VirtioBlkDevice(id: "disk0", queueSize: 16, backend: .file(path: "/dev/full", direct: false))
        try await dev.attach(to: t)
        let guest = try GuestQueue(device: dev, queue: 0)
        guest.submit(id: 1, type: VirtioBlk.typeOut)
        var status: [UInt64: UInt8] = [:]
        _ = reap(guest, count: 1) { id, s, _, _ in status[id] = s }
        #expect(status[1] == VirtioBlk.statusIOErr)
        guest.submit(id: 2, type: VirtioBlk.typeIn)
        _ = reap(guest, count: 1) { id, s, _, _ in status[id] = s }
        #expect(status[2] == VirtioBlk.statusOK)
        try await dev.detach()
        try t.stop()
    }
}
