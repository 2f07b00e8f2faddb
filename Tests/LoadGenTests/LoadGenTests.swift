import Aio
import Devices
import Foundation
import Glibc
import TestSupport
import Testing

@testable import LoadGen

func shortConfig(_ backend: BlockBackend, _ guest: GuestMode) -> LoadConfig {
    var c = LoadConfig()
    c.backend = backend
    c.guest = guest
    c.queueDepth = 8
    c.queueSize = 64
    c.durationNs = 300_000_000
    c.warmupNs = 100_000_000
    c.pollMaxNs = guest == .spinning ? 32768 : 0
    return c
}

/// What a load run asks for on a backend under test (``backendsUnderTest``): the automatic
/// choice is no `--fdmon` at all, so a machine that refuses io_uring runs it on epoll instead
/// of failing, as the rest of the suite does.
func fdmon(_ backend: AioContext.Backend) -> FDMonitorKind? {
    switch backend {
    case .automatic: return nil
    case .ioUring: return .ioUring
    case .epoll: return .epoll
    }
}

@Suite("Load generator", .serialized)
struct LoadGenTests {
    static let file: String = {
        var template = Array("/tmp/dataplane-load-XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        _ = ftruncate(fd, 8 << 20)
        close(fd)
        return String(cString: template)
    }()

    @Test("short runs of every backend and guest mode complete requests, none lost or twice",
          .timeLimit(.minutes(2)),
          arguments: [BlockBackend.null, .nop, .file(path: LoadGenTests.file, direct: false), .delay(nanoseconds: 20_000)],
          GuestMode.allCases)
    func shortRuns(_ backend: BlockBackend, _ guest: GuestMode) async throws {
        let r = try await LoadRunner.run(shortConfig(backend, guest))
        #expect(r.requests.completed > 0)
        #expect(r.requests.completed == r.requests.submitted)
        #expect(r.requests.lost == 0 && r.requests.duplicated == 0)
        #expect(r.iops > 0)
        #expect(r.latencyNs.p50 > 0 && r.latencyNs.p50 <= r.latencyNs.p99 && r.latencyNs.p99 <= r.latencyNs.max)
        #expect(r.iothreads.count == 1 && r.iothreads[0].cpuNs > 0)
    }

    @Test("churn moves devices between IOThreads during the run and loses nothing", .timeLimit(.minutes(2)))
    func churn() async throws {
        var c = shortConfig(.null, .blocking)
        c.iothreads = 2
        c.devices = 2
        c.churnIntervalNs = 1_000_000
        c.durationNs = 500_000_000
        let r = try await LoadRunner.run(c)
        // How many moves fit in the run is a rate (W6 in `make bench` measures it): here, that
        // devices did move, each with a pause, while the guests' requests ran.
        #expect((r.churn?.moves ?? 0) > 0)
        #expect((r.churn?.pauseNs.max ?? 0) > 0)
        #expect(r.requests.lost == 0 && r.requests.duplicated == 0)
        #expect(r.requests.completed == r.requests.submitted)
    }

    @Test("an open loop never issues faster than its rate, and completes every request it issued",
          .timeLimit(.minutes(1)))
    func openLoop() async throws {
        var c = shortConfig(.null, .blocking)
        c.rate = 2_000
        c.durationNs = 500_000_000
        let start = monotonicNanoseconds()
        let r = try await LoadRunner.run(c)
        let elapsed = monotonicNanoseconds() - start
        // Request k is issued no earlier than k intervals after the guest thread started, so
        // the whole run (warm-up included) issues at most one more than the rate allows in its
        // wall time: a bound that a busy machine only loosens. A closed loop at this depth on
        // the null backend issues many times more. How close to the rate a run gets is a
        // measurement (`dataplane load --rate`), not a unit test.
        let interval = Int64(1e9 / c.rate!)
        #expect(r.requests.submitted > 0)
        #expect(r.requests.submitted <= UInt64(1 + elapsed / interval),
                "\(r.requests.submitted) issued in \(elapsed) ns at \(c.rate!)/s")
        #expect(r.requests.completed == r.requests.submitted)
        #expect(r.requests.lost == 0 && r.requests.duplicated == 0)
    }

