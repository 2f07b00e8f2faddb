// libFuzzer target over the monitor's command dispatch (Sources/QMP and what it drives: real
// IOThreads and devices). Each input is what three clients send after the greeting and
// negotiation, interleaved: the input's messages (as the stream splits them) are dealt to the
// clients by a generator seeded from the input's first byte, and fed one at a time, running
// the monitor's loop between messages, so one client's commands arrive while another's
// device_add or device_del is pending. Built by `make fuzz` against the package's QMP,
// Devices, IOThreads, Aio and Uring modules.
//
// Properties checked on every input:
// - nothing crashes, traps or hangs (a reply or event missing for 10 s fails the input);
// - every message a client's stream yields (a value or a parse error) gets exactly one reply
//   on that client, in order: {"return": …} or {"error": {"class": …, "desc": …}} with one of
//   QEMU's classes, with the request's id when it is an object that has one and no id
//   otherwise;
// - every device_del that returned is followed by exactly one DEVICE_DELETED event on each
//   client;
// - every client stays usable: a query-iothreads sent after the input (after a reset
//   character, the documented resynchronisation) is answered with a list;
// - a `quit` that returned shuts the monitor down: every message fed before it was answered,
//   none fed after it is, and the unplugs accepted before it still end with their events;
// - the shutdown `quit` and `dataplane serve` use leaves no IOThread in the registry, no
//   thread named "IO …" and no new descriptor.
// Resources are bounded per input: the input is cut before its (maxCreations+1)th object-add
// or device_add, so an input creates at most that many threads and devices.
import Aio
import Glibc
import IOThreads
import QMP

/// object-add and device_add requests one input may make.
let maxCreations = 16
/// Clients per input.
let clientCount = 3
/// How long a reply or an event may take (device_add and device_del hop through tasks).
let patienceNs: Int64 = 10_000_000_000

/// QEMU's error classes (qapi/error.json ErrorClass).
let errorClasses: Set<String> = ["GenericError", "CommandNotFound", "DeviceNotActive", "DeviceNotFound", "KVMMissingCap"]

/// The main loop: one context, created on first use by libFuzzer's thread (so that is its
/// home thread, the only one that polls it) and used by every input.
let mainContext = try! AioContext()
/// Set by the watchdog timer; read and cleared on the fuzzer's thread.
nonisolated(unsafe) var watchdogFired = false
let watchdog = mainContext.makeTimer { watchdogFired = true }

/// `precondition`, with its message printed in an optimised build too.
func require(_ condition: Bool, _ message: @autoclosure () -> String) {
    if !condition { fatalError(message()) }
}

func failure(_ message: String) -> Never { fatalError(message) }

/// What the client received, split into replies and events.
final class Client {
    var replies: [JSON] = []
    var events: [String] = []

    func received(_ line: String) {
        require(line.hasSuffix("\r\n"), "a line without CRLF: \(line)")
        var stream = JSONStream()
        let parsed = stream.feed(Array(line.utf8))
        guard parsed.count == 1, case .value(let v) = parsed[0], case .object(let members) = v else {
            failure("the monitor sent something that is not one JSON object: \(line)")
        }
        require(line.utf8.allSatisfy { $0 < 0x80 }, "non-ASCII output: \(line)")
        if let event = v["event"] {
            require(members.first?.0 == "event" && event.stringValue != nil, "malformed event: \(line)")
            events.append(event.stringValue!)
        } else {
            replies.append(v)
        }
    }
}

/// Before the first descriptor baseline: the concurrency runtime's own descriptors (libdispatch
/// opens an epoll and an eventfd when the first task runs) are there for good.
let warmedUp: Bool = {
    nonisolated(unsafe) var back = false
    let ctx = mainContext
    Task { ctx.scheduleOneShot { back = true } }
    require(pump { back }, "a task did not run in 10 s")
    return true
}()

/// Runs the loop until `done()` or the watchdog; false on timeout.
func pump(until done: () -> Bool) -> Bool {
    while mainContext.poll(blocking: false) {}
    if done() { return true }
    watchdogFired = false
    watchdog.arm(after: patienceNs)
    defer { watchdog.cancel() }
    while !done() {
        if watchdogFired { return false }
        _ = mainContext.poll(blocking: true)
    }
    return true
}

