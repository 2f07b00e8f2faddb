// W4 io on Dataplane: completion I/O through an AioContext's own ring, on the context's
// home thread (this thread): (a) NOPs in batches of 32; (b) 4 KiB random reads at QD 32
// from a 1 GiB file in the page cache. Plus fio on the same file, and the file itself.
import Aio
import Foundation
import Glibc
import Histogram

let w4FileBytes = 1 << 30

/// Creates the 1 GiB file once (random bytes, so that no block is a hole) and reads it all
/// so that it is in the page cache.
func prepareW4File(_ path: String) throws {
    var st = stat()
    if stat(path, &st) != 0 || Int(st.st_size) != w4FileBytes {
        eprint("creating \(path) (1 GiB, once)")
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw BenchError("cannot create \(path): \(String(cString: strerror(errno)))") }
        var rng = SystemRandomNumberGenerator()
        var chunk = [UInt64](repeating: 0, count: 1 << 17)  // 1 MiB
        for _ in 0..<(w4FileBytes >> 20) {
            for i in chunk.indices { chunk[i] = rng.next() }
            let n = chunk.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            guard n == 1 << 20 else { close(fd); throw BenchError("cannot write \(path)") }
        }
        close(fd)
    }
    // Warm the page cache.
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw BenchError("cannot open \(path)") }
    defer { close(fd) }
    let buf = UnsafeMutableRawPointer.allocate(byteCount: 1 << 20, alignment: 4096)
    defer { buf.deallocate() }
    while read(fd, buf, 1 << 20) > 0 {}
}

struct BenchError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

// W4 (a): NOPs through the context's ring, 32 per batch (2M after 100k of warm-up). The
// completions go to one CompletionTarget with a tag each, as the C loop's go to user_data;
// with `closures`, to one shared closure per request instead (retained while in flight).
func dataplaneW4Nop(closures: Bool = false) throws -> [String: Double] {
    let ctx = try AioContext()
    final class Count { var n = 0 }  // home thread only
    let count = Count()
    let done: (Int32) -> Void = { _ in count.n += 1 }
    let target = ctx.makeCompletionTarget { _, _ in count.n += 1 }
    let batch = 32, n = 2_000_000, warm = 100_000
    var t0: Int64 = 0
    var m0: UInt64 = 0
    var submitted = 0
    while submitted < warm + n {
        if submitted == warm {
            t0 = monotonicNanoseconds()
            m0 = countEnters(ctx)
        }
        if closures {
            for _ in 0..<batch { ctx.submit(.nop, done) }
        } else {
            for i in 0..<batch { ctx.submit(.nop, to: target, tag: UInt32(i)) }
        }
        submitted += batch
        while count.n < submitted { ctx.poll(blocking: true) }
    }
    let dt = monotonicNanoseconds() - t0
    return ["per_second": Double(n) * 1e9 / Double(dt),
            "enters_per_batch": Double(countEnters(ctx) - m0) / Double(n / batch)]
}

func countEnters(_ ctx: AioContext) -> UInt64 { ctx.statistics.ringEnters }

/// xorshift64: the same generator as cref's w4read.
struct XorShift {
    var state: UInt64 = 0x9E37_79B9_7F4A_7C15
    mutating func next() -> UInt64 {
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        return state
    }
}

// W4 (b): 4 KiB random reads, QD 32, each completion submits the next read of its slot.
// Latency is from submit to the completion callback, the completion time read once per
// loop iteration as the C reference reads it once per batch of CQEs; 200 ms of warm-up.
func dataplaneW4Read(path: String, durationNs: Int64) throws -> [String: Double] {
    let ctx = try AioContext()
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw BenchError("cannot open \(path)") }
    defer { close(fd) }
    let qd = 32, bs = 4096
    let blocks = UInt64(lseek(fd, 0, SEEK_END)) / UInt64(bs)
    final class State {  // home thread only
        var rng = XorShift()
        var issued = [Int64](repeating: 0, count: 32)
        var histogram = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
        var measured: UInt64 = 0
        var errors: UInt64 = 0
        var measureFrom: Int64 = .max
        var stopping = false
        /// The completion time shared by every completion of one loop iteration, as the C
        /// reference reads the clock once per batch of CQEs (0: not read yet).
        var batchNow: Int64 = 0
    }
    let st = State()
    let buffers = UnsafeMutableRawBufferPointer.allocate(byteCount: qd * bs, alignment: 4096)
    defer { buffers.deallocate() }
    // The slot is the request's tag (the C reference's user_data).
    var target: CompletionTarget! = nil
    func submit(_ slot: Int) {
        let offset = (st.rng.next() % blocks) * UInt64(bs)
        st.issued[slot] = monotonicNanoseconds()
        ctx.submit(.read(fd: fd, buffer: UnsafeMutableRawBufferPointer(rebasing: buffers[slot * bs..<(slot + 1) * bs]),
                         offset: offset), to: target, tag: UInt32(slot))
    }
    target = ctx.makeCompletionTarget { tag, result in
        guard !st.stopping else { return }
        let slot = Int(tag)
        if st.batchNow == 0 { st.batchNow = monotonicNanoseconds() }
        let now = st.batchNow
        if result != Int32(bs) { st.errors += 1 }
        if now >= st.measureFrom {
            _ = st.histogram.record(UInt64(max(1, now - st.issued[slot])))
            st.measured += 1
        }
        submit(slot)
    }
    for s in 0..<qd { submit(s) }
    let t0 = monotonicNanoseconds() + 200_000_000
    st.measureFrom = t0
    let end = t0 + durationNs
    var now = monotonicNanoseconds()
    while now < end {
        ctx.poll(blocking: true)
        st.batchNow = 0
        now = monotonicNanoseconds()
    }
    let elapsed = now - t0
    // Let the reads in flight finish before the buffers go.
    st.stopping = true
    while ctx.pendingRequests > 0 { ctx.poll(blocking: true) }
    target = nil
    return ["iops": Double(st.measured) * 1e9 / Double(elapsed),
            "p50": Double(st.histogram.valueAtPercentile(50)), "p99": Double(st.histogram.valueAtPercentile(99)),
            "errors": Double(st.errors)]
}

/// fio's path, or nil when it is not installed.
func fioPath() -> String? {
    for p in ["/usr/bin/fio", "/usr/local/bin/fio"] where access(p, X_OK) == 0 { return p }
    return nil
}

// fio on the same file, with the workload's options (page cache kept: --invalidate=0).
func fioW4Read(fio: String, path: String, durationNs: Int64) -> [String: Double]? {
    let seconds = max(1, Int((Double(durationNs) / 1e9).rounded()))
    let command = "\(fio) --name=w4 --filename=\(path) --ioengine=io_uring --rw=randread --bs=4k --iodepth=32"
        + " --invalidate=0 --size=1G --time_based --runtime=\(seconds) --ramp_time=200ms --lat_percentiles=1 --output-format=json 2>/dev/null"
    guard let out = runCommand(command),
          let json = try? JSONSerialization.jsonObject(with: Data(out.utf8)) as? [String: Any],
          let job = (json["jobs"] as? [[String: Any]])?.first,
          let read = job["read"] as? [String: Any],
          let iops = read["iops"] as? Double,
          let lat = read["lat_ns"] as? [String: Any],
          let pct = lat["percentile"] as? [String: Any]
    else { return nil }
    func num(_ k: String) -> Double { (pct[k] as? Double) ?? Double(pct[k] as? Int ?? 0) }
    return ["iops": iops, "p50": num("50.000000"), "p99": num("99.000000")]
}
