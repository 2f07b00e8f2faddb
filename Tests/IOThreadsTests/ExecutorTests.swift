import Aio
import Glibc
import Synchronization
import TestSupport
import Testing

@testable import IOThreads

/// An actor that lives on an IOThread.
actor Counter {
    let thread: IOThread
    var value = 0
    nonisolated var unownedExecutor: UnownedSerialExecutor { thread.asUnownedSerialExecutor() }

    init(on thread: IOThread) { self.thread = thread }

    func increment() -> (Int, Bool) {
        value += 1
        return (value, thread.context.isOnHomeThread)
    }
}

@Suite("IOThread as a Swift executor")
struct ExecutorTests {
    @Test("an actor pinned to an IOThread runs there, serially", .timeLimit(.minutes(1)))
    func actorRunsOnIOThread() async throws {
        let t = try IOThread(id: "actor-home")
        let counter = Counter(on: t)
        try await withThrowingTaskGroup(of: Bool.self) { group in
            for _ in 0..<100 {
                group.addTask { await counter.increment().1 }
            }
            for try await onIOThread in group { #expect(onIOThread) }
        }
        #expect(await counter.value == 100)
        try t.stop()
    }

    @Test("a BH on the IOThread may assume the isolation of an actor pinned to it",
          .timeLimit(.minutes(1)))
    func assumeIsolatedFromBH() async throws {
        let t = try IOThread(id: "assume")
        let counter = Counter(on: t)
        let result = Locked<Int?>(nil)
        t.context.scheduleOneShot {
            let v = counter.assumeIsolated { c in
                c.value += 41
                return c.value
            }
            result.withLock { $0 = v }
        }
        #expect(eventually { result.withLock { $0 } != nil })
        #expect(result.withLock { $0 } == 41)
        #expect(await counter.increment().0 == 42)
        try t.stop()
    }

    @Test("a task that prefers the IOThread runs its synchronous parts there", .timeLimit(.minutes(1)))
    func taskExecutorPreference() async throws {
        let t = try IOThread(id: "task-pref")
        let ctx = t.context!
        let onThread = await Task(executorPreference: t) { ctx.isOnHomeThread }.value
        #expect(onThread)
        let viaGroup = await withTaskGroup(of: Bool.self) { group in
            group.addTask(executorPreference: t) { ctx.isOnHomeThread }
            return await group.next()!
        }
        #expect(viaGroup)
        try t.stop()
    }
}

@Suite("IOThread lifecycle")
struct LifecycleTests {
    @Test("creating, using and destroying 200 IOThreads leaves no thread and no descriptor behind")
    func noThreadOrFdLeft() async {
        // In a child process, so that tests running in parallel do not move the counts.
        await #expect(processExitsWith: .success) {
            func count(_ dir: String) -> Int {
                guard let d = opendir(dir) else { return -1 }
                defer { closedir(d) }
                var n = 0
                while readdir(d) != nil { n += 1 }
                return n
            }
            // Warm up the runtime's own lazily created threads and descriptors first.
            for i in 0..<3 { try! IOThread(id: "warm\(i)").stop() }
            var clean = false
            for _ in 0..<3 where !clean {
                let threads = count("/proc/self/task"), fds = count("/proc/self/fd")
                for i in 0..<200 {
                    let t = try! IOThread(id: "t\(i)")
                    let ran = Atomic<Bool>(false)
                    t.context.scheduleOneShot { ran.store(true, ordering: .releasing) }
                    while !ran.load(ordering: .acquiring) { usleep(50) }
                    try t.stop()
                }
                clean = count("/proc/self/task") == threads && count("/proc/self/fd") == fds
            }
            if !clean { exit(3) }
        }
    }

    @Test("stopping an IOThread from its own thread crashes with a message")
    func stopFromOwnThread() async {
        let result = await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            let t = try! IOThread(id: "selfstop")
            let box = Unmanaged.passRetained(t)
            t.context.scheduleOneShot { try! box.takeUnretainedValue().stop() }
            sleep(10)
        }
        let stderr = String(decoding: result?.standardErrorContent ?? [], as: UTF8.self)
        #expect(stderr.contains("BUG DETECTED: IOThread 'selfstop' stopped from its own thread"))
    }
}
