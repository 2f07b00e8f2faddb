// The virtio-blk device a vhost-user-blk export shows the guest: its feature offer and its
// config space (struct virtio_blk_config, little-endian), as qemu-storage-daemon 7.2 fills it.

import Devices

/// What an export tells the front end about its disk.
struct BlkDeviceDescription {
    var capacityBytes: UInt64
    var logicalBlockSize: UInt32
    var numQueues: Int
    var readOnly: Bool
    /// Write cache enabled (`wce`); the guest flips it with SET_CONFIG.
    var writeCache: Bool

    /// Virtio features offered: what QEMU 7.2's vhost-user-blk keeps and a Linux guest
    /// uses, minus what this back end does not implement (indirect descriptors, event index,
    /// size_max). Discard and write zeroes only when writable.
    var features: UInt64 {
        var f = VirtioBlkFeature.segMax | VirtioBlkFeature.blkSize | VirtioBlkFeature.flush
            | VirtioBlkFeature.topology | VirtioBlkFeature.configWCE | VirtioBlkFeature.multiQueue
            | VirtioBlkFeature.version1 | VhostUser.protocolFeaturesBit
        if readOnly { f |= VirtioBlkFeature.readOnly } else { f |= VirtioBlkFeature.discard | VirtioBlkFeature.writeZeroes }
        return f
    }

    /// The longest config space a front end may read (QEMU 7.2 reads 57 bytes).
    static let configSpaceLimit = 256
    /// seg_max: QEMU's default queue size (128) minus header and status, as qsd reports.
    static let segMax: UInt32 = 126

    /// The config space bytes [offset, offset+count), zero past our fields.
    func config(offset: Int, count: Int) -> [UInt8] {
        var c = [UInt8](repeating: 0, count: BlkDeviceDescription.configSpaceLimit)
        func put<T: FixedWidthInteger>(_ value: T, at o: Int) {
            withUnsafeBytes(of: value.littleEndian) { for (i, b) in $0.enumerated() { c[o + i] = b } }
        }
        put(capacityBytes / 512, at: 0)  // capacity in 512-byte sectors
        put(UInt32(0), at: 8)  // size_max (not offered)
        put(BlkDeviceDescription.segMax, at: 12)
        put(logicalBlockSize, at: 20)  // blk_size
        put(UInt8(0), at: 24)  // physical_block_exp
        put(UInt8(0), at: 25)  // alignment_offset
        put(UInt16(1), at: 26)  // min_io_size
        put(UInt32(1), at: 28)  // opt_io_size
        put(UInt8(writeCache ? 1 : 0), at: 32)  // wce
        put(UInt16(numQueues), at: 34)  // num_queues
        put(UInt32(VirtioBlk.maxDiscardSectors), at: 36)  // max_discard_sectors
        put(UInt32(1), at: 40)  // max_discard_seg
        put(logicalBlockSize / 512, at: 44)  // discard_sector_alignment
        put(UInt32(VirtioBlk.maxDiscardSectors), at: 48)  // max_write_zeroes_sectors
        put(UInt32(1), at: 52)  // max_write_zeroes_seg
        put(UInt8(0), at: 56)  // write_zeroes_may_unmap
        return Array(c[offset..<offset + count])
    }
}
