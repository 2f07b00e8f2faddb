import Glibc

/// The clocks timers can run on.
public enum AioClock: Int, Sendable, CaseIterable {
    /// `CLOCK_MONOTONIC`: never jumps; what QEMU calls `QEMU_CLOCK_REALTIME`. The default.
    case monotonic = 0
    /// `CLOCK_REALTIME`: wall-clock time, which may jump; QEMU's `QEMU_CLOCK_HOST`.
    case realtime = 1

    /// The clock's current time in nanoseconds.
    @inlinable
    public var now: Int64 {
        var ts = timespec()
        clock_gettime(self == .monotonic ? CLOCK_MONOTONIC : CLOCK_REALTIME, &ts)
        return Int64(ts.tv_sec) &* 1_000_000_000 &+ Int64(ts.tv_nsec)
    }
}

/// `CLOCK_MONOTONIC` now, in nanoseconds.
@inlinable
public func monotonicNanoseconds() -> Int64 { AioClock.monotonic.now }

/// QEMU's `qemu_soonest_timeout`: the smaller of two timeouts where -1 means infinite.
@inlinable
func soonest(_ a: Int64, _ b: Int64) -> Int64 {
    UInt64(bitPattern: a) < UInt64(bitPattern: b) ? a : b
}

/// `a + b`, clamped to `Int64.max` (and `.min`) instead of wrapping: deadlines computed from
/// caller-supplied delays, and from timeouts that reach the end of time.
@inlinable
func saturatingAdd(_ a: Int64, _ b: Int64) -> Int64 {
    let (sum, overflow) = a.addingReportingOverflow(b)
    return overflow ? (b > 0 ? .max : .min) : sum
}
