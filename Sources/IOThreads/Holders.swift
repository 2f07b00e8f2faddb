// Holders: who uses an IOThread (QEMU's "iothread: Support tracking and querying IOThread
// holders" series). A holder is a QOM object (a device, by its QOM path), a block node (an
// export, by its node name) or a monitor, as in the series' newest `IOThreadHolder` union.
// Holding is the only door to an IOThread's context: whoever decides to use an IOThread takes
// the hold synchronously, before any work is scheduled there, and releases it after that work
// has drained. While an IOThread is held it can be neither stopped nor deleted; once it is
// stopping, no hold can be taken. Both checks and their effects happen under one lock, so no
// interleaving lets a hold slip in between the check and the stop.
//
// Two ways to hold:
// - `IOThreadHold`, a ~Copyable value for one hold, released once by consuming it (a double
//   release does not compile);
// - `IOThreadHoldSet`, one holder's holds on any number of IOThreads, each held once, for
//   devices and exports whose queues move between IOThreads: a new placement is held before
//   the old one is released.
// Releasing a holder that does not hold is a programming error and crashes, as QEMU asserts;
// so does destroying an IOThread that still has holders, or dropping a hold set that holds.
import Aio

/// Who holds an IOThread: the union `IOThreadHolder` of QEMU's holders series
/// (`query-iothreads` shows it as `{"type": …, …}`).
public enum IOThreadHolder: Hashable, Sendable, CustomStringConvertible {
    /// A QOM object, by its canonical path: a device such as `/machine/peripheral/disk0`.
    case qomObject(path: String)
    /// A block node, by its node name: an export, or a node placed with
    /// `x-blockdev-set-iothread`.
    case blockNode(name: String)
    /// A monitor running on the IOThread, by its name.
    case monitor(name: String)

    /// The union's discriminator: `qom-object`, `block-node` or `monitor-name`.
    public var kind: String {
        switch self {
        case .qomObject: "qom-object"
        case .blockNode: "block-node"
        case .monitor: "monitor-name"
        }
    }

    /// The name of the variant's one member: `qom-path`, `node-name` or `monitor-name`.
    public var memberName: String {
        switch self {
        case .qomObject: "qom-path"
        case .blockNode: "node-name"
        case .monitor: "monitor-name"
        }
    }

    /// The path or name.
    public var name: String {
        switch self {
        case .qomObject(let p): p
        case .blockNode(let n): n
        case .monitor(let n): n
        }
    }

    public var description: String { name }
}

extension IOThread {
    /// Registers `holder` (newest first, as the series prepends) and returns the hold through
    /// which the context is reached. Thread-safe. The same holder may hold more than once
    /// (each hold is released once).
    /// - Throws: ``IOThreadError`` `.stopped` when the IOThread is stopping or stopped (or
    ///   deleted from its registry).
    public func hold(_ holder: IOThreadHolder) throws(IOThreadError) -> IOThreadHold {
        try ref(holder)
        return IOThreadHold(thread: self, holder: holder)
    }

    /// The current holders, newest first. Thread-safe.
    public var holders: [IOThreadHolder] { life.withLock { $0.holders } }

    /// Adds one hold of `holder`, unless the IOThread is no longer running.
    func ref(_ holder: IOThreadHolder) throws(IOThreadError) {
        try life.withLock { l throws(IOThreadError) in
            guard l.phase == .running else {
                throw IOThreadError(.stopped, "IOThread '\(id)' is stopped or being stopped")
            }
            l.holders.insert(holder, at: 0)
        }
    }

    /// Releases one hold of `holder` (the newest). Releasing a holder that does not hold is a
    /// programming error: it crashes.
    func unref(_ holder: IOThreadHolder) {
        let found = life.withLock { l -> Bool in
            guard let i = l.holders.firstIndex(of: holder) else { return false }
            l.holders.remove(at: i)
            return true
        }
        precondition(found, "BUG DETECTED: holder '\(holder)' released IOThread '\(id)' without holding it")
    }
}

/// A reference on an IOThread by a holder. Release it exactly once with ``release()``; it
/// cannot be copied, so it cannot be released twice.
///
/// Dropping a hold without releasing it is a programming error that the IOThread reports
/// when it is destroyed with holders left.
public struct IOThreadHold: ~Copyable, Sendable {
    /// The IOThread held.
    public let thread: IOThread
    /// Who holds it.
    public let holder: IOThreadHolder

    init(thread: IOThread, holder: IOThreadHolder) {
        self.thread = thread
        self.holder = holder
    }

    /// The held IOThread's context: the way to attach handlers to it.
    public var context: AioContext { thread.context }

    /// Releases the hold.
    public consuming func release() {
        thread.unref(holder)
    }
}

/// One holder's holds on IOThreads: each distinct IOThread held at most once, whatever the
/// number of queues placed on it. Devices and exports keep one; a move holds the new
/// IOThreads before it releases those no longer used, so at no moment is a queue on an
/// IOThread that its owner does not hold.
///
/// Thread-safe (one lock). Dropping a set that still holds is a programming error: it
/// crashes, naming the holder.
public final class IOThreadHoldSet: Sendable {
    /// Who holds.
    public let holder: IOThreadHolder
    let held = Locked<[IOThread]>([])

    public init(holder: IOThreadHolder) {
        self.holder = holder
    }

    deinit {
        let left = held.withLock { $0.map(\.id) }
        precondition(left.isEmpty, "BUG DETECTED: holder '\(holder)' dropped its holds on \(left) without releasing them")
    }

    /// Holds every IOThread of `threads` that the set does not hold yet. All or nothing: if
    /// one of them is stopped, the holds this call took are released and it throws.
    /// - Throws: ``IOThreadError`` `.stopped`.
    public func hold(_ threads: [IOThread]) throws(IOThreadError) {
        try held.withLock { h throws(IOThreadError) in
            var taken: [IOThread] = []
            for t in threads where !h.contains(where: { $0 === t }) && !taken.contains(where: { $0 === t }) {
                do throws(IOThreadError) {
                    try t.ref(holder)
                } catch {
                    for u in taken { u.unref(holder) }
                    throw error
                }
                taken.append(t)
            }
            h += taken
        }
    }

    /// Releases every hold except those on `keeping`.
    public func release(keeping: [IOThread] = []) {
        let gone = held.withLock { h -> [IOThread] in
            let gone = h.filter { t in !keeping.contains { $0 === t } }
            h.removeAll { t in !keeping.contains { $0 === t } }
            return gone
        }
        for t in gone { t.unref(holder) }
    }

    /// The IOThreads held, in the order they were first held.
    public var threads: [IOThread] { held.withLock { $0 } }

    /// Whether `thread` is held by this set.
    public func holds(_ thread: IOThread) -> Bool { held.withLock { $0.contains { $0 === thread } } }

    /// The context of `thread`, which the set must hold: the door to it.
    public func context(of thread: IOThread) -> AioContext {
        precondition(holds(thread), "BUG DETECTED: holder '\(holder)' used IOThread '\(thread.id)' without holding it")
        return thread.context
    }
}
