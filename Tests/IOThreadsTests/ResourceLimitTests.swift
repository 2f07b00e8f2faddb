// RLIMIT_NOFILE exhausted: creating an IOThread fails with a clear, typed error and leaves no
// thread and no descriptor behind (issue 7's fault list).
import Aio
import Glibc
import TestSupport
import Testing

@testable import IOThreads

@Suite("IOThread resource limits")
struct ResourceLimitTests {
    @Test("no descriptor left: IOThread creation throws .resource, leaves no thread or fd, and the registry does not keep the id")
    func descriptorExhaustion() async {
        await #expect(processExitsWith: .success) {
            var limit = rlimit()
            getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
            limit.rlim_cur = rlim_t(procEntries("/proc/self/fd").count + 16)
            setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
            let fillers = DescriptorFillers()
            let registry = IOThreadRegistry()
            // The harness in this child may close a descriptor of its own meanwhile, and a
            // creation may then succeed: refill and retry, so only an IOThread that never fails
            // fails the test.
            for attempt in 1...5 {
                let fds = fillers.contextDescriptorsWithOneSpare(orExit: 11)
                do {
                    _ = try registry.create(id: "starved")
                    if attempt == 5 { exit(5) }
                    try? registry.remove("starved")
                    continue
                } catch let error as IOThreadError {
                    if error.kind != .resource || !error.message.contains("Failed to create AioContext for iothread 'starved'") {
                        exit(6)
                    }
                } catch {
                    exit(13)
                }
                if !fillers.contextDescriptorsWithOneSpare(orExit: 11).isSubset(of: fds) { exit(7) }
                if registry.lookup("starved") != nil || !registry.all.isEmpty { exit(8) }  // nothing half-registered
                fillers.closeAll()
                if threadsNamed("IO starved") != 0 { exit(9) }
                // With descriptors back, the same id is free in the registry and works.
                guard let t = try? registry.create(id: "starved") else { exit(10) }
                if registry.lookup("starved") !== t { exit(12) }
                registry.removeAll()
                exit(0)
            }
        }
    }
}
