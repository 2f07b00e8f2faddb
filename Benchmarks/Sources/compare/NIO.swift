// The second reference for W1, W2 and W5: SwiftNIO's MultiThreadedEventLoopGroup (one
// event loop thread; epoll, no busy polling), driven the way an application would:
// `execute` for cross-thread work, `scheduleTask(deadline:)` for timers.
import Aio
import Glibc
import NIOCore
import NIOPosix
import Synchronization

final class Flag: Sendable {
    let value = Atomic<Bool>(false)
}

func withEventLoop<T>(_ body: (EventLoop) throws -> T) throws -> T {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    defer { try? group.syncShutdownGracefully() }
    let loop = group.next()
    // Let the thread start before measuring.
    try loop.submit {}.wait()
    return try body(loop)
}

// W1: the client schedules `execute` that sets a flag; the client spins on it.
func nioW1() throws -> [String: Double] {
    try withEventLoop { loop in
        let flag = Flag()
        let warm = 20_000, n = 200_000
        var samples = [Int64](repeating: 0, count: n)
        for i in 0..<(warm + n) {
            flag.value.store(false, ordering: .relaxed)
            let t0 = monotonicNanoseconds()
            loop.execute { flag.value.store(true, ordering: .releasing) }
            while !flag.value.load(ordering: .acquiring) {}
            if i >= warm { samples[i - warm] = monotonicNanoseconds() - t0 }
        }
        samples.sort()
        return ["p50": percentile(samples, 0.5), "p99": percentile(samples, 0.99), "p999": percentile(samples, 0.999)]
    }
}

// W2: one producer hands 2M closures to `execute`; the event loop runs them.
func nioW2() throws -> [String: Double] {
    try withEventLoop { loop in oneShotThroughput { loop.execute($0) } }
}

// W5: 10k `scheduleTask(deadline:)` timers, deadlines uniform in 0–10 ms after a 20 ms lead,
// armed on the loop (as Dataplane's are).
func nioW5() throws -> [String: Double] {
    try withEventLoop { loop in
        let n = 10_000
        final class Results: @unchecked Sendable {  // written on the loop only, read after `done`
            var late = [Int64](repeating: 0, count: 10_000)
            var fired = 0
            var armNs: Int64 = 0
        }
        let results = Results()
        let done = Flag()
        var rng = SystemRandomNumberGenerator()
        let offsets = (0..<n).map { _ in Int64.random(in: 0..<10_000_000, using: &rng) }
        loop.execute {
            let start = NIODeadline.now().uptimeNanoseconds + 20_000_000
            for i in 0..<n {
                let deadline = start + UInt64(offsets[i])
                loop.scheduleTask(deadline: .uptimeNanoseconds(deadline)) {
                    results.late[i] = Int64(NIODeadline.now().uptimeNanoseconds) - Int64(deadline)
                    results.fired += 1
                    if results.fired == n { done.value.store(true, ordering: .releasing) }
                }
            }
            results.armNs = Int64(NIODeadline.now().uptimeNanoseconds) - Int64(start - 20_000_000)
        }
        while !done.value.load(ordering: .acquiring) { usleep(1000) }
        let sorted = results.late.sorted()
        return ["p50": percentile(sorted, 0.5), "p99": percentile(sorted, 0.99), "max": Double(sorted.last!),
                "arm_ns": Double(results.armNs)]
    }
}

/// The SwiftNIO version this was built with, from Package.resolved (run from Benchmarks/).
let nioVersion: String = {
    guard let f = fopen("Package.resolved", "r") else { return "(version unknown)" }
    defer { fclose(f) }
    var bytes: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = fread(&buf, 1, buf.count, f)
        if n <= 0 { break }
        bytes += buf[0..<n]
    }
    let text = String(decoding: bytes, as: UTF8.self)
    guard let at = text.range(of: "apple/swift-nio\""), let v = text[at.upperBound...].range(of: "\"version\" : \"")
    else { return "(version unknown)" }
    return String(text[v.upperBound...].prefix(while: { $0 != "\"" }))
}()
