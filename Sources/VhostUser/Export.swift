// A vhost-user-blk export: a block backend served to one vhost-user front end (QEMU) at a
// time on a UNIX socket, run on one IOThread or, as QEMU 9.0+ does with an `iothread` list,
// on several: queue q is served by iothreads[q % n]. The control socket and the session stay
// on the first IOThread (the home thread below); each queue's kick handler, ring processing,
// completion I/O and interrupts run on its own IOThread. The export holds every IOThread it
// uses (by default as the block node named by its id).
//
// Lifecycle (under `shared`'s lock): serving -> moving -> serving ..., serving -> deleting
// -> deleted. One operation at a time; a call that finds the export in a state it cannot
// start from throws an ExportError and changes nothing.
// - init takes the holds (synchronously), binds the socket (a stale socket file is replaced)
//   and registers the listener on the home IOThread. A front end that connects gets a
//   Session; a second one while the first is connected is accepted and closed at once (QEMU
//   reports the failure instead of hanging, as it does against qemu-storage-daemon 7.2).
//   When the front end goes away, the session drains every queue, unmaps guest memory and
//   closes its fds; only then is the listener re-armed, so a reconnecting front end finds the
//   export as it left it, with every completed write in the backend.
// - move(to:) holds the new IOThreads, then on the home thread stops listening and moves the
//   session (every ring quiesced, the session handed to the new home by the old one's last
//   BH, the rings restarted on their new IOThreads), listens on the new home, and releases
//   the IOThreads no longer used. The front end stays connected.
// - delete() stops listening, removes the socket file, ends the session the same way, and
//   releases the holds last: it never blocks a thread, so it may be awaited from a task
//   running on the export's own IOThread (qemu-storage-daemon 7.2 deadlocks there).
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
/// mutex; `session`, `listenFD`, `deleting`, `ctx` and `queueContexts` are confined to the
/// home IOThread's thread (every closure that touches them is registered on or scheduled to
/// that context; a move hands them to the new home with the session); `holds` is thread-safe
/// and released by `delete` after every queue has drained on its own IOThread and the home
/// thread has let go.
public final class Export: @unchecked Sendable {
    /// The export id (`block-export-add id=`).
    public let id: String
    /// Who holds the IOThreads (by default the block node named by the export's id).
    public let holder: IOThreadHolder
    public let socketPath: String
    /// The first IOThread: runs the control socket (and the queues it serves).
    public var iothread: IOThread { iothreads[0] }
    /// The IOThreads; queue q runs on `iothreads[q % iothreads.count]`.
    public var iothreads: [IOThread] { shared.withLock { $0.iothreads } }
    public let numQueues: Int
    public let writable: Bool
    public let logicalBlockSize: Int
    /// The serial GET_ID returns (qemu-storage-daemon's).
    public let serial = "vhost_user_blk"
    let backend: OpenBlockBackend
    /// The home context (the first IOThread's). Home thread (see above).
    var ctx: AioContext
    /// The context of each queue (`iothreads[q % n]`'s). Home thread.
    var queueContexts: [AioContext]
    let holds: IOThreadHoldSet
    let description: BlkDeviceDescription
    let log: (@Sendable (String) -> Void)?

    /// serving -> moving -> serving, serving -> deleting -> deleted.
    public enum Phase: Sendable, Equatable { case serving, moving, deleting, deleted }

    struct Shared {
        var phase = Phase.serving
        var iothreads: [IOThread]
        var connected = false
        var connections = 0
        var refused = 0
        var errors: [String] = []
        var queues: [QueueStatistics?] = []
    }
    let shared: Locked<Shared>

    // Home-thread state.
    var listenFD: Int32 = -1
    var session: Session?
    /// Run once the session has closed: the end of a delete, or a move waiting for a closing
    /// session to finish.
    var afterSession: [() -> Void] = []

    /// The holder's path or name on each of its IOThreads.
    public var holderName: String { holder.name }

