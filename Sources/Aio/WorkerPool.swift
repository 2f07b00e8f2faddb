// The worker pool that runs completion I/O for contexts on the epoll backend.
//
// Design note. QEMU's thread pool (util/thread-pool.c), reduced to what we need: requests go
// on a mutex-protected queue and a condition variable wakes one idle worker; a worker does the
// blocking pread/pwrite/fsync, puts (user_data, result) on the done queue and sets the pool's
// event notifier (only when the queue was empty), whose handler on the home thread hands the
// results to the loop. Requests still queued when the context goes away are dropped without
// their callbacks, as io_uring drops them.
//
// Sizing is QEMU's, live (`thread-pool-min`, `thread-pool-max`): a request that finds no idle
// worker starts one while there are fewer than `maxThreads`; new limits start workers up to
// `minThreads` at once and wake the idle ones so that those above `maxThreads` exit; a worker
// idle for `idleTimeoutNanoseconds` (QEMU: 10 s) exits while there are more than
// `minThreads`. Workers are named "worker", as QEMU's are. A worker that exited on its own is
// joined by the home thread the next time it touches the pool, and every other one when the
// context goes away, so no thread outlives its pool.
//
// The one rule that makes it safe: a worker never touches the context, only the pool and
// its notifier, which it keeps alive itself. (Scheduling a BH from a worker would retain the
// context for the duration of the call; if the home thread dropped its last reference
// meanwhile, the context's deinit — which joins the workers — would run on a worker and
// join itself. Found by a repro that destroyed contexts while their workers finished.)
import CShims
import Glibc
import Synchronization

/// `@unchecked Sendable`: every `var` is read and written only with `mutex` held (C-style
/// rather than a `Locked` value, because idle workers wait on `wakeUp` with that mutex); the
/// `let`s are immutable or synchronise themselves (`done` is a `Locked`, `hasResults` an
/// atomic, the notifier a kernel object).
final class WorkerPool: @unchecked Sendable {
    struct Job {
        let request: IORequest
        let userData: UInt64
    }

    /// How long a worker waits for a request before it exits (when above `minThreads`).
    /// QEMU's is 10 s; tests lower it. Read relaxed: a stale value only changes one wait.
    static let idleTimeoutNanoseconds = Atomic<Int64>(10_000_000_000)

    let mutex: UnsafeMutablePointer<pthread_mutex_t>
    /// Signalled for a new request, new limits, a worker that exits, and stop.
    /// On CLOCK_MONOTONIC, so the idle timeout does not move with the wall clock.
    let wakeUp: UnsafeMutablePointer<pthread_cond_t>

    // Guarded by `mutex`.
    var queue: [Job] = []
    var queueHead = 0
    var minThreads = 0
    var maxThreads = 64
    /// Workers started and not yet exited, and how many of them wait for a request.
    var curThreads = 0
    var idleThreads = 0
    var stopping = false
    /// Every worker not yet joined; `exited` are those among them that ended on their own.
    var unjoined: [pthread_t] = []
    var exited: [pthread_t] = []
    /// For tests: the most workers there ever were at once, and how many idle waits timed out.
    var peakThreads = 0
    var idleTimeouts = 0

    /// Results waiting for the home thread.
    let done = Locked<[(UInt64, Int32)]>([])
    /// Whether `done` has results: the pool notifier's poll callback, so that the handler
    /// takes part in adaptive polling (a handler without one switches polling off on epoll,
    /// which cannot see readiness from user space). Written under `done`'s lock; read relaxed
    /// by the poll callback: a stale `false` only defers the results to the notifier's
    /// wake-up, a stale `true` takes an empty batch.
    let hasResults = Atomic<Bool>(false)
    /// Set by a worker when it put the first result on an empty done queue.
    let notifier: EventNotifier

    init() throws(AioError) {
        notifier = try EventNotifier()
        mutex = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
        wakeUp = .allocate(capacity: 1)
        var attr = pthread_condattr_t()
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(wakeUp, &attr)
        pthread_condattr_destroy(&attr)
    }

