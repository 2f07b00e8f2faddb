// A vhost-user-blk export: a block backend served to one vhost-user front end (QEMU) at a
// time on a UNIX socket, run on one IOThread or, as QEMU 9.0+ does with an `iothread` list,
// on several: queue q is served by iothreads[q % n]. The control socket and the session stay
// on the first IOThread (the home thread below); each queue's kick handler, ring processing,
// completion I/O and interrupts run on its own IOThread. The export holds every IOThread it
// uses under its export id.
//
// Lifecycle. init takes the hold, binds the socket (a stale socket file is replaced) and
// registers the listener on the IOThread. A front end that connects gets a Session; a second
// one while the first is connected is accepted and closed at once (QEMU reports the failure
// instead of hanging, as it does against qemu-storage-daemon 7.2). When the front end goes
// away, the session drains every queue, unmaps guest memory and closes its fds; only then is
// the listener re-armed, so a reconnecting front end finds the export as it left it, with every
// completed write in the backend. delete() stops listening, removes the socket file, ends the
// session the same way, and releases the hold last: it never blocks a thread, so it may be
// awaited from a task running on the export's own IOThread (qemu-storage-daemon 7.2
// deadlocks there).
import Aio
import CShims
import Devices
import Glibc
import IOThreads

/// A failure to create or delete an export.
public struct ExportError: Error, Sendable, Equatable, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// A vhost-user-blk export (qemu-storage-daemon's `--export type=vhost-user-blk`).
///
/// `@unchecked Sendable`: the immutable properties are set in init; `shared` is behind its
/// mutex; `session`, `listenFD` and `deleting` are confined to the first IOThread's home
/// thread (every closure that touches them is registered on or scheduled to that context);
/// `holds` are taken in init and released once, by `delete`, after every queue has drained
/// on its own IOThread and the home thread has let go.
public final class Export: @unchecked Sendable {
    /// The export id (`block-export-add id=`); also the holder name on the IOThread.
    public let id: String
    public let socketPath: String
    /// The first IOThread: runs the control socket (and the queues it serves).
    public var iothread: IOThread { iothreads[0] }
    /// The IOThreads as given; queue q runs on `iothreads[q % iothreads.count]`.
    public let iothreads: [IOThread]
    public let numQueues: Int
    public let writable: Bool
    public let logicalBlockSize: Int
    /// The serial GET_ID returns (qemu-storage-daemon's).
    public let serial = "vhost_user_blk"
    let backend: OpenBlockBackend
    let ctx: AioContext
    /// The context of each queue (`iothreads[q % n]`'s).
    let queueContexts: [AioContext]
    let description: BlkDeviceDescription
    let log: (@Sendable (String) -> Void)?

    struct Shared {
        /// One per distinct IOThread.
        var holds: [IOThreadHoldBox] = []
        var connected = false
        var connections = 0
        var refused = 0
        var errors: [String] = []
        var queues: [QueueStatistics?] = []
        var shuttingDown = false
        var deleted = false
    }
    let shared: Locked<Shared>

    // Home-thread state.
    var listenFD: Int32 = -1
    var session: Session?
    var deleting: (() -> Void)?

    /// The holder name this export uses on each of its IOThreads (the export id).
    public var holderName: String { id }

    /// Creates the export and starts listening.
    /// - Parameters:
    ///   - id: a well-formed id (a letter, then letters, digits, `-`, `.`, `_`).
    ///   - backend: where requests go; `.file(path:direct:)` for a disk image.
    ///   - socketPath: the UNIX socket to listen on (a stale socket file there is replaced).
    ///   - iothreads: the first runs the control socket; queue q (its kick handler, its I/O
    ///     and its interrupts) runs on `iothreads[q % iothreads.count]`. Each is held as `id`
    ///     until ``delete()`` returns. A name may repeat (it is held once).
    ///   - numQueues: queues offered (GET_QUEUE_NUM, config `num_queues`), 1...256.
    ///   - writable: allow OUT requests; otherwise the device is read-only (VIRTIO_BLK_F_RO).
    ///   - logicalBlockSize: config `blk_size`, a power of 2 in [512, 2 MiB].
    ///   - size: the disk size for a backend without storage (null, nop, delay); ignored for
    ///     files (the file's size is used).
    ///   - log: called on the IOThread with each protocol error and disconnect reason.
    /// - Throws: ``ExportError`` with qemu-storage-daemon's texts where it has one.
    public convenience init(id: String, backend: BlockBackend, socketPath: String, iothread: IOThread, numQueues: Int = 1,
                            writable: Bool = false, logicalBlockSize: Int = 512, size: UInt64 = 1 << 30,
                            log: (@Sendable (String) -> Void)? = nil) throws(ExportError) {
        try self.init(id: id, backend: backend, socketPath: socketPath, iothreads: [iothread], numQueues: numQueues,
                      writable: writable, logicalBlockSize: logicalBlockSize, size: size, log: log)
    }