    /// Creates the export and starts listening.
    /// - Parameters:
    ///   - id: a well-formed id (a letter, then letters, digits, `-`, `.`, `_`).
    ///   - backend: where requests go; `.file(path:direct:)` for a disk image.
    ///   - socketPath: the UNIX socket to listen on (a stale socket file there is replaced).
    ///   - iothreads: the first runs the control socket; queue q (its kick handler, its I/O
    ///     and its interrupts) runs on `iothreads[q % iothreads.count]`. Each is held by
    ///     `holder` until ``delete()`` returns. A name may repeat (it is held once).
    ///   - numQueues: queues offered (GET_QUEUE_NUM, config `num_queues`), 1...256.
    ///   - writable: allow OUT requests; otherwise the device is read-only (VIRTIO_BLK_F_RO).
    ///   - logicalBlockSize: config `blk_size`, a power of 2 in [512, 2 MiB].
    ///   - size: the disk size for a backend without storage (null, nop, delay); ignored for
    ///     files (the file's size is used).
    ///   - holder: who holds the IOThreads (default: the block node named `id`).
    ///   - log: called on the IOThread with each protocol error and disconnect reason.
    /// - Throws: ``ExportError`` with qemu-storage-daemon's texts where it has one, or when an
    ///   IOThread is stopped (nothing is left behind then).
    public convenience init(id: String, backend: BlockBackend, socketPath: String, iothread: IOThread, numQueues: Int = 1,
                            writable: Bool = false, logicalBlockSize: Int = 512, size: UInt64 = 1 << 30,
                            holder: IOThreadHolder? = nil, log: (@Sendable (String) -> Void)? = nil) throws(ExportError) {
        try self.init(id: id, backend: backend, socketPath: socketPath, iothreads: [iothread], numQueues: numQueues,
                      writable: writable, logicalBlockSize: logicalBlockSize, size: size, holder: holder, log: log)
    }

    /// Creates the export on several IOThreads (QEMU 9.0+'s `iothread` list); see above.
    public init(id: String, backend: BlockBackend, socketPath: String, iothreads: [IOThread], numQueues: Int = 1,
                writable: Bool = false, logicalBlockSize: Int = 512, size: UInt64 = 1 << 30,
                holder: IOThreadHolder? = nil, log: (@Sendable (String) -> Void)? = nil) throws(ExportError) {
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
        self.id = id
        self.holder = holder ?? .blockNode(name: id)
        let holds = IOThreadHoldSet(holder: self.holder)
        self.holds = holds
        do throws(IOThreadError) {
            try holds.hold(iothreads)
        } catch {
            throw ExportError(error.message)
        }
        // From here on, every failure releases the holds (the set must not be dropped holding).
        var contexts = iothreads.map { holds.context(of: $0) }
        ctx = contexts[0]
        queueContexts = (0..<numQueues).map { contexts[$0 % contexts.count] }
        contexts = []
        self.socketPath = socketPath
        self.numQueues = numQueues
        self.writable = writable
        self.logicalBlockSize = logicalBlockSize
        self.log = log
        do {
            self.backend = try OpenBlockBackend(backend, readOnly: !writable, size: size)
        } catch {
            holds.release()
            throw ExportError(error.message)
        }
        description = BlkDeviceDescription(capacityBytes: self.backend.sizeBytes ?? size,
                                           logicalBlockSize: UInt32(logicalBlockSize), numQueues: numQueues,
                                           readOnly: !writable, writeCache: true)
        let fd = dp_unix_listen(socketPath, 16)
        guard fd >= 0 else {
            holds.release()
            throw ExportError("Failed to bind socket to \(socketPath): \(String(cString: strerror(-fd)))")
        }
        // Last stored property: from here on deinit runs, and it expects delete().
        shared = Locked(Shared(iothreads: iothreads, queues: [QueueStatistics?](repeating: nil, count: numQueues)))
        listenFD = fd
        // Registered from this thread: applied by the IOThread on its next iteration.
        listen()
    }

    func listen() {
        // unowned(unsafe): the handler is removed (shutdownOnHomeThread, a move) before delete()
        // returns, and an export lives until then (deinit checks it).
        ctx.setFDHandler(listenFD, FDHandlerCallbacks(read: { [unowned(unsafe) self] in acceptAll() }))
    }

    deinit {
        let phase = shared.withLock { $0.phase }
        precondition(phase == .deleted, "BUG DETECTED: export '\(id)' destroyed without delete()")
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
    public var isDeleted: Bool { shared.withLock { $0.phase == .deleted } }
    /// Where the export is in its lifecycle.
    public var phase: Phase { shared.withLock { $0.phase } }

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
        // A front end that closed and connected again at once: its new connection may be here
        // before the session has read the end of the old one. End that session now and leave
        // the new connection in the backlog, where the listener finds it once the session has
        // drained, instead of refusing it as a second front end.
        if let s = session, !s.closed, s.peerHungUp() {
            s.disconnect("front end closed the connection")
            return
        }
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
        if listenFD >= 0 { ctx.removeFDHandler(listenFD) }
    }