/// Threads of this process whose name starts with "IO " (IOThreads).
func ioThreadCount() -> Int {
    guard let dir = opendir("/proc/self/task") else { return -1 }
    defer { closedir(dir) }
    var n = 0
    while let entry = readdir(dir) {
        let tid = withUnsafeBytes(of: entry.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
        guard tid.first?.isNumber == true else { continue }
        let fd = open("/proc/self/task/\(tid)/comm", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { continue }  // the thread is gone
        var buf = [UInt8](repeating: 0, count: 32)
        let r = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        close(fd)
        if r >= 3 && buf[0] == UInt8(ascii: "I") && buf[1] == UInt8(ascii: "O") && buf[2] == UInt8(ascii: " ") { n += 1 }
    }
    return n
}

/// Open descriptors of this process, with what they are, less timerfds: Dataplane opens none,
/// and dispatch opens one per clock lazily, at some first timer (as Soak.swift notes).
func descriptors() -> [String] {
    guard let dir = opendir("/proc/self/fd") else { return [] }
    defer { closedir(dir) }
    var found: [String] = []
    while let entry = readdir(dir) {
        let fd = withUnsafeBytes(of: entry.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
        guard fd.first?.isNumber == true, Int32(fd) != dirfd(dir) else { continue }
        var target = [CChar](repeating: 0, count: 256)
        let n = readlink("/proc/self/fd/\(fd)", &target, target.count)
        let what = String(decoding: target.prefix(max(0, n)).map { UInt8(bitPattern: $0) }, as: UTF8.self)
        if what != "anon_inode:[timerfd]" { found.append("\(fd) -> " + what) }
    }
    return found
}

/// The command a request names, when it is an object with a string `execute`.
func commandName(_ request: JSONStream.Output) -> String? {
    if case .value(let v) = request { return v["execute"]?.stringValue }
    return nil
}

/// Checks the reply to one request: its envelope, class and id.
func check(_ reply: JSON, answers request: JSONStream.Output) {
    guard case .object(let members) = reply else { failure("reply is not an object: \(reply.serialized)") }
    let keys = members.map(\.0)
    require(keys == ["return"] || keys == ["error"] || keys == ["return", "id"] || keys == ["error", "id"],
            "reply members \(keys): \(reply.serialized)")
    if let error = reply["error"] {
        guard case .object(let e) = error, e.map(\.0) == ["class", "desc"],
              let cls = error["class"]?.stringValue, let desc = error["desc"]?.stringValue else {
            failure("malformed error: \(reply.serialized)")
        }
        require(errorClasses.contains(cls), "error class \(cls) is not QEMU's: \(reply.serialized)")
        require(!desc.isEmpty, "error without a description: \(reply.serialized)")
    }
    var wanted: JSON? = nil
    if case .value(let v) = request { wanted = v["id"] }
    require(reply["id"] == wanted, "reply id \(reply["id"]?.serialized ?? "none") for request id \(wanted?.serialized ?? "none")")
    if case .error = request { require(reply["error"] != nil, "a parse error answered with a return") }
}

/// SplitMix64, seeded by the input: which client sends each message.
struct Dealer {
    var state: UInt64
    mutating func next() -> Int {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return Int((z ^ (z >> 31)) % UInt64(clientCount))
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    var bytes = Array(UnsafeBufferPointer(start: data, count: size))
    _ = warmedUp
    let descriptorsBefore = descriptors()

    let monitor = Monitor(context: mainContext)
    let clients = (0..<clientCount).map { _ in Client() }
    let sessions = clients.map { client in MonitorSession { client.received($0) } }
    for (client, session) in zip(clients, sessions) {
        monitor.open(session)
        require(client.replies.count == 1 && client.replies[0]["QMP"] != nil, "no greeting")
        client.replies = []
        monitor.receive(Array(#"{"execute":"qmp_capabilities"}"#.utf8), from: session)
        require(pump { client.replies.count == 1 } && client.replies[0] == .object([("return", .object([]))]),
                "negotiation failed: \(client.replies.map(\.serialized))")
        client.replies = []
    }

    var quitDone = false
    monitor.onQuit = { quitDone = true }

    // The input, one message at a time, each to the client the dealer picks. A mirror stream
    // per client finds the boundaries and the requests to expect (a client's stream sees only
    // what that client sent); `fed` keeps them in the order they reached the monitor.
    var dealer = Dealer(state: UInt64(bytes.first ?? 0))
    var mirrors = [JSONStream](repeating: JSONStream(), count: clientCount)
    var splitter = JSONStream()
    var fed: [(client: Int, request: JSONStream.Output)] = []
    var creations = 0
    var start = 0
    var i = 0
    var last = 0  // the client that got the last piece (a truncated tail goes to it)
    while i < bytes.count {
        let outputs = splitter.feed(CollectionOfOne(bytes[i]))
        i += 1
        guard !outputs.isEmpty else { continue }
        let creating = outputs.filter { ["object-add", "device_add"].contains(commandName($0)) }.count
        if creations + creating > maxCreations {
            bytes.removeSubrange(start...)
            break
        }
        creations += creating
        let k = dealer.next()
        last = k
        let piece = bytes[start..<i]
        fed += mirrors[k].feed(piece).map { (k, $0) }
        monitor.receive(piece, from: sessions[k])
        start = i
        while mainContext.poll(blocking: false) {}
    }
    if start < bytes.count {  // a truncated tail
        fed += mirrors[last].feed(bytes[start...]).map { (last, $0) }
        monitor.receive(bytes[start...], from: sessions[last])
    }

    // Still usable: a reset character, then a command, on every client.
    let probe = Array("\u{1b}{\"execute\":\"query-iothreads\",\"id\":\"final\"}".utf8)
    for k in 0..<clientCount {
        let got = mirrors[k].feed(probe)
        require(got.last == .value(.object([("execute", .string("query-iothreads")), ("id", .string("final"))])),
                "client \(k): the final query-iothreads was not read as a request")
        fed += got.map { (k, $0) }
        monitor.receive(probe, from: sessions[k])
    }
    let expected = (0..<clientCount).map { k in fed.filter { $0.client == k }.count }
    let answered = { (0..<clientCount).allSatisfy { clients[$0].replies.count >= expected[$0] } }
    require(pump { answered() || quitDone },
            "\(zip(expected, clients).map { $0 - $1.replies.count }) requests unanswered after 10 s (per client)")

    // Walk the requests in the order the monitor took them: each is answered on its client,
    // in order, until a quit returns; nothing after that is.
    var cursor = [Int](repeating: 0, count: clientCount)
    var unplugs = 0
    var quitAt: Int? = nil
    for (n, (k, request)) in fed.enumerated() {
        let replies = clients[k].replies
        require(cursor[k] < replies.count, "client \(k): request \(n) of the input (\(request)) unanswered")
        let reply = replies[cursor[k]]
        cursor[k] += 1
        check(reply, answers: request)
        let name = commandName(request)
        // Every command query-commands lists is dispatched (qmp_capabilities is refused now).
        if let name, name != "qmp_capabilities", monitor.commandNames.contains(name) {
            require(reply["error"]?["class"] != .string("CommandNotFound"), "listed command \(name) not found: \(reply.serialized)")
        }
        if name == "device_del" && reply["return"] != nil { unplugs += 1 }
        if name == "quit" && reply["return"] != nil {
            quitAt = n
            break
        }
    }
    if quitAt != nil {
        require(quitDone, "a quit returned and the shutdown did not finish")
    }
    for k in 0..<clientCount {
        require(clients[k].replies.count == cursor[k],
                "client \(k): \(clients[k].replies.count) replies, \(cursor[k]) expected (quit at \(quitAt.map(String.init) ?? "none"))")
        if quitAt == nil {
            guard case .array = clients[k].replies.last!["return"] else {
                failure("client \(k): final query-iothreads: \(clients[k].replies.last!.serialized)")
            }
        }
    }

    // Every accepted unplug ends with one DEVICE_DELETED, on every client.
    for (k, client) in clients.enumerated() {
        let deleted = { client.events.filter { $0 == "DEVICE_DELETED" }.count }
        require(pump { deleted() >= unplugs }, "client \(k): \(unplugs - deleted()) DEVICE_DELETED events missing after 10 s")
        require(deleted() == unplugs, "client \(k): \(deleted()) DEVICE_DELETED events for \(unplugs) unplugs")
    }

    // The shutdown `quit` runs (again, when a quit ran it: it is idempotent), then nothing may
    // be left.
    var shut = false
    monitor.shutdown { shut = true }
    require(pump { shut }, "the shutdown did not finish in 10 s")
    require(monitor.registry.all.isEmpty, "IOThreads left after the shutdown: \(monitor.registry.all.map(\.id))")
    for session in sessions { monitor.close(session) }
    require(ioThreadCount() == 0, "\(ioThreadCount()) IOThreads still running after teardown")
    // A device's descriptors close when the last reference goes, which may be a task's
    // closure released on another thread just after it finished: allow it a moment.
    var waited = 0
    var descriptorsAfter = descriptors()
    while descriptorsAfter.count > descriptorsBefore.count && waited < 2000 {
        usleep(1000)
        waited += 1
        descriptorsAfter = descriptors()
    }
    require(descriptorsAfter.count <= descriptorsBefore.count,
            "descriptors left open: \(Set(descriptorsAfter).subtracting(descriptorsBefore).sorted())")
    return 0
}
