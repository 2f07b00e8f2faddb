import Aio
import IOThreads
import Testing

@testable import QMP

/// A monitor on a context owned by the test thread, and one session recording replies.
final class Harness {
    let ctx: AioContext
    let monitor: Monitor
    var lines: [String] = []
    var session: MonitorSession!

    init() throws {
        ctx = try AioContext()
        monitor = Monitor(context: ctx)
        session = MonitorSession { [unowned self] in lines.append($0) }
        monitor.open(session)
    }

    func send(_ text: String) -> [String] {
        lines = []
        monitor.receive(Array(text.utf8), from: session)
        while ctx.poll(blocking: false) {}
        return lines
    }
}

@Suite("QMP monitor protocol")
struct MonitorTests {
    @Test("the greeting has the VersionInfo shape qmp-shell needs, and lines end in CRLF")
    func greeting() throws {
        let fresh = try Harness()
        #expect(fresh.lines.count == 1)
        #expect(fresh.lines[0].hasSuffix("}\r\n"))
        #expect(fresh.lines[0].contains(#""qemu": {"micro": 0, "minor": 2, "major": 10}"#))
        #expect(fresh.lines[0].contains(#""capabilities": []"#))
    }

    @Test("only qmp_capabilities before negotiation, and not after")
    func negotiation() throws {
        let h = try Harness()
        #expect(h.send(#"{"execute":"query-version","id":1}"#)
                == [#"{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 1}"# + "\r\n"])
        #expect(h.send(#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#)
                == [#"{"error": {"class": "GenericError", "desc": "Capability oob not available"}}"# + "\r\n"])
        #expect(h.send(#"{"execute":"qmp_capabilities"}"#) == [#"{"return": {}}"# + "\r\n"])
        #expect(h.send(#"{"execute":"qmp_capabilities","id":"x"}"#)
                == [#"{"error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}, "id": "x"}"# + "\r\n"])
    }

    @Test("envelope and argument errors use QEMU's texts and keep the id")
    func envelope() throws {
        let h = try Harness()
        _ = h.send(#"{"execute":"qmp_capabilities"}"#)
        func desc(_ s: String) -> String { h.send(s).first ?? "" }
        #expect(desc("[1]").contains("QMP input must be a JSON object"))
        #expect(desc(#"{"execute":1}"#).contains("QMP input member 'execute' must be a string"))
        #expect(desc(#"{"execute":"quit","arguments":[]}"#).contains("QMP input member 'arguments' must be an object"))
        #expect(desc(#"{"execute":"quit","bogus":1}"#).contains("QMP input member 'bogus' is unexpected"))
        #expect(desc(#"{"arguments":{}}"#).contains("QMP input lacks member 'execute'"))
        #expect(desc(#"{"execute":"nope","id":[1]}"#) == #"{"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": [1]}"# + "\r\n")
        #expect(desc(#"{"execute":"object-del","arguments":{}}"#).contains("Parameter 'id' is missing"))
        #expect(desc(#"{"execute":"object-del","arguments":{"id":5}}"#).contains("Invalid parameter type for 'id', expected: string"))
        #expect(desc(#"{"execute":"object-del","arguments":{"id":"zz"}}"#).contains("object 'zz' not found"))
        #expect(desc(#"{"execute":"query-version","id":{"a":["b"]}}"#).hasSuffix(#""id": {"a": ["b"]}}"# + "\r\n"))
    }

    @Test("device_add refuses a huge num-queues before building a mapping that size (found by fuzzing)")
    func hugeQueueCount() throws {
        let h = try Harness()
        _ = h.send(#"{"execute":"qmp_capabilities"}"#)
        try h.monitor.registry.create(id: "iot0")
        defer { h.monitor.registry.removeAll() }
        // It used to allocate an array of 2^31 IOThreads (16 GiB) first.
        for placement in [#""iothread":"iot0""#, #""iothread-vq-mapping":[{"iothread":"iot0"}]"#] {
            let reply = h.send(#"{"execute":"device_add","arguments":{"driver":"virtio-blk","id":"d0","num-queues":2147483648,"#
                               + placement + "}}")
            #expect(reply == [#"{"error": {"class": "GenericError", "desc": "num-queues must be in [1, 64]"}}"# + "\r\n"])
        }
        #expect(h.monitor.devices.isEmpty)
    }

    @Test("device_add refuses a delay backend longer than Int64.max ns instead of trapping (found by fuzzing)")
    func hugeDelay() throws {
        let h = try Harness()
        _ = h.send(#"{"execute":"qmp_capabilities"}"#)
        try h.monitor.registry.create(id: "iot0")
        defer { h.monitor.registry.removeAll() }
        // "9223372036854775807us" used to trap converting 9.2e21 ns to Int64.
        for duration in ["9223372036854775807us", "1e300s", "infs", "9223372036.854775808s"] {
            let reply = h.send(#"{"execute":"device_add","arguments":{"driver":"virtio-blk","id":"d0","iothread":"iot0","backend":"delay:"#
                               + duration + #""}}"#)
            #expect(reply == [#"{"error": {"class": "GenericError", "desc": "backend 'delay:' needs a duration such as 100us, 2ms or 1s"}}"# + "\r\n"],
                    "delay:\(duration)")
        }
        #expect(h.monitor.devices.isEmpty)
    }

    @Test("no event reaches a session before it negotiated")
    func eventsAfterNegotiation() throws {
        let h = try Harness()
        h.lines = []
        h.monitor.emit("TEST", nil)
        #expect(h.lines.isEmpty)
        _ = h.send(#"{"execute":"qmp_capabilities"}"#)
        h.lines = []
        h.monitor.emit("TEST", .object([("x", .int(1))]))
        #expect(h.lines.count == 1 && h.lines[0].hasPrefix(#"{"event": "TEST", "data": {"x": 1}, "timestamp": {"seconds": "#))
    }
}
