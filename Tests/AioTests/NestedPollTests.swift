// Nested polls: a callback may run `poll` again (QEMU allows it, drain relies on it). These
// check that what the outer level is still using survives the inner one, and that the inner
// one finishes the outer level's work exactly once.
import CShims
import Glibc
import Synchronization
import Testing

@testable import Aio

/// A weak reference the test and a callback share (a callback cannot capture a `weak var`
/// of the test's frame and have the test see its later value).
/// `@unchecked Sendable`: used on the test's thread, which is the context's home thread.
final class WeakBox<T: AnyObject>: @unchecked Sendable {
    weak var value: T?
    init(_ value: T? = nil) { self.value = value }
}

@Suite("Nested polls")
struct NestedPollTests {
    @Test("a BH deleted in its callback and dropped by its owner outlives a nested poll in that callback",
          arguments: backends)
    func deletedBottomHalfOutlivesNestedPoll(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        let owner = Local<BottomHalf?>(nil)
        let box = WeakBox<BottomHalf>()
        let aliveAfterNested = Local<Bool?>(nil)
        owner.value = ctx.makeBottomHalf {
            owner.value!.delete()
            owner.value = nil  // only the loop's reference is left
            ctx.poll(blocking: false)  // nested: unlinks the deleted BH
            aliveAfterNested.value = box.value != nil
        }
        box.value = owner.value
        owner.value!.schedule()
        #expect(ctx.poll(blocking: false))
        #expect(aliveAfterNested.value == true, "the BH lived until its callback returned")
        while ctx.poll(blocking: false) {}
        #expect(box.value == nil, "and went after it")
    }

    @Test("a BH deleted by another thread while its callback runs a nested poll outlives that poll",
          .timeLimit(.minutes(1)), arguments: backends)
    func bottomHalfDeletedElsewhereOutlivesNestedPoll(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        // Release/acquire hand-offs between the loop's callback and the deleting thread.
        let inCallback = Atomic<Bool>(false), deleted = Atomic<Bool>(false)
        let box = WeakBox<BottomHalf>()
        let aliveAfterNested = Local<Bool?>(nil)
        let bh = ctx.makeBottomHalf {
            inCallback.store(true, ordering: .releasing)
            while !deleted.load(ordering: .acquiring) { sched_yield() }
            ctx.poll(blocking: false)  // nested: unlinks the BH the other thread deleted
            aliveAfterNested.value = box.value != nil
        }
        box.value = bh
        bh.schedule()
        // Unmanaged: the other thread gets the owner's only reference and drops it.
        let ref = Unmanaged.passRetained(bh)
        _ = consume bh
        let other = try spawn {
            while !inCallback.load(ordering: .acquiring) { sched_yield() }
            ref._withUnsafeGuaranteedRef { $0.delete() }
            ref.release()
            deleted.store(true, ordering: .releasing)
        }
        #expect(ctx.poll(blocking: false))
        pthread_join(other, nil)
        #expect(aliveAfterNested.value == true)
        while ctx.poll(blocking: false) {}
        #expect(box.value == nil)
    }

    @Test("a completion target's callback outlives a nested poll that completes the target's last request",
          arguments: backends)
    func completionTargetOutlivesNestedPoll(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        let box = WeakBox<CompletionTarget>()
        let aliveAfterNested = Local<Bool?>(nil)
        let tags = Local<[UInt32]>([])
        var target: CompletionTarget? = ctx.makeCompletionTarget { tag, _ in
            tags.value.append(tag)
            guard tag == 1 else { return }
            ctx.poll(blocking: false)  // nested: runs tag 2, the target's last request
            aliveAfterNested.value = box.value != nil
        }
        box.value = target
        ctx.submit(.nop, to: target!, tag: 1)
        ctx.submit(.nop, to: target!, tag: 2)
        target = nil  // only the context holds it now
        run(ctx) { tags.value.count == 2 }
        #expect(tags.value == [1, 2])
        #expect(aliveAfterNested.value == true, "the target lived until the outer callback returned")
        while ctx.poll(blocking: false) {}
        #expect(box.value == nil, "and went after it")
        #expect(ctx.pendingRequests == 0)
    }

    // Nested polls from each kind of callback. From a BH and from a poll-ready handler they are
    // in BottomHalfOrderTests and ConformanceTests (test-nested-aio-poll).

