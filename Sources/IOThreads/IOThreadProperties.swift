import Aio

/// The properties QEMU's `iothread` object has, with QEMU's defaults and validation.
public struct IOThreadProperties: Sendable, Equatable {
    /// QEMU's `IOTHREAD_POLL_MAX_NS_DEFAULT` on POSIX: NVMe benchmarks put the sweet spot at
    /// 16–32 µs.
    public static let defaultPollMaxNs: Int64 = 32768
    /// QEMU's `THREAD_POOL_MAX_THREADS_DEFAULT`.
    public static let defaultThreadPoolMax: Int64 = 64

    /// Longest busy-poll window in ns; 0 disables polling.
    public var pollMaxNs: Int64 = IOThreadProperties.defaultPollMaxNs
    /// Growth factor of a handler's poll window; 0 means ×2.
    public var pollGrow: Int64 = 0
    /// Shrink divisor; 0 means reset the window to 0.
    public var pollShrink: Int64 = 0
    /// Maximum requests a device submits in one batch; 0 lets the engine choose.
    public var aioMaxBatch: Int64 = 0
    /// Worker threads kept ready (the epoll backend's pool).
    public var threadPoolMin: Int64 = 0
    /// Worker thread cap.
    public var threadPoolMax: Int64 = IOThreadProperties.defaultThreadPoolMax

    public init() {}

    /// The names QEMU uses, in `qom-list` order.
    public static let names = ["poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch",
                               "thread-pool-min", "thread-pool-max"]

    /// A property by its QEMU name.
    public func value(of name: String) throws(IOThreadError) -> Int64 {
        switch name {
        case "poll-max-ns": return pollMaxNs
        case "poll-grow": return pollGrow
        case "poll-shrink": return pollShrink
        case "aio-max-batch": return aioMaxBatch
        case "thread-pool-min": return threadPoolMin
        case "thread-pool-max": return threadPoolMax
        default: throw IOThreadError(.notFound, "Property 'iothread.\(name)' not found")
        }
    }

    /// Sets a property by its QEMU name, validating it as QEMU does: negative values are
    /// refused with "`name` value must be in range [0, 9223372036854775807]", and the pool
    /// bounds with "bad thread-pool-min/thread-pool-max values". On error nothing changes.
    public mutating func set(_ name: String, to value: Int64) throws(IOThreadError) {
        guard IOThreadProperties.names.contains(name) else {
            throw IOThreadError(.notFound, "Property 'iothread.\(name)' not found")
        }
        guard value >= 0 else {
            throw IOThreadError(.invalidValue, "\(name) value must be in range [0, \(Int64.max)]")
        }
        var copy = self
        switch name {
        case "poll-max-ns": copy.pollMaxNs = value
        case "poll-grow": copy.pollGrow = value
        case "poll-shrink": copy.pollShrink = value
        case "aio-max-batch": copy.aioMaxBatch = value
        case "thread-pool-min": copy.threadPoolMin = value
        case "thread-pool-max": copy.threadPoolMax = value
        default: throw IOThreadError(.notFound, "Property 'iothread.\(name)' not found")
        }
        try copy.validatePool()
        self = copy
    }

    /// QEMU `aio_context_set_thread_pool_params`'s check.
    func validatePool() throws(IOThreadError) {
        let intMax = Int64(Int32.max)
        if threadPoolMin > threadPoolMax || threadPoolMax <= 0 || threadPoolMin < 0
            || threadPoolMin > intMax || threadPoolMax > intMax {
            throw IOThreadError(.invalidValue, "bad thread-pool-min/thread-pool-max values")
        }
    }

    /// Checks every value (for a whole set of properties given at creation).
    public func validate() throws(IOThreadError) {
        for name in IOThreadProperties.names where try value(of: name) < 0 {
            throw IOThreadError(.invalidValue, "\(name) value must be in range [0, \(Int64.max)]")
        }
        try validatePool()
    }

    var pollParameters: PollParameters {
        PollParameters(maxNs: pollMaxNs, grow: pollGrow, shrink: pollShrink)
    }
}

/// QEMU's `id_wellformed`: a letter first, then letters, digits, '-', '.' or '_'.
public func isWellFormedObjectID(_ id: String) -> Bool {
    guard let first = id.unicodeScalars.first, first.isASCII, first.properties.isAlphabetic else { return false }
    return id.unicodeScalars.allSatisfy { c in
        c.isASCII && (c.properties.isAlphabetic || ("0"..."9").contains(c) || c == "-" || c == "." || c == "_")
    }
}
