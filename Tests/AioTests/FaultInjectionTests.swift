// Faults injected for real: a seccomp filter refusing io_uring_setup (what container
// runtimes do), a descriptor limit, a completion-queue overflow (signals during waits are in
// SignalTests).
import CShims
import Glibc
import Synchronization
import TestSupport
import Testing
import Uring

@testable import Aio

@Suite("Fault injection")
struct FaultInjectionTests {
    @Test("io_uring missing (ENOSYS) is explained and falls back too")
    func enosys() async {
        await #expect(processExitsWith: .success) {
            unsetenv("DATAPLANE_FDMON")  // the make test pass that forces epoll would hide the fallback
            guard dp_deny_io_uring_setup(ENOSYS) == 0 else { exit(4) }
            let ctx = try! AioContext()
            if ctx.backendKind != .epoll || ctx.fallbackReason?.contains("no io_uring") != true { exit(5) }
        }
    }

    @Test("io_uring refused (EPERM, as container runtimes do) falls back to epoll, whose I/O works")
    func epermFallbackDoesIO() async {
        await #expect(processExitsWith: .success) {
            unsetenv("DATAPLANE_FDMON")
            guard dp_deny_io_uring_setup(EPERM) == 0 else { exit(4) }
            let ctx = try! AioContext()
            if ctx.backendKind != .epoll || ctx.fallbackReason == nil { exit(5) }
            // Completion I/O through the worker pool: a read of a real file.
            guard let fd = anonymousFile(size: 0) else { exit(6) }
            let pattern = [UInt8](repeating: 0x5a, count: 4096)
            if pwrite(fd, pattern, pattern.count, 0) != pattern.count { exit(7) }
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
            defer { buffer.deallocate() }
            let result = Local<Int32?>(nil)
            ctx.submit(.read(fd: fd, buffer: buffer, offset: 0)) { result.value = $0 }
            let deadline = monotonicNanoseconds() + 10_000_000_000
            while result.value == nil && monotonicNanoseconds() < deadline { ctx.poll(blocking: true) }
            if result.value != 4096 || !buffer.elementsEqual(pattern) { exit(8) }
            close(fd)
        }
    }

    @Test("out of descriptors: creating a context fails with a typed error and leaves nothing behind")
    func descriptorLimit() async {
        await #expect(processExitsWith: .success) {
            // Use up every descriptor below a lowered limit.
            var limit = rlimit()
            getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
            let highest = openFileDescriptorCount() + 16
            limit.rlim_cur = rlim_t(highest)
            setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
            let fillers = DescriptorFillers()
            // No descriptor at all, then exactly one: the eventfd fits, the ring and the epoll
            // instance do not. A creation that succeeded because the harness freed a slot is
            // retried after filling it (a context that always succeeds still fails the test).
            for spare in 0...1 {
                var attempts = 0
                while true {
                    attempts += 1
                    let before = fillers.contextDescriptorsWithOneSpare(orExit: 10)
                    var freed: Int32 = -1
                    if spare == 1 { freed = fillers.freeOne() ?? -1 }
                    do {
                        _ = try AioContext()
                        if attempts == 5 { exit(5) }
                        continue
                    } catch let error as AioError {
                        if error.code != .resourceUnavailable || error.errno != EMFILE { exit(6) }
                    } catch {
                        exit(9)
                    }
                    // Nothing half-made: the one free descriptor, which the eventfd took, is
                    // free again (or held by the harness, as no kind of descriptor a context
                    // makes), and no context-kind descriptor appeared anywhere else.
                    if freed >= 0 && isContextDescriptor(freed) { exit(8) }
                    if !fillers.contextDescriptorsWithOneSpare(orExit: 10).isSubset(of: before) { exit(7) }
                    break
                }
            }
        }
    }

    @Test("EINTR, EAGAIN and EBUSY from io_uring_enter are retried: every request, timer and BH runs once",
          .enabled(if: backends.contains(.ioUring), "io_uring-only: the ring's own enter errors (epoll's EINTR is the signals test)"),
          .timeLimit(.minutes(1)))
    func enterErrorsAreRetried() throws {
        let ctx = try makeContext(.ioUring)
        let monitor = try #require(ctx.monitor as? IOUringMonitor)
        // The next 60 enters, submits and waits alike, are refused.
        let faults = Array(repeating: [EINTR, EAGAIN, EBUSY], count: 20).flatMap { $0 }
        monitor.ring.injectedEnterErrors = faults
        let n = 1000  // four times the SQ: it fills while the kernel refuses to drain it
        let counts = Local([Int](repeating: 0, count: n))
        let results = Local(Set<Int32>())
        for i in 0..<n {
            ctx.submit(.nop) { rc in
                counts.value[i] += 1
                results.value.insert(rc)
            }
        }
        #expect(monitor.backlog.count > monitor.backlogStart, "requests waited in the backlog, none failed")
        let timerFired = Local(0), bhRan = Local(0)
        let timer = ctx.makeTimer { timerFired.value += 1 }
        timer.arm(after: 1_000_000)
        ctx.scheduleOneShot { bhRan.value += 1 }
        let deadline = monotonicNanoseconds() + 20_000_000_000
        while (counts.value.contains(0) || timerFired.value == 0) && monotonicNanoseconds() < deadline {
            ctx.poll(blocking: true)
        }
        #expect(monitor.ring.injectedEnterErrors.isEmpty, "every injected fault was met")
        #expect(counts.value.allSatisfy { $0 == 1 }, "each request completed exactly once")
        #expect(results.value == [0], "and successfully")
        #expect(timerFired.value == 1 && bhRan.value == 1)
        #expect(ctx.pendingRequests == 0)
    }

    @Test("a completion-queue overflow loses no completion", arguments: backends)
    func completionQueueOverflow(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        let done = Local(0)
        // More than the CQ holds (512 with a 256-entry SQ), submitted without reaping.
        for _ in 0..<3000 { ctx.submit(.nop) { _ in done.value += 1 } }
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while done.value < 3000 && monotonicNanoseconds() < deadline { ctx.poll(blocking: true) }
        #expect(done.value == 3000)
        #expect(ctx.pendingRequests == 0)
    }
}
