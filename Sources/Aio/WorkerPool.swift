// The worker pool that runs completion I/O for contexts on the epoll backend.
//
// Design note. QEMU's thread pool, reduced to what we need: requests go on a
// mutex-protected queue and a counting semaphore wakes one worker; a worker does the
// blocking pread/pwrite/fsync, puts (user_data, result) on the done queue and sets the
// pool's event notifier (only when the queue was empty), whose handler on the home thread
// hands the results to the loop. Workers start lazily (up to `maxWorkers`) and are joined
// when the context goes away; requests still queued then are dropped without their
// callbacks, as io_uring drops them.
//
// The one rule that makes it safe: a worker never touches the context, only the pool and
// its notifier, which it keeps alive itself. (Scheduling a BH from a worker would retain the
// context for the duration of the call; if the home thread dropped its last reference
// meanwhile, the context's deinit — which joins the workers — would run on a worker and
// join itself. Found by a repro that destroyed contexts while their workers finished.)
import CShims
import Glibc
import Synchronization

final class WorkerPool: Sendable {
    struct Job: @unchecked Sendable {
        // @unchecked: the buffer is owned by the submitter, who keeps it valid and untouched
        // until the completion callback runs (the contract of AioContext.submit).
        let request: IORequest
        let userData: UInt64
    }

    struct State {
        var queue: [Job] = []
        var workers: [pthread_t] = []
        var idle = 0
        var stopping = false
    }

    let state = Locked(State())
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
    /// Counts jobs (and stop tokens) for the workers to take. Heap-allocated: a sem_t must
    /// not move. Sendable by being a kernel-synchronised object.
    nonisolated(unsafe) let semaphore: UnsafeMutablePointer<sem_t>
    let maxWorkers = 4

    init() throws(AioError) {
        notifier = try EventNotifier()
        semaphore = .allocate(capacity: 1)
        sem_init(semaphore, 0, 0)
    }

    /// Takes the finished results (home thread, from the notifier's handler).
    func takeResults() -> [(UInt64, Int32)] {
        done.withLock { q in
            let items = q
            q.removeAll(keepingCapacity: true)
            hasResults.store(false, ordering: .relaxed)
            return items
        }
    }

    func run(_ request: IORequest, userData: UInt64) {
        let spawn = state.withLock { s -> Bool in
            s.queue.append(Job(request: request, userData: userData))
            return s.queue.count > s.idle && s.workers.count < maxWorkers
        }
        if spawn { startWorker() }
        sem_post(semaphore)
    }

    func startWorker() {
        let box = Unmanaged.passRetained(self).toOpaque()
        var tid = pthread_t()
        let rc = pthread_create(&tid, nil, { arg in
            let pool = Unmanaged<WorkerPool>.fromOpaque(arg!).takeRetainedValue()
            pool.workerLoop()
            return nil
        }, box)
        if rc != 0 {
            // No thread: the job stays queued for an existing worker (there is one unless
            // this was the first; then it is failed below with the errno).
            Unmanaged<WorkerPool>.fromOpaque(box).release()
            let orphan = state.withLock { s -> Job? in s.workers.isEmpty ? s.queue.popLast() : nil }
            if let orphan { finish(orphan.userData, -rc) }
            return
        }
        state.withLock { $0.workers.append(tid) }
    }

    func workerLoop() {
        while true {
            state.withLock { $0.idle += 1 }
            while sem_wait(semaphore) != 0 {}  // EINTR
            let job = state.withLock { s -> Job? in
                s.idle -= 1
                if s.stopping { return nil }
                return s.queue.isEmpty ? nil : s.queue.removeFirst()
            }
            guard let job else {
                if state.withLock({ $0.stopping }) { return }
                continue
            }
            finish(job.userData, perform(job.request))
        }
    }

    func finish(_ userData: UInt64, _ result: Int32) {
        let wasEmpty = done.withLock { q -> Bool in
            q.append((userData, result))
            hasResults.store(true, ordering: .relaxed)
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

    /// Stops and joins the workers. Called by the context's deinit (never on a worker: the
    /// workers hold no reference to the context).
    func shutdown() {
        let workers = state.withLock { s -> [pthread_t] in
            s.stopping = true
            return s.workers
        }
        for _ in workers { sem_post(semaphore) }
        for t in workers { pthread_join(t, nil) }
        sem_destroy(semaphore)
        semaphore.deallocate()
    }
}
