// virtio-blk on a DeviceQueue: what a parsed request means (read, write, flush, discard,
// write zeroes, get id), how it reaches the backend (at once for null, an SQE on the context's
// ring for nop and files, a timer for delay), and what its completion writes back. Home thread
// of the queue, like the rest of it.
import Aio
import Glibc
import Synchronization

extension DeviceQueue {
    /// Parses the chain at `head` and submits it, or completes it at once.
    func start(head: Int) {
        inFlight += 1
        statistics._inFlight.store(inFlight, ordering: .relaxed)
        slots[head].busy = true
        switch parse(head: head) {
        case .malformed:
            statistics._malformed.add(1, ordering: .relaxed)
            complete(head: head, status: nil, written: 0)
            return
        case .ioError:
            statistics._malformed.add(1, ordering: .relaxed)
            complete(head: head, status: VirtioBlk.statusIOErr, written: 0)
            return
        case .ok:
            break
        }
        let req = slots[head]
        let fd = backend.fileDescriptor
        switch req.type {
        case VirtioBlk.typeIn, VirtioBlk.typeOut:
            let isWrite = req.type == VirtioBlk.typeOut
            guard !(isWrite && backend.readOnly), inRange(sector: req.sector, bytes: req.dataLen) else {
                complete(head: head, status: VirtioBlk.statusIOErr, written: 0)
                return
            }
            switch backend.backend {
            case .null:
                complete(head: head, status: VirtioBlk.statusOK, written: isWrite ? 0 : UInt32(req.dataLen))
            case .nop:
                context!.submit(.nop, to: completionTarget!, tag: UInt32(head))
            case .delay(let ns):
                timers[head].arm(after: ns)
            case .file:
                guard req.dataCount > 0 else {
                    complete(head: head, status: VirtioBlk.statusOK, written: 0)
                    return
                }
                let iov = UnsafePointer(iovs[head] + req.dataStart)
                let offset = req.sector &* VirtioBlk.sectorSize
                if isWrite {
                    context!.submit(.writev(fd: fd, iovecs: iov, count: req.dataCount, offset: offset),
                                    to: completionTarget!, tag: UInt32(head))
                } else {
                    context!.submit(.readv(fd: fd, iovecs: iov, count: req.dataCount, offset: offset),
                                    to: completionTarget!, tag: UInt32(head))
                }
            }
        case VirtioBlk.typeFlush:
            if case .file = backend.backend {
                context!.submit(.fsync(fd: fd, dataOnly: true), to: completionTarget!, tag: UInt32(head))
            } else {
                complete(head: head, status: VirtioBlk.statusOK, written: 0)
            }
        case VirtioBlk.typeDiscard, VirtioBlk.typeWriteZeroes:
            startDiscardOrWriteZeroes(head: head)
        case VirtioBlk.typeGetID:
            // The serial, NUL-padded, never more than 20 bytes or than the buffer.
            let n = min(req.dataLen, VirtioBlk.idBytes)
            var copied = 0
            var k = 0
            while copied < n {
                let v = iovs[head][req.dataStart + k]
                k += 1
                let take = min(v.iov_len, n - copied)
                let dst = v.iov_base!.assumingMemoryBound(to: UInt8.self)
                for j in 0..<take { dst[j] = copied + j < serial.count ? serial[copied + j] : 0 }
                copied += take
            }
            complete(head: head, status: VirtioBlk.statusOK, written: UInt32(n))
        default:
            complete(head: head, status: VirtioBlk.statusUnsupported, written: 0)
        }
    }

