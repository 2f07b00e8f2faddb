// The descriptor-chain walk of a DeviceQueue: guest memory is foreign and hostile. Each
// descriptor field is read once into a local and validated there; every buffer is translated
// region by region (a buffer crossing into an adjacent region is split, one crossing into no
// region fails); a chain may not loop, leave the table, put readable after writable buffers,
// or have more than 1024 pieces. Home thread of the queue, like the rest of it.
import Glibc
import Synchronization

extension DeviceQueue {
    /// Makes room for `count` iovecs in `head`'s array (grows only past its high-water mark).
    @inline(__always)
    func reserveIovecs(_ head: Int, _ count: Int) {
        guard count > iovCapacity[head] else { return }
        let capacity = min(max(count, iovCapacity[head] * 2), DeviceQueue.maxPieces)
        let p = UnsafeMutablePointer<iovec>.allocate(capacity: capacity)
        p.update(from: iovs[head], count: iovCapacity[head])
        iovs[head].deallocate()
        iovs[head] = p
        iovCapacity[head] = capacity
    }

    /// Walks the chain at `head` into the slot's iovecs (readable pieces, then writable
    /// ones), finds the header and the status byte, and fills the slot's request.
    func parse(head: Int) -> Parsed {
        let size = ring.layout.size
        var i = head
        var visited = 0
        var pieces = 0
        var readPieces = 0
        var readBytes = 0
        var writeBytes = 0
        var seenWritable = false
        var badBuffer = false
        var lastOK = false
        while true {
            guard visited < size else { return .malformed }  // longer than the table: a loop
            visited += 1
            let d = ring.descriptor(i)  // each field read once; only the copy is used
            // No VIRTIO_RING_F_INDIRECT_DESC is offered, so an indirect descriptor is an error.
            guard d.flags & SplitRingLayout.descIndirect == 0 else { return .malformed }
            let writable = d.flags & SplitRingLayout.descWrite != 0
            guard writable || !seenWritable else { return .malformed }  // readable after writable
            seenWritable = seenWritable || writable
            lastOK = false
            if d.len == 0 {
                badBuffer = true  // zero-sized buffers are not allowed
            } else {
                let before = pieces
                var addr = d.addr
                var remaining = UInt64(d.len)
                while remaining > 0 {
                    guard let (p, available) = memory.piece(at: addr) else { break }
                    guard pieces < DeviceQueue.maxPieces else { return .malformed }
                    let n = min(available, remaining)
                    reserveIovecs(head, pieces + 1)
                    iovs[head][pieces] = iovec(iov_base: p, iov_len: Int(n))
                    pieces += 1
                    addr &+= n
                    remaining -= n
                }
                if remaining == 0 {
                    lastOK = true
                    if writable { writeBytes += Int(d.len) } else { readBytes += Int(d.len); readPieces = pieces }
                } else {
                    pieces = before  // drop what was translated of this buffer
                    badBuffer = true
                }
            }
            if d.flags & SplitRingLayout.descNext == 0 { break }
            i = Int(d.next)
            guard i < size else { return .malformed }
        }
        // The status byte: the last byte of the last descriptor, which must be writable.
        guard seenWritable, lastOK, pieces > readPieces else { return .malformed }
        let last = iovs[head][pieces - 1]
        slots[head].status = (last.iov_base! + (last.iov_len - 1)).assumingMemoryBound(to: UInt8.self)
        guard !badBuffer, readBytes >= VirtioBlk.headerSize else { return .ioError }
        // The header: the first 16 readable bytes, wherever the guest split them.
        var header = (UInt64(0), UInt64(0))
        withUnsafeMutableBytes(of: &header) { h in
            var copied = 0
            var k = 0
            while copied < VirtioBlk.headerSize {
                let v = iovs[head][k]
                k += 1
                let take = min(v.iov_len, VirtioBlk.headerSize - copied)
                h.baseAddress!.advanced(by: copied).copyMemory(from: v.iov_base!, byteCount: take)
                copied += take
            }
        }
        let type = UInt32(truncatingIfNeeded: UInt64(littleEndian: header.0)) & ~VirtioBlk.typeBarrier
        slots[head].type = type
        slots[head].sector = UInt64(littleEndian: header.1)
        if type == VirtioBlk.typeOut || type == VirtioBlk.typeDiscard || type == VirtioBlk.typeWriteZeroes {
            // Data: the readable bytes after the header.
            var skip = VirtioBlk.headerSize
            var k = 0
            while skip > 0 {
                let v = iovs[head][k]
                if v.iov_len <= skip {
                    skip -= v.iov_len
                    k += 1
                } else {
                    iovs[head][k] = iovec(iov_base: v.iov_base! + skip, iov_len: v.iov_len - skip)
                    skip = 0
                }
            }
            slots[head].dataStart = k
            slots[head].dataCount = readPieces - k
            slots[head].dataLen = readBytes - VirtioBlk.headerSize
        } else {
            // Data: the writable bytes before the status byte.
            var count = pieces - readPieces
            if last.iov_len == 1 {
                count -= 1
            } else {
                iovs[head][pieces - 1].iov_len -= 1
            }
            slots[head].dataStart = readPieces
            slots[head].dataCount = count
            slots[head].dataLen = writeBytes - 1
        }
        return .ok
    }
}
