// `make bench`: workloads W1–W6 (Benchmarks/WORKLOADS.md), allocations, memory and idle
// CPU, on Dataplane beside the C reference (cref/cref.c, raw liburing, the same protocols)
// and SwiftNIO (W1, W2, W5). Each comparison is repeated (3 times by default), runs of the
// implementations interleaved, and printed as median [min–max] with the ratio
// Dataplane / reference and the issue's goal. Wall-clock figures on 2 shared vCPUs are
// noisy: read the ratios, measured in the same run.
//
// Usage: compare [CREF]                 (default cref/bin/cref)
//        compare probe-idle-memory | probe-soak SECONDS   (children of the memory rows)
//        compare probe-w2e ROUNDS | probe-w1 RUNS | probe-w4nop RUNS | probe-w3 QD SPIN RUNS | probe-w6
//          (one workload alone, for profiling)
// Environment: DP_BENCH_REPEATS (3), DP_BENCH_W3_MS (2000, measured window per W3/W4 run),
// DP_BENCH_W6_MS (5000), DP_BENCH_SOAK_SECONDS (10; the issue's figure is 60),
// DP_BENCH_ONLY (comma-separated sections: w1,w2,w3,w4,w5,w6,alloc,memory,idle).
import Aio
import Glibc

let args = Array(CommandLine.arguments.dropFirst())
if args.first == "probe-idle-memory" {
    try probeIdleMemory()
    exit(0)
}
if args.first == "probe-w2e" {  // W2 existing BHs alone, for perf and callgrind
    let pool = try ExistingBHs()
    for _ in 0..<(Int(args.dropFirst().first ?? "5") ?? 5) { print("per_second=\(Int(pool.round()["per_second"]!))") }
    pool.close()
    exit(0)
}
if args.first == "probe-w1" {  // W1 polling on alone, for profiling
    for _ in 0..<(Int(args.dropFirst().first ?? "3") ?? 3) { print(try dataplaneW1(pollMaxNs: 32768)) }
    exit(0)
}
if args.first == "probe-w4nop" {  // W4 NOPs alone, for profiling
    for _ in 0..<(Int(args.dropFirst().first ?? "3") ?? 3) { print(try dataplaneW4Nop(closures: getenv("CLOSURES") != nil)) }
    exit(0)
}
if args.first == "probe-w3" {  // W3 alone: probe-w3 QD SPINNING(0|1) [RUNS], polling on
    let a = Array(args.dropFirst())
    let config = W3Config(qd: Int(a.first ?? "32") ?? 32, pollMaxNs: 32768, spinning: a.dropFirst().first == "1")
    for _ in 0..<(Int(a.dropFirst(2).first ?? "1") ?? 1) {
        print(try dataplaneW3(config, warmupNs: 300_000_000, durationNs: 1_500_000_000))
    }
    exit(0)
}
if args.first == "probe-w6" {  // W6 alone (3 s): pause p50 and p99 in ns
    let r = try dataplaneW6(durationNs: 3_000_000_000)
    print("moves_per_second=\(Int(r["moves_per_second"]!)) pause_p50=\(Int(r["pause_p50"]!)) pause_p99=\(Int(r["pause_p99"]!))")
    exit(0)
}
if args.first == "probe-soak" {
    try probeSoak(seconds: Int(args.dropFirst().first ?? "10") ?? 10)
    exit(0)
}

let crefPath = args.first ?? "cref/bin/cref"
let repeats = envInt("DP_BENCH_REPEATS", 3)
let w3Ms = envInt("DP_BENCH_W3_MS", 2000)
let w6Ms = envInt("DP_BENCH_W6_MS", 5000)
let soakSeconds = envInt("DP_BENCH_SOAK_SECONDS", 10)
let only: Set<String>? = getenv("DP_BENCH_ONLY").map { Set(String(cString: $0).split(separator: ",").map(String.init)) }
func enabled(_ section: String) -> Bool { only?.contains(section) ?? true }

func cref(_ a: [String]) -> [String: Double] {
    let command = ([crefPath] + a).joined(separator: " ")
    guard let out = runCommand(command) else { fatalError("\(command) failed") }
    return parsePairs(out)
}

