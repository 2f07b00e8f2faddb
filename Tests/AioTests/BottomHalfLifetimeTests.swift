import Glibc
import Synchronization
import Testing

@testable import Aio

/// Who keeps a BH alive (see the ownership note in BottomHalf.swift): its owner until
/// `delete()`, then the loop until it unlinks it; a one-shot, the loop until it ran. No
/// reference is taken per schedule, so these check that nothing is freed early or kept.
@Suite("Bottom halves: lifetime without a reference per schedule")
struct BottomHalfLifetimeTests {
    final class Token: Sendable {}

    @Test("a scheduled BH deleted and dropped by its owner lives until the loop unlinks it, unrun",
          arguments: backends)
    func deletedWhileLinked(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        let n = Local(0)
        var bh: BottomHalf? = ctx.makeBottomHalf { n.value += 1 }
        weak let weakBH = bh
        bh!.schedule()
        bh!.delete()
        bh = nil
        #expect(weakBH != nil, "the loop's reference keeps a linked BH")
        #expect(!ctx.poll(blocking: false), "freeing a deleted BH is not progress")
        #expect(weakBH == nil, "the loop dropped it when it unlinked it")
        #expect(n.value == 0)
    }

    @Test("a BH that deletes itself and drops the last owner reference outlives its callback",
          arguments: backends)
    func deletedInItsOwnCallback(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        let owner = Local<BottomHalf?>(nil)
        var token: Token? = Token()
        weak let weakToken = token
        let seen = Local(false)
        owner.value = ctx.makeBottomHalf { [token] in
            owner.value!.delete()
            owner.value = nil
            // The BH and its closure context (which holds `token`) must still be alive.
            seen.value = token != nil
        }
        weak let weakBH = owner.value
        token = nil
        owner.value!.schedule()
        #expect(ctx.poll(blocking: false))
        #expect(seen.value)
        #expect(weakToken != nil, "the loop holds the deleted BH until it unlinks it")
        while ctx.poll(blocking: false) {}
        #expect(weakBH == nil)
        #expect(weakToken == nil, "the closure context went with the BH")
    }

    @Test("a BH deleted and dropped by another thread while its callback runs survives the callback",
          .timeLimit(.minutes(1)), arguments: backends)
    func deletedFromAnotherThreadDuringCallback(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        let inCallback = Atomic<Bool>(false), deleted = Atomic<Bool>(false)
        let ranAfterDelete = Atomic<Int>(0)
        // The closure holds `box`; if the BH were freed during the callback, so would be `box`.
        final class Box: Sendable { let value = Atomic<Int>(0) }
        let box = Box()
        let holder = Local<BottomHalf?>(ctx.makeBottomHalf { [box] in
            inCallback.store(true, ordering: .releasing)
            while !deleted.load(ordering: .acquiring) { sched_yield() }
            box.value.add(1, ordering: .relaxed)
            ranAfterDelete.add(1, ordering: .relaxed)
        })
        weak let weakBH = holder.value
        holder.value!.schedule()
        // Unmanaged: hand the other thread the BH without a reference it would drop late.
        let bhRef = Unmanaged.passRetained(holder.value!)
        holder.value = nil
        let other = try spawn {
            while !inCallback.load(ordering: .acquiring) { sched_yield() }
            bhRef._withUnsafeGuaranteedRef { $0.delete() }
            bhRef.release()  // the owner's last reference goes away during the callback
            deleted.store(true, ordering: .releasing)
        }
        #expect(ctx.poll(blocking: false))
        pthread_join(other, nil)
        #expect(ranAfterDelete.load(ordering: .relaxed) == 1)
        #expect(box.value.load(ordering: .relaxed) == 1)
        #expect(weakBH != nil, "the loop still holds the deleted BH")
        while ctx.poll(blocking: false) {}
        #expect(weakBH == nil)
    }

    @Test("a one-shot's closure is freed after it ran, and an unrun one with its context", arguments: backends)
    func oneShotFreed(_ backend: AioContext.Backend) throws {
        var ctx: AioContext? = try makeContext(backend)
        var token: Token? = Token()
        weak let ran = token
        ctx!.scheduleOneShot { [token] in _ = token }
        token = Token()
        weak let unrun = token
        #expect(ctx!.poll(blocking: false))
        #expect(ran == nil)
        ctx!.scheduleOneShot { [token] in _ = token }
        token = nil
        #expect(unrun != nil)
        ctx = nil
        #expect(unrun == nil, "the context dropped the one-shot it never ran")
    }

    @Test("scheduling a deleted BH does nothing", arguments: backends)
    func scheduleAfterDelete(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        let n = Local(0)
        let bh = ctx.makeBottomHalf { n.value += 1 }
        bh.delete()
        while ctx.poll(blocking: false) {}
        bh.schedule()
        #expect(!bh.isScheduled)
        #expect(!ctx.poll(blocking: false))
        #expect(n.value == 0)
    }
}