    deinit {
        pthread_cond_destroy(wakeUp)
        wakeUp.deallocate()
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    @inline(__always) func lock() { pthread_mutex_lock(mutex) }
    @inline(__always) func unlock() { pthread_mutex_unlock(mutex) }

    /// Takes the finished results (home thread, from the notifier's handler).
    func takeResults() -> [(UInt64, Int32)] {
        done.withLock { q in
            let items = q
            q.removeAll(keepingCapacity: true)
            hasResults.store(false, ordering: .relaxed)  // relaxed: under the lock, see hasResults
            return items
        }
    }

    /// Queues a request (home thread), starting a worker if none is idle and the pool is
    /// below its maximum (QEMU `thread_pool_submit_aio`).
    func run(_ request: IORequest, userData: UInt64) {
        lock()
        let finished = takeExited()
        queue.append(Job(request: request, userData: userData))
        var failed: Int32 = 0
        if idleThreads == 0 && curThreads < maxThreads { failed = startWorker() }
        var orphan: Job? = nil
        if failed != 0 && curThreads == 0 {
            // No thread at all to run it: fail it with the errno rather than lose it.
            orphan = queue.removeLast()
        } else {
            pthread_cond_signal(wakeUp)
        }
        unlock()
        join(finished)
        if let orphan { finish(orphan.userData, -failed) }
    }

    /// Applies new bounds (home thread; QEMU `thread_pool_update_params`): starts workers up to
    /// `min` now, and wakes the idle ones so that those above `max` exit; busy ones above it
    /// exit when their request is done.
    func setLimits(min: Int, max: Int) {
        lock()
        minThreads = min
        maxThreads = max
        while curThreads < minThreads && startWorker() == 0 {}
        if curThreads > maxThreads { pthread_cond_broadcast(wakeUp) }
        let finished = takeExited()
        unlock()
        join(finished)
    }

    /// Starts a worker. Called with `mutex` held. Returns 0 or the errno of pthread_create.
    func startWorker() -> Int32 {
        // Unmanaged: the worker's own +1 on the pool, taken back on its thread (so the pool
        // outlives every worker; shutdown joins them all before the context lets it go).
        let me = Unmanaged.passRetained(self).toOpaque()
        var tid = pthread_t()
        let rc = pthread_create(&tid, nil, { arg in
            let pool = Unmanaged<WorkerPool>.fromOpaque(arg!).takeRetainedValue()
            pool.workerLoop()
            return nil
        }, me)
        guard rc == 0 else {
            // No worker took the reference passed to it: release it here.
            Unmanaged<WorkerPool>.fromOpaque(me).release()
            return rc
        }
        curThreads += 1
        peakThreads = Swift.max(peakThreads, curThreads)
        unjoined.append(tid)
        return 0
    }

    /// Workers that ended on their own, no longer counted as unjoined. Called with `mutex`
    /// held; join them after unlocking.
    func takeExited() -> [pthread_t] {
        guard !exited.isEmpty else { return [] }
        let finished = exited
        exited.removeAll()
        unjoined.removeAll { finished.contains($0) }
        return finished
    }

    func join(_ threads: [pthread_t]) {
        for t in threads { pthread_join(t, nil) }
    }

    /// QEMU `worker_thread`: take requests while the pool is not above its maximum; idle for
    /// the timeout with nothing queued and more workers than the minimum, exit.
    func workerLoop() {
        _ = dp_set_thread_name("worker")
        lock()
        while !stopping && curThreads <= maxThreads {
            if queueHead == queue.count {
                idleThreads += 1
                let timedOut = waitForWork()
                idleThreads -= 1
                if timedOut { idleTimeouts += 1 }
                if timedOut && queueHead == queue.count && curThreads > minThreads { break }
                continue  // with work or not, check the bounds before taking any
            }
            let job = queue[queueHead]
            queueHead += 1
            if queueHead == queue.count {
                queue.removeAll(keepingCapacity: true)
                queueHead = 0
            }
            unlock()
            finish(job.userData, perform(job.request))
            lock()
        }
        curThreads -= 1
        if !stopping { exited.append(pthread_self()) }
        // Pass on a wake-up this worker took but will not serve (QEMU does the same).
        pthread_cond_signal(wakeUp)
        unlock()
    }

    /// Waits on `wakeUp` (with `mutex` held) for up to the idle timeout; returns whether it
    /// timed out. EINTR does not occur (pthread_cond_timedwait never returns it).
    func waitForWork() -> Bool {
        let deadline = saturatingAdd(monotonicNanoseconds(), WorkerPool.idleTimeoutNanoseconds.load(ordering: .relaxed))
        var ts = timespec(tv_sec: Int(deadline / 1_000_000_000), tv_nsec: Int(deadline % 1_000_000_000))
        return pthread_cond_timedwait(wakeUp, mutex, &ts) == ETIMEDOUT
    }

    func finish(_ userData: UInt64, _ result: Int32) {
        let wasEmpty = done.withLock { q -> Bool in
            q.append((userData, result))
            hasResults.store(true, ordering: .relaxed)  // relaxed: under the lock, see hasResults
            return q.count == 1
        }
        // Results appended after this and before the handler takes them ride on this wake-up.
        if wasEmpty { notifier.set() }
    }

    func perform(_ request: IORequest) -> Int32 {
        while true {
            let rc: Int
            switch request {
            case .read(let fd, let buffer, let offset):
                rc = pread(fd, buffer.baseAddress, buffer.count, off_t(Int64(bitPattern: offset)))
            case .write(let fd, let buffer, let offset):
                rc = pwrite(fd, buffer.baseAddress, buffer.count, off_t(Int64(bitPattern: offset)))
            case .readv(let fd, let iovecs, let count, let offset):
                rc = preadv(fd, iovecs, Int32(count), off_t(Int64(bitPattern: offset)))
            case .writev(let fd, let iovecs, let count, let offset):
                rc = pwritev(fd, iovecs, Int32(count), off_t(Int64(bitPattern: offset)))
            case .fsync(let fd, let dataOnly):
                rc = Int(dataOnly ? fdatasync(fd) : fsync(fd))
            case .fallocate(let fd, let mode, let offset, let length):
                let r = dp_fallocate(fd, mode, Int64(bitPattern: offset), Int64(bitPattern: length))
                if r == -EINTR { continue }
                return r
            case .nop, .timeout:
                return 0
            }
            if rc >= 0 { return Int32(clamping: rc) }
            if errno != EINTR { return -errno }
        }
    }

    /// Stops and joins every worker. Called by the context's deinit (never on a worker: the
    /// workers hold no reference to the context).
    func shutdown() {
        lock()
        stopping = true
        pthread_cond_broadcast(wakeUp)
        let threads = unjoined
        unjoined.removeAll()
        exited.removeAll()
        unlock()
        join(threads)
    }
}