let table = Table()
let backend = try AioContext().backendKind
let title = [
    "Dataplane vs the C reference (raw liburing) and SwiftNIO \(nioVersion): median of \(repeats) runs [min–max]; ratio = Dataplane / reference",
    "machine: \(machineDescription()); backend: \(backend); build: release",
    "parameters: W1 200k round trips after 20k; W2 2M BHs; W3 warm-up 500 ms + \(w3Ms) ms, queue size 256, null device;"
        + " W4 2M NOPs, reads \(w3Ms) ms after 200 ms on a 1 GiB file; W5 10k timers; W6 \(w6Ms) ms; soak \(soakSeconds) s",
]
for t in title { eprint(t) }
var existingBHMallocs: (mallocs: Double, ops: Double)? = nil
var w3Mallocs: [Double] = []

// MARK: W1 wake-rtt
if enabled("w1") {
    var nio = Runs()
    for _ in 0..<repeats { nio.append(try nioW1()) }
    for maxNs: Int64 in [32768, 0] {
        var ours = Runs(), theirs = Runs()
        for _ in 0..<repeats {
            ours.append(try dataplaneW1(pollMaxNs: maxNs))
            theirs.append(cref(["w1", String(maxNs)]))
        }
        let on = maxNs != 0
        let label = on ? "W1 wake-rtt, polling on" : "W1 wake-rtt, polling off"
        let p50 = ours.stat("p50"), c50 = theirs.stat("p50"), n50 = nio.stat("p50")
        if on {
            let met = c50.map { p50!.median <= 1.3 * $0.median } == true && n50.map { p50!.median <= 0.5 * $0.median } == true
            table.add("\(label) p50 ns", .ns, dp: p50, c: c50, nio: n50, goal: "≤1.3× C; ≤0.5× NIO execute", met: met)
        } else {
            let met = c50.map { p50!.median <= 1.2 * $0.median } == true
            table.add("\(label) p50 ns", .ns, dp: p50, c: c50, nio: n50, goal: "≤1.2× C", met: met)
        }
        table.add("\(label) p99 ns", .ns, dp: ours.stat("p99"), c: theirs.stat("p99"), nio: nio.stat("p99"))
        table.add("\(label) p99.9 ns", .ns, dp: ours.stat("p999"), c: theirs.stat("p999"), nio: nio.stat("p999"))
        table.add("\(label) eventfd writes/op", .count, dp: ours.stat("eventfd_per_op"), c: theirs.stat("eventfd_per_op"), ratios: false)
        table.add("\(label) ring enters/op", .count, dp: ours.stat("enters_per_op"), c: theirs.stat("enters_per_op"), ratios: false)
    }
}

// MARK: loop iteration (no reference): the fixed cost every wake-up pays
if enabled("iter") {
    var runs = Runs()
    for _ in 0..<repeats {
        let ctx = try AioContext()
        while ctx.poll(blocking: false) {}
        let n = 2_000_000
        let t0 = monotonicNanoseconds()
        for _ in 0..<n { _ = ctx.poll(blocking: false) }
        runs.append(["ns": Double(monotonicNanoseconds() - t0) / Double(n)])
    }
    table.add("idle non-blocking loop iteration ns (no reference)", .ns, dp: runs.stat("ns"), ratios: false)
}

