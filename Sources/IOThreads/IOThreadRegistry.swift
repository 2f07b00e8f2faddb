import Aio
import Synchronization

/// IOThreads by id (QEMU's `/objects` container for `iothread` objects). Thread-safe.
public final class IOThreadRegistry: Sendable {
    let threads = Locked<[String: IOThread]>([:])
    /// Creation order, for listings in the order QEMU shows them.
    let order = Locked<[String]>([])

    public init() {}

    /// Creates and starts an IOThread under `id`.
    /// - Throws: ``IOThreadError`` for a malformed or duplicate id, a bad property, or a
    ///   thread the kernel refused.
    @discardableResult
    public func create(id: String, properties: IOThreadProperties = IOThreadProperties()) throws(IOThreadError) -> IOThread {
        guard isWellFormedObjectID(id) else {
            throw IOThreadError(.invalidID, "Parameter 'id' expects an identifier")
        }
        // Reserve the id first so two creators cannot both start a thread for it.
        let taken = order.withLock { o -> Bool in
            if o.contains(id) { return true }
            o.append(id)
            return false
        }
        guard !taken else { throw IOThreadError(.duplicateID, "attempt to add duplicate property '\(id)' to object (type 'container')") }
        do {
            let thread = try IOThread(id: id, properties: properties)
            threads.withLock { $0[id] = thread }
            return thread
        } catch {
            order.withLock { $0.removeAll { $0 == id } }
            throw error
        }
    }

    /// The IOThread with `id`, if any.
    public func lookup(_ id: String) -> IOThread? { threads.withLock { $0[id] } }

    /// All IOThreads in creation order.
    public var all: [IOThread] {
        let ids = order.withLock { $0 }
        return threads.withLock { t in ids.compactMap { t[$0] } }
    }

    /// Stops and removes the IOThread with `id`. One that has holders is refused, with
    /// QEMU's text for an object in use.
    /// - Throws: ``IOThreadError`` `.notFound` when there is none, `.inUse` when it is held.
    public func remove(_ id: String) throws(IOThreadError) {
        let outcome = threads.withLock { t -> Result<IOThread, IOThreadError> in
            guard let thread = t[id] else { return .failure(IOThreadError(.notFound, "object '\(id)' not found")) }
            do throws(IOThreadError) { try thread.retire() } catch { return .failure(error) }
            t.removeValue(forKey: id)
            return .success(thread)
        }
        let thread = try outcome.get()
        // Retired: nothing can hold it any more, so the stop cannot be refused. The id stays
        // reserved (in `order`) until the thread is joined.
        try? thread.stop()
        order.withLock { $0.removeAll { $0 == id } }
    }

    /// Stops and removes every IOThread that nothing holds; the held ones stay.
    public func removeAll() {
        for t in all { try? remove(t.id) }
    }
}