    /// Creates the export on several IOThreads (QEMU 9.0+'s `iothread` list); see above.
    public init(id: String, backend: BlockBackend, socketPath: String, iothreads: [IOThread], numQueues: Int = 1,
                writable: Bool = false, logicalBlockSize: Int = 512, size: UInt64 = 1 << 30,
                log: (@Sendable (String) -> Void)? = nil) throws(ExportError) {
        guard isWellFormedObjectID(id) else { throw ExportError("Invalid block export id") }
        guard numQueues > 0 else { throw ExportError("num-queues must be greater than 0") }
        guard numQueues <= 256 else { throw ExportError("num-queues must be at most 256") }
        guard logicalBlockSize > 0, logicalBlockSize & (logicalBlockSize - 1) == 0 else {
            throw ExportError("Property \(id).logical-block-size doesn't take value '\(logicalBlockSize)', it's not a power of 2")
        }
        guard logicalBlockSize >= 512 && logicalBlockSize <= 2 << 20 else {
            throw ExportError("Property \(id).logical-block-size doesn't take value \(logicalBlockSize) (minimum: 512, maximum: 2097152)")
        }
        guard !iothreads.isEmpty else { throw ExportError("iothread list must not be empty") }
        var contexts: [AioContext] = []
        for t in iothreads {
            guard !t.isStopped, let c = t.context else { throw ExportError("iothread \"\(t.id)\" is stopped") }
            contexts.append(c)
        }
        let ctx = contexts[0]
        self.id = id
        self.socketPath = socketPath
        self.iothreads = iothreads
        queueContexts = (0..<numQueues).map { contexts[$0 % contexts.count] }
        self.numQueues = numQueues
        self.writable = writable
        self.logicalBlockSize = logicalBlockSize
        self.log = log
        self.ctx = ctx
        do {
            self.backend = try OpenBlockBackend(backend, readOnly: !writable, size: size)
        } catch {
            throw ExportError(error.message)
        }
        description = BlkDeviceDescription(capacityBytes: self.backend.sizeBytes ?? size,
                                           logicalBlockSize: UInt32(logicalBlockSize), numQueues: numQueues,
                                           readOnly: !writable, writeCache: true)
        let fd = dp_unix_listen(socketPath, 16)
        guard fd >= 0 else {
            throw ExportError("Failed to bind socket to \(socketPath): \(String(cString: strerror(-fd)))")
        }
        // Last stored property: from here on deinit runs, and it expects delete().
        shared = Locked(Shared(queues: [QueueStatistics?](repeating: nil, count: numQueues)))
        listenFD = fd
        var boxes: [IOThreadHoldBox] = []
        var seen: Set<ObjectIdentifier> = []
        for t in iothreads where seen.insert(ObjectIdentifier(t)).inserted {
            boxes.append(IOThreadHoldBox(t.hold(id)))
        }
        shared.withLock { $0.holds = boxes }
        // Registered from this thread: applied by the IOThread on its next iteration.
        listen()
    }

    func listen() {
        ctx.setFdHandler(listenFD, FdHandlerCallbacks(read: { [unowned(unsafe) self] in acceptAll() }))
    }

    deinit {
        let deleted = shared.withLock { $0.deleted }
        precondition(deleted, "BUG DETECTED: export '\(id)' destroyed without delete()")
    }

    // MARK: - State readable from any thread

