// The soak (issue 7, workload W6 held for a long time): a churn run whose process is
// sampled once a second, judged on what a long-running embedder cares about: no request
// lost or completed twice, holders consistent, and no growth in threads, descriptors or
// resident memory once warmed up.
import Aio
import Glibc

/// A process's resources, read from /proc.
public struct ProcessResources: Codable, Sendable, Equatable {
    public var threads: Int
    public var descriptors: Int
    public var rssKiB: Int

    enum CodingKeys: String, CodingKey { case threads, descriptors, rssKiB = "rss_kib" }

    public init(threads: Int, descriptors: Int, rssKiB: Int) {
        self.threads = threads
        self.descriptors = descriptors
        self.rssKiB = rssKiB
    }

    /// This process, now.
    public static func current() -> ProcessResources {
        var threads = 0, rss = 0
        if let f = fopen("/proc/self/status", "r") {
            var line: UnsafeMutablePointer<CChar>? = nil
            var cap = 0
            while getline(&line, &cap, f) > 0 {
                let s = String(cString: line!)
                func value() -> Int { Int(s.split(whereSeparator: { $0 == " " || $0 == "\t" }).dropFirst().first.map { $0.filter(\.isNumber) } ?? "") ?? 0 }
                if s.hasPrefix("Threads:") { threads = value() }
                if s.hasPrefix("VmRSS:") { rss = value() }
            }
            free(line)
            fclose(f)
        }
        // The listing's own descriptor is among the entries.
        let fds = max(0, procEntries("/proc/self/fd").count - 1)
        return ProcessResources(threads: threads, descriptors: fds, rssKiB: rss)
    }
}

/// This process's descriptors as "fd -> target" (for naming what was left behind).
func descriptorTargets() -> Set<String> {
    var names: Set<String> = []
    for name in procEntries("/proc/self/fd") {
        var target = [CChar](repeating: 0, count: 256)
        let n = readlink("/proc/self/fd/\(name)", &target, 255)
        guard n > 0 else { continue }  // closed meanwhile
        let text = String(decoding: target[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        if text.hasPrefix("/proc/") && text.hasSuffix("/fd") { continue }  // this listing's own
        names.insert("\(name) -> " + text)
    }
    return names
}

/// The numeric entries of a /proc directory (descriptors or thread ids of this process).
func procEntries(_ path: String) -> [String] {
    guard let dir = opendir(path) else { return [] }
    defer { closedir(dir) }
    var names: [String] = []
    while let e = readdir(dir) {
        let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
        if name.first?.isNumber == true { names.append(name) }
    }
    return names
}

/// What a soak found.
public struct SoakResult: Codable, Sendable {
    public struct Sample: Codable, Sendable {
        public var seconds: Double
        public var resources: ProcessResources
    }
    public var load: LoadResult
    /// Before the run, once warmed up (the first sample a quarter into the measured time),
    /// at its end, and after the run (its IOThreads stopped).
    public var before, warm, end, after: ProcessResources
    public var samples: [Sample]
    /// Resident memory may move this much (allocator noise) without counting as growth.
    public var rssToleranceKiB: Int
    /// Why the soak failed; empty when it passed.
    public var failures: [String]

    public var passed: Bool { failures.isEmpty }

    enum CodingKeys: String, CodingKey {
        case load, before, warm, end, after, samples, failures
        case rssToleranceKiB = "rss_tolerance_kib"
    }
}

public enum Soak {
    /// Runs `config` (a churn configuration) and judges it.
    /// - Parameter processWide: judge the whole process's threads, descriptors and memory
    ///   (what `dataplane soak` does, alone in its process). Off when other work shares the
    ///   process — a test suite running in parallel opens and closes descriptors of its own.
    public static func run(_ config: LoadConfig, rssToleranceKiB: Int = 8192, processWide: Bool = true,
                           progress: (@Sendable (Double, ProcessResources) -> Void)? = nil) async throws -> SoakResult {
        precondition(config.churnIntervalNs != nil, "a soak is a churn run: set churnIntervalNs")
        // The concurrency runtime opens its timer descriptors on the first sleep: let it, so
        // that they are not counted as left behind by the run.
        try await Task.sleep(nanoseconds: 1_000_000)
        let before = ProcessResources.current()
        let targetsBefore = descriptorTargets()
        let samples = Locked<[SoakResult.Sample]>([])
        let load = try await LoadRunner.run(config) { seconds, _, _, _ in
            let r = ProcessResources.current()
            samples.withLock { $0.append(.init(seconds: seconds, resources: r)) }
            progress?(seconds, r)
        }
        let after = ProcessResources.current()
        let all = samples.withLock { $0 }
        // Warmed up: a quarter into the measured time (caches, pools and histograms are in
        // place by then); the end: the last sample taken while the devices still ran.
        let warmAt = Double(config.warmupNs) / 1e9 + Double(config.durationNs) / 4e9
        let warm = all.first { $0.seconds >= warmAt }?.resources ?? all.first?.resources ?? before
        let end = all.last?.resources ?? after
        var failures: [String] = []
        if load.requests.lost != 0 { failures.append("\(load.requests.lost) requests lost") }
        if load.requests.duplicated != 0 { failures.append("\(load.requests.duplicated) requests completed twice") }
        if (load.churn?.moves ?? 0) == 0 { failures.append("no device moved") }
        if !load.holders.consistent {
            failures.append("holders inconsistent: \(load.holders.attached) with every device attached (expected \(load.holders.expected)), \(load.holders.afterDetach) after detach")
        }
        if processWide {
            if end.threads > warm.threads { failures.append("threads grew from \(warm.threads) to \(end.threads) while running") }
            if end.descriptors > warm.descriptors {
                failures.append("descriptors grew from \(warm.descriptors) to \(end.descriptors) while running")
            }
            if end.rssKiB > warm.rssKiB + rssToleranceKiB {
                failures.append("resident memory grew from \(warm.rssKiB) KiB to \(end.rssKiB) KiB while running")
            }
            // Dispatch, under Swift's Task.sleep, opens a timerfd lazily for its own timers (one
            // per clock, at some first sleep); Dataplane uses no timerfd, so those are not ours.
            let left = descriptorTargets().subtracting(targetsBefore).filter { !$0.hasSuffix("anon_inode:[timerfd]") }.sorted()
            if !left.isEmpty {
                failures.append("descriptors left behind: \(before.descriptors) before, \(after.descriptors) after: \(left)")
            }
        }
        // The run's IOThreads are named "IO iothread<N>": their count is exact whatever else
        // runs in the process.
        let ioThreadsLeft = ioThreadCount()
        if ioThreadsLeft != 0 { failures.append("\(ioThreadsLeft) IOThreads left running") }
        return SoakResult(load: load, before: before, warm: warm, end: end, after: after, samples: all,
                          rssToleranceKiB: rssToleranceKiB, failures: failures)
    }

    /// Threads of this process named "IO iothread<N>": the IOThreads a load run makes.
    static func ioThreadCount() -> Int {
        procEntries("/proc/self/task").filter { tid in
            let fd = open("/proc/self/task/\(tid)/comm", O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { return false }
            var buf = [UInt8](repeating: 0, count: 32)
            let got = read(fd, &buf, 31)
            close(fd)
            guard got > 0 else { return false }
            let name = String(decoding: buf[0..<got], as: UTF8.self).filter { $0 != "\n" }
            let prefix = "IO iothread"
            return name.hasPrefix(prefix) && name.count > prefix.count && name.dropFirst(prefix.count).allSatisfy(\.isNumber)
        }.count
    }
}
