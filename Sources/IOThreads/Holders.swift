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
        let ok = holderList.withLock { h -> Bool in
            guard !h.retired && !isStopped else { return false }
            h.holders.append(holder)
            return true
        }
        precondition(ok, "BUG DETECTED: holder '\(holder)' took IOThread '\(id)' after it was stopped or deleted")
        return IOThreadHold(thread: self, holder: holder)
    }

    /// The current holders, in the order they took their holds. Thread-safe.
    public var holders: [String] { holderList.withLock { $0.holders } }

    /// Marks the IOThread as going away if nobody holds it (atomically with `hold`), so that
    /// no hold can slip in between the check and the stop. Returns false if it is held.
    func retireIfUnheld() -> Bool {
        holderList.withLock { h in
            guard h.holders.isEmpty else { return false }
            h.retired = true
            return true
        }
    }

    /// Releases one hold of `holder` by name (the monitor's and the registry's path).
    /// Releasing a holder that does not hold is a programming error: it crashes.
    public func unref(holder: String) {
        let found = holderList.withLock { h -> Bool in
            guard let i = h.holders.firstIndex(of: holder) else { return false }
            h.holders.remove(at: i)
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
