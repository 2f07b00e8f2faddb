// Signals during blocking waits: a wait ends with an event or at its deadline, never because
// a signal arrived (QEMU retries its io_uring wait for the same reason).
import CShims
import Glibc
import Synchronization
import Testing
import Uring

@testable import Aio

/// Deliveries of SIGUSR1 to the handler below (a lock-free add is async-signal-safe; relaxed:
/// a count, waited for by polling).
let signalsDelivered = Atomic<Int>(0)

/// Installs a SIGUSR1 handler without SA_RESTART, so that a blocked system call returns EINTR.
func installSignalCounter() {
    var sa = sigaction()
    sa.__sigaction_handler.sa_handler = { _ in signalsDelivered.add(1, ordering: .relaxed) }
    sigemptyset(&sa.sa_mask)
    sa.sa_flags = 0
    sigaction(SIGUSR1, &sa, nil)
}

/// The scheduler state of thread `tid` of this process ("R", "S", ...), from /proc.
func threadState(_ tid: Int32) -> Character? {
    let fd = open("/proc/self/task/\(tid)/stat", O_RDONLY)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var buf = [UInt8](repeating: 0, count: 512)
    let n = read(fd, &buf, buf.count)
    guard n > 0 else { return nil }
    // "tid (comm) S ...": the state follows the last ')' (the name may contain one).
    guard let close = buf[0..<n].lastIndex(of: UInt8(ascii: ")")), close + 2 < n else { return nil }
    return Character(UnicodeScalar(buf[close + 2]))
}

/// Unblocks SIGUSR1 on the calling thread. A thread started from a test inherits the signal
/// mask of the Swift concurrency thread that runs the test, which blocks it: a SIGUSR1 sent
/// there stays pending and interrupts nothing.
func acceptSignals() {
    var set = sigset_t()
    sigemptyset(&set)
    sigaddset(&set, SIGUSR1)
    pthread_sigmask(SIG_UNBLOCK, &set, nil)
}

/// Sends up to `count` SIGUSR1s to `thread` (kernel id `tid`), each once the thread sleeps in
/// the kernel and after the previous one was delivered; stops early when `done` says so.
/// Returns how many were delivered.
func signalWhileSleeping(_ thread: pthread_t, tid: Int32, count: Int, done: () -> Bool) -> Int {
    let first = signalsDelivered.load(ordering: .relaxed)
    var sent = 0
    let deadline = monotonicNanoseconds() + 20_000_000_000
    while sent < count && !done() && monotonicNanoseconds() < deadline {
        guard threadState(tid) == "S" else {
            usleep(100)
            continue
        }
        let before = signalsDelivered.load(ordering: .relaxed)
        pthread_kill(thread, SIGUSR1)
        sent += 1
        while signalsDelivered.load(ordering: .relaxed) == before && !done() && monotonicNanoseconds() < deadline {
            usleep(100)
        }
    }
    return signalsDelivered.load(ordering: .relaxed) - first
}

/// What one blocking poll on a signalled thread saw.
struct SignalledPoll {
    var progress: Bool
    var timerRuns: Int
    var blockingWaits: UInt64
    var queuedSQEs: UInt32
    var signalsDelivered: Int
}

/// On a thread of its own: arms a 500 ms timer, optionally queues a request (so the waiting
/// io_uring_enter also submits), runs one blocking poll, and meanwhile sends up to `signals`
/// SIGUSR1s, each while the thread sleeps in the kernel.
func blockingPollWhileSignalled(_ backend: AioContext.Backend, signals: Int, queueRequest: Bool) throws -> SignalledPoll {
    installSignalCounter()
    let tid = Atomic<Int32>(0)  // release/acquire: the thread is set up once it is published
    let outcome = Locked<SignalledPoll?>(nil)
    let thread = try spawn {
        acceptSignals()
        let ctx = try! AioContext(backend: backend)
        while ctx.poll(blocking: false) {}
        let runs = Local(0)
        let timer = ctx.makeTimer { runs.value += 1 }
        timer.arm(after: 500_000_000)
        while ctx.poll(blocking: false) {}
        if queueRequest {
            // Queued now, it reaches the kernel in the io_uring_enter that waits; an hour long,
            // it is still in flight when the context goes.
            ctx.submit(.timeout(nanoseconds: 3_600_000_000_000)) { _ in }
        }
        let queued = (ctx.monitor as? IOUringMonitor)?.ring.pendingSubmissions ?? 0
        let waits = ctx.statistics.blockingWaits
        tid.store(dp_gettid(), ordering: .releasing)
        let progress = ctx.poll(blocking: true)
        outcome.withLock {
            $0 = SignalledPoll(progress: progress, timerRuns: runs.value, blockingWaits: ctx.statistics.blockingWaits - waits,
                               queuedSQEs: queued, signalsDelivered: 0)
        }
    }
    while tid.load(ordering: .acquiring) == 0 { usleep(100) }
    let delivered = signalWhileSleeping(thread, tid: tid.load(ordering: .acquiring), count: signals) {
        outcome.withLock { $0 != nil }
    }
    pthread_join(thread, nil)
    var o = try #require(outcome.withLock { $0 })
    o.signalsDelivered = delivered
    return o
}

// Serialized: the tests share the process's SIGUSR1 handler and its counter.
@Suite("Signals during waits", .serialized)
struct SignalTests {
    @Test("signals during a blocking wait neither end it early nor lose the timer", .timeLimit(.minutes(1)),
          arguments: backends)
    func signalsDuringWait(_ backend: AioContext.Backend) throws {
        let o = try blockingPollWhileSignalled(backend, signals: 5, queueRequest: false)
        #expect(o.signalsDelivered >= 1, "signals reached the thread while it slept in the wait")
        #expect(o.progress && o.timerRuns == 1, "the one blocking poll returned with the timer fired")
        #expect(o.blockingWaits == 1)
    }

    @Test("a signal that interrupts a timed wait whose io_uring_enter also submitted SQEs does not end it early",
          .timeLimit(.minutes(1)), arguments: backends)
    func signalAfterSubmittingInTheSameEnter(_ backend: AioContext.Backend) throws {
        let o = try blockingPollWhileSignalled(backend, signals: 3, queueRequest: true)
        if backend != .epoll { #expect(o.queuedSQEs > 0, "the waiting enter had SQEs to submit") }
        #expect(o.signalsDelivered >= 1, "a signal reached the thread while it slept in the wait")
        #expect(o.progress && o.timerRuns == 1, "the one blocking poll returned with the timer fired, not at a signal")
        #expect(o.blockingWaits == 1)
    }
}
