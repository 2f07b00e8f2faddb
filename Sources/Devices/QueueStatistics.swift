// The counters of one virtqueue, written by the IOThread that runs it and read by anyone.
import Synchronization

/// Counters of one queue, readable from any thread.
public final class QueueStatistics: Sendable {
    let _requests = Atomic<UInt64>(0)
    let _completions = Atomic<UInt64>(0)
    let _interrupts = Atomic<UInt64>(0)
    let _kicks = Atomic<UInt64>(0)
    let _inFlight = Atomic<Int>(0)
    let _malformed = Atomic<UInt64>(0)
    let _broken = Atomic<Bool>(false)
    /// Requests popped from the avail ring.
    public var requests: UInt64 { _requests.load(ordering: .relaxed) }
    /// Requests completed (pushed to the used ring).
    public var completions: UInt64 { _completions.load(ordering: .relaxed) }
    /// Interrupts signalled to the guest.
    public var interrupts: UInt64 { _interrupts.load(ordering: .relaxed) }
    /// Kicks received through the kick eventfd.
    public var kicks: UInt64 { _kicks.load(ordering: .relaxed) }
    /// Requests taken and not yet completed.
    public var inFlight: Int { _inFlight.load(ordering: .relaxed) }
    /// Requests whose descriptor chain was refused (IOERR or handed back unprocessed).
    public var malformed: UInt64 { _malformed.load(ordering: .relaxed) }
    /// The queue met a ring error and stopped taking requests.
    public var isBroken: Bool { _broken.load(ordering: .relaxed) }
}
