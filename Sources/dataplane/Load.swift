import Aio
import ArgumentParser
import Devices
import Foundation
import LoadGen

/// Options shared by `load`, `sweep` and `demo`.
struct LoadOptions: ParsableArguments {
    @Option(parsing: .unconditional, help: "IOThreads.") var iothreads = 1
    @Option(parsing: .unconditional, help: "virtio-blk-like devices.") var devices = 1
    @Option(parsing: .unconditional, help: "Queues per device.") var queues = 1
    @Option(name: .customLong("queue-size"), parsing: .unconditional, help: "Entries per queue (a power of 2).") var queueSize = 256
    @Option(name: .customLong("qd"), parsing: .unconditional, help: "Requests outstanding per queue (closed loop).") var qd = 32
    @Option(parsing: .unconditional, help: "Open loop: requests per second per queue (latency from the scheduled time).") var rate: Double?
    @Option(help: "Backend: null, nop, file:PATH, delay:DURATION.") var backend = "null"
    @Option(name: .customLong("poll-max-ns"), parsing: .unconditional, help: "Adaptive polling cap in ns (0: off).") var pollMaxNs: Int64 = 32768
    @Option(name: .customLong("poll-grow"), parsing: .unconditional, help: "Poll window growth factor (0: x2).") var pollGrow: Int64 = 0
    @Option(name: .customLong("poll-shrink"), parsing: .unconditional, help: "Poll window shrink divisor (0: reset).") var pollShrink: Int64 = 0
    @Option(help: "How guests wait for completions: blocking or spinning.") var guest = "blocking"
    @Option(parsing: .unconditional, help: "Measured duration, with its unit (e.g. 10s, 500ms).") var duration = "10s"
    @Option(parsing: .unconditional, help: "Warm-up before measuring, with its unit (e.g. 1s).") var warmup = "1s"
    @Option(help: "fd-monitoring backend: io_uring or epoll (default: io_uring if the kernel allows).") var fdmon: String?
    @Option(parsing: .unconditional, help: "W6: move one device to another IOThread every INTERVAL (e.g. 10ms).") var churn: String?

    func config() throws -> LoadConfig {
        var c = LoadConfig()
        c.iothreads = iothreads
        c.devices = devices
        c.queues = queues
        c.queueSize = queueSize
        c.queueDepth = qd
        c.rate = rate
        c.backend = try BlockBackend(parsing: backend)
        c.pollMaxNs = pollMaxNs
        c.pollGrow = pollGrow
        c.pollShrink = pollShrink
        guard let g = GuestMode(rawValue: guest) else { throw ValidationError("--guest must be blocking or spinning") }
        c.guest = g
        c.durationNs = try durationOption("--duration", duration)
        c.warmupNs = try durationOption("--warmup", warmup)
        c.fdmon = try fdmonOption(fdmon)
        if let churn { c.churnIntervalNs = try durationOption("--churn", churn) }
        try c.validate()
        return c
    }

    mutating func validate() throws {
        do { _ = try config() } catch let e as DeviceError { throw ValidationError(e.message) }
    }
}

/// A duration option's value in ns, or the one-line error the command line prints. On the
/// command line a duration needs its unit: a bare `10` is refused rather than read as 10 ns.
func durationOption(_ name: String, _ text: String) throws -> Int64 {
    if Double(text) != nil {
        throw ValidationError("\(name) \(text): a duration needs a unit (ns, us, ms or s), e.g. \(text)s")
    }
    if text.hasPrefix("-") { throw ValidationError("\(name) \(text): a duration cannot be negative") }
    guard let ns = parseDuration(text) else {
        throw ValidationError("\(name) \(text): not a duration (a number and a unit: ns, us, ms or s, e.g. 10s or 500ms)")
    }
    return ns
}

/// The `--fdmon` option: nil (the default backend), io_uring or epoll.
func fdmonOption(_ text: String?) throws -> FDMonitorKind? {
    guard let text else { return nil }
    guard let k = FDMonitorKind(rawValue: text) else { throw ValidationError("--fdmon must be io_uring or epoll") }
    return k
}

struct Load: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Drive virtio-blk-like devices on IOThreads from guest threads and report IOPS, latency and CPU (W3, W6).")

    @OptionGroup var options: LoadOptions
    @Flag(help: "Print the result as one JSON document on stdout.") var json = false
    @Option(help: "Write an HTML report to this file.") var report: String?

    func run() async throws {
        let config = try options.config()
        var live: (@Sendable (Double, Double, UInt64, Double) -> Void)? = nil
        if isatty(2) != 0 {
            live = { (t: Double, iops: Double, p99: UInt64, cpu: Double) in
                errorLine(String(format: "  %5.1fs  %10.0f IOPS  p99 %8llu ns  IOThread CPU %5.1f%%", t, iops, p99, cpu))
            }
        }
        let result = try await LoadRunner.run(config, live: live)
        if json {
            print(try Report.json(result))
        } else {
            print("machine: \(result.machine.cpu), \(result.machine.vcpus) vCPUs, kernel \(result.machine.kernel), \(result.machine.build) build; fdmon \(result.fdmon)")
            print(Report.table([(label(config), result)]))
        }
        if let report {
            try Report.html(title: "dataplane load", [(label(config), result)]).write(toFile: report, atomically: true, encoding: .utf8)
        }
        if result.requests.lost != 0 || result.requests.duplicated != 0 {
            throw DeviceError("\(result.requests.lost) requests lost, \(result.requests.duplicated) completed twice")
        }
    }
}