    @Test("an fd read handler may run a nested poll: it runs a BH scheduled there and the other ready handler once, and is not re-entered",
          arguments: backends)
    func nestedPollFromReadHandler(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        let p = makePipe()
        defer { close(p.read); close(p.write) }
        let other = try EventNotifier()
        let reads = Local(0), otherReads = Local(0), bhRuns = Local(0), depthInRead = Local(0)
        let nested = Local<Bool?>(nil)
        let bh = ctx.makeBottomHalf { bhRuns.value += 1 }
        ctx.setFDHandler(p.read, FDHandlerCallbacks(read: {
            reads.value += 1
            depthInRead.value = max(depthInRead.value, ctx.depth)
            var byte: UInt8 = 0
            _ = read(p.read, &byte, 1)  // drained first, as a handler must before nesting
            bh.schedule()
            nested.value = ctx.poll(blocking: false)
        }))
        ctx.setEventNotifier(other, FDHandlerCallbacks(read: { otherReads.value += 1 }))
        while ctx.poll(blocking: false) {}
        var byte: UInt8 = 1
        #expect(write(p.write, &byte, 1) == 1)
        other.set()
        run(ctx) { reads.value == 1 && otherReads.value == 1 }
        while ctx.poll(blocking: false) {}
        #expect(nested.value == true, "the nested poll made progress: the BH ran in it")
        #expect(bhRuns.value == 1)
        #expect(reads.value == 1 && depthInRead.value == 1, "the read handler ran once, at the top level")
        #expect(otherReads.value == 1, "the other ready handler ran once, at whichever level")
        ctx.removeFDHandler(p.read)
        ctx.removeEventNotifier(other)
        bh.delete()
    }

    @Test("a completion callback may wait in a nested blocking poll for another request, as a drain does",
          arguments: backends)
    func nestedBlockingPollFromCompletion(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        let order = Local<[String]>([])
        ctx.submit(.nop) { _ in
            order.value.append("outer")
            let done = Local(false)
            ctx.submit(.timeout(nanoseconds: 1_000_000)) { rc in
                order.value.append("inner \(rc)")
                done.value = true
            }
            while !done.value { ctx.poll(blocking: true) }
            order.value.append("outer done")
        }
        run(ctx) { order.value.count == 3 }
        #expect(order.value == ["outer", "inner \(-ETIME)", "outer done"])
        #expect(ctx.pendingRequests == 0)
        #expect(ctx.statistics.completions == 2)
        #expect(!ctx.poll(blocking: false))
    }

    @Test("a timer callback may run a nested poll: a BH scheduled there and another due timer run once",
          arguments: backends)
    func nestedPollFromTimer(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        let a = Local(0), b = Local(0), bhRuns = Local(0)
        let nested = Local<Bool?>(nil)
        let bh = ctx.makeBottomHalf { bhRuns.value += 1 }
        let timerA = ctx.makeTimer {
            a.value += 1
            bh.schedule()
            nested.value = ctx.poll(blocking: false)
        }
        let timerB = ctx.makeTimer { b.value += 1 }
        timerA.arm(at: 0)
        timerB.arm(at: 0)  // due with A, armed after it: runs after it, here inside A's nested poll
        #expect(ctx.poll(blocking: false))
        #expect(a.value == 1 && b.value == 1 && bhRuns.value == 1)
        #expect(nested.value == true)
        #expect(!ctx.poll(blocking: false))
        #expect(a.value == 1 && b.value == 1 && bhRuns.value == 1, "nothing ran twice")
        bh.delete()
    }

    @Test("a blocking nested poll sleeps and is woken by a BH another thread schedules",
          .timeLimit(.minutes(1)), arguments: backends)
    func blockingNestedPollIsWokenFromAnotherThread(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        // Relaxed: written and read on the home thread (by the one-shot and the nested loop).
        let woken = Atomic<Bool>(false)
        let slept = Local<UInt64>(0), writes = Local<UInt64>(0), nestedPolls = Local(0)
        let outer = ctx.makeBottomHalf {
            let waits = ctx.statistics.blockingWaits, eventfdWrites = ctx.statistics.eventfdWrites
            let tid = dp_gettid()
            // Schedules once the nested poll announced that it may sleep (notify_me != 0, read
            // with acquire as notify() does it more strongly) and sleeps in the kernel.
            let other = try! spawn {
                while ctx.wake.pointee.notifyMe.load(ordering: .acquiring) == 0 || threadState(tid) != "S" { usleep(100) }
                ctx.scheduleOneShot { woken.store(true, ordering: .relaxed) }
            }
            while !woken.load(ordering: .relaxed) {
                ctx.poll(blocking: true)
                nestedPolls.value += 1
            }
            pthread_join(other, nil)
            slept.value = ctx.statistics.blockingWaits - waits
            writes.value = ctx.statistics.eventfdWrites - eventfdWrites
        }
        outer.schedule()
        #expect(ctx.poll(blocking: false))
        let wasWoken = woken.load(ordering: .relaxed)
        #expect(wasWoken)
        #expect(slept.value >= 1, "the nested poll waited in the kernel")
        #expect(writes.value == 1, "and was woken through the eventfd, once")
        #expect(nestedPolls.value >= 1)
        let notifyMe = ctx.wake.pointee.notifyMe.load(ordering: .relaxed)  // home thread: its own writes
        #expect(notifyMe == 0, "every announcement was withdrawn")
        outer.delete()
    }
}