// MARK: W2 bh-throughput
if enabled("w2") {
    var oneShot = Runs(), existing = Runs(), existingArray = Runs(), c = Runs(), nio = Runs(), floor = Runs()
    let pool = try ExistingBHs()
    for _ in 0..<repeats {
        floor.append(closureHandOffFloor())
        existing.append(pool.round())
        existingArray.append(pool.round(unmanaged: false))
        oneShot.append(try dataplaneW2OneShot())
        c.append(cref(["w2"]))
        nio.append(try nioW2())
    }
    pool.close()
    let e = existing.stat("per_second"), o = oneShot.stat("per_second"), cs = c.stat("per_second"), ns = nio.stat("per_second")
    table.add("W2 existing BHs/s (C: preallocated nodes)", .rate, dp: e, c: cs,
              goal: "≥0.5× C", met: cs.map { e!.median >= 0.5 * $0.median })
    table.add("  the same from a [BottomHalf] loop (caller's ARC)", .rate, dp: existingArray.stat("per_second"), c: cs)
    table.add("W2 one-shot BHs/s (NIO: execute)", .rate, dp: o, c: cs, nio: ns,
              goal: "≥10× NIO execute", met: ns.map { o!.median >= 10 * $0.median })
    existingBHMallocs = ((existing.runs + existingArray.runs).reduce(0) { $0 + $1["mallocs"]! },
                         (existing.runs + existingArray.runs).reduce(0) { $0 + $1["ops"]! })
    table.add("  floor: closures through a preallocated ring, no BH", .rate, dp: floor.stat("per_second"), nio: ns)
    table.add("W2 allocations per one-shot BH / execute", .count, dp: oneShot.stat("mallocs_per_op"),
              nio: nio.stat("mallocs_per_op"), ratios: false)
}

// MARK: W3 virtqueue
if enabled("w3") {
    let configs: [(W3Config, Double)] = [
        (W3Config(qd: 1, pollMaxNs: 32768, spinning: true), 0.8),
        (W3Config(qd: 1, pollMaxNs: 0, spinning: false), 0.9),
        (W3Config(qd: 32, pollMaxNs: 32768, spinning: false), 0.5),
    ]
    for (config, goal) in configs {
        var ours = Runs(), theirs = Runs()
        for _ in 0..<repeats {
            ours.append(try dataplaneW3(config, warmupNs: 500_000_000, durationNs: Int64(w3Ms) * 1_000_000))
            theirs.append(cref(config.crefArgs + ["500", String(w3Ms)]))
        }
        let label = "W3 \(config.label)"
        let dp = ours.stat("iops"), cs = theirs.stat("iops")
        table.add("\(label) IOPS", .rate, dp: dp, c: cs, goal: "≥\(goal)× C", met: cs.map { dp!.median >= goal * $0.median })
        table.add("  latency p50 / p99 / p99.9 ns", .ns, dp: ours.stat("p50"), c: theirs.stat("p50"))
        table.rows[table.rows.count - 1].dataplane = [ours.stat("p50"), ours.stat("p99"), ours.stat("p999")]
            .map { Unit.ns.format($0!.median) }.joined(separator: " / ")
        table.rows[table.rows.count - 1].cref = [theirs.stat("p50"), theirs.stat("p99"), theirs.stat("p999")]
            .map { Unit.ns.format($0!.median) }.joined(separator: " / ")
        table.add("  kicks/req", .count, dp: ours.stat("kicks_per_req"), c: theirs.stat("kicks_per_req"), ratios: false)
        table.add("  interrupts/req", .count, dp: ours.stat("irqs_per_req"), c: theirs.stat("irqs_per_req"), ratios: false)
        table.add("  IOThread CPU ns/req", .count, dp: ours.stat("cpu_ns_per_req"), c: theirs.stat("cpu_ns_per_req"))
        let bad = ours.runs.reduce(0) { $0 + ($1["lost"] ?? 0) + ($1["unexpected"] ?? 0) }
            + theirs.runs.reduce(0) { $0 + ($1["lost"] ?? 0) + ($1["unexpected"] ?? 0) }
        if bad != 0 { table.notes.append("W3 \(config.label): \(Int(bad)) requests lost or completed wrongly") }
        w3Mallocs += ours.runs.compactMap { $0["mallocs_per_req"] }
    }
}

