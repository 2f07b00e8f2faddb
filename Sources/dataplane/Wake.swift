import Aio
import ArgumentParser
import Glibc
import IOThreads
import LoadGen
import Synchronization

/// `dataplane wake`: the wake-up round trip (workload W1) to an IOThread with adaptive
/// polling off and on, side by side.
struct Wake: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Wake an IOThread from another thread, polling off then on, and report the round trip (W1).")

    @Option(parsing: .unconditional, help: "Seconds per setting.")
    var seconds: Double = 3

    @Option(parsing: .unconditional, help: "poll-max-ns for the polling run.")
    var pollMaxNs: Int64 = 32768

    @Option(help: "fd-monitoring backend: io_uring or epoll.")
    var fdmon: String = "io_uring"

    @Option(parsing: .unconditional, help: "Nanoseconds the client thinks between round trips (0: W1 back to back).")
    var thinkNs: Int64 = 5_000

    mutating func validate() throws {
        guard seconds > 0 && seconds <= 600 else { throw ValidationError("--seconds must be in (0, 600]") }
        guard pollMaxNs >= 0 else { throw ValidationError("--poll-max-ns must be >= 0") }
        guard thinkNs >= 0 && thinkNs <= 1_000_000_000 else { throw ValidationError("--think-ns must be in [0, 1e9]") }
        guard fdmon == "io_uring" || fdmon == "epoll" else { throw ValidationError("--fdmon must be io_uring or epoll") }
    }

    func run() throws {
        let backend: AioContext.Backend = fdmon == "epoll" ? .epoll : .automatic
        print("W1 wake-rtt: a client thread schedules a bottom half on an IOThread and spins until it ran,")
        print("then thinks for \(thinkNs) ns before the next one.")
        print(machineLine())
        var rows: [(String, Result)] = []
        for (label, maxNs) in [("polling off (poll-max-ns 0)", Int64(0)), ("polling on (poll-max-ns \(pollMaxNs))", pollMaxNs)] {
            var props = IOThreadProperties()
            props.pollMaxNs = maxNs
            let thread = try IOThread(id: "demo", properties: props, backend: backend)
            let hold = try thread.hold(.monitor(name: "wake"))  // the way to its context
            let result = measure(hold.context, thread, seconds: seconds)
            hold.release()
            print("  \(label): backend \(thread.backendKind), \(result.count) round trips")
            try thread.stop()
            rows.append((label, result))
        }
        print("")
        print("setting                          p50 ns    p99 ns  p99.9 ns  eventfd writes/op  ring enters/op  IOThread CPU")
        for (label, r) in rows {
            print(pad(label, 30) + pad(r.p50, 9, right: true) + pad(r.p99, 10, right: true) + pad(r.p999, 10, right: true)
                  + pad(String(format2(r.eventfdPerOp)), 19, right: true) + pad(String(format2(r.entersPerOp)), 16, right: true)
                  + pad("\(Int(r.cpuPercent.rounded()))%", 14, right: true))
        }
        if rows.count == 2, rows[0].1.p50 > 0 {
            print("\npolling on / off, p50: \(format2(Double(rows[1].1.p50) / Double(rows[0].1.p50)))× "
                  + "(a sleeping thread costs a wake-up; a polling one sees the work with no system call)")
        }
    }

    struct Result {
        var count = 0
        var p50 = 0, p99 = 0, p999 = 0
        var eventfdPerOp = 0.0, entersPerOp = 0.0, cpuPercent = 0.0
    }

    func measure(_ context: AioContext, _ thread: IOThread, seconds: Double) -> Result {
        let flag = Atomic<Bool>(false)
        let bh = context.makeBottomHalf(name: "demo-w1") { flag.store(true, ordering: .releasing) }
        defer { bh.delete() }
        let think = thinkNs
        func roundTrip() -> Int64 {
            if think > 0 {
                let until = monotonicNanoseconds() + think
                while monotonicNanoseconds() < until {}
            }
            flag.store(false, ordering: .relaxed)
            let t0 = monotonicNanoseconds()
            bh.schedule()
            while !flag.load(ordering: .acquiring) {}
            return monotonicNanoseconds() - t0
        }
        // Warm-up: lets the adaptive rule find its window.
        for _ in 0..<2000 { _ = roundTrip() }
        let stats = thread.statistics
        let writes0 = stats.eventfdWrites, enters0 = stats.ringEnters
        let cpu0 = threadCPUNanoseconds(thread.threadID)
        let start = monotonicNanoseconds()
        let end = start + Int64(seconds * 1e9)
        var samples: [Int64] = []
        samples.reserveCapacity(1 << 20)
        while monotonicNanoseconds() < end { samples.append(roundTrip()) }
        let wall = monotonicNanoseconds() - start
        let cpu = threadCPUNanoseconds(thread.threadID) - cpu0
        samples.sort()
        func pct(_ p: Double) -> Int { Int(samples[min(samples.count - 1, Int(Double(samples.count) * p))]) }
        let n = Double(samples.count)
        return Result(count: samples.count, p50: pct(0.5), p99: pct(0.99), p999: pct(0.999),
                      eventfdPerOp: Double(stats.eventfdWrites - writes0) / n,
                      entersPerOp: Double(stats.ringEnters - enters0) / n,
                      cpuPercent: 100 * Double(cpu) / Double(wall))
    }
}

/// A thread's CPU time from the kernel (`/proc/self/task/TID/stat`, utime + stime).
func threadCPUNanoseconds(_ tid: Int32) -> Int64 {
    let fd = open("/proc/self/task/\(tid)/stat", O_RDONLY)
    guard fd >= 0 else { return 0 }
    defer { close(fd) }
    var buf = [UInt8](repeating: 0, count: 1024)
    let n = read(fd, &buf, buf.count)
    guard n > 0 else { return 0 }
    let text = String(decoding: buf[0..<n], as: UTF8.self)
    // Fields after the command name (which is in parentheses and may hold spaces).
    guard let close = text.lastIndex(of: ")") else { return 0 }
    let fields = text[text.index(after: close)...].split(separator: " ")
    guard fields.count > 13, let utime = Int64(fields[11]), let stime = Int64(fields[12]) else { return 0 }
    return (utime + stime) * 1_000_000_000 / Int64(sysconf(Int32(_SC_CLK_TCK)))
}

func machineLine() -> String {
    let m = LoadResult.Machine.current
    return "machine: \(m.cpu), \(m.vcpus) vCPUs, kernel \(m.kernel); build: \(m.build)"
}

func pad(_ s: String, _ width: Int, right: Bool = false) -> String {
    let fill = String(repeating: " ", count: max(0, width - s.count))
    return right ? fill + s : s + fill
}
func pad(_ n: Int, _ width: Int, right: Bool = false) -> String { pad(String(n), width, right: right) }
func format2(_ x: Double) -> String {
    let r = (x * 100).rounded() / 100
    return String(r)
}
