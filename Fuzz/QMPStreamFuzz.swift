// libFuzzer target over the monitor's input path: the byte-stream splitter, the JSON parser
// and the serializer (Sources/QMP/JSON.swift, JSONStream.swift, compiled in by `make fuzz`).
// Properties checked on every input, fed in the chunks its first byte picks:
// - nothing crashes, traps or hangs (libFuzzer's timeout);
// - every value parsed serializes to ASCII and parses back to the same value;
// - a valid command sent after the input (after a reset character) is still understood.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    let chunk = max(1, Int(bytes.first ?? 1) % 17)
    var stream = JSONStream()
    var outputs: [JSONStream.Output] = []
    var i = 0
    while i < bytes.count {
        outputs += stream.feed(bytes[i..<min(i + chunk, bytes.count)])
        i += chunk
    }
    for case .value(let v) in outputs {
        let text = v.serialized
        precondition(text.utf8.allSatisfy { $0 < 0x80 }, "non-ASCII output")
        var again = JSONStream()
        let back = again.feed(Array((text + " ").utf8))
        precondition(back == [.value(v)], "round trip changed \(text)")
    }
    // The documented resync: a control character, then a valid command.
    let tail = stream.feed(Array("\u{1b}{\"execute\":\"query-version\"}".utf8))
    precondition(tail.last == .value(.object([("execute", .string("query-version"))])), "not usable after input: \(tail)")
    return 0
}