// MARK: W4 io
if enabled("w4") {
    var ours = Runs(), closures = Runs(), theirs = Runs()
    for _ in 0..<repeats {
        ours.append(try dataplaneW4Nop())
        closures.append(try dataplaneW4Nop(closures: true))
        theirs.append(cref(["w4nop"]))
    }
    let dp = ours.stat("per_second"), cs = theirs.stat("per_second")
    table.add("W4 NOPs/s through the context ring, batches of 32", .rate, dp: dp, c: cs,
              goal: "≥0.8× C", met: cs.map { dp!.median >= 0.8 * $0.median })
    table.add("  the same with a closure per request", .rate, dp: closures.stat("per_second"), c: cs)
    table.add("  ring enters per batch", .count, dp: ours.stat("enters_per_batch"), ratios: false)

    let path = "\(getcwd(nil, 0).map { String(cString: $0) } ?? ".")/.build/w4-1GiB.dat"
    try prepareW4File(path)
    let fio = fioPath()
    if fio == nil {
        table.notes.append("fio is not installed: the fio column of W4 is skipped (apt-get install -y fio)")
    }
    var reads = Runs(), creads = Runs(), fios = Runs()
    for _ in 0..<repeats {
        reads.append(try dataplaneW4Read(path: path, durationNs: Int64(w3Ms) * 1_000_000))
        creads.append(cref(["w4read", path, String(w3Ms)]))
        if let fio, let r = fioW4Read(fio: fio, path: path, durationNs: Int64(w3Ms) * 1_000_000) { fios.append(r) }
    }
    let r = reads.stat("iops"), c = creads.stat("iops"), f = fios.stat("iops")
    var row = Row(workload: "W4 4 KiB random reads QD32, page cache, IOPS", dataplane: cell(r, .rate), cref: cell(c, .rate))
    row.nio = f.map { "fio \(cell($0, .rate))" } ?? "fio: not installed"
    row.ratios = [ratioText(r, c, "C"), ratioText(r, f, "fio")].compactMap { $0 }.joined(separator: ", ")
    row.goal = "≥0.9× C; fio beside"
    row.met = c.map { r!.median >= 0.9 * $0.median }
    table.add(row)
    var lat = Row(workload: "  latency p50 / p99 ns")
    lat.dataplane = "\(Unit.ns.format(reads.stat("p50")!.median)) / \(Unit.ns.format(reads.stat("p99")!.median))"
    lat.cref = "\(Unit.ns.format(creads.stat("p50")!.median)) / \(Unit.ns.format(creads.stat("p99")!.median))"
    if let f50 = fios.stat("p50"), let f99 = fios.stat("p99") {
        lat.nio = "fio \(Unit.ns.format(f50.median)) / \(Unit.ns.format(f99.median))"
    }
    table.add(lat)
    let errors = reads.runs.reduce(0) { $0 + ($1["errors"] ?? 0) } + creads.runs.reduce(0) { $0 + ($1["errors"] ?? 0) }
    if errors != 0 { table.notes.append("W4: \(Int(errors)) reads returned less than 4 KiB") }
}

// MARK: W5 timers
if enabled("w5") {
    var ours = Runs(), theirs = Runs(), nio = Runs()
    for _ in 0..<repeats {
        ours.append(try dataplaneW5())
        theirs.append(cref(["w5"]))
        nio.append(try nioW5())
    }
    let p50 = ours.stat("p50")!, c50 = theirs.stat("p50")!, p99 = ours.stat("p99")!, c99 = theirs.stat("p99")!
    table.add("W5 timer lateness p50 ns", .ns, dp: p50, c: c50, nio: nio.stat("p50"),
              goal: "≤ C + 5µs", met: p50.median <= c50.median + 5000)
    table.add("W5 timer lateness p99 ns", .ns, dp: p99, c: c99, nio: nio.stat("p99"),
              goal: "≤1.2× C", met: p99.median <= 1.2 * c99.median)
    table.add("W5 timer lateness max ns", .ns, dp: ours.stat("max"), c: theirs.stat("max"), nio: nio.stat("max"))
    table.add("  time to arm the 10k timers ns", .ns, dp: ours.stat("arm_ns"), nio: nio.stat("arm_ns"))
}

