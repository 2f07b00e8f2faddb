import Devices
import Glibc

/// What one load run measured. Encodes to the JSON `dataplane load --json` prints (keys
/// `iops`, `latency_ns`, `requests`, `iothreads`, `machine`, `config`, and `churn`).
public struct LoadResult: Codable, Sendable {
    public struct Latency: Codable, Sendable {
        public var p50, p90, p99, p999, max: UInt64
    }
    public struct Requests: Codable, Sendable {
        public var submitted, completed, lost, duplicated: UInt64
    }
    public struct IOThreadFigures: Codable, Sendable {
        public var id: String
        public var threadID: Int
        public var cpuPercent: Double
        public var cpuNs: Int64
        public var pollHits, pollMisses, pollingNs, blockedNs, eventfdWrites, ringEnters: UInt64

        enum CodingKeys: String, CodingKey {
            case id, threadID = "thread_id", cpuPercent = "cpu_percent", cpuNs = "cpu_ns", pollHits = "poll_hits"
            case pollMisses = "poll_misses", pollingNs = "polling_ns", blockedNs = "blocked_ns"
            case eventfdWrites = "eventfd_writes", ringEnters = "ring_enters"
        }
    }
    public struct Churn: Codable, Sendable {
        public struct Pause: Codable, Sendable { public var p50, p99, max: Int64 }
        public var moves: Int
        public var pauseNs: Pause
        enum CodingKeys: String, CodingKey { case moves, pauseNs = "pause_ns" }
    }
    /// Holder references on the run's IOThreads: with every device attached (churn stopped)
    /// they must equal one per (device, IOThread it uses); after the final detach, none.
    public struct Holders: Codable, Sendable {
        public var expected: Int
        public var attached: Int
        public var afterDetach: Int
        public var consistent: Bool { attached == expected && afterDetach == 0 }
        enum CodingKeys: String, CodingKey { case expected, attached, afterDetach = "after_detach" }
    }
    public struct Machine: Codable, Sendable {
        public var cpu: String
        public var vcpus: Int
        public var kernel: String
        public var build: String

        public static var current: Machine {
            var u = utsname()
            uname(&u)
            let kernel = withUnsafeBytes(of: u.release) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
            var model = "unknown"
            if let f = fopen("/proc/cpuinfo", "r") {
                var line: UnsafeMutablePointer<CChar>? = nil
                var cap = 0
                while getline(&line, &cap, f) > 0 {
                    let s = String(cString: line!)
                    if s.hasPrefix("model name"), let colon = s.firstIndex(of: ":") {
                        model = String(s[s.index(after: colon)...].drop(while: { $0 == " " || $0 == "\t" }).prefix(while: { $0 != "\n" }))
                        break
                    }
                }
                free(line)
                fclose(f)
            }
            #if DEBUG
            let build = "debug"
            #else
            let build = "release"
            #endif
            return Machine(cpu: model, vcpus: Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))), kernel: kernel, build: build)
        }
    }
    public struct Config: Codable, Sendable {
        public var iothreads, devices, queues, queueSize, qd: Int
        public var rate: Double?
        public var backend: String
        public var pollMaxNs, pollGrow, pollShrink: Int64
        public var guest: String
        public var durationNs, warmupNs: Int64
        public var churnIntervalNs: Int64?

        init(_ c: LoadConfig) {
            iothreads = c.iothreads; devices = c.devices; queues = c.queues; queueSize = c.queueSize
            qd = c.queueDepth; rate = c.rate; backend = c.backend.description; pollMaxNs = c.pollMaxNs
            pollGrow = c.pollGrow; pollShrink = c.pollShrink; guest = c.guest.rawValue
            durationNs = c.durationNs; warmupNs = c.warmupNs; churnIntervalNs = c.churnIntervalNs
        }
        enum CodingKeys: String, CodingKey {
            case iothreads, devices, queues, queueSize = "queue_size", qd, rate, backend, pollMaxNs = "poll_max_ns"
            case pollGrow = "poll_grow", pollShrink = "poll_shrink", guest, durationNs = "duration_ns"
            case warmupNs = "warmup_ns", churnIntervalNs = "churn_interval_ns"
        }
    }

    public var iops: Double
    public var latencyNs: Latency
    public var requests: Requests
    public var kicksPerRequest: Double
    public var interruptsPerRequest: Double
    public var iothreadCPUNsPerRequest: Double
    public var iothreads: [IOThreadFigures]
    public var churn: Churn?
    public var holders: Holders
    /// The IOThreads' fd-monitoring backend (`io_uring` or `epoll`), as `--fdmon` names it;
    /// the devices' block backend is `config.backend`.
    public var fdmon: String
    public var machine: Machine
    public var config: Config

    enum CodingKeys: String, CodingKey {
        case iops, latencyNs = "latency_ns", requests, kicksPerRequest = "kicks_per_request"
        case interruptsPerRequest = "interrupts_per_request", iothreadCPUNsPerRequest = "iothread_cpu_ns_per_request"
        case iothreads, churn, holders, fdmon, machine, config
    }
}
