import Testing

@testable import QMP

func values(_ text: String, chunk: Int = 1) -> [JSONStream.Output] {
    var s = JSONStream()
    var out: [JSONStream.Output] = []
    let bytes = Array(text.utf8)
    var i = 0
    while i < bytes.count {
        out += s.feed(bytes[i..<min(i + chunk, bytes.count)])
        i += chunk
    }
    return out
}

@Suite("QMP framing and JSON")
struct JSONStreamTests {
    @Test("values are split from a byte stream with no delimiter, whatever the chunking")
    func byteStream() {
        let text = #"{"execute":"a"}{"execute":"b","arguments":{"x":[1,2,{"y":"}"}]}}  {"execute":"c"}"#
        for chunk in [1, 3, 7, 1000] {
            let out = values(text, chunk: chunk)
            #expect(out.count == 3)
            if case .value(let v) = out[1] { #expect(v["arguments"]?["x"] == .array([.int(1), .int(2), .object([("y", .string("}"))])])) }
        }
    }

    @Test("QEMU's parse error texts")
    func errors() {
        #expect(values("@@@ @") == [.error("JSON parse error, stray '@'")], "one error, then recovery")
        #expect(values("@{}") == [.error("JSON parse error, stray '@'"), .value(.object([]))])
        #expect(values(#"{"a":1,"a":2}"#) == [.error("JSON parse error, duplicate key")])
        #expect(values(#"{"a" 1}"#) == [.error("JSON parse error, missing : in object pair")])
        #expect(values(#"{1:2}"#) == [.error("JSON parse error, key is not a string in object")])
        #expect(values(#"[1 2]"#) == [.error("JSON parse error, expected separator in list")])
        #expect(values(#"{"a":nope}"#) == [.error("JSON parse error, invalid keyword 'nope'")])
        #expect(values(#"{"a":"\q"}"#) == [.error("JSON parse error, invalid escape sequence in string")])
        #expect(values("}") == [.error("JSON parse error, expecting value")])
        var s = JSONStream()
        let bad: [UInt8] = Array(#"{"a":""#.utf8) + [0xC3, 0x28] + Array(#""}"#.utf8)
        #expect(s.feed(bad) == [.error("JSON parse error, invalid UTF-8 sequence in string")])
    }

    @Test("nesting over 1024 is refused once, and parsing resumes after it")
    func nestingLimit() {
        let deep = String(repeating: "[", count: 1100) + String(repeating: "]", count: 1100)
        let out = values(deep + #"{"execute":"ok"}"#, chunk: 64)
        #expect(out.first == .error("JSON nesting depth limit exceeded"))
        #expect(out.last == .value(.object([("execute", .string("ok"))])))
        #expect(out.count == 2)
        let ok = String(repeating: "[", count: 1024) + String(repeating: "]", count: 1024)
        #expect(values(ok, chunk: 512).count == 1)
    }

    @Test("more than 2 Mi tokens are refused")
    func tokenLimit() {
        var s = JSONStream()
        var out = s.feed(Array("[".utf8))
        let chunk = Array(String(repeating: "1,", count: 100_000).utf8)
        for _ in 0..<11 { out += s.feed(chunk) }
        #expect(out == [.error("JSON token count limit exceeded")])
        out = s.feed(Array(#"]{"execute":"ok"}"#.utf8))
        #expect(out.last == .value(.object([("execute", .string("ok"))])))
    }

    @Test("a control character resets a half-read message without an error")
    func controlReset() {
        #expect(values("{\"execute\": \u{1b}{\"execute\":\"x\"}") == [.value(.object([("execute", .string("x"))]))])
    }

    @Test("a control character inside an open string is an error and resynchronises (found by fuzzing)")
    func controlInString() {
        // Misaligned quotes leave a string open at the end of the input; the reset must
        // still reach the parser.
        let out = values(#"{"t"":true,"f":false}"# + "\u{1b}" + #"{"execute":"q"}"#, chunk: 4)
        #expect(out.first == .error("JSON parse error, stray '\\u001b' in string"))
        #expect(out.last == .value(.object([("execute", .string("q"))])))
    }

    @Test("output is ASCII with \\u escapes, QEMU's separators, and integers stay integers")
    func serialization() {
        let v = JSON.object([("desc", .string("é\"\n😀")), ("n", .int(-5)), ("u", .uint(UInt64.max)), ("a", .array([.bool(true), .null]))])
        #expect(v.serialized == #"{"desc": "\u00e9\"\n\ud83d\ude00", "n": -5, "u": 18446744073709551615, "a": [true, null]}"#)
        #expect(values(v.serialized) == [.value(v)])
    }
}
