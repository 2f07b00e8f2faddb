// Misuse is a programming error: it crashes with a message that says what was violated.
import Glibc
import Testing

@testable import Aio

/// Checks that the child's standard error says what was violated.
func expectMessage(_ result: ExitTest.Result?, _ message: String, sourceLocation: SourceLocation = #_sourceLocation) {
    let stderr = String(decoding: result?.standardErrorContent ?? [], as: UTF8.self)
    #expect(stderr.contains("BUG DETECTED"), sourceLocation: sourceLocation)
    #expect(stderr.contains(message), "stderr: \(stderr)", sourceLocation: sourceLocation)
}

@Suite("Misuse crashes loudly")
struct CrashTests {
    @Test("poll off the home thread crashes")
    func pollOffHomeThread() async {
        let result = await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            let ctx = try! AioContext()
            var thread = pthread_t()
            let box = Unmanaged.passRetained(ctx).toOpaque()
            pthread_create(&thread, nil, { arg in
                let ctx = Unmanaged<AioContext>.fromOpaque(arg!).takeRetainedValue()
                ctx.poll(blocking: false)
                return nil
            }, box)
            pthread_join(thread, nil)
        }
        expectMessage(result, "AioContext.poll(blocking:) called off the context's home thread")
    }

    @Test("destroying a context with an undeleted BH crashes")
    func leakedBottomHalf() async {
        let result = await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            var ctx: AioContext? = try! AioContext()
            let bh = ctx!.makeBottomHalf(name: "forgotten") {}
            _ = bh
            ctx = nil
        }
        expectMessage(result, "bottom half 'forgotten' leaked")
    }

    @Test("dropping the last reference to an undeleted BH crashes at once")
    func droppedBottomHalf() async {
        let result = await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            let ctx = try! AioContext()
            var bh: BottomHalf? = ctx.makeBottomHalf(name: "dropped") {}
            bh!.schedule()
            bh = nil
            ctx.poll(blocking: false)
        }
        expectMessage(result, "bottom half 'dropped' leaked: its last reference went away before delete()")
    }

    @Test("a completion target used with another context crashes")
    func completionTargetOfAnotherContext() async {
        let result = await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            let a = try! AioContext()
            let b = try! AioContext()
            let target = a.makeCompletionTarget { _, _ in }
            b.submit(.nop, to: target, tag: 0)
        }
        expectMessage(result, "CompletionTarget used with a context other than the one that made it")
    }

    @Test("deleting a BH twice crashes")
    func doubleDelete() async {
        let result = await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            let ctx = try! AioContext()
            let bh = ctx.makeBottomHalf {}
            bh.delete()
            bh.delete()
        }
        expectMessage(result, "deleted twice")
    }

    @Test("submitting I/O off the home thread crashes")
    func submitOffHomeThread() async {
        let result = await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            let ctx = try! AioContext()
            var thread = pthread_t()
            let box = Unmanaged.passRetained(ctx).toOpaque()
            pthread_create(&thread, nil, { arg in
                let ctx = Unmanaged<AioContext>.fromOpaque(arg!).takeRetainedValue()
                ctx.submit(.nop) { _ in }
                return nil
            }, box)
            pthread_join(thread, nil)
        }
        expectMessage(result, "AioContext.submit called off the context's home thread")
    }

    @Test("a correct lifecycle exits cleanly (the crash tests above are not crashing for another reason)")
    func cleanLifecycleExits() async {
        await #expect(processExitsWith: .success) {
            let ctx = try! AioContext()
            let bh = ctx.makeBottomHalf {}
            bh.schedule()
            ctx.poll(blocking: true)
            bh.delete()
        }
    }
}
