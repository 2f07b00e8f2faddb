/// The three numbers that steer adaptive polling (QEMU's `poll-max-ns`, `poll-grow`,
/// `poll-shrink`).
public struct PollParameters: Sendable, Equatable {
    /// Longest busy-poll window in ns; 0 disables polling.
    public var maxNs: Int64
    /// Growth factor; 0 selects the default, ×2.
    public var grow: Int64
    /// Shrink divisor; 0 selects the default, reset the window to 0.
    public var shrink: Int64

    public init(maxNs: Int64 = 0, grow: Int64 = 0, shrink: Int64 = 0) {
        self.maxNs = maxNs
        self.grow = grow
        self.shrink = shrink
    }

    /// Polling off: what a bare context starts with.
    public static let disabled = PollParameters()
}

/// QEMU's per-handler grow/shrink rule (`adjust_polling_time`, util/aio-posix.c, 10.x),
/// exactly, but for one thing: growth saturates at `poll-max-ns` where QEMU's int64
/// multiplication overflows (a huge `poll-grow` made the window negative). A pure function,
/// so it is tested with made-up numbers and no clock.
public enum AdaptivePolling {
    /// The first growth step: "start polling at 4 microseconds".
    public static let initialNs: Int64 = 4000
    /// A handler with no successful poll for this long leaves the poll list (io_uring only).
    public static let idleIntervalNs: Int64 = 7_000_000_000

    /// The handler's next poll window, given its current one (`n`) and how long the
    /// iteration in which it fired took from entry to the end of the wait (`blockNs`).
    public static func adjust(current n: Int64, blockNs: Int64, _ p: PollParameters) -> Int64 {
        if blockNs <= n {
            return n  // the sweet spot: polling found the event in time
        } else if blockNs > p.maxNs {
            return p.shrink != 0 ? n / p.shrink : 0  // polling did not pay: shrink
        } else if n < p.maxNs && blockNs < p.maxNs {
            let g = p.grow != 0 ? p.grow : 2  // the event came a little too late: grow
            guard n != 0 else { return min(initialNs, p.maxNs) }
            let (grown, overflow) = n.multipliedReportingOverflow(by: g)
            return overflow ? p.maxNs : min(grown, p.maxNs)
        }
        return n  // only when blockNs == maxNs
    }
}
