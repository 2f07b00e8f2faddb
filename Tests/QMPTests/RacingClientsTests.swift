// Two management clients racing each other (issue 14's crashes): each scenario feeds one
// client's command and, before the monitor's loop runs again, another client's command
// that touches the same IOThread or device. Each runs in a child process, so a crash is a
// failed test instead of a dead test runner; the child checks every answer itself and exits
// with a code that says which check failed.
import Aio
import Glibc
import IOThreads
import Testing

@testable import QMP

/// A monitor on a context owned by the test thread, with several sessions.
final class Clients {
    let ctx: AioContext
    let monitor: Monitor
    var lines: [[String]]
    var sessions: [MonitorSession] = []

    init(_ count: Int) throws {
        ctx = try AioContext()
        monitor = Monitor(context: ctx)
        lines = Array(repeating: [], count: count)
        for i in 0..<count {
            let s = MonitorSession { [unowned self] in lines[i].append($0) }
            sessions.append(s)
            monitor.open(s)
        }
        for i in 0..<count { feed(i, #"{"execute":"qmp_capabilities"}"#) }
        _ = pump { self.lines.allSatisfy { $0.count >= 2 } }
        for i in 0..<count { lines[i] = [] }
    }

    /// Hands `text` to client `i`'s session without running the loop.
    func feed(_ i: Int, _ text: String) {
        monitor.receive(Array(text.utf8), from: sessions[i])
    }

    /// Runs the monitor's loop until `done` holds (or 10 s pass); returns whether it did.
    func pump(_ done: () -> Bool) -> Bool {
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while monotonicNanoseconds() < deadline {
            while ctx.poll(blocking: false) {}
            if done() { return true }
            usleep(200)
        }
        return false
    }

    /// Client `i`'s lines that are answers (not events).
    func answers(_ i: Int) -> [String] { lines[i].filter { !$0.hasPrefix(#"{"event""#) } }
    func events(_ name: String) -> [String] { lines.flatMap { $0 }.filter { $0.hasPrefix(#"{"event": "\#(name)""#) } }
}

/// Exits the child with `code` unless `ok`, printing what was seen.
func check(_ ok: Bool, _ code: Int32, _ what: @autoclosure () -> String) {
    if !ok {
        print("check \(code) failed: \(what())")
        exit(code)
    }
}

@Suite("Racing management clients")
struct RacingClientsTests {
    @Test("object-del racing a device_add on that IOThread is refused, and nothing crashes")
    func objectDelRacingDeviceAdd() async {
        await #expect(processExitsWith: .success) {
            let c = try! Clients(2)
            // The window is a few microseconds wide: try it many times.
            for round in 0..<200 {
                c.lines = [[], []]
                c.feed(0, #"{"execute":"object-add","arguments":{"qom-type":"iothread","id":"iot\#(round)"}}"#)
                check(c.pump { c.answers(0).count == 1 }, 2, "object-add answered")
                c.feed(0, #"{"execute":"device_add","arguments":{"driver":"virtio-blk","id":"d\#(round)","iothread":"iot\#(round)"}}"#)
                c.feed(1, #"{"execute":"object-del","arguments":{"id":"iot\#(round)"}}"#)
                check(c.pump { c.answers(0).count == 2 && c.answers(1).count == 1 }, 3, "both answered: \(c.lines)")
                check(c.answers(0)[1].contains(#""return""#), 4, c.answers(0)[1])
                check(c.answers(1)[0].contains("object 'iot\(round)' is in use, can not be deleted"), 5, c.answers(1)[0])
                c.feed(0, #"{"execute":"device_del","arguments":{"id":"d\#(round)"}}"#)
                check(c.pump { c.events("DEVICE_DELETED").count == 2 }, 6, "DEVICE_DELETED on both: \(c.lines)")
                c.feed(1, #"{"execute":"object-del","arguments":{"id":"iot\#(round)"}}"#)
                check(c.pump { c.answers(1).count == 2 }, 7, "second object-del answered")
                check(c.answers(1)[1].contains(#""return""#), 8, c.answers(1)[1])
            }
            exit(0)
        }
    }

    @Test("device_del racing the device_add of the same device: one DEVICE_DELETED, nothing crashes")
    func deviceDelRacingDeviceAdd() async {
        await #expect(processExitsWith: .success) {
            let c = try! Clients(2)
            c.feed(0, #"{"execute":"object-add","arguments":{"qom-type":"iothread","id":"iot0"}}"#)
            check(c.pump { c.answers(0).count == 1 }, 2, "object-add answered")
            c.lines[0] = []
            c.feed(0, #"{"execute":"device_add","arguments":{"driver":"virtio-blk","id":"e1","iothread":"iot0"}}"#)
            c.feed(1, #"{"execute":"device_del","arguments":{"id":"e1"}}"#)
            check(c.pump { c.answers(0).count == 1 && c.answers(1).count == 1 && c.events("DEVICE_DELETED").count == 2 },
                  3, "answers and one DEVICE_DELETED per client: \(c.lines)")
            check(c.answers(0)[0].contains(#""return""#) && c.answers(1)[0].contains(#""return""#), 4, "\(c.lines)")
            // Nothing more comes: one unplug, one event per client. The monitor runs one command
            // at a time and a device_del's unplug ends before the next command starts, so once
            // the next command is answered every event of the unplug has been sent.
            c.feed(1, #"{"execute":"object-del","arguments":{"id":"iot0"}}"#)
            check(c.pump { c.answers(1).count == 2 }, 6, "object-del answered")
            check(c.events("DEVICE_DELETED").count == 2, 5, "\(c.lines)")
            check(c.answers(1)[1].contains(#""return""#), 7, c.answers(1)[1])
            exit(0)
        }
    }

    @Test("shutdown arriving during a device_add detaches the device and frees every IOThread")
    func shutdownDuringDeviceAdd() async {
        await #expect(processExitsWith: .success) {
            for round in 0..<200 {
                let c = try! Clients(1)
                c.feed(0, #"{"execute":"object-add","arguments":{"qom-type":"iothread","id":"iot\#(round)"}}"#)
                check(c.pump { c.answers(0).count == 1 }, 2, "object-add answered")
                c.feed(0, #"{"execute":"device_add","arguments":{"driver":"virtio-blk","id":"d0","iothread":"iot\#(round)"}}"#)
                var finished = false
                c.monitor.shutdown { finished = true }
                check(c.pump { finished }, 3, "shutdown finished")
                check(c.monitor.devices.isEmpty, 5, "no device left: \(c.monitor.devices.keys)")
                // Removes the IOThreads nothing holds: none may stay.
                c.monitor.registry.removeAll()
                check(c.monitor.registry.all.isEmpty, 4, "no IOThread left: \(c.monitor.registry.all.map { $0.holders })")
            }
            exit(0)
        }
    }
}
