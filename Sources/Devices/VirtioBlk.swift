// virtio-blk's numbers (virtio 1.x §5.2): request types, status bytes and limits, and the
// feature bits a device offers. The config space an export shows is in VhostUser's BlkConfig.

/// virtio-blk request constants (virtio 1.x §5.2.6).
public enum VirtioBlk {
    public static let typeIn: UInt32 = 0
    public static let typeOut: UInt32 = 1
    public static let typeFlush: UInt32 = 4
    public static let typeGetID: UInt32 = 8
    public static let typeDiscard: UInt32 = 11
    public static let typeWriteZeroes: UInt32 = 13
    /// Discard / write-zeroes segment flag: the range may be deallocated.
    public static let writeZeroesFlagUnmap: UInt32 = 1
    /// The most sectors one discard or write-zeroes segment may cover (config space).
    public static let maxDiscardSectors: UInt64 = 32768
    // fallocate(2) modes (glibc defines them only under _GNU_SOURCE).
    static let fallocKeepSize: Int32 = 0x01
    static let fallocPunchHole: Int32 = 0x02
    static let fallocZeroRange: Int32 = 0x10
    /// Legacy flag bit in `type`, masked off before dispatch (as QEMU does).
    public static let typeBarrier: UInt32 = 0x8000_0000
    public static let statusOK: UInt8 = 0
    public static let statusIOErr: UInt8 = 1
    public static let statusUnsupported: UInt8 = 2
    public static let sectorSize: UInt64 = 512
    public static let headerSize = 16
    public static let idBytes = 20
}

/// The virtio-blk feature bits (virtio 1.x §5.2.3) and transport bits a back end offers.
public enum VirtioBlkFeature {
    public static let sizeMax: UInt64 = 1 << 1
    public static let segMax: UInt64 = 1 << 2
    public static let readOnly: UInt64 = 1 << 5
    public static let blkSize: UInt64 = 1 << 6
    public static let flush: UInt64 = 1 << 9
    public static let topology: UInt64 = 1 << 10
    public static let configWCE: UInt64 = 1 << 11
    public static let multiQueue: UInt64 = 1 << 12
    public static let discard: UInt64 = 1 << 13
    public static let writeZeroes: UInt64 = 1 << 14
    public static let indirectDesc: UInt64 = 1 << 28
    public static let eventIdx: UInt64 = 1 << 29
    public static let version1: UInt64 = 1 << 32
}
