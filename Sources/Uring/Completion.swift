/// One completion queue entry, copied out of the ring.
public struct Completion: Sendable, Equatable {
    /// The `user_data` the request was submitted with.
    public var userData: UInt64
    /// The request's result: a byte count or other non-negative value, or `-errno`.
    public var result: Int32
    /// The CQE flags (`IORING_CQE_F_MORE` and so on).
    public var flags: UInt32

    public init(userData: UInt64, result: Int32, flags: UInt32) {
        self.userData = userData
        self.result = result
        self.flags = flags
    }

    /// More completions will follow for this request (a multishot request is still armed).
    public var hasMore: Bool { flags & Completion.moreFlag != 0 }

    /// `IORING_CQE_F_MORE`.
    public static let moreFlag: UInt32 = 1 << 1
}

/// Poll event bits as io_uring and poll(2) use them.
public enum PollEvents {
    public static let readable: UInt32 = 0x001  // POLLIN
    public static let priority: UInt32 = 0x002  // POLLPRI
    public static let writable: UInt32 = 0x004  // POLLOUT
    public static let error: UInt32 = 0x008  // POLLERR
    public static let hangup: UInt32 = 0x010  // POLLHUP
    public static let invalid: UInt32 = 0x020  // POLLNVAL
    public static let readHangup: UInt32 = 0x2000  // POLLRDHUP
}
