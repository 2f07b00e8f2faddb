// RLIMIT_NOFILE exhausted: creating an IOThread fails with a clear, typed error and leaves no
// thread and no descriptor behind (issue 7's fault list).
import Aio
import Glibc
import TestSupport
import Testing

@testable import IOThreads

@Suite("IOThread resource limits")
struct ResourceLimitTests {
    @Test("no descriptor left: IOThread creation throws .resource, and no thread or fd is left")
    func descriptorExhaustion() async {
        await #expect(processExitsWith: .success) {
            var limit = rlimit()
            getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
            limit.rlim_cur = rlim_t(procEntries("/proc/self/fd").count + 16)
            setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
            var fillers: [Int32] = []
            // The harness in this child may close a descriptor of its own meanwhile; refill
            // and retry, so only an IOThread that never fails fails the test.
            for attempt in 1...5 {
                while true {
                    let fd = open("/dev/null", O_RDONLY)
                    if fd < 0 { break }
                    fillers.append(fd)
                }
                // Reading /proc needs a descriptor itself: count with one filler closed.
                // Only new descriptors count: the harness may close one of its own meanwhile.
                func descriptorsWithOneSpare() -> Set<String> {
                    close(fillers.removeLast())
                    defer { fillers.append(open("/dev/null", O_RDONLY)) }
                    // "fd -> target": a leak shows even in a number a filler had before.
                    return contextDescriptors()
                }
                let fds = descriptorsWithOneSpare()
                do {
                    _ = try IOThread(id: "starved")
                    if attempt == 5 { exit(5) }
                    continue
                } catch let error as IOThreadError {
                    if error.kind != .resource || !error.message.contains("Failed to create AioContext for iothread 'starved'") {
                        exit(6)
                    }
                } catch {
                    exit(10)
                }
                if !descriptorsWithOneSpare().isSubset(of: fds) { exit(7) }
                close(fillers.removeLast())
                close(fillers.removeLast())
                let ioThreads = procEntries("/proc/self/task").filter { tid in
                    let fd = open("/proc/self/task/\(tid)/comm", O_RDONLY)
                    guard fd >= 0 else { return false }
                    defer { close(fd) }
                    var buf = [UInt8](repeating: 0, count: 32)
                    let n = read(fd, &buf, 32)
                    return n > 3 && buf[0] == UInt8(ascii: "I") && buf[1] == UInt8(ascii: "O") && buf[2] == UInt8(ascii: " ")
                }
                if !ioThreads.isEmpty { exit(8) }
                // With descriptors back, the same id works: nothing half-registered.
                for fd in fillers { close(fd) }
                let t = try? IOThread(id: "starved")
                if t == nil { exit(9) }
                exit(0)
            }
        }
    }
}
