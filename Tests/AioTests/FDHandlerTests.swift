import Glibc
import Synchronization
import TestSupport
import Testing
import Uring

@testable import Aio

func makePipe() -> (read: Int32, write: Int32) {
    var fds: [Int32] = [0, 0]
    precondition(pipe(&fds) == 0)
    for fd in fds { _ = fcntl(fd, F_SETFL, O_NONBLOCK) }
    return (fds[0], fds[1])
}

@Suite("fd handlers")
struct FDHandlerTests {
    @Test("a plain fd handler is level-triggered: called again while data stays unread",
          arguments: backends)
    func levelTriggered(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        let p = makePipe()
        defer { close(p.read); close(p.write) }
        let calls = Local(0)
        ctx.setFDHandler(p.read, FDHandlerCallbacks(read: { calls.value += 1 }))
        #expect(!ctx.poll(blocking: false))
        var byte: UInt8 = 1
        #expect(write(p.write, &byte, 1) == 1)
        #expect(ctx.poll(blocking: true))
        #expect(calls.value == 1)
        #expect(ctx.poll(blocking: true), "not drained: fires again")
        #expect(calls.value == 2)
        #expect(read(p.read, &byte, 1) == 1)
        while ctx.poll(blocking: false) {}  // an event may be in flight from before the read
        let settled = calls.value
        #expect(!ctx.poll(blocking: false))
        #expect(calls.value == settled)
        ctx.removeFDHandler(p.read)
    }

    @Test("a write handler fires while the fd is writable", arguments: backends)
    func writeHandler(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        let p = makePipe()
        defer { close(p.read); close(p.write) }
        let calls = Local(0)
        ctx.setFDHandler(p.write, FDHandlerCallbacks(write: {
            calls.value += 1
            ctx.removeFDHandler(p.write)  // a callback may remove its own handler
        }))
        #expect(ctx.poll(blocking: true))
        #expect(calls.value == 1)
        #expect(!ctx.poll(blocking: false))
        #expect(calls.value == 1)
    }

    @Test("a poll callback may remove its own handler mid-spin; the handler lives until the next iteration",
          arguments: backends)
    func pollCallbackRemovesItself(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        ctx.setPollParameters(PollParameters(maxNs: 200_000))
        var notifier: EventNotifier? = try EventNotifier()
        let fd = notifier!.fileDescriptor
        weak let weakNotifier = notifier
        let polls = Local(0)
        let box = Local<EventNotifier?>(notifier)
        ctx.setEventNotifier(notifier!, FDHandlerCallbacks(
            read: {},
            poll: {
                polls.value += 1
                // Removes its own registration (applied at once on the home thread) and drops
                // the last outside reference: only the context keeps the handler now.
                if let n = box.value {
                    ctx.removeEventNotifier(n)
                    box.value = nil
                }
                return false
            },
            pollReady: {}))
        notifier = nil
        ctx.poll(blocking: false)  // registered
        weak var weakHandler: FDHandler?
        do {
            let h = try #require(ctx.handlersByFd[fd])
            // Into the poll list with a window, as a handler that fired would be.
            h.inPollList = true
            ctx.pollHandlers.append(h)
            h.pollNs = 100_000
            weakHandler = h
        }
        let timer = ctx.makeTimer {}
        timer.arm(after: 2_000_000)  // ends the blocking wait after the window
        ctx.poll(blocking: true)
        #expect(polls.value == 1, "called once, then skipped as deleted for the rest of the spin")
        #expect(weakHandler != nil && weakNotifier != nil, "kept until the next top-level iteration")
        ctx.poll(blocking: false)
        #expect(weakHandler == nil && weakNotifier == nil, "freed at the start of the next one")
        timer.cancel()
    }

    @Test("removal is safe against events in flight and fd-number reuse", arguments: backends)
    func removalDropsStaleEvents(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        let oldCalls = Local(0)
        let newCalls = Local(0)
        for _ in 0..<50 {
            let first = try EventNotifier()
            let fd = first.fileDescriptor
            ctx.setEventNotifier(first, FDHandlerCallbacks(read: { oldCalls.value += 1 }))
            ctx.poll(blocking: false)  // arms the poll in the kernel
            first.set()  // the kernel completes the poll: an event is in flight
            ctx.removeEventNotifier(first)
            // Let the context drop its reference so the fd closes, then take the same number.
            var second: EventNotifier? = nil
            for _ in 0..<3 where second?.fileDescriptor != fd {
                ctx.poll(blocking: false)
                second = try EventNotifier()
            }
            ctx.setEventNotifier(second!, FDHandlerCallbacks(read: { newCalls.value += 1 }))
            while ctx.poll(blocking: false) {}
            #expect(oldCalls.value == 0, "the removed handler never runs")
            #expect(newCalls.value == 0, "the new handler sees no event of the old registration")
            second!.set()
            #expect(ctx.poll(blocking: true))
            #expect(newCalls.value == 1)
            ctx.removeEventNotifier(second!)
            newCalls.value = 0
        }
    }

