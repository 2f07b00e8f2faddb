import Glibc
import Testing

@testable import Aio

/// `submit(_:to:tag:)`: one callback for many requests, told apart by their tags, with the
/// context holding the target only while it has requests in flight.
@Suite("Completion targets")
struct CompletionTargetTests {
    @Test("each request's tag and result reach the target's callback, once", arguments: backends)
    func tagsAndResults(_ backend: AioContext.Backend) throws {
        let contents = (0..<16384).map { UInt8(truncatingIfNeeded: $0 &* 5 &+ 1) }
        let file = try TemporaryFile(bytes: contents)
        let ctx = try makeContext(backend)
        let buffers = (0..<4).map { _ in UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096) }
        defer { buffers.forEach { $0.deallocate() } }
        let seen = Local<[UInt32: Int32]>([:])
        let calls = Local(0)
        let target = ctx.makeCompletionTarget { tag, result in
            calls.value += 1
            seen.value[tag] = result
        }
        for (i, offset) in [12288, 0, 8192, 4096].enumerated() {
            ctx.submit(.read(fd: file.fd, buffer: buffers[i], offset: UInt64(offset)), to: target, tag: UInt32(100 + i))
        }
        ctx.submit(.nop, to: target, tag: 7)
        ctx.submit(.read(fd: -1, buffer: buffers[0], offset: 0), to: target, tag: 8)
        #expect(ctx.pendingRequests == 6)
        #expect(target.pendingRequests == 6)
        run(ctx) { calls.value == 6 }
        while ctx.poll(blocking: false) {}
        #expect(calls.value == 6)
        #expect(seen.value == [100: 4096, 101: 4096, 102: 4096, 103: 4096, 7: 0, 8: -EBADF])
        for (i, offset) in [12288, 0, 8192, 4096].enumerated() where i > 0 {
            #expect(Array(buffers[i]) == Array(contents[offset..<offset + 4096]))
        }
        #expect(ctx.pendingRequests == 0 && target.pendingRequests == 0)
    }

    @Test("the context holds a target while it has requests in flight, and only then", arguments: backends)
    func heldWhileInFlight(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        let calls = Local(0)
        var target: CompletionTarget? = ctx.makeCompletionTarget { _, _ in calls.value += 1 }
        weak let weakTarget = target
        for tag in 0..<3 { ctx.submit(.nop, to: target!, tag: UInt32(tag)) }
        target = nil
        #expect(weakTarget != nil, "three NOPs in flight keep it")
        run(ctx) { calls.value == 3 }
        #expect(weakTarget == nil, "the last completion let it go")
    }

    @Test("a callback that submits again to its own target keeps a chain going", arguments: backends)
    func resubmitFromCallback(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        let chain = Local<[UInt32]>([])
        final class WeakBox { weak var target: CompletionTarget? }
        let box = WeakBox()
        var target: CompletionTarget? = ctx.makeCompletionTarget { tag, _ in
            chain.value.append(tag)
            // Alive while its callback runs: the context's hold ends after the callback.
            if tag < 50 { ctx.submit(.nop, to: box.target!, tag: tag + 1) }
        }
        box.target = target
        weak let weakTarget = target
        ctx.submit(.nop, to: target!, tag: 0)
        target = nil  // the chain alone keeps it alive now
        run(ctx) { chain.value.count == 51 }
        #expect(chain.value == Array(0...50))
        #expect(weakTarget == nil)
        #expect(ctx.pendingRequests == 0)
    }

    @Test("a context destroyed with requests in flight lets their target go, uncalled", arguments: backends)
    func contextGoneWithRequestsInFlight(_ backend: AioContext.Backend) throws {
        var ctx: AioContext? = try makeContext(backend)
        let calls = Local(0)
        var target: CompletionTarget? = ctx!.makeCompletionTarget { _, _ in calls.value += 1 }
        weak let weakTarget = target
        // An hour's timeout: in flight until the context goes.
        ctx!.submit(.timeout(nanoseconds: 3_600_000_000_000), to: target!, tag: 1)
        ctx!.poll(blocking: false)
        target = nil
        #expect(weakTarget != nil)
        ctx = nil
        #expect(weakTarget == nil)
        #expect(calls.value == 0)
    }

    @Test("RawArray grows, moves out and frees what it holds")
    func rawArray() {
        final class Item { let n: Int; init(_ n: Int) { self.n = n } }
        weak var first: Item?
        weak var last: Item?
        do {
            var a = RawArray<Item>(capacity: 2)
            for i in 0..<100 { a.append(Item(i)) }
            first = a[0]
            last = a[99]
            let count = a.count, n42 = a[42].n
            #expect(count == 100 && n42 == 42)
            let removed = a.removeLast().n
            #expect(removed == 99)
            #expect(last == nil, "the removed element was handed out and dropped")
            a[0] = Item(-1)
            let n0 = a[0].n
            #expect(first == nil && n0 == -1)
            a.swapAt(0, 42)
            a.swapAt(5, 5)
            let swapped = (a[0].n, a[42].n, a[5].n)
            #expect(swapped == (42, -1, 5))
            a.removeAll()
            let empty = a.isEmpty
            #expect(empty)
            a.append(Item(7))
            last = a[0]
        }
        #expect(last == nil, "deinit released what was left")
    }
}
