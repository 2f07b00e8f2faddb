// Runs workloads W1, W2 and W5 (../shared/spec/WORKLOADS.md) on Dataplane and on the C
// reference (cref/cref.c, raw liburing, the same wake-up protocol), each 3 times, and prints
// the medians (with min and max) side by side with their ratio. Wall-clock figures on 2
// shared vCPUs are noisy: read the ratios, measured in the same run.
import Aio
import Glibc
import IOThreads
import Synchronization

let crefPath = CommandLine.arguments.dropFirst().first ?? "cref/bin/cref"
let repeats = 3

struct Sample { var values: [String: Double] }

func runCref(_ args: [String]) -> [String: Double] {
    let command = ([crefPath] + args).joined(separator: " ")
    guard let pipe = popen(command, "r") else { fatalError("cannot run \(command)") }
    var output = ""
    var buf = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = fread(&buf, 1, buf.count, pipe)
        if n <= 0 { break }
        output += String(decoding: buf[0..<n], as: UTF8.self)
    }
    let rc = pclose(pipe)
    precondition(rc == 0, "\(command) failed: \(output)")
    var result: [String: Double] = [:]
    for pair in output.split(whereSeparator: { $0 == " " || $0 == "\n" }) {
        let kv = pair.split(separator: "=")
        if kv.count == 2, let v = Double(kv[1]) { result[String(kv[0])] = v }
    }
    return result
}

func percentile(_ sorted: [Int64], _ p: Double) -> Double {
    Double(sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))])
}

// W1: a client thread schedules a BH on an IOThread; the BH sets a flag; the client spins.
func w1(pollMaxNs: Int64) throws -> [String: Double] {
    var props = IOThreadProperties()
    props.pollMaxNs = pollMaxNs
    let thread = try IOThread(id: "w1", properties: props)
    defer { thread.stop() }
    let flag = Atomic<Bool>(false)
    let bh = thread.context.makeBottomHalf(name: "w1") { flag.store(true, ordering: .releasing) }
    defer { bh.delete() }
    let warm = 20_000, n = 200_000
    var samples = [Int64](repeating: 0, count: n)
    var w0: UInt64 = 0, e0: UInt64 = 0
    for i in 0..<(warm + n) {
        if i == warm { w0 = thread.statistics.eventfdWrites; e0 = thread.statistics.ringEnters }
        flag.store(false, ordering: .relaxed)
        let t0 = monotonicNanoseconds()
        bh.schedule()
        while !flag.load(ordering: .acquiring) {}
        if i >= warm { samples[i - warm] = monotonicNanoseconds() - t0 }
    }
    samples.sort()
    return ["p50": percentile(samples, 0.5), "p99": percentile(samples, 0.99), "p999": percentile(samples, 0.999),
            "eventfd_per_op": Double(thread.statistics.eventfdWrites - w0) / Double(n),
            "enters_per_op": Double(thread.statistics.ringEnters - e0) / Double(n)]
}

// W2: one producer schedules 2M one-shot BHs as fast as it can; the IOThread runs them.
func w2() throws -> [String: Double] {
    var props = IOThreadProperties()
    props.pollMaxNs = 0
    let thread = try IOThread(id: "w2", properties: props)
    defer { thread.stop() }
    let ran = Atomic<Int>(0)
    let n = 2_000_000
    let ctx = thread.context!
    let t0 = monotonicNanoseconds()
    for _ in 0..<n { ctx.scheduleOneShot { ran.add(1, ordering: .relaxed) } }
    while ran.load(ordering: .relaxed) < n {}
    let dt = monotonicNanoseconds() - t0
    return ["per_second": Double(n) * 1e9 / Double(dt)]
}

