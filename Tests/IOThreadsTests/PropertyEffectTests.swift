// The properties that steer the engine rather than polling: aio-max-batch and the worker
// pool's bounds (QEMU's event-loop-base properties). Each test shows the effect with counts:
// SQEs per io_uring_enter, and worker threads in /proc/self/task by name.
import Aio
import Glibc
import Synchronization
import TestSupport
import Testing

@testable import IOThreads

/// Whether this kernel gives us io_uring (the automatic backend would use it).
let ioUringAvailable: Bool = (try? AioContext(backend: .ioUring)) != nil

/// Threads of this process named `name` (/proc/self/task/*/comm).
func threadsNamed(_ name: String) -> Int {
    procEntries("/proc/self/task").filter { threadName(Int32($0) ?? -1) == name }.count
}

/// Runs `count` requests made by `request` on the IOThread, all submitted from one BH, and
/// waits until every one completed; returns their results.
func submitBatch(on t: IOThread, count: Int, _ request: @escaping @Sendable (Int) -> IORequest) -> [Int32] {
    let results = Locked<[Int32]>([])
    runOn(t) {}  // property changes made before this call apply from the next iteration
    let ctx = t.context!
    t.context.scheduleOneShot {
        for i in 0..<count {
            ctx.submit(request(i)) { rc in results.withLock { $0.append(rc) } }
        }
    }
    _ = eventually { results.withLock { $0.count } == count }
    return results.withLock { $0 }
}

@Suite("IOThread properties that steer the engine")
struct PropertyEffectTests {
    @Test("aio-max-batch bounds the SQEs one io_uring_enter submits, and applies live",
          .timeLimit(.minutes(1)), .enabled(if: ioUringAvailable, "io_uring is refused here: no submission batches"))
    func aioMaxBatchBoundsSubmissions() throws {
        let t = try IOThread(id: "batch", backend: .ioUring)
        defer { try? t.stop() }
        try t.setProperty("aio-max-batch", to: 8)
        let bounded = submitBatch(on: t, count: 64) { _ in .nop }
        #expect(bounded.count == 64 && bounded.allSatisfy { $0 == 0 })
        let largestBounded = t.statistics.largestSubmissionBatch
        #expect(largestBounded >= 1 && largestBounded <= 8, "64 nops from one BH went at most 8 per enter")

        try t.setProperty("aio-max-batch", to: 0)  // the engine's default: no bound but the SQ
        let unbounded = submitBatch(on: t, count: 64) { _ in .nop }
        #expect(unbounded.count == 64)
        #expect(t.statistics.largestSubmissionBatch >= 64, "back to one enter for the whole batch")
    }

    @Test("thread-pool-min and thread-pool-max resize the worker pool live")
    func threadPoolBoundsApplyLive() async {
        await #expect(processExitsWith: .success) {
            // The worker pool runs completion I/O on the epoll backend.
            let t = try! IOThread(id: "pool", backend: .epoll)
            guard let fd = anonymousFile(size: 4096) else { exit(2) }
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
            let address = UInt(bitPattern: buffer.baseAddress)
            func read(_ n: Int) -> [Int32] {
                submitBatch(on: t, count: n) { _ in
                    .read(fd: fd, buffer: UnsafeMutableRawBufferPointer(start: UnsafeMutableRawPointer(bitPattern: address), count: 4096),
                          offset: 0)
                }
            }
            if read(1) != [4096] { exit(3) }  // the pool exists from the first file I/O on
            try! t.setProperty("thread-pool-min", to: 3)
            if !eventually({ threadsNamed("worker") == 3 }) { exit(4) }  // grew to the minimum
            try! t.setProperty("thread-pool-min", to: 1)
            try! t.setProperty("thread-pool-max", to: 2)
            if !eventually({ threadsNamed("worker") <= 2 }) { exit(5) }  // shrank to the maximum
            if read(16) != [Int32](repeating: 4096, count: 16) { exit(6) }
            if threadsNamed("worker") > 2 { exit(7) }  // a burst stays within it
            try! t.stop()
        }
    }
}