    /// The session drained and let go of guest memory: listen again (or go on with a delete
    /// or a move that waited for it).
    func sessionClosed() {
        session = nil
        shared.withLock {
            $0.connected = false
            $0.queues = [QueueStatistics?](repeating: nil, count: numQueues)
        }
        let waiting = afterSession
        afterSession = []
        if waiting.isEmpty {
            if listenFD >= 0 { listen() }
        } else {
            for body in waiting { body() }
        }
    }

    // MARK: - Move

    /// Moves the export, with its front end connected, to `iothreads` (queue q to
    /// `iothreads[q % n]`, the control socket to the first): holds them, quiesces every ring
    /// (the requests taken complete), hands the session to the new home, restarts the rings
    /// there, and releases the IOThreads no longer used. Returns the pause in ns: from the
    /// start of the quiesce to the moment the new home reads the socket again.
    /// - Throws: ``ExportError`` when the export is not serving (being moved, deleted) or an
    ///   IOThread is stopped; nothing changes then.
    @discardableResult
    public func move(to iothreads: [IOThread]) async throws(ExportError) -> Int64 {
        guard !iothreads.isEmpty else { throw ExportError("iothread list must not be empty") }
        try shared.withLock { s throws(ExportError) in
            switch s.phase {
            case .serving: s.phase = .moving
            case .moving: throw ExportError("Export '\(id)' is being moved")
            case .deleting, .deleted: throw ExportError("Export '\(id)' is already shutting down")
            }
        }
        do throws(IOThreadError) {
            try holds.hold(iothreads)
        } catch {
            shared.withLock { $0.phase = .serving }
            throw ExportError(error.message)
        }
        let contexts = iothreads.map { holds.context(of: $0) }
        let home = contexts[0]
        let queueContexts = (0..<numQueues).map { contexts[$0 % contexts.count] }
        let old = ctx  // read before the hand-off: only the home thread writes it, and it is idle for us
        let began = monotonicNanoseconds()
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            old.scheduleOneShot(name: "\(id)-move") { [self] in
                moveOnHomeThread(home: home, queueContexts: queueContexts) { done.resume() }
            }
        }
        let pause = monotonicNanoseconds() - began
        holds.release(keeping: iothreads)
        shared.withLock {
            $0.iothreads = iothreads
            $0.phase = .serving
        }
        return pause
    }

    /// The home thread's part of a move; `done` runs on the new home.
    func moveOnHomeThread(home: AioContext, queueContexts: [AioContext], _ done: @escaping @Sendable () -> Void) {
        if let s = session, s.closed {
            // A front end is going away: move once its session has closed.
            afterSession.append { [self] in moveOnHomeThread(home: home, queueContexts: queueContexts, done) }
            return
        }
        if listenFD >= 0 { ctx.removeFDHandler(listenFD) }
        guard let s = session else {
            ctx = home
            self.queueContexts = queueContexts
            home.scheduleOneShot(name: "\(id)-moved") { [self] in
                if listenFD >= 0 { listen() }
                done()
            }
            return
        }
        // While connected nobody is accepted (see acceptAll): the listener comes back with the
        // session, on the new home.
        s.move(home: home, queueContexts: queueContexts, handOff: { [self] in
            ctx = home
            self.queueContexts = queueContexts
        }) { [self] in
            // On the new home, which owns the export's home state from here on.
            if listenFD >= 0 { listen() }
            done()
        }
    }

    // MARK: - Delete

    /// Deletes the export: stops listening and removes the socket file, disconnects the front
    /// end, waits until every request already taken has completed on its queue's IOThread
    /// (and is visible to the guest), unmaps guest memory, then releases every IOThread hold.
    /// Never blocks a thread.
    /// - Throws: ``ExportError`` (`Export 'ID' is already shutting down`) on a second call, or
    ///   while a move runs; nothing changes then.
    public func delete() async throws(ExportError) {
        try shared.withLock { s throws(ExportError) in
            switch s.phase {
            case .serving: s.phase = .deleting
            case .moving: throw ExportError("Export '\(id)' is being moved")
            case .deleting, .deleted: throw ExportError("Export '\(id)' is already shutting down")
            }
        }
        let home = ctx  // stable: only a move writes it, and none runs now
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            home.scheduleOneShot(name: "export-delete") { [self] in
                shutdownOnHomeThread { done.resume() }
            }
        }
        holds.release()
        shared.withLock { $0.phase = .deleted }
    }

    func shutdownOnHomeThread(_ done: @escaping () -> Void) {
        if listenFD >= 0 {
            ctx.removeFDHandler(listenFD)
            close(listenFD)
            listenFD = -1
            unlink(socketPath)
        }
        guard let s = session else { return done() }
        afterSession.append(done)  // delete() lets only one caller get here
        s.disconnect("export deleted")
    }
}