    @Test("the JSON has every documented key", .timeLimit(.minutes(1)))
    func jsonKeys() async throws {
        var c = shortConfig(.null, .blocking)
        c.iothreads = 2
        c.churnIntervalNs = 1_000_000
        let r = try await LoadRunner.run(c)
        let object = try JSONSerialization.jsonObject(with: Data(try Report.json(r).utf8)) as! [String: Any]
        for key in ["iops", "latency_ns", "requests", "iothreads", "machine", "config", "churn", "holders"] {
            #expect(object[key] != nil, "missing \(key)")
        }
        let latency = object["latency_ns"] as! [String: Any]
        #expect(Set(latency.keys) == ["p50", "p90", "p99", "p999", "max"])
        let requests = object["requests"] as! [String: Any]
        #expect(Set(requests.keys) == ["submitted", "completed", "lost", "duplicated"])
        let churn = object["churn"] as! [String: Any]
        #expect(churn["moves"] != nil && (churn["pause_ns"] as? [String: Any])?["p99"] != nil)
        #expect(Set((object["holders"] as! [String: Any]).keys) == ["expected", "attached", "after_detach"])
        #expect((object["iothreads"] as! [Any]).count == 2)
    }

    @Test("the HTML report is one page with one chart per figure")
    func htmlStructure() async throws {
        let r = try await LoadRunner.run(shortConfig(.null, .blocking))
        let html = Report.html(title: "t <&>", [("a", r), ("b", r)])
        #expect(html.hasPrefix("<!DOCTYPE html>"))
        #expect(html.components(separatedBy: "<svg").count - 1 == 5)
        #expect(html.components(separatedBy: "<rect").count - 1 == 10, "two bars per chart")
        #expect(html.contains("t &lt;&amp;&gt;"))
        #expect(html.contains("</html>"))
    }

    @Test("bad combinations are refused with one line")
    func validation() {
        var c = LoadConfig()
        c.queueDepth = 100
        #expect(throws: DeviceError("--qd must be in [1, 85] for --queue-size 256 (3 descriptors per request)")) { try c.validate() }
        c = LoadConfig()
        c.churnIntervalNs = 1_000_000
        #expect(throws: DeviceError("--churn needs --iothreads 2 or more (devices move between IOThreads)")) { try c.validate() }
    }

    @Test("a short soak passes: nothing lost, holders consistent, its IOThreads gone",
          .timeLimit(.minutes(1)), arguments: backendsUnderTest)
    func shortSoak(_ backend: AioContext.Backend) async throws {
        var c = LoadConfig()
        c.iothreads = 2
        c.devices = 4
        c.queueDepth = 8
        c.fdmon = fdmon(backend)
        c.warmupNs = 500_000_000
        c.durationNs = 3_000_000_000
        c.churnIntervalNs = 1_000_000
        // Other suites run in this process at the same time, opening and closing descriptors
        // and threads of their own: process-wide growth is judged by `make soak`, alone in its
        // process; here the run's own figures and IOThreads.
        let r = try await Soak.run(c, processWide: false)
        #expect(r.passed, "\(r.failures)")
        if backend == .epoll { #expect(r.load.fdmon == "epoll") }
        // (The soak itself fails a run in which no device moved.)
        #expect(r.load.holders.expected == 4 && r.load.holders.attached == 4 && r.load.holders.afterDetach == 0)
        // A sample follows every sleep of at most a second, in the warm-up and in the measured
        // time alike; a slow machine makes the sleeps longer and the samples fewer, never none.
        #expect(r.samples.count >= 2, "sampled in the warm-up and in the measured time")
    }
}
