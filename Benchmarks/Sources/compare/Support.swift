// Helpers: child processes, environment knobs, /proc readers, waiting for async work from a
// plain thread, and starting pthreads.
import Glibc
import LoadGen
import Synchronization

/// Runs a shell command; returns its standard output (nil if it failed).
func runCommand(_ command: String) -> String? {
    guard let pipe = popen(command, "r") else { return nil }
    var output = ""
    var buf = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = fread(&buf, 1, buf.count, pipe)
        if n <= 0 { break }
        output += String(decoding: buf[0..<n], as: UTF8.self)
    }
    return pclose(pipe) == 0 ? output : nil
}

/// Parses "key=value key=value" (what cref and the probes print).
func parsePairs(_ output: String) -> [String: Double] {
    var result: [String: Double] = [:]
    for pair in output.split(whereSeparator: { $0 == " " || $0 == "\n" }) {
        let kv = pair.split(separator: "=")
        if kv.count == 2, let v = Double(kv[1]) { result[String(kv[0])] = v }
    }
    return result
}

func pairs(_ d: [String: Double]) -> String {
    d.keys.sorted().map { "\($0)=\(d[$0]!)" }.joined(separator: " ")
}

/// An integer from the environment, or `fallback`.
func envInt(_ name: String, _ fallback: Int) -> Int {
    guard let v = getenv(name), let i = Int(String(cString: v)) else { return fallback }
    return i
}

/// Resident set size of this process, in KiB (VmRSS, or another field of /proc/self/status
/// such as RssAnon: anonymous memory only, without the file-backed code pages).
func residentKiB(_ field: String = "VmRSS") -> Int {
    guard let f = fopen("/proc/self/status", "r") else { return 0 }
    defer { fclose(f) }
    var line: UnsafeMutablePointer<CChar>? = nil
    var cap = 0
    defer { free(line) }
    while getline(&line, &cap, f) > 0 {
        let s = String(cString: line!)
        if s.hasPrefix(field + ":") {
            return Int(s.dropFirst(field.count + 1).filter { $0.isNumber }) ?? 0
        }
    }
    return 0
}

/// One mapping of /proc/self/smaps: address range, name and resident KiB.
struct Mapping {
    var start, end: UInt
    var name: String
    var rssKiB: Int
}

func smaps() -> [Mapping] {
    guard let f = fopen("/proc/self/smaps", "r") else { return [] }
    defer { fclose(f) }
    var line: UnsafeMutablePointer<CChar>? = nil
    var cap = 0
    defer { free(line) }
    var result: [Mapping] = []
    while getline(&line, &cap, f) > 0 {
        let s = String(cString: line!)
        let fields = s.split(separator: " ", omittingEmptySubsequences: true)
        if let first = fields.first, first.contains("-"), !first.hasSuffix(":") {
            let range = first.split(separator: "-")
            guard range.count == 2, let a = UInt(range[0], radix: 16), let b = UInt(range[1], radix: 16) else { continue }
            let name = fields.count >= 6 ? fields[5...].joined(separator: " ").trimmingNewline() : ""
            result.append(Mapping(start: a, end: b, name: name, rssKiB: 0))
        } else if s.hasPrefix("Rss:"), !result.isEmpty {
            result[result.count - 1].rssKiB = Int(s.dropFirst(4).filter { $0.isNumber }) ?? 0
        }
    }
    return result
}

extension String {
    func trimmingNewline() -> String {
        var s = self
        while s.hasSuffix("\n") { s.removeLast() }
        return s
    }
}

/// `@unchecked Sendable`: written by the task before sem_post, read after sem_wait.
final class ResultBox<T>: @unchecked Sendable {
    var result: Result<T, Error>? = nil
}

/// Standard error (progress lines), without touching C's global `stderr`.
func eprint(_ s: String) {
    var line = s + "\n"
    line.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
}

/// Runs `body` as a task and blocks the calling (non-cooperative) thread until it is done.
/// The main thread waits here so that no thread of the concurrency pool is ever blocked.
func blockOn<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) throws -> T {
    let box = ResultBox<T>()
    let sem = UnsafeMutablePointer<sem_t>.allocate(capacity: 1)
    sem_init(sem, 0, 0)
    defer {
        sem_destroy(sem)
        sem.deallocate()
    }
    nonisolated(unsafe) let s = sem
    Task.detached {
        do { box.result = .success(try await body()) } catch { box.result = .failure(error) }
        sem_post(s)
    }
    while sem_wait(sem) != 0 {}
    return try box.result!.get()
}

/// A joinable pthread running `body`.
final class PThread: @unchecked Sendable {  // `thread` is written before start returns, read by join
    var thread = pthread_t()
    let body: () -> Void

    init(_ body: @escaping () -> Void) {
        self.body = body
        let arg = Unmanaged.passRetained(self).toOpaque()
        pthread_create(&thread, nil, { arg in
            let t = Unmanaged<PThread>.fromOpaque(arg!).takeRetainedValue()
            t.body()
            return nil
        }, arg)
    }

    func join() { pthread_join(thread, nil) }

    /// CPU time used so far by the thread, in ns.
    var cpuNanoseconds: Int64 {
        var clock = clockid_t()
        guard pthread_getcpuclockid(thread, &clock) == 0 else { return 0 }
        var ts = timespec()
        guard clock_gettime(clock, &ts) == 0 else { return 0 }
        return Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
    }
}

func sleepNanoseconds(_ ns: Int64) {
    var ts = timespec(tv_sec: Int(ns / 1_000_000_000), tv_nsec: Int(ns % 1_000_000_000))
    var left = timespec()
    while nanosleep(&ts, &left) != 0 && errno == EINTR { ts = left }
}

func percentile(_ sorted: [Int64], _ p: Double) -> Double {
    Double(sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))])
}

/// CPU model, vCPUs and kernel (the load generator's machine description).
func machineDescription() -> String {
    let m = LoadResult.Machine.current
    return "\(m.cpu), \(m.vcpus) vCPUs, kernel \(m.kernel)"
}
