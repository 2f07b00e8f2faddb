import Aio
import Glibc
import IOThreads
import Testing

@testable import QMP

extension Harness {
    /// Polls the monitor's context until a line containing `text` arrives (or 10 s pass).
    func waitFor(_ text: String) -> Bool {
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while monotonicNanoseconds() < deadline {
            while ctx.poll(blocking: false) {}
            if lines.contains(where: { $0.contains(text) }) { return true }
            usleep(1000)
        }
        return false
    }
}

@Suite("QMP block exports (qemu-storage-daemon's commands)", .serialized)
struct BlockExportTests {
    @Test("blockdev-add, block-export-add, query-block-exports, block-export-del with 7.2's texts",
          .timeLimit(.minutes(1)))
    func lifecycle() throws {
        let h = try Harness()
        _ = h.send(#"{"execute":"qmp_capabilities"}"#)
        var template = Array("/tmp/dataplane-qmp-disk-XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)  // exit tests running meanwhile must not inherit it
        let file = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        defer { close(fd); unlink(file) }
        #expect(ftruncate(fd, 1 << 20) == 0)
        let sock = "/tmp/dp-qmp-exp-\(getpid()).sock"
        func ok(_ s: String) -> Bool { h.send(s) == [#"{"return": {}}"# + "\r\n"] }
        func desc(_ s: String) -> String {
            let line = h.send(s).first ?? ""
            let parts = line.split(separator: #""desc": ""#, maxSplits: 1)
            guard parts.count == 2 else { return line }
            return String(parts[1].prefix { $0 != "\"" })
        }
        #expect(ok(#"{"execute":"object-add","arguments":{"qom-type":"iothread","id":"iot0"}}"#))
        #expect(ok(#"{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"file0","filename":"\#(file)"}}"#))
        #expect(ok(#"{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"disk0","file":"file0"}}"#))
        #expect(ok(#"{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"null0","size":1073741824,"read-zeroes":true}}"#))
        #expect(ok(#"{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"ro0","filename":"\#(file)","read-only":true}}"#))
        #expect(desc(#"{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"disk0","file":"file0"}}"#)
                == "Duplicate nodes with node-name='disk0'")
        #expect(desc(#"{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"f9","filename":"/nonexistent/disk.img"}}"#)
                == "Could not open '/nonexistent/disk.img': No such file or directory")
        let add = #"{"execute":"block-export-add","arguments":{"type":"vhost-user-blk","id":"exp0","node-name":"disk0","writable":true,"iothread":"iot0","num-queues":2,"addr":{"type":"unix","path":"\#(sock)"}}}"#
        #expect(ok(add))
        #expect(access(sock, F_OK) == 0)
        #expect(desc(add) == "Block export id 'exp0' is already in use")
        func exportAdd(_ extra: String, id: String = "exp1", node: String = "null0",
                       addr: String = #"{"type":"unix","path":"/tmp/dp-qmp-unused.sock"}"#) -> String {
            desc(#"{"execute":"block-export-add","arguments":{"type":"vhost-user-blk","id":"\#(id)","node-name":"\#(node)","addr":\#(addr)\#(extra)}}"#)
        }
        #expect(exportAdd("", id: "bad id") == "Invalid block export id")
        #expect(exportAdd("", node: "nosuch") == "Cannot find device='' nor node-name='nosuch'")
        #expect(h.send(#"{"execute":"block-export-add","arguments":{"type":"vhost-user-blk","id":"exp1","node-name":"null0","iothread":"nosuch","addr":{"type":"unix","path":"/tmp/x.sock"}}}"#)
                .first?.contains(#""desc": "iothread \"nosuch\" not found""#) == true)
        #expect(exportAdd(#","num-queues":0"#) == "num-queues must be greater than 0")
        #expect(exportAdd(#","logical-block-size":1000"#) == "Property exp1.logical-block-size doesn't take value '1000', it's not a power of 2")
        #expect(exportAdd(#","logical-block-size":256"#) == "Property exp1.logical-block-size doesn't take value 256 (minimum: 512, maximum: 2097152)")
        #expect(exportAdd("", addr: #"{"type":"inet","host":"x","port":"1"}"#) == "Only socket address types 'unix' and 'fd' are supported")
        #expect(exportAdd("", addr: #"{"type":"unix","path":"/nonexistent-dir/x.sock"}"#)
                == "Failed to bind socket to /nonexistent-dir/x.sock: No such file or directory")
        #expect(exportAdd(#","writable":true"#, node: "ro0") == "Cannot export read-only node as writable")
        #expect(desc(#"{"execute":"block-export-add","arguments":{"type":"nosuch","id":"e","node-name":"null0"}}"#)
                == "Parameter 'type' does not accept value 'nosuch'")
        #expect(desc(#"{"execute":"block-export-add","arguments":{"type":"vhost-user-blk","id":"e","node-name":"null0"}}"#)
                == "Parameter 'addr' is missing")
        #expect(h.send(#"{"execute":"query-block-exports"}"#)
                == [#"{"return": [{"node-name": "disk0", "shutting-down": false, "type": "vhost-user-blk", "id": "exp0"}]}"# + "\r\n"])
        #expect(h.send(#"{"execute":"query-iothreads"}"#).first?.contains(#""holders": [{"type": "block-node", "node-name": "disk0"}]"#) == true)
        #expect(desc(#"{"execute":"object-del","arguments":{"id":"iot0"}}"#) == "object 'iot0' is in use, can not be deleted")
        #expect(desc(#"{"execute":"blockdev-del","arguments":{"node-name":"disk0"}}"#) == "Node disk0 is in use")
        #expect(desc(#"{"execute":"blockdev-del","arguments":{"node-name":"file0"}}"#) == "Node file0 is in use")
        #expect(desc(#"{"execute":"block-export-del","arguments":{"id":"exp1"}}"#) == "Export 'exp1' is not found")
        _ = h.send(#"{"execute":"block-export-del","arguments":{"id":"exp0","mode":"safe"}}"#)
        #expect(h.waitFor(#"{"return": {}}"#))
        // The event comes first, as qemu-storage-daemon 7.2 sends it.
        #expect(h.lines.count == 2 && h.lines[0].contains(#""event": "BLOCK_EXPORT_DELETED", "data": {"id": "exp0"}"#))
        #expect(h.send(#"{"execute":"query-block-exports"}"#) == [#"{"return": []}"# + "\r\n"])
        #expect(access(sock, F_OK) != 0, "the socket file is removed")
        #expect(h.send(#"{"execute":"query-iothreads"}"#).first?.contains(#""holders": []"#) == true)
        #expect(ok(#"{"execute":"blockdev-del","arguments":{"node-name":"disk0"}}"#))
        #expect(ok(#"{"execute":"blockdev-del","arguments":{"node-name":"file0"}}"#))
        #expect(desc(#"{"execute":"blockdev-del","arguments":{"node-name":"null9"}}"#) == "Failed to find node with node-name='null9'")
        #expect(ok(#"{"execute":"object-del","arguments":{"id":"iot0"}}"#))
    }

    @Test("block-export-add with an iothread list (QEMU 9.0+) holds every IOThread until block-export-del",
          .timeLimit(.minutes(1)))
    func iothreadList() throws {
        let h = try Harness()
        _ = h.send(#"{"execute":"qmp_capabilities"}"#)
        let sock = "/tmp/dp-qmp-exp3-\(getpid()).sock"
        func ok(_ s: String) -> Bool { h.send(s) == [#"{"return": {}}"# + "\r\n"] }
        func desc(_ s: String) -> String {
            let line = h.send(s).first ?? ""
            let parts = line.split(separator: #""desc": ""#, maxSplits: 1)
            guard parts.count == 2 else { return line }
            return String(parts[1].prefix { $0 != "\"" })
        }
        func add(_ iothread: String) -> String {
            #"{"execute":"block-export-add","arguments":{"type":"vhost-user-blk","id":"exp0","node-name":"null0","num-queues":2,"iothread":\#(iothread),"addr":{"type":"unix","path":"\#(sock)"}}}"#
        }
        #expect(ok(#"{"execute":"object-add","arguments":{"qom-type":"iothread","id":"iot0"}}"#))
        #expect(ok(#"{"execute":"object-add","arguments":{"qom-type":"iothread","id":"iot1"}}"#))
        #expect(ok(#"{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"null0"}}"#))
        #expect(h.send(add(#"["iot0","nosuch"]"#)).first?.contains(#""desc": "iothread \"nosuch\" not found""#) == true)
        #expect(desc(add("[]")) == "Parameter 'iothread' must not be an empty list")
        #expect(desc(add("[1]")) == "Invalid parameter type for 'iothread[]', expected: string")
        #expect(desc(add("7")) == "Invalid parameter type for 'iothread', expected: string or array")
        #expect(access(sock, F_OK) != 0, "a refused add leaves no socket behind")
        #expect(ok(add(#"["iot0","iot1"]"#)))
        func count(_ needle: String, in text: String) -> Int {
            var n = 0
            var rest = Substring(text)
            while let r = rest.firstRange(of: needle) {
                n += 1
                rest = rest[r.upperBound...]
            }
            return n
        }
        let iothreads = h.send(#"{"execute":"query-iothreads"}"#).first ?? ""
        #expect(count(#""holders": [{"type": "block-node", "node-name": "null0"}]"#, in: iothreads) == 2,
                "both IOThreads are held by the exported node: \(iothreads)")
        #expect(desc(#"{"execute":"object-del","arguments":{"id":"iot1"}}"#) == "object 'iot1' is in use, can not be deleted")
        _ = h.send(#"{"execute":"block-export-del","arguments":{"id":"exp0"}}"#)
        #expect(h.waitFor(#"{"return": {}}"#))
        let after = h.send(#"{"execute":"query-iothreads"}"#).first ?? ""
        #expect(count(#""holders": []"#, in: after) == 2, "neither holds it: \(after)")
        #expect(ok(#"{"execute":"object-del","arguments":{"id":"iot1"}}"#))
        #expect(ok(#"{"execute":"object-del","arguments":{"id":"iot0"}}"#))
    }

    @Test("an export without an IOThread gets a thread of its own; shutdown deletes every export",
          .timeLimit(.minutes(1)))
    func shutdownDeletesExports() throws {
        let h = try Harness()
        _ = h.send(#"{"execute":"qmp_capabilities"}"#)
        let sock = "/tmp/dp-qmp-exp2-\(getpid()).sock"
        #expect(h.send(#"{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"null0"}}"#).first?.contains("return") == true)
        #expect(h.send(#"{"execute":"block-export-add","arguments":{"type":"vhost-user-blk","id":"exp0","node-name":"null0","addr":{"type":"unix","path":"\#(sock)"}}}"#)
                == [#"{"return": {}}"# + "\r\n"])
        var finished = false
        h.monitor.shutdown { finished = true }
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while !finished && monotonicNanoseconds() < deadline {
            while h.ctx.poll(blocking: false) {}
            usleep(1000)
        }
        #expect(finished)
        #expect(access(sock, F_OK) != 0)
        #expect(h.monitor.exports.isEmpty)
    }
}
