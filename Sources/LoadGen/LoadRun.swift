// One load run (workload W3, and W6 with churn): IOThreads, virtio-blk-like devices on
// them, and one guest thread per queue that keeps requests outstanding (closed loop) or
// issues them at a fixed rate (open loop, latency from the scheduled time, so a stall is
// not hidden). The guest threads go through the same virtqueue code a real guest would.
import Aio
import Devices
import Glibc
import Histogram
import IOThreads
import Synchronization

/// Runs one configuration.
public enum LoadRunner {
    /// Runs `config`; `live` (if given) is called about once a second from the calling task
    /// with the elapsed seconds, IOPS over the last second, p99 so far (ns) and IOThread CPU %.
    public static func run(
        _ config: LoadConfig, live: (@Sendable (Double, Double, UInt64, Double) -> Void)? = nil
    ) async throws -> LoadResult {
        try config.validate()
        var props = IOThreadProperties()
        props.pollMaxNs = config.pollMaxNs
        props.pollGrow = config.pollGrow
        props.pollShrink = config.pollShrink
        let backend: AioContext.Backend = config.fdmon.map { $0 == .epoll ? .epoll : .ioUring } ?? .automatic
        var threads: [IOThread] = []
        for i in 0..<config.iothreads {
            threads.append(try IOThread(id: "iothread\(i)", properties: props, backend: backend))
        }
        defer { for t in threads { try? t.stop() } }
        var devices: [VirtioBlkDevice] = []
        var workers: [GuestWorker] = []
        for d in 0..<config.devices {
            let dev = try VirtioBlkDevice(id: "disk\(d)", queues: config.queues, queueSize: config.queueSize,
                                          backend: config.backend)
            let mapping = (0..<config.queues).map { q in threads[(d * config.queues + q) % threads.count] }
            try await dev.attach(mapping: mapping)
            devices.append(dev)
            for q in 0..<config.queues {
                workers.append(GuestWorker(guest: try GuestQueue(device: dev, queue: q), config: config))
            }
        }
        for w in workers { try w.start() }

        // Churn (W6): every interval, move one device (round robin) to the next IOThread.
        let churnStop = StopFlag()
        let pauses = Locked<[Int64]>([])
        let churnTask: Task<Void, Error>? = config.churnIntervalNs.map { interval in
            Task { [devices, threads] in
                var k = 0
                while !churnStop.isSet {
                    try await Task.sleep(nanoseconds: UInt64(interval))
                    if churnStop.isSet { break }
                    let dev = devices[k % devices.count]
                    k += 1
                    guard let current = dev.iothreads.first,
                          let i = threads.firstIndex(where: { $0 === current }) else { continue }
                    let pause = try await dev.move(to: threads[(i + 1) % threads.count])
                    pauses.withLock { $0.append(pause) }
                }
            }
        }

        // Warm-up, then the measured window.
        let runStart = monotonicNanoseconds()
        try await sleepReporting(until: runStart + config.warmupNs, start: runStart, workers: workers, threads: threads, live: live)
        let cpu0 = threads.map(\.cpuTimeNanoseconds)
        let stats0 = threads.map { snapshot($0.statistics) }
        let dev0 = devices.map { d in (0..<config.queues).map { deviceCounters(d.statistics(queue: $0)) } }
        for w in workers { w.measuring.store(true, ordering: .relaxed) }
        let t0 = monotonicNanoseconds()
        try await sleepReporting(until: t0 + config.durationNs, start: runStart, workers: workers, threads: threads, live: live)
        for w in workers { w.measuring.store(false, ordering: .relaxed) }
        let elapsed = monotonicNanoseconds() - t0
        let cpu1 = threads.map(\.cpuTimeNanoseconds)
        let stats1 = threads.map { snapshot($0.statistics) }
        let dev1 = devices.map { d in (0..<config.queues).map { deviceCounters(d.statistics(queue: $0)) } }

        churnStop.set()
        try await churnTask?.value
        let holdersExpected = devices.reduce(0) { n, d in n + Set(d.iothreads.map(ObjectIdentifier.init)).count }
        let holdersAttached = threads.reduce(0) { $0 + $1.holders.count }
        for w in workers { w.requestStop() }
        for w in workers { w.join() }
        for d in devices { try await d.detach() }
        let holdersAfterDetach = threads.reduce(0) { $0 + $1.holders.count }

        // Results.
        var histogram = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
        var measured: UInt64 = 0, submitted: UInt64 = 0, completed: UInt64 = 0, duplicated: UInt64 = 0
        for w in workers {
            histogram.add(w.histogram)
            measured += w.measuredCompletions
            submitted += w.submitted
            completed += w.completed
            duplicated += w.guest.unexpectedCompletions
        }
        var kicks: UInt64 = 0, interrupts: UInt64 = 0, deviceCompletions: UInt64 = 0
        for (a, b) in zip(dev0, dev1) {
            for (x, y) in zip(a, b) {
                kicks += y.kicks - x.kicks
                interrupts += y.interrupts - x.interrupts
                deviceCompletions += y.completions - x.completions
            }
        }
        let perRequest = { (x: UInt64) -> Double in deviceCompletions == 0 ? 0 : Double(x) / Double(deviceCompletions) }
        var iothreadResults: [LoadResult.IOThreadFigures] = []
        for (i, t) in threads.enumerated() {
            let s0 = stats0[i], s1 = stats1[i]
            let cpu = cpu1[i] - cpu0[i]
            iothreadResults.append(.init(
                id: t.id, threadID: Int(t.threadID),
                cpuPercent: 100 * Double(cpu) / Double(elapsed), cpuNs: cpu,
                pollHits: s1.pollHits - s0.pollHits, pollMisses: s1.pollMisses - s0.pollMisses,
                pollingNs: s1.pollNs - s0.pollNs, blockedNs: s1.blockedNs - s0.blockedNs,
                eventfdWrites: s1.eventfdWrites - s0.eventfdWrites, ringEnters: s1.ringEnters - s0.ringEnters))
        }
        let p = pauses.withLock { $0 }.sorted()
        return LoadResult(
            iops: Double(measured) * 1e9 / Double(elapsed),
            latencyNs: .init(p50: histogram.valueAtPercentile(50), p90: histogram.valueAtPercentile(90),
                             p99: histogram.valueAtPercentile(99), p999: histogram.valueAtPercentile(99.9),
                             max: histogram.max),
            requests: .init(submitted: submitted, completed: completed,
                            lost: submitted >= completed ? submitted - completed : 0, duplicated: duplicated),
            kicksPerRequest: perRequest(kicks), interruptsPerRequest: perRequest(interrupts),
            iothreadCPUNsPerRequest: deviceCompletions == 0 ? 0
                : Double(zip(cpu1, cpu0).reduce(0) { $0 + $1.0 - $1.1 }) / Double(deviceCompletions),
            iothreads: iothreadResults,
            churn: config.churnIntervalNs == nil ? nil : .init(
                moves: p.count, pauseNs: .init(p50: p.isEmpty ? 0 : p[p.count / 2],
                                               p99: p.isEmpty ? 0 : p[min(p.count - 1, p.count * 99 / 100)], max: p.last ?? 0)),
            holders: .init(expected: holdersExpected, attached: holdersAttached, afterDetach: holdersAfterDetach),
            fdmon: threads[0].backendKind.rawValue,
            machine: .current,
            config: .init(config))
    }