    @Test("handlers registered from another thread are applied by the home thread",
          .timeLimit(.minutes(1)), arguments: backends)
    func crossThreadRegistration(_ backend: AioContext.Backend) throws {
        let loop = LoopThread(backend: backend)
        let e = try EventNotifier()
        let calls = Atomic<Int>(0)
        let onHome = Atomic<Bool>(true)
        let ctx = loop.context!
        ctx.setEventNotifier(e, FDHandlerCallbacks(read: {
            if !ctx.isOnHomeThread { onHome.store(false, ordering: .relaxed) }
            calls.add(1, ordering: .relaxed)
        }))
        loop.sync {}  // the change was applied at the start of an iteration before this BH
        e.set()
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while calls.load(ordering: .relaxed) == 0 && monotonicNanoseconds() < deadline { usleep(1000) }
        #expect(calls.load(ordering: .relaxed) == 1)
        ctx.removeEventNotifier(e)
        loop.sync {}
        e.set()
        loop.sync {}
        loop.sync {}
        #expect(calls.load(ordering: .relaxed) == 1, "no callback after the removal was applied")
        let allOnHome = onHome.load(ordering: .relaxed)
        #expect(allOnHome)
        loop.join()
    }
}

@Suite("Lifecycle and resources")
struct LifecycleTests {
    @Test("creating and destroying 1000 contexts leaks no file descriptor")
    func noFdLeak() async {
        // In a child process, so that tests running in parallel do not move the count.
        // Counted: the kinds of descriptor a context makes (eventfd, io_uring, epoll). The
        // runtime may open one of those kinds lazily on another thread (dispatch's manager
        // uses epoll and an eventfd), so a round that moved is measured again: a real leak
        // moves every round by a thousand, a lazy initialisation only once.
        await #expect(processExitsWith: .success) {
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64, alignment: 8)
            for backend in backends {
                var clean = false
                for _ in 0..<3 where !clean {
                    let before = openFileDescriptorCount(kinds: contextDescriptorKinds)
                    for _ in 0..<1000 {
                        let ctx = try! AioContext(backend: backend)
                        let e = try! EventNotifier()
                        ctx.setEventNotifier(e, FDHandlerCallbacks(read: {}))
                        let done = Local(false)
                        // A read starts the epoll backend's worker pool (and its notifier).
                        ctx.submit(.read(fd: e.fileDescriptor, buffer: buffer, offset: 0)) { _ in done.value = true }
                        e.set()
                        while !done.value { ctx.poll(blocking: true) }
                        ctx.removeEventNotifier(e)
                    }
                    clean = openFileDescriptorCount(kinds: contextDescriptorKinds) == before
                }
                if !clean { exit(3) }
            }
        }
    }

    @Test("DATAPLANE_FDMON=epoll forces the epoll backend and says why")
    func environmentForcesEpoll() async {
        await #expect(processExitsWith: .success) {
            setenv("DATAPLANE_FDMON", "epoll", 1)
            let ctx = try! AioContext()
            if ctx.backendKind != .epoll || ctx.fallbackReason != "DATAPLANE_FDMON=epoll" { exit(1) }
        }
    }

    @Test("the automatic backend is io_uring where the kernel allows it, else epoll with the reason")
    func automaticPrefersIOUring() async {
        // In a child without DATAPLANE_FDMON, which the suite's epoll pass sets: the choice is
        // the kernel's then, on either pass.
        await #expect(processExitsWith: .success) {
            unsetenv("DATAPLANE_FDMON")
            let ctx = try! AioContext(backend: .automatic)
            switch UringProbe.check() {
            case .available:
                if ctx.backendKind != .ioUring || ctx.fallbackReason != nil { exit(3) }
            case .unavailable(_, let reason):
                if ctx.backendKind != .epoll || ctx.fallbackReason != reason { exit(4) }
            }
            let epoll = try! AioContext(backend: .epoll)
            if epoll.backendKind != .epoll || epoll.fallbackReason != "epoll requested" { exit(5) }
        }
    }
}
