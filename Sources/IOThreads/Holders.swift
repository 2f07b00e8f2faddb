// Holders: who uses an IOThread (QEMU's "iothread: Support tracking and querying IOThread
// holders" series). A holder is a path such as "/machine/peripheral/disk0", an export name
// or the monitor. The only way to reach an IOThread's context for attaching is through a
// hold, a ~Copyable value that must be released exactly once (consuming): a double release
// does not compile. The name-based path (`unref(holder:)`, for the monitor and the registry)
// checks at run time: releasing a holder that does not hold is a programming error and
// crashes, as QEMU's reviewers asked; so does destroying an IOThread that still has holders.
import Aio

extension IOThread {
    /// Registers `holder` and returns the hold through which the context is reached.
    /// Thread-safe. The same holder may hold more than once (each hold is released once).
    public func hold(_ holder: String) -> IOThreadHold {
        precondition(!isStopped, "BUG DETECTED: holder '\(holder)' took IOThread '\(id)' after it was stopped")
        holderList.withLock { $0.append(holder) }
        return IOThreadHold(thread: self, holder: holder)
    }

    /// The current holders, in the order they took their holds. Thread-safe.
    public var holders: [String] { holderList.withLock { $0 } }

    /// Releases one hold of `holder` by name (the monitor's and the registry's path).
    /// Releasing a holder that does not hold is a programming error: it crashes.
    public func unref(holder: String) {
        let found = holderList.withLock { list -> Bool in
            guard let i = list.firstIndex(of: holder) else { return false }
            list.remove(at: i)
            return true
        }
        precondition(found, "BUG DETECTED: holder '\(holder)' released IOThread '\(id)' without holding it")
    }
}

/// A reference on an IOThread by a named holder. Release it exactly once with
/// ``release()``; it cannot be copied, so it cannot be released twice.
///
/// Dropping a hold without releasing it is a programming error that the IOThread reports
/// when it is destroyed with holders left.
public struct IOThreadHold: ~Copyable, Sendable {
    /// The IOThread held.
    public let thread: IOThread
    /// Who holds it.
    public let holder: String

    init(thread: IOThread, holder: String) {
        self.thread = thread
        self.holder = holder
    }

    /// The held IOThread's context: the way to attach handlers to it.
    public var context: AioContext { thread.context }

    /// Releases the hold.
    public consuming func release() {
        thread.unref(holder: holder)
    }
}
