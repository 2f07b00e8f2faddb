// The worker pool that runs completion I/O on the epoll backend (QEMU's thread pool).
import Glibc
import Synchronization
import Testing

@testable import Aio

@Suite("Worker pool")
struct WorkerPoolTests {
    @Test("file I/O through the worker pool leaves adaptive polling on", arguments: backends)
    func fileIOKeepsPollingOn(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        ctx.setPollParameters(PollParameters(maxNs: 1_000_000_000))
        let file = try TemporaryFile(bytes: [UInt8](repeating: 7, count: 4096))
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { buffer.deallocate() }
        let result = Local<Int32?>(nil)
        ctx.submit(.read(fd: file.fd, buffer: buffer, offset: 0)) { result.value = $0 }
        run(ctx) { result.value != nil }
        #expect(result.value == 4096)

        // A handler that fired once is polled from then on, so work that appears without an
        // fd event is found by polling and runs through poll-ready.
        let n = try EventNotifier()
        let pending = Local(0), reads = Local(0), readyRuns = Local(0)
        ctx.setEventNotifier(n, FDHandlerCallbacks(
            read: { reads.value += 1 },
            poll: { pending.value > 0 },
            pollReady: { readyRuns.value += 1; pending.value = 0 }))
        n.set()
        run(ctx) { reads.value == 1 }
        // Bounds the blocking poll below if it does not poll (then it waits for this timer).
        let timer = ctx.makeTimer {}
        timer.arm(after: 1_000_000_000)
        while ctx.poll(blocking: false) {}
        let hits = ctx.statistics.pollHits
        pending.value = 1
        #expect(ctx.poll(blocking: true))
        #expect(readyRuns.value == 1, "found by polling")
        #expect(ctx.statistics.pollHits > hits)
        timer.cancel()
        ctx.removeEventNotifier(n)
    }
}
