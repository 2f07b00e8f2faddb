// The monitor's control plane: one command at a time across clients, the device and export
// lifecycles as the commands see them, live moves (qom-set of a device's iothread,
// x-blockdev-set-iothread), holders in the series' union shape, the command table as a
// library, flow control, and quit racing a command.
import Aio
import Devices
import Glibc
import IOThreads
import Testing

@testable import QMP

extension Clients {
    /// Feeds `text` to client `i` and runs the loop until that client has `n` more answers.
    func ask(_ i: Int, _ text: String, answers n: Int = 1) -> [String] {
        let before = answers(i).count
        feed(i, text)
        _ = pump { answers(i).count >= before + n }
        return Array(answers(i).dropFirst(before))
    }

    /// The description of the error in client `i`'s answer to `text`, or the whole answer.
    func desc(_ i: Int, _ text: String) -> String {
        let line = ask(i, text).first ?? ""
        let parts = line.split(separator: #""desc": ""#, maxSplits: 1)
        guard parts.count == 2 else { return line }
        return String(parts[1].prefix { $0 != "\"" })
    }

    func ok(_ i: Int, _ text: String) -> Bool { ask(i, text) == [#"{"return": {}}"# + "\r\n"] }

    /// The holders query-iothreads shows for `id`.
    func holders(_ id: String) -> JSON? {
        let line = ask(0, #"{"execute":"query-iothreads"}"#).first ?? ""
        var stream = JSONStream()
        guard case .value(let v)? = stream.feed(Array(line.utf8)).first, case .array(let list)? = v["return"] else { return nil }
        return list.first { $0["id"]?.stringValue == id }?["holders"]
    }
}

func qom(_ path: String) -> JSON { .object([("type", .string("qom-object")), ("qom-path", .string(path))]) }
func node(_ name: String) -> JSON { .object([("type", .string("block-node")), ("node-name", .string(name))]) }

@Suite("QMP control plane", .serialized)
struct ControlPlaneCommandTests {
    @Test("commands run one at a time across clients: a query sent during a device_add sees it done", .timeLimit(.minutes(1)))
    func oneAtATime() throws {
        let c = try Clients(2)
        #expect(c.ok(0, #"{"execute":"object-add","arguments":{"qom-type":"iothread","id":"iot0"}}"#))
        c.feed(0, #"{"execute":"device_add","arguments":{"driver":"virtio-blk","id":"d0","iothread":"iot0"},"id":"add"}"#)
        c.feed(1, #"{"execute":"query-iothreads","id":"q"}"#)
        #expect(c.answers(1).isEmpty, "the query waits for the device_add before it")
        #expect(c.pump { c.answers(0).count == 2 && c.answers(1).count == 1 })
        #expect(c.answers(1)[0].contains(#""holders": [{"type": "qom-object", "qom-path": "/machine/peripheral/d0"}]"#))
        c.feed(0, #"{"execute":"device_del","arguments":{"id":"d0"}}"#)
        #expect(c.pump { c.events("DEVICE_DELETED").count == 2 })
        #expect(c.ok(1, #"{"execute":"object-del","arguments":{"id":"iot0"}}"#))
    }

    @Test("an unplugging device: a second device_del, qom-set and object-del of its IOThread are refused until DEVICE_DELETED",
          .timeLimit(.minutes(1)))
    func unplugging() throws {
        let c = try Clients(2)
        #expect(c.ok(0, #"{"execute":"object-add","arguments":{"qom-type":"iothread","id":"iot0"}}"#))
        #expect(c.ok(0, #"{"execute":"object-add","arguments":{"qom-type":"iothread","id":"iot1"}}"#))
        #expect(c.ok(0, #"{"execute":"device_add","arguments":{"driver":"virtio-blk","id":"d0","iothread":"iot0","backend":"delay:50ms"}}"#))
        // A request in flight (50 ms in the delay backend) makes the drain last.
        let guest = try GuestQueue(device: c.monitor.devices["d0"]!.device, queue: 0)
        guest.submit(id: 1)
        #expect(c.pump { c.monitor.devices["d0"]!.device.statistics(queue: 0).inFlight == 1 })
        c.feed(0, #"{"execute":"device_del","arguments":{"id":"d0"}}"#)
        c.feed(1, #"{"execute":"device_del","arguments":{"id":"d0"}}"#)
        c.feed(1, #"{"execute":"qom-set","arguments":{"path":"/machine/peripheral/d0","property":"iothread","value":"iot1"}}"#)
        c.feed(1, #"{"execute":"object-del","arguments":{"id":"iot0"}}"#)
        #expect(c.pump { c.answers(0).count >= 1 && c.answers(1).count == 3 })
        #expect(c.answers(0).last == #"{"return": {}}"# + "\r\n")
        #expect(c.answers(1)[0].contains("Device d0 is already in the process of unplug"))
        #expect(c.answers(1)[1].contains("Device d0 is already in the process of unplug"))
        #expect(c.answers(1)[2].contains("object 'iot0' is in use, can not be deleted"))
        #expect(c.pump { c.events("DEVICE_DELETED").count == 2 })
        #expect(c.events("DEVICE_DELETED")[0].contains(#""data": {"device": "d0", "path": "/machine/peripheral/d0"}"#))
        #expect(c.desc(1, #"{"execute":"device_del","arguments":{"id":"d0"}}"#) == "Device 'd0' not found")
        #expect(c.ok(1, #"{"execute":"object-del","arguments":{"id":"iot0"}}"#))
        #expect(c.ok(1, #"{"execute":"object-del","arguments":{"id":"iot1"}}"#))
    }

    @Test("qom-set of a device's iothread moves its queues live; qom-get reads the link", .timeLimit(.minutes(1)))
    func moveDevice() throws {
        let c = try Clients(1)
        #expect(c.ok(0, #"{"execute":"object-add","arguments":{"qom-type":"iothread","id":"iot0"}}"#))
        #expect(c.ok(0, #"{"execute":"object-add","arguments":{"qom-type":"iothread","id":"iot1"}}"#))
        #expect(c.ok(0, #"{"execute":"device_add","arguments":{"driver":"virtio-blk-pci","id":"d0","iothread":"iot0","num-queues":2}}"#))
        let backend = "/machine/peripheral/d0/virtio-backend"
        #expect(c.holders("iot0") == .array([qom(backend)]), "a PCI proxy's holder is its virtio backend child")
        #expect(c.ask(0, #"{"execute":"qom-get","arguments":{"path":"d0","property":"iothread"}}"#) == [#"{"return": "/objects/iot0"}"# + "\r\n"])
        #expect(c.ok(0, #"{"execute":"qom-set","arguments":{"path":"/machine/peripheral/d0","property":"iothread","value":"iot1"}}"#))
        #expect(c.holders("iot0") == .array([]) && c.holders("iot1") == .array([qom(backend)]))
        #expect(c.ask(0, #"{"execute":"qom-get","arguments":{"path":"/machine/peripheral/d0/virtio-backend","property":"iothread"}}"#)
                == [#"{"return": "/objects/iot1"}"# + "\r\n"])
        #expect(c.desc(0, #"{"execute":"qom-set","arguments":{"path":"d0","property":"iothread","value":"nope"}}"#) == "Device 'nope' not found")
        #expect(c.desc(0, #"{"execute":"qom-set","arguments":{"path":"d0","property":"num-queues","value":4}}"#)
                == "Attempt to set property 'num-queues' on device 'd0' (type 'virtio-blk-pci') after it was realized")
        #expect(c.desc(0, #"{"execute":"qom-get","arguments":{"path":"d0","property":"bogus"}}"#) == "Property 'virtio-blk-pci.bogus' not found")
        #expect(c.desc(0, #"{"execute":"object-del","arguments":{"id":"iot1"}}"#) == "object 'iot1' is in use, can not be deleted")
        #expect(c.ok(0, #"{"execute":"object-del","arguments":{"id":"iot0"}}"#), "the old IOThread is free")
        // A name both an IOThread and a device answer to is ambiguous as a partial path.
        #expect(c.ok(0, #"{"execute":"object-add","arguments":{"qom-type":"iothread","id":"d0"}}"#))
        #expect(c.desc(0, #"{"execute":"qom-get","arguments":{"path":"d0","property":"type"}}"#) == "Path 'd0' is ambiguous")
        #expect(c.ok(0, #"{"execute":"object-del","arguments":{"id":"d0"}}"#))
        c.feed(0, #"{"execute":"device_del","arguments":{"id":"d0"}}"#)
        #expect(c.pump { c.events("DEVICE_DELETED").count == 1 })
        #expect(c.ok(0, #"{"execute":"object-del","arguments":{"id":"iot1"}}"#))
    }

    @Test("an iothread-vq-mapping entry that serves no queue is held too", .timeLimit(.minutes(1)))
    func mappingHoldsEveryEntry() throws {
        let c = try Clients(1)
        for id in ["iot0", "iot1", "iot2"] {
            #expect(c.ok(0, #"{"execute":"object-add","arguments":{"qom-type":"iothread","id":"\#(id)"}}"#))
        }
        #expect(c.ok(0, #"{"execute":"device_add","arguments":{"driver":"virtio-blk","id":"d0","num-queues":2,"iothread-vq-mapping":[{"iothread":"iot0"},{"iothread":"iot1"},{"iothread":"iot2"}]}}"#))
        for id in ["iot0", "iot1", "iot2"] { #expect(c.holders(id) == .array([qom("/machine/peripheral/d0")]), "\(id)") }
        #expect(c.desc(0, #"{"execute":"object-del","arguments":{"id":"iot2"}}"#) == "object 'iot2' is in use, can not be deleted")
        c.feed(0, #"{"execute":"device_del","arguments":{"id":"d0"}}"#)
        #expect(c.pump { c.events("DEVICE_DELETED").count == 1 })
        for id in ["iot0", "iot1", "iot2"] { #expect(c.ok(0, #"{"execute":"object-del","arguments":{"id":"\#(id)"}}"#)) }
    }

    @Test("x-blockdev-set-iothread places a node, moves its exports with force, and holds as the node", .timeLimit(.minutes(1)))
    func setNodeIOThread() throws {
        let c = try Clients(1)
        let sock = "/tmp/dp-qmp-setiot-\(getpid()).sock"
        defer { unlink(sock) }
        #expect(c.ok(0, #"{"execute":"object-add","arguments":{"qom-type":"iothread","id":"iot0"}}"#))
        #expect(c.ok(0, #"{"execute":"object-add","arguments":{"qom-type":"iothread","id":"iot1"}}"#))
        #expect(c.ok(0, #"{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"null0"}}"#))
        func set(_ args: String) -> String { c.desc(0, #"{"execute":"x-blockdev-set-iothread","arguments":{\#(args)}}"#) }
        #expect(set(#""node-name":"nope","iothread":"iot0""#) == "Failed to find node with node-name='nope'")
        #expect(set(#""node-name":"null0","iothread":"nope""#) == "Cannot find iothread nope")
        #expect(set(#""node-name":"null0","iothread":5"#) == "Invalid parameter type for 'iothread', expected: string or null")
        // An unexported node: placed, and held as itself.
        #expect(set(#""node-name":"null0","iothread":"iot0""#) == #"{"return": {}}"# + "\r\n")
        #expect(c.holders("iot0") == .array([node("null0")]))
        #expect(c.desc(0, #"{"execute":"object-del","arguments":{"id":"iot0"}}"#) == "object 'iot0' is in use, can not be deleted")
        // An export without an iothread runs where its node is.
        #expect(c.ok(0, #"{"execute":"block-export-add","arguments":{"type":"vhost-user-blk","id":"exp0","node-name":"null0","addr":{"type":"unix","path":"\#(sock)"}}}"#))
        #expect(c.holders("iot0") == .array([node("null0"), node("null0")]), "the export and the node each hold it")
        #expect(set(#""node-name":"null0","iothread":"iot1""#)
                == "Node null0 is associated with a BlockBackend and could be in use (use force=true to override this check)")
        #expect(c.holders("iot0") == .array([node("null0"), node("null0")]), "a refused move changes nothing")
        #expect(set(#""node-name":"null0","iothread":"iot1","force":true"#) == #"{"return": {}}"# + "\r\n")
        #expect(c.holders("iot0") == .array([]) && c.holders("iot1") == .array([node("null0"), node("null0")]))
        #expect(c.ok(0, #"{"execute":"object-del","arguments":{"id":"iot0"}}"#))
        #expect(access(sock, F_OK) == 0, "the export still listens")
        // To the main loop: the node lets go; the export runs on a thread of its own.
        #expect(set(#""node-name":"null0","iothread":null,"force":true"#) == #"{"return": {}}"# + "\r\n")
        #expect(c.holders("iot1") == .array([]))
        #expect(c.ok(0, #"{"execute":"object-del","arguments":{"id":"iot1"}}"#))
        _ = c.ask(0, #"{"execute":"block-export-del","arguments":{"id":"exp0"}}"#)
        #expect(c.ok(0, #"{"execute":"blockdev-del","arguments":{"node-name":"null0"}}"#))
        #expect(c.monitor.exports.isEmpty && c.monitor.nodes.isEmpty)
    }

    @Test("an embedder adds its own commands to the table; query-commands lists them")
    func customCommand() throws {
        let c = try Clients(1)
        c.monitor.register(QMPCommand("__com.example_echo", arguments: ["text": .string], required: ["text"], .sync { call in
            .string(call.arguments.string("text")!.uppercased())
        }))
        #expect(c.ask(0, #"{"execute":"__com.example_echo","arguments":{"text":"hi"}}"#) == [#"{"return": "HI"}"# + "\r\n"])
        #expect(c.desc(0, #"{"execute":"__com.example_echo","arguments":{}}"#) == "Parameter 'text' is missing")
        #expect(c.ask(0, #"{"execute":"query-commands"}"#).first?.contains(#"{"name": "__com.example_echo"}"#) == true)
    }

    @Test("a client with 8 messages waiting is told to stop sending, and to resume once they ran", .timeLimit(.minutes(1)))
    func backlog() throws {
        let c = try Clients(1)
        var signals: [Bool] = []
        c.sessions[0].onBacklog = { signals.append($0) }
        #expect(c.ok(0, #"{"execute":"object-add","arguments":{"qom-type":"iothread","id":"iot0"}}"#))
        c.feed(0, #"{"execute":"device_add","arguments":{"driver":"virtio-blk","id":"d0","iothread":"iot0"}}"#)
        for _ in 0..<Monitor.backlogLimit { c.feed(0, #"{"execute":"query-version"}"#) }
        #expect(signals == [true], "the device_add runs; eight wait")
        #expect(c.pump { c.answers(0).count == 2 + Monitor.backlogLimit })
        #expect(signals == [true, false])
        c.feed(0, #"{"execute":"device_del","arguments":{"id":"d0"}}"#)
        #expect(c.pump { c.events("DEVICE_DELETED").count == 1 })
        #expect(c.ok(0, #"{"execute":"object-del","arguments":{"id":"iot0"}}"#))
    }

    @Test("quit from one client during another's device_add: both answered, then everything is torn down", .timeLimit(.minutes(1)))
    func quitDuringDeviceAdd() throws {
        let c = try Clients(2)
        var quit = false
        c.monitor.onQuit = { quit = true }
        #expect(c.ok(0, #"{"execute":"object-add","arguments":{"qom-type":"iothread","id":"iot0"}}"#))
        c.lines = [[], []]
        c.feed(0, #"{"execute":"device_add","arguments":{"driver":"virtio-blk","id":"d0","iothread":"iot0"}}"#)
        c.feed(1, #"{"execute":"quit"}"#)
        c.feed(0, #"{"execute":"query-version"}"#)  // queued after quit: never runs
        #expect(c.pump { quit })
        #expect(c.answers(0) == [#"{"return": {}}"# + "\r\n"], "device_add answered, the query after quit dropped")
        #expect(c.answers(1) == [#"{"return": {}}"# + "\r\n"])
        #expect(c.monitor.devices.isEmpty && c.monitor.registry.all.isEmpty)
        #expect(c.monitor.isShuttingDown)
    }
}
