import Glibc
import Synchronization
import TestSupport
import Testing
import Uring

@testable import Aio

/// The backends every conformance test runs on: io_uring where the kernel allows it, and
/// always epoll.
/// `DATAPLANE_FDMON=epoll` runs the suite as a machine without io_uring would.
let backends: [AioContext.Backend] = {
    if let v = getenv("DATAPLANE_FDMON"), String(cString: v) == "epoll" { return [.epoll] }
    if let v = getenv("DATAPLANE_FDMON"), String(cString: v) == "io_uring" { return [.ioUring] }
    return UringProbe.check().isAvailable ? [.ioUring, .epoll] : [.epoll]
}()

/// A value touched only on one thread (the test's, which is the context's home thread).
/// `@unchecked Sendable`: the callbacks that capture it run on that same thread.
final class Local<T>: @unchecked Sendable {
    var value: T
    init(_ value: T) { self.value = value }
}

/// Makes a context, drained the way QEMU's test-aio drains before each test.
func makeContext(_ backend: AioContext.Backend) throws -> AioContext {
    let ctx = try AioContext(backend: backend)
    while ctx.poll(blocking: false) {}
    return ctx
}

/// A thread that owns a context and runs its loop until stopped, for cross-thread tests
/// (a minimal IOThread).
final class LoopThread: @unchecked Sendable {
    // @unchecked: `context` is written once by the thread before `ready` is signalled
    // (the `ready` flag's release/acquire) and only read afterwards; `stop` is atomic.
    var context: AioContext!
    let ready = Atomic<Bool>(false)
    let stop = Atomic<Bool>(false)
    var thread = pthread_t()
    let backend: AioContext.Backend

    init(backend: AioContext.Backend) {
        self.backend = backend
        let box = Unmanaged.passRetained(self).toOpaque()
        pthread_create(&thread, nil, { arg in
            let me = Unmanaged<LoopThread>.fromOpaque(arg!).takeRetainedValue()
            me.context = try! AioContext(backend: me.backend)
            me.ready.store(true, ordering: .releasing)
            while !me.stop.load(ordering: .acquiring) { me.context.poll(blocking: true) }
            return nil
        }, box)
        while !ready.load(ordering: .acquiring) { usleep(100) }
    }

    /// Runs `body` on the loop thread and waits for it (QEMU's aio_wait_bh_oneshot).
    func sync(_ body: @escaping @Sendable () -> Void) {
        let flag = Local(false)
        let sem = UnsafeMutablePointer<sem_t>.allocate(capacity: 1)
        sem_init(sem, 0, 0)
        let semAddress = UInt(bitPattern: sem)
        context.scheduleOneShot {
            body()
            flag.value = true
            sem_post(UnsafeMutablePointer<sem_t>(bitPattern: semAddress)!)
        }
        while sem_wait(sem) != 0 {}
        sem_destroy(sem)
        sem.deallocate()
        precondition(flag.value)
    }

    func join() {
        stop.store(true, ordering: .releasing)
        context.notify()
        pthread_join(thread, nil)
        context = nil
    }
}

/// What a failed `#expect(ctx.poll(...))` shows of the context. Without it Swift Testing
/// reflects every stored property, reaches the ring (a `~Copyable` value, which reflection
/// cannot copy) and crashes the test process instead of reporting the failure.
extension AioContext: CustomReflectable {
    public var customMirror: Mirror {
        Mirror(self, children: ["backend": backendKind.description], displayStyle: .class)
    }
}
