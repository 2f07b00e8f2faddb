// fds that poll(2) answers without waiting: a regular file (always ready) and a number that is
// not an open descriptor (never ready). Both backends treat them alike.
import Glibc
import Testing

@testable import Aio

@Suite("fd handlers: the same answer on both backends")
struct BackendParityTests {
    @Test("a regular file is always ready: its read handler runs once per blocking poll", arguments: backends)
    func regularFileIsAlwaysReady(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        let file = try TemporaryFile(bytes: [1, 2, 3])
        let reads = Local(0)
        ctx.setFDHandler(file.fd, FDHandlerCallbacks(read: { reads.value += 1 }))
        // Bounds a blocking poll that would wait for a file that never becomes "readable".
        let timer = ctx.makeTimer {}
        timer.arm(after: 1_000_000_000)
        ctx.poll(blocking: false)
        let base = reads.value
        for i in 1...3 {
            #expect(ctx.poll(blocking: true))
            try #require(reads.value == base + i, "poll \(i)")
        }
        ctx.removeFDHandler(file.fd)
        timer.cancel()
    }

    @Test("a number that is no open descriptor never fires and does not keep the loop busy", arguments: backends)
    func closedDescriptorNeverFires(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        let fd = Int32.max - 1  // above any descriptor limit
        let calls = Local(0)
        ctx.setFDHandler(fd, FDHandlerCallbacks(read: { calls.value += 1 }))
        for _ in 0..<3 { ctx.poll(blocking: false) }  // registered and refused
        let enters = ctx.monitor.ringEnters
        for _ in 0..<20 { #expect(!ctx.poll(blocking: false)) }
        // (Read first: the monitor holds a ~Copyable ring, which #expect cannot reflect.)
        let entersAfter = ctx.monitor.ringEnters
        #expect(entersAfter == enters, "no re-arm per iteration")
        #expect(calls.value == 0)
        ctx.removeFDHandler(fd)
    }
}
