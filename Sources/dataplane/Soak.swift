import Aio
import ArgumentParser
import Devices
import Foundation
import LoadGen

struct SoakCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "soak",
        abstract: "W6 churn held for a long time: fails unless nothing is lost or completed twice, holders stay consistent, and threads, descriptors and memory do not grow.")

    @Option(parsing: .unconditional, help: "Measured duration, with its unit (e.g. 60s).") var duration = "60s"
    @Option(parsing: .unconditional, help: "Move one device to the other IOThread every INTERVAL (e.g. 100us).") var churn = "100us"
    @Option(parsing: .unconditional, help: "Devices (W6: 4).") var devices = 4
    @Option(help: "fd-monitoring backend: io_uring or epoll (default: io_uring if the kernel allows).") var fdmon: String?
    @Option(name: .customLong("rss-tolerance"), help: "Resident-memory growth (KiB) still counted as noise.") var rssTolerance = 8192
    @Flag(help: "Print the result as one JSON document on stdout.") var json = false

    mutating func validate() throws { _ = try config() }

    func config() throws -> LoadConfig {
        var c = LoadConfig()
        c.iothreads = 2
        c.devices = devices
        c.warmupNs = 2_000_000_000
        c.durationNs = try durationOption("--duration", duration)
        c.churnIntervalNs = try durationOption("--churn", churn)
        c.fdmon = try fdmonOption(fdmon)
        do { try c.validate() } catch { throw ValidationError(error.message) }
        return c
    }

    func run() async throws {
        let c = try config()
        let verbose = !json
        let r = try await Soak.run(c, rssToleranceKiB: rssTolerance) { seconds, res in
            if verbose && Int(seconds) % 10 == 0 {
                errorLine(String(format: "  %5.0fs  threads %d  fds %d  RSS %d KiB", seconds, res.threads, res.descriptors, res.rssKiB))
            }
        }
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys]
            print(String(decoding: try encoder.encode(r), as: UTF8.self))
        } else {
            let l = r.load
            let seconds = Double(c.durationNs) / 1e9
            let moves = l.churn?.moves ?? 0
            print("soak: \(l.fdmon), \(c.devices) devices on 2 IOThreads, churn every \(churn), \(duration) measured")
            print(String(format: "  %d moves (%.0f/s), pause p50 %.1f µs, p99 %.1f µs, max %.1f µs", moves, Double(moves) / seconds,
                         Double(l.churn?.pauseNs.p50 ?? 0) / 1e3, Double(l.churn?.pauseNs.p99 ?? 0) / 1e3, Double(l.churn?.pauseNs.max ?? 0) / 1e3))
            print("  requests: \(l.requests.submitted) submitted, \(l.requests.completed) completed, \(l.requests.lost) lost, \(l.requests.duplicated) completed twice")
            print("  holders: \(l.holders.attached) with all attached (expected \(l.holders.expected)), \(l.holders.afterDetach) after detach")
            print("  threads \(r.warm.threads) -> \(r.end.threads) (after: \(r.after.threads)), descriptors \(r.warm.descriptors) -> \(r.end.descriptors) (before \(r.before.descriptors), after \(r.after.descriptors)), RSS \(r.warm.rssKiB) -> \(r.end.rssKiB) KiB")
            print(r.passed ? "PASS" : "FAIL: " + r.failures.joined(separator: "; "))
        }
        if !r.passed { throw ExitCode(1) }
    }
}
