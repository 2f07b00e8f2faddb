// A QMP-aware mutator for the dispatch target (libFuzzer's LLVMFuzzerCustomMutator). Byte
// mutations alone mostly break the JSON, and rarely turn `"num-queues":4` into a number that
// matters; so half the time the input is read as messages and one is changed as a client
// could change it: a value replaced by one of the wrong type or size, a key added, removed or
// duplicated, a command added from the monitor's own list with made-up arguments, a message
// repeated or dropped. The other half is libFuzzer's own byte mutations (framing, truncation,
// garbage, invalid UTF-8), which also keep the dictionary in play.
import QMP

@_silgen_name("LLVMFuzzerMutate")
func LLVMFuzzerMutate(_ data: UnsafeMutablePointer<UInt8>, _ size: Int, _ maxSize: Int) -> Int

/// SplitMix64: the mutation depends on libFuzzer's seed only, so runs replay.
struct SplitMix {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    mutating func below(_ n: Int) -> Int { Int(next() % UInt64(max(1, n))) }
    mutating func pick<T>(_ items: [T]) -> T { items[below(items.count)] }
}

/// Argument names the monitor's commands take, and one it does not.
let argumentNames = [
    "qom-type", "id", "path", "property", "value", "driver", "iothread", "iothread-vq-mapping", "vqs",
    "num-queues", "queue-size", "backend", "command-line", "cpu-index", "enable", "poll-max-ns", "poll-grow",
    "poll-shrink", "aio-max-batch", "thread-pool-min", "thread-pool-max", "node-name", "force", "bogus",
]

/// A value for an argument: often of the right kind and near a limit, sometimes not at all.
func interestingValue(_ rng: inout SplitMix, depth: Int = 0) -> JSON {
    switch rng.below(depth > 1 ? 4 : 6) {
    case 0:
        return .int(rng.pick([0, 1, 2, 3, 4, -1, 63, 64, 65, 256, 1023, 1024, 1025, 32768, 99_999_999_999,
                              Int64(Int32.max), Int64(Int32.max) + 1, Int64.max, Int64.min, Int64.max / 2]))
    case 1:
        return rng.pick([.uint(UInt64.max), .double(1e300), .double(-0.5), .double(2.0), .null, .bool(true), .bool(false)])
    case 2:
        return .string(composedString(&rng))
    case 3:
        return .string(rng.pick(["iothread", "virtio-blk", "virtio-blk-pci", "iot0", "iot1", "d0", "d1", "type",
                                 "poll-max-ns", "thread-pool-min", "info iothreads", "help", "null", "nop", ""]))
    case 4:
        var items: [JSON] = []
        for _ in 0..<rng.below(4) { items.append(interestingValue(&rng, depth: depth + 1)) }
        if rng.below(2) == 0 {
            // An iothread-vq-mapping entry.
            items.append(.object([("iothread", .string(rng.pick(["iot0", "iot1", "x"]))),
                                  ("vqs", .array((0..<rng.below(4)).map { _ in .int(Int64(rng.below(6)) - 1) }))]))
        }
        return .array(items)
    default:
        var members: [(String, JSON)] = []
        for _ in 0..<rng.below(3) { members.append((rng.pick(argumentNames), interestingValue(&rng, depth: depth + 1))) }
        return .object(members)
    }
}

/// Strings in the shapes the monitor parses (ids, QOM paths, backends, durations, HMP lines),
/// with odd parts: huge, empty, negative, not-a-number, non-ASCII, NUL.
func composedString(_ rng: inout SplitMix) -> String {
    let head = rng.pick(["", "", "/objects/", "/machine/peripheral/", "delay:", "file:", "file+direct:", "info ", "iot", "d"])
    let middle = rng.pick(["0", "1", "-1", "1e300", "1e19", "nan", "inf", "-0", "9223372036854775807", "0.5",
                           "iot0", "d0", "a/b", "1st", "é", "\u{0}", "😀", " ", String(repeating: "x", count: 1 + rng.below(5000))])
    let tail = rng.pick(["", "", "s", "ms", "us", "ns", "/", "iothreads"])
    return head + middle + tail
}

/// Replaces the `target`th node (pre-order) of `v`, or changes the object it is in.
func mutate(_ v: inout JSON, _ target: inout Int, _ rng: inout SplitMix) -> Bool {
    if target == 0 {
        if case .object(var members) = v, rng.below(2) == 0 {
            switch rng.below(3) {
            case 0: members.append((rng.pick(argumentNames), interestingValue(&rng)))  // an extra key
            case 1: if !members.isEmpty { members.remove(at: rng.below(members.count)) }  // a missing one
            default: if let m = members.randomElement(using: &rng) { members.append(m) }  // a duplicate
            }
            v = .object(members)
        } else {
            v = interestingValue(&rng)
        }
        return true
    }
    target -= 1
    switch v {
    case .array(var items):
        for k in items.indices where mutate(&items[k], &target, &rng) {
            v = .array(items)
            return true
        }
    case .object(var members):
        for k in members.indices where mutate(&members[k].1, &target, &rng) {
            v = .object(members)
            return true
        }
    default: break
    }
    return false
}

func nodeCount(_ v: JSON) -> Int {
    switch v {
    case .array(let items): return 1 + items.reduce(0) { $0 + nodeCount($1) }
    case .object(let members): return 1 + members.reduce(0) { $0 + nodeCount($1.1) }
    default: return 1
    }
}

extension SplitMix: RandomNumberGenerator {}

@_cdecl("LLVMFuzzerCustomMutator")
public func customMutator(_ data: UnsafeMutablePointer<UInt8>, _ size: Int, _ maxSize: Int, _ seed: UInt32) -> Int {
    var rng = SplitMix(state: UInt64(seed))
    if rng.below(2) == 0 { return LLVMFuzzerMutate(data, size, maxSize) }
    var stream = JSONStream()
    var messages: [JSON] = stream.feed(UnsafeBufferPointer(start: data, count: size)).compactMap {
        if case .value(let v) = $0 { return v } else { return nil }
    }
    switch rng.below(messages.isEmpty ? 1 : 4) {
    case 0:  // a command the monitor lists, with made-up arguments
        var m: [(String, JSON)] = [("execute", .string(rng.pick(Monitor.builtinCommandNames)))]
        if rng.below(4) != 0 { m.append(("arguments", interestingValue(&rng, depth: 1))) }
        if rng.below(3) == 0 { m.append(("id", interestingValue(&rng, depth: 2))) }
        messages.insert(.object(m), at: rng.below(messages.count + 1))
    case 1, 2:  // a value, a key
        let k = rng.below(messages.count)
        var target = rng.below(nodeCount(messages[k]))
        _ = mutate(&messages[k], &target, &rng)
    default:  // a message repeated or dropped
        let k = rng.below(messages.count)
        if rng.below(2) == 0 { messages.insert(messages[k], at: rng.below(messages.count + 1)) } else { messages.remove(at: k) }
    }
    let text = Array(messages.map(\.serialized).joined(separator: "\n").utf8)
    guard text.count <= maxSize else { return LLVMFuzzerMutate(data, size, maxSize) }
    for (k, b) in text.enumerated() { data[k] = b }
    return text.count
}
