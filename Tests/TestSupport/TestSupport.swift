// Helpers shared by the test targets that drive IOThreads and devices (IOThreadsTests,
// DevicesTests, VhostUserTests): one copy instead of one per target.
import Aio
import Devices
import Glibc
import IOThreads

/// The backends a test runs on: the automatic choice (io_uring where the kernel allows it)
/// and epoll; only epoll in the suite's DATAPLANE_FDMON=epoll pass.
public let backendsUnderTest: [AioContext.Backend] = {
    if let v = getenv("DATAPLANE_FDMON"), String(cString: v) == "epoll" { return [.epoll] }
    return [.automatic, .epoll]
}()

/// Waits (bounded, 10 s by default) until `condition` holds; returns whether it did.
public func eventually(seconds: Double = 10, _ condition: () -> Bool) -> Bool {
    let deadline = monotonicNanoseconds() + Int64(seconds * 1e9)
    while !condition() {
        if monotonicNanoseconds() > deadline { return false }
        usleep(200)
    }
    return true
}

/// An IOThread on `backend` with the given poll window.
public func makeIOThread(_ id: String, _ backend: AioContext.Backend, pollMaxNs: Int64 = 32768) throws -> IOThread {
    var p = IOThreadProperties()
    p.pollMaxNs = pollMaxNs
    return try IOThread(id: id, properties: p, backend: backend)
}

/// Polls the guest side until `n` completions arrived (or 10 s passed); returns how many.
public func reap(_ guest: GuestQueue, count n: Int, into body: (UInt64, UInt8, UInt32, Int) -> Void) -> Int {
    var got = 0
    let deadline = monotonicNanoseconds() + 10_000_000_000
    while got < n && monotonicNanoseconds() < deadline {
        got += guest.reap(body)
        if got < n { guest.waitForInterrupt(timeoutMs: 10) }
    }
    return got
}
