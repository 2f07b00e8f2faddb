// The vhost-user wire format (docs/interop/vhost-user.rst): a 12-byte header (request,
// flags, size; host byte order) then `size` payload bytes, with file descriptors riding as
// SCM_RIGHTS on the same bytes. Only what a virtio-blk back end for QEMU 7.2 needs is named.

/// vhost-user request codes (front end → back end).
public enum VhostUserRequest: UInt32, Sendable, CustomStringConvertible {
    case none = 0
    case getFeatures = 1
    case setFeatures = 2
    case setOwner = 3
    case resetOwner = 4
    case setMemTable = 5
    case setLogBase = 6
    case setLogFD = 7
    case setVringNum = 8
    case setVringAddr = 9
    case setVringBase = 10
    case getVringBase = 11
    case setVringKick = 12
    case setVringCall = 13
    case setVringErr = 14
    case getProtocolFeatures = 15
    case setProtocolFeatures = 16
    case getQueueNum = 17
    case setVringEnable = 18
    case sendRARP = 19
    case netSetMTU = 20
    case setSlaveReqFD = 21
    case iotlbMsg = 22
    case setVringEndian = 23
    case getConfig = 24
    case setConfig = 25
    case getInflightFD = 31
    case setInflightFD = 32
    case resetDevice = 34
    case getMaxMemSlots = 36
    case addMemReg = 37
    case remMemReg = 38

    public var description: String {
        switch self {
        case .none: "NONE"
        case .getFeatures: "GET_FEATURES"
        case .setFeatures: "SET_FEATURES"
        case .setOwner: "SET_OWNER"
        case .resetOwner: "RESET_OWNER"
        case .setMemTable: "SET_MEM_TABLE"
        case .setLogBase: "SET_LOG_BASE"
        case .setLogFD: "SET_LOG_FD"
        case .setVringNum: "SET_VRING_NUM"
        case .setVringAddr: "SET_VRING_ADDR"
        case .setVringBase: "SET_VRING_BASE"
        case .getVringBase: "GET_VRING_BASE"
        case .setVringKick: "SET_VRING_KICK"
        case .setVringCall: "SET_VRING_CALL"
        case .setVringErr: "SET_VRING_ERR"
        case .getProtocolFeatures: "GET_PROTOCOL_FEATURES"
        case .setProtocolFeatures: "SET_PROTOCOL_FEATURES"
        case .getQueueNum: "GET_QUEUE_NUM"
        case .setVringEnable: "SET_VRING_ENABLE"
        case .sendRARP: "SEND_RARP"
        case .netSetMTU: "NET_SET_MTU"
        case .setSlaveReqFD: "SET_SLAVE_REQ_FD"
        case .iotlbMsg: "IOTLB_MSG"
        case .setVringEndian: "SET_VRING_ENDIAN"
        case .getConfig: "GET_CONFIG"
        case .setConfig: "SET_CONFIG"
        case .getInflightFD: "GET_INFLIGHT_FD"
        case .setInflightFD: "SET_INFLIGHT_FD"
        case .resetDevice: "RESET_DEVICE"
        case .getMaxMemSlots: "GET_MAX_MEM_SLOTS"
        case .addMemReg: "ADD_MEM_REG"
        case .remMemReg: "REM_MEM_REG"
        }
    }
}

/// Constants of the protocol.
public enum VhostUser {
    /// Header bytes: request u32, flags u32, size u32.
    public static let headerSize = 12
    /// The largest payload accepted (the biggest real one is a 268-byte config message).
    public static let maxPayload = 4096
    /// At most this many descriptors ride on one message.
    public static let maxFDs = 8
    /// At most this many memory regions in SET_MEM_TABLE.
    public static let maxMemoryRegions = 8

    /// Flags: bits 0-1 the version (1), bit 2 a reply, bit 3 "ack this" (REPLY_ACK).
    public static let versionMask: UInt32 = 0x3
    public static let version: UInt32 = 0x1
    public static let replyFlag: UInt32 = 0x4
    public static let needReplyFlag: UInt32 = 0x8
    /// Every reply carries exactly these flags (QEMU checks for 0x5).
    public static let replyFlags: UInt32 = version | replyFlag

    /// vring-file payload (KICK/CALL/ERR): the queue index and the "no fd" bit.
    public static let vringIndexMask: UInt64 = 0xff
    public static let vringNoFDFlag: UInt64 = 0x100

    /// The virtio feature bit that says protocol features exist.
    public static let protocolFeaturesBit: UInt64 = 1 << 30

    /// Protocol feature bits.
    public static let protocolMQ: UInt64 = 1 << 0
    public static let protocolReplyAck: UInt64 = 1 << 3
    public static let protocolConfig: UInt64 = 1 << 9
    /// What a blk back end offers (MQ | REPLY_ACK | CONFIG = 0x209): what QEMU 7.2 needs.
    public static let offeredProtocolFeatures: UInt64 = protocolMQ | protocolReplyAck | protocolConfig

    /// The largest queue a front end may configure (the spec's limit for split rings).
    public static let maxQueueSize = 32768
}


/// A message as read off the socket (home thread only; its fds are owned until taken).
struct VhostUserMessage {
    var request: UInt32
    var flags: UInt32
    var payload: UnsafeRawBufferPointer
    var fds: [Int32]

    var needsReply: Bool { flags & VhostUser.needReplyFlag != 0 }

    func u64(at offset: Int = 0) -> UInt64 { payload.loadUnaligned(fromByteOffset: offset, as: UInt64.self) }
    func u32(at offset: Int) -> UInt32 { payload.loadUnaligned(fromByteOffset: offset, as: UInt32.self) }
}

/// Why a session was ended or a message refused.
public struct VhostUserProtocolError: Error, Sendable, CustomStringConvertible, Equatable {
    public let message: String
    init(_ message: String) { self.message = message }
    public var description: String { message }
}
