// fd handlers and event notifiers of a context (QEMU's aio_set_fd_handler and
// aio_set_event_notifier): registration from any thread is queued and applied by the home
// thread at the start of its next iteration (at once when called there); removed handlers are
// retired until no walk over them is in progress.
import CShims
import Glibc
import Synchronization

extension AioContext {
    // MARK: - fd handlers and event notifiers

    /// Registers (or replaces, or with all callbacks nil removes) the handler for `fd`.
    /// Thread-safe: on the home thread it takes effect at once; from another thread at the
    /// start of the home thread's next iteration (the loop is notified).
    public func setFDHandler(_ fd: Int32, _ callbacks: FDHandlerCallbacks) {
        let handler = callbacks.isEmpty ? nil : FDHandler(fd: fd, role: .fd, callbacks: callbacks, notifier: nil)
        change(fd, handler)
    }

    /// Removes the handler for `fd`, if any. Thread-safe (see ``setFDHandler(_:_:)``). Once
    /// applied, no callback for this registration runs again, even for events already
    /// completed in the kernel.
    public func removeFDHandler(_ fd: Int32) { change(fd, nil) }

    /// Registers an event notifier. `callbacks.read` runs after the loop cleared the
    /// notifier, once per batch of ``EventNotifier/set()`` calls. The context keeps the
    /// notifier alive while it is registered. Thread-safe (see ``setFDHandler(_:_:)``).
    public func setEventNotifier(_ notifier: EventNotifier, _ callbacks: FDHandlerCallbacks) {
        let fd = notifier.fileDescriptor
        let handler = callbacks.isEmpty
            ? nil : FDHandler(fd: fd, role: .eventNotifier, callbacks: callbacks, notifier: notifier)
        change(fd, handler)
    }

    /// Removes an event notifier's handler. Thread-safe (see ``removeFDHandler(_:)``).
    public func removeEventNotifier(_ notifier: EventNotifier) { change(notifier.fileDescriptor, nil) }

    func change(_ fd: Int32, _ handler: FDHandler?) {
        precondition(fd != notifier.fileDescriptor || handler?.role == .contextNotifier,
                     "BUG DETECTED: the context's own notifier fd cannot be re-registered")
        if isOnHomeThread {
            applyPendingChanges()  // keep the order of earlier changes from other threads
            apply(fd, handler)
        } else {
            pendingChanges.withLock { $0.append((fd, handler)) }
            // Release: the queued change is visible to the home thread that sees the flag.
            hasPendingChanges.store(true, ordering: .releasing)
        }
        notify()
    }

    func applyPendingChanges() {
        guard hasPendingChanges.load(ordering: .acquiring) else { return }
        let changes = pendingChanges.withLock { q -> [(Int32, FDHandler?)] in
            hasPendingChanges.store(false, ordering: .relaxed)
            let c = q
            q.removeAll()
            return c
        }
        for (fd, handler) in changes { apply(fd, handler) }
    }

    func apply(_ fd: Int32, _ handler: FDHandler?) {
        if let old = handlersByFd.removeValue(forKey: fd) { retire(old) }
        if let handler { install(handler) }
    }

    func install(_ h: FDHandler) {
        let slot: Int
        if let free = freeHandlerSlots.popLast() {
            slot = free
        } else {
            slot = handlerSlots.count
            handlerSlots.append(nil)
        }
        generation &+= 1
        h.userData = UserData.make(kind: UserData.fdHandler, generation: generation, slot: slot)
        handlerSlots[slot] = h
        handlersByFd[h.fd] = h
        if h.callbacks.poll == nil { pollDisableCount += 1 }
        monitor.register(h)
    }

    func retire(_ h: FDHandler) {
        h.deleted = true
        retiredHandlers.append(h)
        handlerSlots[UserData.slot(h.userData)] = nil
        freeHandlerSlots.append(UserData.slot(h.userData))
        if h.callbacks.poll == nil { pollDisableCount -= 1 }
        if h.inPollList { removeFromPollList(h) }
        if h.pollNs != 0 { statistics.publishPollWindow(fd: h.fd, ns: nil) }
        monitor.unregister(h)
    }

    /// The live handler a backend event belongs to, or nil for a stale one.
    @inline(__always)
    func handler(for userData: UInt64) -> FDHandler? {
        let slot = UserData.slot(userData)
        guard slot < handlerSlots.count, let h = handlerSlots[slot], h.userData == userData else { return nil }
        return h
    }

    func markReady(_ h: FDHandler, revents: UInt32) {
        h.revents |= revents
        if !h.onReadyList {
            h.onReadyList = true
            readyHandlers.append(h)
        }
    }

    func markPollReady(_ h: FDHandler) {
        h.pollReadyFlag = true
        if !h.onReadyList {
            h.onReadyList = true
            readyHandlers.append(h)
        }
    }

    func removeFromPollList(_ h: FDHandler) {
        h.inPollList = false
        if let i = pollHandlers.firstIndex(where: { $0 === h }) { pollHandlers.remove(at: i) }
    }
}