// MARK: W6 churn
if enabled("w6") {
    var runs = Runs()
    for _ in 0..<repeats { runs.append(try dataplaneW6(durationNs: Int64(w6Ms) * 1_000_000)) }
    let moves = runs.stat("moves_per_second")!, p99 = runs.stat("pause_p99")!
    table.add("W6 churn moves/s (4 devices, 2 IOThreads, \(w6Ms) ms)", .rate, dp: moves, goal: "≥1000",
              met: moves.median >= 1000)
    table.add("W6 pause per move p50 ns", .ns, dp: runs.stat("pause_p50"))
    table.add("W6 pause per move p99 ns", .ns, dp: p99, goal: "≤100µs", met: p99.median <= 100_000)
    table.add("W6 pause per move max ns", .ns, dp: runs.stat("pause_max"))
    // Lost, duplicated and holders: every run must pass, so these add up over the runs.
    let sum = { (key: String) in runs.runs.reduce(0) { $0 + $1[key]! } }
    var row = Row(workload: "W6 requests lost / completed twice (all runs)")
    row.dataplane = "\(Int(sum("lost"))) / \(Int(sum("duplicated"))) of \(Int(sum("completed")))"
    row.goal = "0 / 0"
    row.met = sum("lost") == 0 && sum("duplicated") == 0
    table.add(row)
    var holders = Row(workload: "W6 holders: attached / after detach (every run)")
    let attached = Set(runs.runs.map { Int($0["holders_attached"]!) }), after = Set(runs.runs.map { Int($0["holders_after_detach"]!) })
    holders.dataplane = "\(attached.sorted().map(String.init).joined(separator: ",")) / \(after.sorted().map(String.init).joined(separator: ","))"
    holders.goal = "4 / 0"
    holders.met = attached == [4] && after == [0]
    table.add(holders)
}

// MARK: Allocations
if enabled("alloc") {
    if !w3Mallocs.isEmpty {
        let worst = w3Mallocs.max()!
        table.add("allocations per W3 request (steady state, all runs)", .count, dp: Stat(worst), goal: "0", met: worst == 0)
    }
    if let e = existingBHMallocs {
        // Every malloc in the process while the producer scheduled and the IOThread ran them.
        var row = Row(workload: "allocations per scheduled existing BH")
        row.dataplane = "\(Unit.count.format(e.mallocs / e.ops)) (\(Int(e.mallocs)) in \(Unit.rate.format(e.ops)))"
        row.goal = "0"
        row.met = e.mallocs == 0
        table.add(row)
    }
    let jobs = try dataplaneExecutorJobs()
    table.add("allocations per executor job (actor hop)", .count, dp: Stat(jobs["mallocs_per_job"]!), goal: "0",
              met: jobs["mallocs_per_job"]! == 0)
    table.add("  executor job ns (IOThread to IOThread hop)", .ns, dp: Stat(jobs["ns_per_hop"]!))
}

// MARK: Memory
if enabled("memory") {
    if let m = runSelf(["probe-idle-memory"]) {
        let per = m["per_thread_kib"]!
        table.add("idle IOThread RSS beyond ring and stack (64 made)", .kib, dp: Stat(per), goal: "≤256KiB", met: per <= 256)
        var row = Row(workload: "  RSS before → after; rings; stacks (all 64)")
        row.dataplane = "\(Int(m["rss_before_kib"]!)) → \(Int(m["rss_after_kib"]!)) KiB; \(Int(m["rings_kib"]!)); \(Int(m["stacks_kib"]!))"
        table.add(row)
    } else {
        table.notes.append("memory probe failed")
    }
    if let s = runSelf(["probe-soak", String(soakSeconds)]) {
        let g = s["growth_kib"]!
        table.add("W3 RSS growth after warm-up (\(soakSeconds) s run, QD32 polling on)", .kib, dp: Stat(g),
                  goal: "none (≤64KiB noise)", met: g <= 64)
    } else {
        table.notes.append("soak probe failed")
    }
}

// MARK: Idle CPU
if enabled("idle") {
    let r = try idleCPU()
    table.add("idle IOThread CPU, polling on, 1–6 s after work", .percent, dp: Stat(r["cpu_percent"]!),
              goal: "~0% (≤1%)", met: r["cpu_percent"]! <= 1)
}

print("")
table.printAll(title: title)
