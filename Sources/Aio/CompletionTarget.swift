/// One completion callback shared by many requests, each of which names it with a 32-bit
/// tag (a descriptor-table index, say): ``AioContext/submit(_:to:tag:)``.
///
/// A closure passed to ``AioContext/submit(_:_:)`` is retained when the request is queued
/// and released after it ran: two atomic operations per request. A target is held by the
/// context only while it has requests in flight (one retain when the first goes out, one
/// release when the last came back), so a steady stream of requests takes no reference
/// per request. Make one with ``AioContext/makeCompletionTarget(_:)``.
///
/// `@unchecked Sendable` is not claimed: a target is made for one context and used on its
/// home thread only (`inFlight` is a plain counter).
public final class CompletionTarget {
    let body: (_ tag: UInt32, _ result: Int32) -> Void
    /// Requests in flight to this target. Home thread only.
    @exclusivity(unchecked) var inFlight = 0
    /// The context that made it (identity only, for the misuse check).
    let context: UnsafeMutableRawPointer

    init(context: AioContext, body: @escaping (_ tag: UInt32, _ result: Int32) -> Void) {
        // Identity only (submit checks the target is used with its own context).
        self.context = Unmanaged.passUnretained(context).toOpaque()
        self.body = body
    }

    /// Requests sent to this target whose callback has not run yet. Home thread only.
    public var pendingRequests: Int { inFlight }
}
