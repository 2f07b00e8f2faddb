/// The callbacks of an fd handler or event notifier. All run on the context's home thread.
///
/// - `read` runs when the fd is readable (or hung up, or in error); for an event notifier,
///   after the notifier was cleared, once per batch of ``EventNotifier/set()`` calls. An event
///   notifier registered without `read` runs `pollReady` there instead: the loop clears the
///   notifier, so the kick must reach a callback.
/// - `write` runs when the fd is writable.
/// - `poll` is a cheap readiness check used while busy-polling; `pollReady` does the work
///   when it returned true. `poll` is ignored without `pollReady` (as in QEMU).
/// - `pollBegin` / `pollEnd` bracket busy polling (a virtqueue suppresses guest kicks in
///   between). A `pollBegin` is not always followed by `pollEnd`: not when the handler is
///   removed while polling (as in QEMU).
public struct FDHandlerCallbacks: Sendable {
    public var read: (@Sendable () -> Void)?
    public var write: (@Sendable () -> Void)?
    public var poll: (@Sendable () -> Bool)?
    public var pollReady: (@Sendable () -> Void)?
    public var pollBegin: (@Sendable () -> Void)?
    public var pollEnd: (@Sendable () -> Void)?

    public init(
        read: (@Sendable () -> Void)? = nil,
        write: (@Sendable () -> Void)? = nil,
        poll: (@Sendable () -> Bool)? = nil,
        pollReady: (@Sendable () -> Void)? = nil,
        pollBegin: (@Sendable () -> Void)? = nil,
        pollEnd: (@Sendable () -> Void)? = nil
    ) {
        self.read = read
        self.write = write
        self.poll = pollReady == nil ? nil : poll
        self.pollReady = pollReady
        self.pollBegin = pollBegin
        self.pollEnd = pollEnd
    }

    var isEmpty: Bool { read == nil && write == nil && poll == nil }
}

/// How `user_data` of a ring request (and `data.u64` of an epoll event) is laid out:
/// bits 63–62 the kind, 61–32 a generation, 31–0 a slot. A stale completion (its handler
/// or request gone, the slot reused) carries an old generation and is dropped, so no
/// event ever reaches a handler registered later for the same fd number.
enum UserData {
    static let kindShift: UInt64 = 62
    static let ignore: UInt64 = 0
    static let fdHandler: UInt64 = 1
    static let request: UInt64 = 2

    @inline(__always) static func make(kind: UInt64, generation: UInt32, slot: Int) -> UInt64 {
        (kind << kindShift) | (UInt64(generation & 0x3FFF_FFFF) << 32) | UInt64(UInt32(slot))
    }
    @inline(__always) static func kind(_ u: UInt64) -> UInt64 { u >> kindShift }
    @inline(__always) static func slot(_ u: UInt64) -> Int { Int(UInt32(truncatingIfNeeded: u)) }
    @inline(__always) static func generation(_ u: UInt64) -> UInt32 { UInt32((u >> 32) & 0x3FFF_FFFF) }
}

/// One registration of an fd (QEMU's `AioHandler`). Lives on the home thread only; a
/// replacement is a new registration, so a modified handler starts adaptive polling anew
/// (as in QEMU).
///
/// `@unchecked Sendable` (and `@exclusivity(unchecked)` on its vars): created by the registering thread, handed to the home thread
/// through the context's `pendingChanges` mutex, and touched only by the home thread after.
final class FDHandler: @unchecked Sendable {
    enum Role { case fd, eventNotifier, contextNotifier }

    let fd: Int32
    let role: Role
    let callbacks: FDHandlerCallbacks
    /// Keeps an event notifier (and its fd) alive while registered.
    let notifier: EventNotifier?
    /// poll(2) events to watch.
    let events: UInt32
    @exclusivity(unchecked) var userData: UInt64 = 0

    // Home thread only, as the fields above and below.
    @exclusivity(unchecked) var deleted = false
    // Dispatch state.
    @exclusivity(unchecked) var revents: UInt32 = 0
    @exclusivity(unchecked) var pollReadyFlag = false
    @exclusivity(unchecked) var onReadyList = false
    // Adaptive polling state (QEMU AioPolledEvent and friends).
    @exclusivity(unchecked) var inPollList = false
    @exclusivity(unchecked) var pollNs: Int64 = 0
    @exclusivity(unchecked) var pollIdleTimeout: Int64 = 0
    // Backend state: a poll request is in the kernel (io_uring), registered (epoll).
    @exclusivity(unchecked) var armed = false
    @exclusivity(unchecked) var multishot = false

    init(fd: Int32, role: Role, callbacks: FDHandlerCallbacks, notifier: EventNotifier?) {
        self.fd = fd
        self.role = role
        self.callbacks = callbacks
        self.notifier = notifier
        var ev: UInt32 = 0
        if callbacks.read != nil || role != .fd { ev |= 0x001 | 0x010 | 0x008 }  // IN | HUP | ERR
        if callbacks.write != nil { ev |= 0x004 | 0x008 }  // OUT | ERR
        self.events = ev
    }
}