    /// Discard and write zeroes (virtio 1.x 5.2.6.2), as qemu-storage-daemon 7.2 checks them:
    /// one 16-byte segment (more is UNSUPP), known flags only, no UNMAP on a discard, at most
    /// 32768 sectors, inside the disk, and a writable disk. A file gets an fallocate: a hole
    /// for discard (and for write zeroes that allows unmapping), a zeroed range otherwise.
    func startDiscardOrWriteZeroes(head: Int) {
        let req = slots[head]
        let discard = req.type == VirtioBlk.typeDiscard
        guard !backend.readOnly else { return complete(head: head, status: VirtioBlk.statusIOErr, written: 0) }
        guard req.dataLen <= 16 else { return complete(head: head, status: VirtioBlk.statusUnsupported, written: 0) }
        guard req.dataLen == 16 else { return complete(head: head, status: VirtioBlk.statusIOErr, written: 0) }
        var segment = (UInt64(0), UInt64(0))
        withUnsafeMutableBytes(of: &segment) { out in
            var copied = 0
            var k = req.dataStart
            while copied < 16 {
                let v = iovs[head][k]
                k += 1
                let take = min(v.iov_len, 16 - copied)
                out.baseAddress!.advanced(by: copied).copyMemory(from: v.iov_base!, byteCount: take)
                copied += take
            }
        }
        let sector = UInt64(littleEndian: segment.0)
        let count = UInt64(UInt32(truncatingIfNeeded: UInt64(littleEndian: segment.1)))
        let flags = UInt32(truncatingIfNeeded: UInt64(littleEndian: segment.1) >> 32)
        let unmap = flags & VirtioBlk.writeZeroesFlagUnmap != 0
        guard flags & ~VirtioBlk.writeZeroesFlagUnmap == 0, !(discard && unmap) else {
            return complete(head: head, status: VirtioBlk.statusUnsupported, written: 0)
        }
        guard count <= VirtioBlk.maxDiscardSectors, inRange(sector: sector, bytes: Int(count) * Int(VirtioBlk.sectorSize)) else {
            return complete(head: head, status: VirtioBlk.statusIOErr, written: 0)
        }
        guard case .file = backend.backend, count > 0 else {
            return complete(head: head, status: VirtioBlk.statusOK, written: 0)
        }
        let mode = discard || unmap ? VirtioBlk.fallocPunchHole | VirtioBlk.fallocKeepSize : VirtioBlk.fallocZeroRange | VirtioBlk.fallocKeepSize
        slots[head].sector = sector
        slots[head].extentSectors = count
        slots[head].fallocateMode = mode
        context!.submit(.fallocate(fd: backend.fileDescriptor, mode: mode, offset: sector &* VirtioBlk.sectorSize,
                                   length: count &* VirtioBlk.sectorSize), to: completionTarget!, tag: UInt32(head))
    }

    /// A whole number of 512-byte sectors inside the backend (overflow-safe).
    func inRange(sector: UInt64, bytes: Int) -> Bool {
        guard UInt64(bytes) % VirtioBlk.sectorSize == 0 else { return false }
        guard let size = backend.sizeBytes else { return true }
        let sectors = size / VirtioBlk.sectorSize
        return sector <= sectors && UInt64(bytes) / VirtioBlk.sectorSize <= sectors - sector
    }

    func backendCompleted(head: Int, result: Int32) {
        guard finishRequest(head: head, result: result) else { return }
        // Completions of one iteration share one interrupt (the BH runs after them).
        if pendingInterrupt { irqBH?.schedule() }
        // Last: a detach waiting for this completion hands the queue to its next owner, and
        // from then on this thread must not touch it.
        if !accepting && inFlight == 0 && drained != nil { finishDetach() }
    }

    /// Completes the request at `head` from its backend result, or resubmits it (a fallback or
    /// the fdatasync of a write-through write); returns whether it completed.
    func finishRequest(head: Int, result: Int32) -> Bool {
        let req = slots[head]
        let isFile: Bool
        if case .file = backend.backend { isFile = true } else { isFile = false }
        if req.type == VirtioBlk.typeDiscard || req.type == VirtioBlk.typeWriteZeroes {
            if result == -EOPNOTSUPP && req.type == VirtioBlk.typeWriteZeroes && !req.punching {
                // No zeroed ranges on this file system: a hole reads back as zeros too.
                slots[head].punching = true
                context!.submit(.fallocate(fd: backend.fileDescriptor, mode: VirtioBlk.fallocPunchHole | VirtioBlk.fallocKeepSize,
                                           offset: req.sector &* VirtioBlk.sectorSize,
                                           length: req.extentSectors &* VirtioBlk.sectorSize), to: completionTarget!, tag: UInt32(head))
                return false
            }
            slots[head].punching = false
            // A discard is a hint: a file system without holes has done nothing wrong.
            let ok = result >= 0 || (req.type == VirtioBlk.typeDiscard && result == -EOPNOTSUPP)
            complete(head: head, status: ok ? VirtioBlk.statusOK : VirtioBlk.statusIOErr, written: 0)
        } else if req.syncing {
            slots[head].syncing = false
            complete(head: head, status: result < 0 ? VirtioBlk.statusIOErr : VirtioBlk.statusOK, written: 0)
        } else if result < 0 || (isFile && req.type != VirtioBlk.typeFlush && Int(result) != req.dataLen) {
            // An error, or a short transfer (the file shrank under us).
            complete(head: head, status: VirtioBlk.statusIOErr, written: 0)
        } else if isFile && req.type == VirtioBlk.typeOut && writeThrough {
            slots[head].syncing = true
            context!.submit(.fsync(fd: backend.fileDescriptor, dataOnly: true), to: completionTarget!, tag: UInt32(head))
            return false
        } else {
            complete(head: head, status: VirtioBlk.statusOK, written: req.type == VirtioBlk.typeIn ? UInt32(req.dataLen) : 0)
        }
        return true
    }
}