    struct Counters { var pollHits, pollMisses, pollNs, blockedNs, eventfdWrites, ringEnters: UInt64 }
    static func snapshot(_ s: AioStatistics) -> Counters {
        Counters(pollHits: s.pollHits, pollMisses: s.pollMisses, pollNs: s.pollNanoseconds,
                 blockedNs: s.blockedNanoseconds, eventfdWrites: s.eventfdWrites, ringEnters: s.ringEnters)
    }
    static func deviceCounters(_ s: QueueStatistics) -> (kicks: UInt64, interrupts: UInt64, completions: UInt64) {
        (s.kicks, s.interrupts, s.completions)
    }

    static func sleepReporting(
        until end: Int64, start: Int64, workers: [GuestWorker], threads: [IOThread],
        live: (@Sendable (Double, Double, UInt64, Double) -> Void)?
    ) async throws {
        var lastT = monotonicNanoseconds()
        var lastDone = workers.reduce(0) { $0 + $1.completedTotal.load(ordering: .relaxed) }
        var lastCPU = threads.reduce(0) { $0 + $1.cpuTimeNanoseconds }
        while true {
            let now = monotonicNanoseconds()
            if now >= end { return }
            try await Task.sleep(nanoseconds: UInt64(min(end - now, 1_000_000_000)))
            guard let live else { continue }
            let t = monotonicNanoseconds()
            let done = workers.reduce(0) { $0 + $1.completedTotal.load(ordering: .relaxed) }
            let cpu = threads.reduce(0) { $0 + $1.cpuTimeNanoseconds }
            var merged = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
            for w in workers { if let h = w.published.withLock({ $0 }) { merged.add(h) } }
            live(Double(t - start) / 1e9, Double(done - lastDone) * 1e9 / Double(max(1, t - lastT)),
                 merged.valueAtPercentile(99), 100 * Double(cpu - lastCPU) / Double(max(1, t - lastT)))
            lastT = t
            lastDone = done
            lastCPU = cpu
        }
    }
}

/// A flag one task sets and another polls.
final class StopFlag: Sendable {
    let value = Atomic<Bool>(false)
    func set() { value.store(true, ordering: .releasing) }
    var isSet: Bool { value.load(ordering: .acquiring) }
}
