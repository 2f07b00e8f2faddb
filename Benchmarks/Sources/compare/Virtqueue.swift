// W3 virtqueue and W6 churn on Dataplane: a null virtio-blk-like device attached to an
// IOThread, and a guest thread per queue that keeps QD requests outstanding: LoadGen's
// GuestWorker, the one `dataplane load` runs (closed loop, live reporting off): submit up
// to QD, one kick unless suppressed, reap, then either spin or wait on the interrupt
// eventfd.
import Aio
import CBenchSupport
import Devices
import Glibc
import Histogram
import IOThreads
import LoadGen
import Synchronization

struct W3Config {
    var qd: Int
    var pollMaxNs: Int64
    var spinning: Bool
    var label: String { "QD\(qd), polling \(pollMaxNs == 0 ? "off" : "on"), \(spinning ? "spinning" : "blocking") guest" }
    var crefArgs: [String] { ["w3", String(qd), String(pollMaxNs), spinning ? "spinning" : "blocking"] }
}

/// One W3 run. `rssProbe`, when given, is called after the warm-up and every second of the
/// measured window (the soak).
func dataplaneW3(_ c: W3Config, warmupNs: Int64, durationNs: Int64, countMallocs: Bool = true,
                 rssProbe: ((Int64) -> Void)? = nil) throws -> [String: Double] {
    var props = IOThreadProperties()
    props.pollMaxNs = c.pollMaxNs
    let thread = try IOThread(id: "w3", properties: props)
    defer { try? thread.stop() }
    let dev = try VirtioBlkDevice(id: "disk0", queues: 1, queueSize: 256, backend: .null)
    try blockOn { try await dev.attach(to: thread) }
    let guest = GuestWorker(guest: try GuestQueue(device: dev, queue: 0), depth: c.qd, spinning: c.spinning, live: false)
    try guest.start()
    sleepNanoseconds(warmupNs)
    let s = dev.statistics(queue: 0)
    let k0 = s.kicks, i0 = s.interrupts, c0 = s.completions
    let cpu0 = thread.cpuTimeNanoseconds
    let st = thread.statistics
    let it0 = st.iterations, ph0 = st.pollHits, pm0 = st.pollMisses, bw0 = st.blockingWaits, en0 = st.ringEnters
    let m0 = dp_malloc_count()
    if countMallocs { dp_malloc_count_enable(1) }
    guest.measuring.store(true, ordering: .relaxed)
    let t0 = monotonicNanoseconds()
    if let rssProbe {
        rssProbe(0)
        while monotonicNanoseconds() - t0 < durationNs {
            sleepNanoseconds(min(1_000_000_000, durationNs - (monotonicNanoseconds() - t0)))
            rssProbe(monotonicNanoseconds() - t0)
        }
    } else {
        sleepNanoseconds(durationNs)
    }
    guest.measuring.store(false, ordering: .relaxed)
    let elapsed = monotonicNanoseconds() - t0
    dp_malloc_count_enable(0)
    let mallocs = dp_malloc_count() - m0
    let k1 = s.kicks, i1 = s.interrupts, c1 = s.completions
    let cpu1 = thread.cpuTimeNanoseconds
    let it1 = st.iterations, ph1 = st.pollHits, pm1 = st.pollMisses, bw1 = st.blockingWaits, en1 = st.ringEnters
    let windows = st.pollWindows
    guest.requestStop()
    guest.join()
    try blockOn { try await dev.detach() }
    let done = Double(c1 - c0)
    var r: [String: Double] = [
        "iops": Double(guest.measuredCompletions) * 1e9 / Double(elapsed),
        "p50": Double(guest.histogram.valueAtPercentile(50)),
        "p99": Double(guest.histogram.valueAtPercentile(99)),
        "p999": Double(guest.histogram.valueAtPercentile(99.9)),
        "kicks_per_req": Double(k1 - k0) / done,
        "irqs_per_req": Double(i1 - i0) / done,
        "cpu_ns_per_req": Double(cpu1 - cpu0) / done,
        "lost": Double(guest.submitted - guest.completed),
        "unexpected": Double(guest.guest.unexpectedCompletions),
    ]
    r["iterations_per_req"] = Double(it1 - it0) / done
    r["poll_hits_per_req"] = Double(ph1 - ph0) / done
    r["poll_misses_per_req"] = Double(pm1 - pm0) / done
    r["blocking_waits_per_req"] = Double(bw1 - bw0) / done
    r["enters_per_req"] = Double(en1 - en0) / done
    if getenv("DP_BENCH_VERBOSE") != nil { eprint("W3 \(c.label): \(pairs(r)) poll windows \(windows)") }
    if countMallocs { r["mallocs_per_req"] = Double(mallocs) / done }
    return r
}

/// W6: 4 devices, one queue each, spread over two IOThreads, one blocking guest thread per
/// device at QD 32; device 0 is moved back and forth between the IOThreads in a loop.
func dataplaneW6(durationNs: Int64) throws -> [String: Double] {
    let threads = [try IOThread(id: "churn0"), try IOThread(id: "churn1")]
    defer { for t in threads { try? t.stop() } }
    var devices: [VirtioBlkDevice] = []
    var guests: [GuestWorker] = []
    for d in 0..<4 {
        let dev = try VirtioBlkDevice(id: "disk\(d)", queues: 1, queueSize: 256, backend: .null)
        let t = threads[d % 2]
        try blockOn { try await dev.attach(to: t) }
        devices.append(dev)
        guests.append(GuestWorker(guest: try GuestQueue(device: dev, queue: 0), depth: 32, spinning: false, live: false))
    }
    for g in guests { try g.start() }
    sleepNanoseconds(300_000_000)
    let moving = devices[0]
    let pauses = try blockOn { () async throws -> [Int64] in
        var pauses: [Int64] = []
        pauses.reserveCapacity(1 << 20)
        var k = 1
        let end = monotonicNanoseconds() + durationNs
        while monotonicNanoseconds() < end {
            pauses.append(try await moving.move(to: threads[k % 2]))
            k += 1
        }
        return pauses
    }
    let holders = threads.reduce(0) { $0 + $1.holders.count }
    for g in guests { g.requestStop() }
    for g in guests { g.join() }
    for dev in devices { try blockOn { try await dev.detach() } }
    let holdersAfter = threads.reduce(0) { $0 + $1.holders.count }
    var lost: UInt64 = 0, dup: UInt64 = 0, completed: UInt64 = 0
    for g in guests {
        lost += g.submitted - g.completed
        dup += g.guest.unexpectedCompletions
        completed += g.completed
    }
    let p = pauses.sorted()
    return [
        "moves_per_second": Double(p.count) * 1e9 / Double(durationNs),
        "pause_p50": percentile(p, 0.5), "pause_p99": percentile(p, 0.99), "pause_max": Double(p.last ?? 0),
        "lost": Double(lost), "duplicated": Double(dup), "completed": Double(completed),
        "holders_attached": Double(holders), "holders_after_detach": Double(holdersAfter),
    ]
}
