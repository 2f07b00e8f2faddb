import Aio
import Devices

/// How a guest waits for completions.
public enum GuestMode: String, Sendable, CaseIterable, Codable {
    /// Sleeps on the interrupt eventfd (a vCPU in HLT).
    case blocking
    /// Spins on the used ring with interrupts suppressed (a polling guest driver).
    case spinning
}

/// One load run's parameters (the `dataplane load` options).
public struct LoadConfig: Sendable, Equatable {
    public var iothreads = 1
    public var devices = 1
    public var queues = 1
    public var queueSize = 256
    /// Requests outstanding per queue (closed loop).
    public var queueDepth = 32
    /// Requests per second per queue (open loop); nil: closed loop.
    public var rate: Double? = nil
    public var backend: BlockBackend = .null
    public var pollMaxNs: Int64 = 32768
    public var pollGrow: Int64 = 0
    public var pollShrink: Int64 = 0
    public var guest: GuestMode = .blocking
    public var durationNs: Int64 = 10_000_000_000
    public var warmupNs: Int64 = 1_000_000_000
    public var fdmon: FDMonitorKind? = nil
    /// Move one device to another IOThread every this many ns (W6); nil: no churn.
    public var churnIntervalNs: Int64? = nil

    public init() {}

    /// Checks the combination; the message is one line for the command line.
    public func validate() throws(DeviceError) {
        func need(_ ok: Bool, _ message: String) throws(DeviceError) { if !ok { throw DeviceError(message) } }
        try need(iothreads >= 1 && iothreads <= 64, "--iothreads must be in [1, 64]")
        try need(devices >= 1 && devices <= 64, "--devices must be in [1, 64]")
        try need(queues >= 1 && queues <= 16, "--queues must be in [1, 16]")
        try need(queueSize >= 4 && queueSize <= 32768 && queueSize & (queueSize - 1) == 0,
                 "--queue-size must be a power of 2 in [4, 32768]")
        try need(queueDepth >= 1 && queueDepth <= queueSize / 3,
                 "--qd must be in [1, \(queueSize / 3)] for --queue-size \(queueSize) (3 descriptors per request)")
        if let rate { try need(rate > 0 && rate <= 10_000_000, "--rate must be in (0, 10000000] requests/s per queue") }
        try need(pollMaxNs >= 0, "--poll-max-ns must be >= 0")
        try need(pollGrow >= 0, "--poll-grow must be >= 0")
        try need(pollShrink >= 0, "--poll-shrink must be >= 0")
        try need(durationNs > 0 && durationNs <= 3_600_000_000_000, "--duration must be in (0, 1h]")
        try need(warmupNs >= 0 && warmupNs <= 600_000_000_000, "--warmup must be in [0, 10m]")
        if let churn = churnIntervalNs {
            try need(churn >= 100_000, "--churn interval must be at least 100us")
            try need(iothreads >= 2, "--churn needs --iothreads 2 or more (devices move between IOThreads)")
        }
    }
}
