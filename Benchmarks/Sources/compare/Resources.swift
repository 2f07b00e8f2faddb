// Memory and idle CPU of IOThreads. The memory figures are taken in a child process (this
// executable, `compare probe-…`), so that heap freed by earlier workloads cannot absorb
// what is being measured.
import Aio
import CBenchSupport
import Glibc
import IOThreads
import Synchronization

/// Where a thread's stack is mapped (pthread_getattr_np on that thread).
final class StackRange: @unchecked Sendable {  // written on the IOThread before `done`, read after
    var low: UInt = 0
    var high: UInt = 0
    let done = Atomic<Bool>(false)
}

/// `compare probe-idle-memory`: RSS before and after creating 64 idle IOThreads (polling on,
/// the default), and how much of the growth is the io_uring rings and the thread stacks:
/// the Rss of the `anon_inode:[io_uring]` mappings, and of the mappings that hold each
/// IOThread's stack (its pthread stack range, asked on the thread itself).
func probeIdleMemory() throws {
    let count = 64
    // Warm what any first IOThread pays once per process (lazy runtime metadata, the first
    // thread's malloc arena is not per thread either): one IOThread, created and stopped.
    try IOThread(id: "warm").stop()
    sleepNanoseconds(100_000_000)
    let ringsBefore = smaps().filter { $0.name.contains("io_uring") }.reduce(0) { $0 + $1.rssKiB }
    let rss0 = residentKiB()
    var threads: [IOThread] = []
    for i in 0..<count { threads.append(try IOThread(id: "idle\(i)")) }
    sleepNanoseconds(500_000_000)  // let them settle into their blocking waits
    let rss1 = residentKiB()
    var stacks: [StackRange] = []
    let holds = IOThreadHoldSet(holder: .monitor(name: "bench"))
    try holds.hold(threads)
    defer { holds.release() }
    for t in threads {
        let r = StackRange()
        holds.context(of: t).scheduleOneShot {
            var low: UInt = 0, high: UInt = 0
            _ = dp_thread_stack(&low, &high)
            r.low = low
            r.high = high
            r.done.store(true, ordering: .releasing)
        }
        while !r.done.load(ordering: .acquiring) { usleep(100) }
        stacks.append(r)
    }
    let maps = smaps()
    let rings = maps.filter { $0.name.contains("io_uring") }.reduce(0) { $0 + $1.rssKiB } - ringsBefore
    var stackKiB = 0
    for m in maps where stacks.contains(where: { m.start < $0.high && m.end > $0.low }) { stackKiB += m.rssKiB }
    holds.release()
    for t in threads { try t.stop() }
    print(pairs(["rss_before_kib": Double(rss0), "rss_after_kib": Double(rss1), "threads": Double(count),
                 "rings_kib": Double(rings), "stacks_kib": Double(stackKiB),
                 "per_thread_kib": Double(rss1 - rss0 - rings - stackKiB) / Double(count)]))
}

/// `compare probe-soak SECONDS`: one W3 run (QD 32, polling on, blocking guest) with RSS
/// sampled when the measured window starts (after a 2 s warm-up) and every second after.
/// Growth is of RssAnon (heap, stacks, anonymous mappings): VmRSS also grows by the code
/// pages (file-backed, shared, clean) that paths run for the first time fault in, which
/// is not memory the run holds on to.
func probeSoak(seconds: Int) throws {
    final class Samples: @unchecked Sendable { var rss: [Int] = []; var anon: [Int] = [] }  // main thread only
    let samples = Samples()
    let verbose = getenv("DP_BENCH_VERBOSE") != nil
    nonisolated(unsafe) var maps0: [Mapping] = []
    let r = try dataplaneW3(W3Config(qd: 32, pollMaxNs: 32768, spinning: false), warmupNs: 2_000_000_000,
                            durationNs: Int64(seconds) * 1_000_000_000, countMallocs: false) { t in
        samples.rss.append(residentKiB())
        samples.anon.append(residentKiB("RssAnon"))
        if verbose && t == 0 { maps0 = smaps() }
    }
    if verbose {
        // Which mappings grew during the measured window.
        for m in smaps() {
            let before = maps0.first(where: { $0.start == m.start })?.rssKiB ?? 0
            if m.rssKiB != before { eprint("  \(String(m.start, radix: 16))-\(String(m.end, radix: 16)) \(m.name): \(before) -> \(m.rssKiB) KiB") }
        }
    }
    let first = samples.anon.first ?? 0, last = samples.anon.last ?? 0
    if verbose { eprint("soak VmRSS KiB, each second: \(samples.rss); RssAnon: \(samples.anon)") }
    print(pairs(["anon_warm_kib": Double(first), "anon_end_kib": Double(last), "anon_max_kib": Double(samples.anon.max() ?? 0),
                 "growth_kib": Double(last - first), "vmrss_growth_kib": Double((samples.rss.last ?? 0) - (samples.rss.first ?? 0)),
                 "iops": r["iops"] ?? 0, "seconds": Double(seconds)]))
}

/// Idle CPU: an IOThread with polling on is kept busy (W1 round trips, so its poll windows
/// have grown), then left with nothing to do; its CPU clock is read from 1 s to 6 s later.
func idleCPU() throws -> [String: Double] {
    let thread = try IOThread(id: "idle")
    defer { try? thread.stop() }
    // The benchmark holds the IOThread it uses: the way to its context.
    let holds = IOThreadHoldSet(holder: .monitor(name: "bench"))
    try holds.hold([thread])
    defer { holds.release() }
    let ctx = holds.context(of: thread)
    let flag = Atomic<Bool>(false)
    let bh = ctx.makeBottomHalf(name: "burst") { flag.store(true, ordering: .releasing) }
    defer { bh.delete() }
    for _ in 0..<50_000 {
        flag.store(false, ordering: .relaxed)
        bh.schedule()
        while !flag.load(ordering: .acquiring) {}
    }
    let windows = thread.statistics.pollWindows.values.max() ?? 0
    sleepNanoseconds(1_000_000_000)
    let c0 = thread.cpuTimeNanoseconds
    let t0 = monotonicNanoseconds()
    sleepNanoseconds(5_000_000_000)
    let c1 = thread.cpuTimeNanoseconds
    let dt = monotonicNanoseconds() - t0
    return ["cpu_percent": 100 * Double(c1 - c0) / Double(dt), "poll_window_ns_before": Double(windows)]
}

/// Runs this executable with `args` and parses the line it prints.
func runSelf(_ args: [String]) -> [String: Double]? {
    var buf = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buf, buf.count - 1)
    let me = n > 0 ? String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : CommandLine.arguments[0]
    guard let out = runCommand(([me] + args).joined(separator: " ")) else { return nil }
    return parsePairs(out)
}