// W5: 10k one-shot timers, deadlines uniform in 0–10 ms (after a 20 ms lead for arming).
func w5() throws -> [String: Double] {
    let thread = try IOThread(id: "w5")
    defer { thread.stop() }
    let n = 10_000
    final class Results: @unchecked Sendable {  // written on the IOThread only, read after `done`
        var late = [Int64](repeating: 0, count: 10_000)
        var timers: [AioTimer] = []
        var fired = 0
    }
    let results = Results()
    let done = Atomic<Bool>(false)
    let ctx = thread.context!
    var rng = SystemRandomNumberGenerator()
    let offsets = (0..<n).map { _ in Int64.random(in: 0..<10_000_000, using: &rng) }
    ctx.scheduleOneShot {
        let start = monotonicNanoseconds() + 20_000_000
        for i in 0..<n {
            let deadline = start + offsets[i]
            let t = ctx.makeTimer {
                results.late[i] = monotonicNanoseconds() - deadline
                results.fired += 1
                if results.fired == n { done.store(true, ordering: .releasing) }
            }
            t.arm(at: deadline)
            results.timers.append(t)
        }
    }
    while !done.load(ordering: .acquiring) { usleep(1000) }
    let sorted = results.late.sorted()
    return ["p50": percentile(sorted, 0.5), "p99": percentile(sorted, 0.99), "max": Double(sorted.last!)]
}

func median3(_ runs: [[String: Double]], _ key: String) -> (Double, Double, Double) {
    let v = runs.compactMap { $0[key] }.sorted()
    return (v[v.count / 2], v.first!, v.last!)
}

func fmt(_ x: Double) -> String {
    if x >= 1e6 { return String(Int((x / 1e6 * 100).rounded())) .inserting(".", at: 2) + "M" }
    if x < 10 { return String((x * 1000).rounded() / 1000) }
    return String(Int(x.rounded()))
}

extension String {
    func padded(_ width: Int) -> String { self + String(repeating: " ", count: max(1, width - count)) }

    func inserting(_ c: Character, at fromEnd: Int) -> String {
        var s = self
        while s.count <= fromEnd { s = "0" + s }
        s.insert(c, at: s.index(s.endIndex, offsetBy: -fromEnd))
        return s
    }
}

func row(_ name: String, _ ours: [[String: Double]], _ theirs: [[String: Double]], _ key: String, higherIsBetter: Bool = false) {
    let (a, amin, amax) = median3(ours, key)
    let (b, bmin, bmax) = median3(theirs, key)
    let ratio = b == 0 ? 0 : a / b
    func cell(_ m: Double, _ lo: Double, _ hi: Double) -> String { "\(fmt(m)) [\(fmt(lo))–\(fmt(hi))]" }
    let ratioText: String = b == 0 ? "–" : "\((ratio * 100).rounded() / 100)×" + (higherIsBetter ? " (higher is better)" : "")
    let line: String = name.padded(44) + cell(a, amin, amax).padded(30) + cell(b, bmin, bmax).padded(30)
    print(line + ratioText)
}

var u = utsname()
uname(&u)
let kernel = withUnsafeBytes(of: u.release) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
print("Dataplane vs the C reference on raw liburing: median of \(repeats) [min–max], ratio = Dataplane / C")
print("machine: \(sysconf(Int32(_SC_NPROCESSORS_ONLN))) vCPUs, kernel \(kernel); backend: \(try AioContext().backendKind)")
print("")
let header: String = "workload".padded(44) + "Dataplane".padded(30) + "C reference".padded(30)
print(header + "ratio")
for maxNs: Int64 in [0, 32768] {
    var ours: [[String: Double]] = [], theirs: [[String: Double]] = []
    for _ in 0..<repeats {
        ours.append(try w1(pollMaxNs: maxNs))
        theirs.append(runCref(["w1", String(maxNs)]))
    }
    let label = maxNs == 0 ? "W1 wake-rtt, polling off" : "W1 wake-rtt, polling on"
    row("\(label) p50 ns", ours, theirs, "p50")
    row("\(label) p99 ns", ours, theirs, "p99")
    row("\(label) p99.9 ns", ours, theirs, "p999")
    row("\(label) eventfd writes/op", ours, theirs, "eventfd_per_op")
    row("\(label) ring enters/op", ours, theirs, "enters_per_op")
}
do {
    var ours: [[String: Double]] = [], theirs: [[String: Double]] = []
    for _ in 0..<repeats {
        ours.append(try w2())
        theirs.append(runCref(["w2"]))
    }
    row("W2 one-shot BHs per second", ours, theirs, "per_second", higherIsBetter: true)
}
do {
    var ours: [[String: Double]] = [], theirs: [[String: Double]] = []
    for _ in 0..<repeats {
        ours.append(try w5())
        theirs.append(runCref(["w5"]))
    }
    row("W5 timer lateness p50 ns", ours, theirs, "p50")
    row("W5 timer lateness p99 ns", ours, theirs, "p99")
    row("W5 timer lateness max ns", ours, theirs, "max")
}
