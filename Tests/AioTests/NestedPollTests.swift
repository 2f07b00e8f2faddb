// Nested polls: a callback may run `poll` again (QEMU allows it, drain relies on it). These
// check that what the outer level is still using survives the inner one, and that the inner
// one finishes the outer level's work exactly once.
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
}