    /// Whether a front end is connected now.
    public var isConnected: Bool { shared.withLock { $0.connected } }
    /// Front ends served so far.
    public var connectionCount: Int { shared.withLock { $0.connections } }
    /// Connections refused because a front end was already connected.
    public var refusedConnections: Int { shared.withLock { $0.refused } }
    /// Protocol errors and disconnect reasons, oldest first (the last 32).
    public var errors: [String] { shared.withLock { $0.errors } }
    /// The counters of queue `index` while it runs (nil while stopped).
    public func queueStatistics(_ index: Int) -> QueueStatistics? { shared.withLock { $0.queues[index] } }
    /// Requests taken from the guest and not yet completed, over all queues.
    public var inFlight: Int { shared.withLock { $0.queues.reduce(0) { $0 + ($1?.inFlight ?? 0) } } }
    /// Whether ``delete()`` has completed.
    public var isDeleted: Bool { shared.withLock { $0.deleted } }

    func recordError(_ text: String) {
        shared.withLock {
            $0.errors.append(text)
            if $0.errors.count > 32 { $0.errors.removeFirst() }
        }
        log?("vhost-user-blk export '\(id)': \(text)")
    }

    func publish(queue: Int, _ s: QueueStatistics) { shared.withLock { $0.queues[queue] = s } }

    func retire(queue: Int, _ s: QueueStatistics) {
        shared.withLock { if $0.queues[queue] === s { $0.queues[queue] = nil } }
    }

    // MARK: - Connections (home thread)

    func acceptAll() {
        while listenFD >= 0 {
            let fd = accept(listenFD, nil, nil)
            guard fd >= 0 else { return }  // EAGAIN: done; EMFILE etc.: it waits in the backlog
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            if session != nil {
                // One front end at a time: refuse the second at once rather than leave it hanging.
                close(fd)
                shared.withLock { $0.refused += 1 }
                recordError("refused a second front end while one is connected")
                continue
            }
            let s = Session(export: self, ctx: ctx, fd: fd, description: description)
            s.onClosed = { [unowned(unsafe) self] in sessionClosed() }
            session = s
            shared.withLock {
                $0.connected = true
                $0.connections += 1
            }
            s.start()
        }
    }

    /// The session is ending: accept nobody until it has drained (a reconnecting front end
    /// waits in the backlog instead of being refused).
    func sessionEnding() {
        if listenFD >= 0 { ctx.removeFdHandler(listenFD) }
    }

    /// The session drained and let go of guest memory: listen again (or finish a delete).
    func sessionClosed() {
        session = nil
        if listenFD >= 0 { listen() }
        shared.withLock {
            $0.connected = false
            $0.queues = [QueueStatistics?](repeating: nil, count: numQueues)
        }
        if let done = deleting {
            deleting = nil
            done()
        }
    }

    // MARK: - Delete

    /// Deletes the export: stops listening and removes the socket file, disconnects the front
    /// end, waits until every request already taken has completed on its queue's IOThread
    /// (and is visible to the guest), unmaps guest memory, then releases every IOThread hold.
    /// Never blocks a thread.
    /// - Throws: ``ExportError`` (`Export 'ID' is already shutting down`) on a second call.
    public func delete() async throws(ExportError) {
        let first = shared.withLock { s -> Bool in
            guard !s.shuttingDown else { return false }
            s.shuttingDown = true
            return true
        }
        guard first else { throw ExportError("Export '\(id)' is already shutting down") }
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            ctx.scheduleOneShot(name: "export-delete") { [self] in
                shutdownOnHomeThread { done.resume() }
            }
        }
        let holds = shared.withLock { s -> [IOThreadHoldBox] in
            s.deleted = true
            let h = s.holds
            s.holds = []
            return h
        }
        for h in holds { h.release() }
    }

    func shutdownOnHomeThread(_ done: @escaping () -> Void) {
        if listenFD >= 0 {
            ctx.removeFdHandler(listenFD)
            close(listenFD)
            listenFD = -1
            unlink(socketPath)
        }
        guard let s = session else { return done() }
        deleting = done  // delete() lets only one caller get here
        s.disconnect("export deleted")
    }
}

/// A hold in a box, so that it can sit in a lock-protected struct (a hold is ~Copyable).
///
/// `@unchecked Sendable`: released once, by the task that took it out of the export's state
/// under the lock.
final class IOThreadHoldBox: @unchecked Sendable {
    var hold: IOThreadHold?
    init(_ hold: consuming IOThreadHold) { self.hold = consume hold }
    func release() {
        if let h = hold.take() { h.release() }
    }
}