func label(_ c: LoadConfig) -> String {
    "poll-max-ns \(c.pollMaxNs), qd \(c.queueDepth), \(c.guest.rawValue)" + (c.rate.map { ", rate \(Int($0))/s" } ?? "")
}

struct Sweep: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a grid of settings, print a table and write an HTML report with charts.")

    @OptionGroup var options: LoadOptions
    @Option(name: .customLong("poll-grid"), help: "poll-max-ns values, comma separated.") var pollGrid = "0,4096,32768,262144"
    @Option(name: .customLong("qd-grid"), help: "Queue depths, comma separated.") var qdGrid = "1,32"
    @Option(name: .customLong("guest-grid"), help: "Guest modes, comma separated.") var guestGrid = "blocking,spinning"
    @Option(help: "HTML report file.") var report = "dataplane-sweep.html"

    /// Bad grid values are bad arguments (exit 2), found before anything runs.
    mutating func validate() throws { _ = try grids() }

    func grids() throws -> (polls: [Int64], qds: [Int], guests: [GuestMode]) {
        let polls = try pollGrid.split(separator: ",").map { s -> Int64 in
            guard let v = Int64(s), v >= 0 else { throw ValidationError("--poll-grid: bad value \(s)") }
            return v
        }
        let qds = try qdGrid.split(separator: ",").map { s -> Int in
            guard let v = Int(s), v >= 1 else { throw ValidationError("--qd-grid: bad value \(s)") }
            return v
        }
        let guests = try guestGrid.split(separator: ",").map { s -> GuestMode in
            guard let g = GuestMode(rawValue: String(s)) else { throw ValidationError("--guest-grid: bad value \(s)") }
            return g
        }
        return (polls, qds, guests)
    }

    func run() async throws {
        let (polls, qds, guests) = try grids()
        var base = try options.config()
        if options.duration == "10s" { base.durationNs = 3_000_000_000 }
        if options.warmup == "1s" { base.warmupNs = 500_000_000 }
        var rows: [(String, LoadResult)] = []
        for g in guests {
            for qd in qds {
                for p in polls {
                    var c = base
                    c.guest = g
                    c.queueDepth = qd
                    c.pollMaxNs = p
                    try c.validate()
                    errorLine("running \(label(c)) ...")
                    rows.append((label(c), try await LoadRunner.run(c)))
                }
            }
        }
        print(Report.table(rows))
        try Report.html(title: "dataplane sweep", rows).write(toFile: report, atomically: true, encoding: .utf8)
        print("report: \(report)")
    }
}

struct Demo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "About 30 s: polling off against polling on, at QD 1 and QD 32, null backend; a table and an HTML report.")

    @Option(parsing: .unconditional, help: "Seconds measured per setting.") var seconds: Double = 5
    @Option(help: "HTML report file.") var report = "dataplane-demo.html"

    mutating func validate() throws {
        guard seconds > 0 && seconds <= 600 else { throw ValidationError("--seconds must be in (0, 600]") }
    }

    func run() async throws {
        var rows: [(String, LoadResult)] = []
        print("W3 virtqueue: a guest thread keeps QD requests outstanding on a null virtio-blk-like device on one IOThread,")
        print("and sleeps on the interrupt eventfd between completions; polling off (poll-max-ns 0) against on (QEMU's 32768).")
        for qd in [1, 32] {
            for poll: Int64 in [0, 32768] {
                var c = LoadConfig()
                c.queueDepth = qd
                c.pollMaxNs = poll
                c.durationNs = Int64(seconds * 1e9)
                c.warmupNs = 1_000_000_000
                errorLine("  running \(label(c)) for \(seconds) s ...")
                rows.append((label(c), try await LoadRunner.run(c)))
            }
        }
        if let r = rows.first?.1 {
            print("machine: \(r.machine.cpu), \(r.machine.vcpus) vCPUs, kernel \(r.machine.kernel), \(r.machine.build) build; fdmon \(r.fdmon)")
        }
        print(Report.table(rows))
        for qd in [0, 2] where rows.count >= qd + 2 {
            let off = rows[qd].1, on = rows[qd + 1].1
            print(String(format: "QD %d: polling on gives %.2fx the IOPS and %.2fx the p50 latency of polling off, for %.2fx the IOThread CPU per request",
                         qd == 0 ? 1 : 32, on.iops / max(off.iops, 1), Double(on.latencyNs.p50) / Double(max(off.latencyNs.p50, 1)),
                         on.iothreadCPUNsPerRequest / max(off.iothreadCPUNsPerRequest, 1)))
        }
        try Report.html(title: "dataplane demo: polling off against on", rows).write(toFile: report, atomically: true, encoding: .utf8)
        print("report: \(report)")
    }
}
