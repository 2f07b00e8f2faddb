import Glibc
import Testing

@testable import Aio

/// A temporary file with known contents, removed on deinit.
final class TemporaryFile {
    let path: String
    let fd: Int32

    init(bytes: [UInt8]) throws {
        var template = Array("/tmp/dataplane-test-XXXXXX".utf8CString)
        fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else { throw AioError.syscall("mkstemp", errno: errno) }
        path = String(cString: template)
        let n = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
        precondition(n == bytes.count)
    }

    deinit {
        close(fd)
        unlink(path)
    }
}

/// Polls until `done` or 10 s pass.
func run(_ ctx: AioContext, until done: () -> Bool) {
    let deadline = monotonicNanoseconds() + 10_000_000_000
    while !done() && monotonicNanoseconds() < deadline { ctx.poll(blocking: true) }
}

@Suite("Completion I/O on the context's ring")
struct CompletionIOTests {
    @Test("reads of a real file return the right bytes at the right offsets", arguments: backends)
    func readsReturnFileBytes(_ backend: AioContext.Backend) throws {
        let contents = (0..<16384).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
        let file = try TemporaryFile(bytes: contents)
        let ctx = try makeContext(backend)
        let buffers = (0..<4).map { _ in UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096) }
        defer { buffers.forEach { $0.deallocate() } }
        let results = Local<[Int: Int32]>([:])
        for (i, offset) in [12288, 0, 8192, 4096].enumerated() {
            ctx.submit(.read(fd: file.fd, buffer: buffers[i], offset: UInt64(offset))) { results.value[offset] = $0 }
        }
        #expect(ctx.pendingRequests == 4)
        run(ctx) { results.value.count == 4 }
        #expect(results.value == [0: 4096, 4096: 4096, 8192: 4096, 12288: 4096])
        for (i, offset) in [12288, 0, 8192, 4096].enumerated() {
            #expect(Array(buffers[i]) == Array(contents[offset..<offset + 4096]))
        }
        #expect(ctx.pendingRequests == 0)
    }

    @Test("a write then an fsync then a read round-trips through the file", arguments: backends)
    func writeFsyncRead(_ backend: AioContext.Backend) throws {
        let file = try TemporaryFile(bytes: [UInt8](repeating: 0, count: 8192))
        let ctx = try makeContext(backend)
        let out = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        let back = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { out.deallocate(); back.deallocate() }
        for i in 0..<4096 { out[i] = UInt8(truncatingIfNeeded: i ^ 0x5a) }
        let steps = Local<[String]>([])
        ctx.submit(.write(fd: file.fd, buffer: UnsafeRawBufferPointer(out), offset: 4096)) { rc in
            steps.value.append("write \(rc)")
            ctx.submit(.fsync(fd: file.fd, dataOnly: true)) { rc in
                steps.value.append("fsync \(rc)")
                ctx.submit(.read(fd: file.fd, buffer: back, offset: 4096)) { rc in steps.value.append("read \(rc)") }
            }
        }
        run(ctx) { steps.value.count == 3 }
        #expect(steps.value == ["write 4096", "fsync 0", "read 4096"])
        #expect(Array(back) == Array(out))
    }

    @Test("writev gathers and readv scatters across several buffers", arguments: backends)
    func vectoredRoundTrip(_ backend: AioContext.Backend) throws {
        let file = try TemporaryFile(bytes: [UInt8](repeating: 0, count: 8192))
        let ctx = try makeContext(backend)
        let sizes = [512, 1024, 2560]  // 4096 bytes in three pieces
        let out = sizes.map { UnsafeMutableRawBufferPointer.allocate(byteCount: $0, alignment: 8) }
        let back = sizes.map { UnsafeMutableRawBufferPointer.allocate(byteCount: $0, alignment: 8) }
        defer { (out + back).forEach { $0.deallocate() } }
        var n = 0
        for b in out { for i in 0..<b.count { b[i] = UInt8(truncatingIfNeeded: n &* 13 &+ 1); n += 1 } }
        let outIov = UnsafeMutablePointer<iovec>.allocate(capacity: 3)
        let backIov = UnsafeMutablePointer<iovec>.allocate(capacity: 3)
        defer { outIov.deallocate(); backIov.deallocate() }
        for i in 0..<3 {
            outIov[i] = iovec(iov_base: out[i].baseAddress, iov_len: out[i].count)
            backIov[i] = iovec(iov_base: back[i].baseAddress, iov_len: back[i].count)
        }
        let steps = Local<[String]>([])
        ctx.submit(.writev(fd: file.fd, iovecs: outIov, count: 3, offset: 4096)) { rc in
            steps.value.append("writev \(rc)")
            ctx.submit(.readv(fd: file.fd, iovecs: backIov, count: 3, offset: 4096)) { rc in steps.value.append("readv \(rc)") }
        }
        run(ctx) { steps.value.count == 2 }
        #expect(steps.value == ["writev 4096", "readv 4096"])
        #expect(back.flatMap { Array($0) } == out.flatMap { Array($0) })
        var onDisk = [UInt8](repeating: 0, count: 4096)
        #expect(pread(file.fd, &onDisk, 4096, 4096) == 4096)
        #expect(onDisk == out.flatMap { Array($0) })
    }

    @Test("fallocate punches a hole that reads back as zeros", arguments: backends)
    func fallocatePunchesHole(_ backend: AioContext.Backend) throws {
        let file = try TemporaryFile(bytes: [UInt8](repeating: 0xA5, count: 16384))
        let ctx = try makeContext(backend)
        let result = Local<Int32?>(nil)
        // FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        ctx.submit(.fallocate(fd: file.fd, mode: 0x03, offset: 4096, length: 8192)) { result.value = $0 }
        run(ctx) { result.value != nil }
        #expect(result.value == 0)
        var back = [UInt8](repeating: 1, count: 16384)
        #expect(pread(file.fd, &back, 16384, 0) == 16384)
        #expect(back[0..<4096].allSatisfy { $0 == 0xA5 } && back[12288...].allSatisfy { $0 == 0xA5 })
        #expect(back[4096..<12288].allSatisfy { $0 == 0 })
    }

    @Test("a failing request reports its errno to the callback", arguments: backends)
    func failingRequestReportsErrno(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 512, alignment: 8)
        defer { buffer.deallocate() }
        let result = Local<Int32?>(nil)
        ctx.submit(.read(fd: -1, buffer: buffer, offset: 0)) { result.value = $0 }
        run(ctx) { result.value != nil }
        #expect(result.value == -EBADF)
    }

    @Test("a nop completes with 0 and a timeout with -ETIME, never before its delay", arguments: backends)
    func nopAndTimeout(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        let order = Local<[String]>([])
        // Taken before the submission, which starts the delay (the ring's timer starts when the
        // SQE reaches the kernel; epoll's context timer when it is armed): a lower bound with no
        // slack, not a measurement.
        let submitted = monotonicNanoseconds()
        let completedAt = Local<Int64>(0)
        ctx.submit(.timeout(nanoseconds: 20_000_000)) { rc in
            order.value.append("timeout \(rc)")
            completedAt.value = monotonicNanoseconds()
        }
        ctx.submit(.nop) { rc in order.value.append("nop \(rc)") }
        run(ctx) { order.value.count == 2 }
        #expect(order.value == ["nop 0", "timeout \(-ETIME)"])
        #expect(completedAt.value - submitted >= 20_000_000)
        #expect(!ctx.poll(blocking: false))
    }

    @Test("completions are progress; a completion callback may submit again", arguments: backends)
    func completionIsProgress(_ backend: AioContext.Backend) throws {
        let ctx = try makeContext(backend)
        let n = Local(0)
        @Sendable func again(_ rc: Int32) {
            n.value += 1
            if n.value < 100 { ctx.submit(.nop, again) }
        }
        ctx.submit(.nop, again)
        run(ctx) { n.value == 100 }
        #expect(n.value == 100)
        #expect(ctx.statistics.completions == 100)
        #expect(!ctx.poll(blocking: false))
    }
}
