// The monitor's input: a byte stream of JSON values with no delimiter (qemu.qmp sends no
// newline), split the way QEMU's json-streamer splits it — a value is complete when the
// nesting of braces and brackets returns to zero — with QEMU's limits and error texts. A
// malformed or oversized message yields one error and is dropped; parsing goes on with the
// bytes after it, so the connection stays usable.

public struct JSONStream {
    /// QEMU's MAX_TOKEN_SIZE (bytes of one message), MAX_TOKEN_COUNT and MAX_NESTING.
    public static let maxMessageBytes = 64 << 20
    public static let maxTokens = 2 << 20
    public static let maxNesting = 1024

    public enum Output: Equatable {
        case value(JSON)
        /// A parse error: the response has no `id`.
        case error(String)
    }

    var buffer: [UInt8] = []
    var depth = 0
    var tokens = 0
    var inString = false
    var escaped = false
    var inBareword = false
    /// After a limit was hit: drop bytes until the nesting closes or a reset character.
    var skipping = false
    /// After a stray character: drop bytes until a structural or control character (QEMU's
    /// lexer recovery), so "@@@" is one error, not three.
    var recovering = false

    public init() {}

    /// Feeds bytes; returns the values and errors they complete, in order.
    public mutating func feed<C: Collection>(_ bytes: C) -> [Output] where C.Element == UInt8 {
        var out: [Output] = []
        for b in bytes { step(b, &out) }
        return out
    }

    mutating func reset() {
        buffer.removeAll(keepingCapacity: true)
        depth = 0
        tokens = 0
        inString = false
        escaped = false
        inBareword = false
    }

    mutating func fail(_ message: String, _ out: inout [Output]) {
        out.append(.error(message))
        reset()
    }

    mutating func step(_ b: UInt8, _ out: inout [Output]) {
        if recovering {
            switch b {
            case UInt8(ascii: "{"), UInt8(ascii: "}"), UInt8(ascii: "["), UInt8(ascii: "]"), UInt8(ascii: ":"), UInt8(ascii: ","):
                recovering = false  // and this character starts afresh, below
            case 0x09:
                return
            default:
                if b < 0x20 || b == 0xFE || b == 0xFF {
                    recovering = false
                    reset()
                }
                return
            }
        }
        if skipping {
            // Resynchronise on a control character (QEMU's documented reset) or when the
            // dropped value's nesting closes.
            if b < 0x20 && b != 0x09 && b != 0x0A && b != 0x0D || b == 0xFF || b == 0xFE {
                skipping = false
                reset()
            } else if !inString {
                if b == UInt8(ascii: "\"") { inString = true } else if b == UInt8(ascii: "{") || b == UInt8(ascii: "[") { depth += 1 } else if b == UInt8(ascii: "}") || b == UInt8(ascii: "]") {
                    depth -= 1
                    if depth <= 0 {
                        skipping = false
                        reset()
                    }
                }
            } else if escaped {
                escaped = false
            } else if b == UInt8(ascii: "\\") {
                escaped = true
            } else if b == UInt8(ascii: "\"") {
                inString = false
            }
            return
        }
        if buffer.count >= JSONStream.maxMessageBytes {
            failAndSkipValue("JSON token size limit exceeded", &out)
            return
        }
        if inString {
            if b < 0x20 || b == 0xFE || b == 0xFF {
                // A raw control character cannot be in a JSON string: the message is dropped
                // with an error, and the character resynchronises as the spec's reset does.
                fail("JSON parse error, stray '\\u" + JSON.hex4(UInt32(b)) + "' in string", &out)
                return
            }
            buffer.append(b)
            if escaped {
                escaped = false
            } else if b == UInt8(ascii: "\\") {
                escaped = true
            } else if b == UInt8(ascii: "\"") {
                inString = false
                if depth == 0 { complete(&out) }
            }
            return
        }
        switch b {
        case 0x20, 0x09, 0x0A, 0x0D:
            if inBareword { endBareword(&out) }
            if depth > 0 { buffer.append(b) }  // keeps "1 2" two tokens for the parser
        case UInt8(ascii: "{"), UInt8(ascii: "["):
            if inBareword { endBareword(&out) }
            depth += 1
            if depth > JSONStream.maxNesting {
                fail("JSON nesting depth limit exceeded", &out)
                skipping = true
                depth = JSONStream.maxNesting + 1
                return
            }
            countToken(&out)
            buffer.append(b)
        case UInt8(ascii: "}"), UInt8(ascii: "]"):
            if inBareword { endBareword(&out) }
            if depth == 0 {
                fail("JSON parse error, expecting value", &out)
                return
            }
            depth -= 1
            buffer.append(b)
            countToken(&out)
            if depth == 0 { complete(&out) }
        case UInt8(ascii: "\""):
            if inBareword { endBareword(&out) }
            inString = true
            countToken(&out)
            buffer.append(b)
        case UInt8(ascii: ":"), UInt8(ascii: ","):
            if inBareword { endBareword(&out) }
            if depth == 0 {
                fail("JSON parse error, expecting value", &out)
                return
            }
            countToken(&out)
            buffer.append(b)
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
             UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "+"), UInt8(ascii: "."):
            if !inBareword {
                inBareword = true
                countToken(&out)
            }
            buffer.append(b)
        default:
            if b < 0x20 || b == 0xFF || b == 0xFE {
                reset()  // QEMU's documented way to force the parser into a known state
            } else {
                let shown = b < 0x80 ? String(UnicodeScalar(b)) : "\\x" + String(b, radix: 16)
                fail("JSON parse error, stray '\(shown)'", &out)
                recovering = true
            }
        }
    }

    /// Reports a limit and drops the rest of the value being read (up to where its nesting
    /// closes), so its tail is not parsed as new messages.
    mutating func failAndSkipValue(_ message: String, _ out: inout [Output]) {
        let open = depth
        fail(message, &out)
        if open > 0 {
            skipping = true
            depth = open
        }
    }

    mutating func countToken(_ out: inout [Output]) {
        tokens += 1
        if tokens > JSONStream.maxTokens {
            failAndSkipValue("JSON token count limit exceeded", &out)
        }
    }

    mutating func endBareword(_ out: inout [Output]) {
        inBareword = false
        if depth == 0 { complete(&out) }
    }

    mutating func complete(_ out: inout [Output]) {
        let bytes = buffer
        reset()
        var parser = JSONParser(bytes: bytes)
        switch parser.parseDocument() {
        case .success(let v): out.append(.value(v))
        case .failure(let e): out.append(.error("JSON parse error, \(e.message)"))
        }
    }
}

struct ParseError: Error { let message: String }

/// Recursive descent over one complete message.
struct JSONParser {
    let bytes: [UInt8]
    var i = 0

    init(bytes: [UInt8]) { self.bytes = bytes }

    mutating func parseDocument() -> Result<JSON, ParseError> {
        do {
            let v = try value(depth: 0)
            skipSpace()
            guard i == bytes.count else { throw ParseError(message: "expecting value") }
            return .success(v)
        } catch let e as ParseError {
            return .failure(e)
        } catch {
            return .failure(ParseError(message: "expecting value"))
        }
    }

    mutating func skipSpace() {
        while i < bytes.count, bytes[i] == 0x20 || bytes[i] == 0x09 || bytes[i] == 0x0A || bytes[i] == 0x0D { i += 1 }
    }

    mutating func value(depth: Int) throws -> JSON {
        skipSpace()
        guard i < bytes.count else { throw ParseError(message: "premature EOI") }
        switch bytes[i] {
        case UInt8(ascii: "{"): return try object(depth: depth + 1)
        case UInt8(ascii: "["): return try array(depth: depth + 1)
        case UInt8(ascii: "\""): return .string(try string())
        default: return try bareword()
        }
    }

    mutating func object(depth: Int) throws -> JSON {
        i += 1
        var members: [(String, JSON)] = []
        skipSpace()
        if i < bytes.count && bytes[i] == UInt8(ascii: "}") {
            i += 1
            return .object(members)
        }
        while true {
            skipSpace()
            guard i < bytes.count else { throw ParseError(message: "premature EOI") }
            guard bytes[i] == UInt8(ascii: "\"") else { throw ParseError(message: "key is not a string in object") }
            let key = try string()
            skipSpace()
            guard i < bytes.count, bytes[i] == UInt8(ascii: ":") else { throw ParseError(message: "missing : in object pair") }
            i += 1
            skipSpace()
            guard i < bytes.count, bytes[i] != UInt8(ascii: "}"), bytes[i] != UInt8(ascii: ",") else {
                throw ParseError(message: "Missing value in dict")
            }
            let v = try value(depth: depth)
            if members.contains(where: { $0.0 == key }) { throw ParseError(message: "duplicate key") }
            members.append((key, v))
            skipSpace()
            guard i < bytes.count else { throw ParseError(message: "premature EOI") }
            if bytes[i] == UInt8(ascii: "}") {
                i += 1
                return .object(members)
            }
            guard bytes[i] == UInt8(ascii: ",") else { throw ParseError(message: "expected separator in dict") }
            i += 1
        }
    }

    mutating func array(depth: Int) throws -> JSON {
        i += 1
        var items: [JSON] = []
        skipSpace()
        if i < bytes.count && bytes[i] == UInt8(ascii: "]") {
            i += 1
            return .array(items)
        }
        while true {
            items.append(try value(depth: depth))
            skipSpace()
            guard i < bytes.count else { throw ParseError(message: "premature EOI") }
            if bytes[i] == UInt8(ascii: "]") {
                i += 1
                return .array(items)
            }
            guard bytes[i] == UInt8(ascii: ",") else { throw ParseError(message: "expected separator in list") }
            i += 1
        }
    }

    mutating func string() throws -> String {
        i += 1
        var raw: [UInt8] = []
        while i < bytes.count {
            let b = bytes[i]
            i += 1
            if b == UInt8(ascii: "\"") {
                guard let s = String(validating: raw, as: UTF8.self) else {
                    throw ParseError(message: "invalid UTF-8 sequence in string")
                }
                return s
            }
            if b == UInt8(ascii: "\\") {
                guard i < bytes.count else { break }
                let e = bytes[i]
                i += 1
                switch e {
                case UInt8(ascii: "\""): raw.append(e)
                case UInt8(ascii: "\\"): raw.append(e)
                case UInt8(ascii: "/"): raw.append(e)
                case UInt8(ascii: "'"): raw.append(e)
                case UInt8(ascii: "b"): raw.append(0x08)
                case UInt8(ascii: "f"): raw.append(0x0C)
                case UInt8(ascii: "n"): raw.append(0x0A)
                case UInt8(ascii: "r"): raw.append(0x0D)
                case UInt8(ascii: "t"): raw.append(0x09)
                case UInt8(ascii: "u"):
                    var code = try hex4()
                    if code >= 0xD800 && code < 0xDC00 {
                        guard i + 1 < bytes.count, bytes[i] == UInt8(ascii: "\\"), bytes[i + 1] == UInt8(ascii: "u") else {
                            throw ParseError(message: "\\u\(JSON.hex4(code)) is not a valid Unicode character")
                        }
                        i += 2
                        let low = try hex4()
                        guard low >= 0xDC00 && low < 0xE000 else {
                            throw ParseError(message: "\\u\(JSON.hex4(low)) is not a valid Unicode character")
                        }
                        code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                    }
                    guard code != 0, let scalar = UnicodeScalar(code) else {
                        throw ParseError(message: "\\u\(JSON.hex4(code)) is not a valid Unicode character")
                    }
                    raw.append(contentsOf: Array(String(scalar).utf8))
                default:
                    throw ParseError(message: "invalid escape sequence in string")
                }
                continue
            }
            raw.append(b)
        }
        throw ParseError(message: "premature EOI")
    }

    mutating func hex4() throws -> UInt32 {
        guard i + 4 <= bytes.count, let v = UInt32(String(decoding: bytes[i..<i + 4], as: UTF8.self), radix: 16) else {
            throw ParseError(message: "invalid escape sequence in string")
        }
        i += 4
        return v
    }

    mutating func bareword() throws -> JSON {
        let start = i
        while i < bytes.count {
            let b = bytes[i]
            let isWordByte = (b >= UInt8(ascii: "a") && b <= UInt8(ascii: "z")) || (b >= UInt8(ascii: "A") && b <= UInt8(ascii: "Z"))
                || (b >= UInt8(ascii: "0") && b <= UInt8(ascii: "9")) || b == UInt8(ascii: "-") || b == UInt8(ascii: "+") || b == UInt8(ascii: ".")
            guard isWordByte else { break }
            i += 1
        }
        let word = String(decoding: bytes[start..<i], as: UTF8.self)
        guard !word.isEmpty else { throw ParseError(message: "expecting value") }
        switch word {
        case "true": return .bool(true)
        case "false": return .bool(false)
        case "null": return .null
        default: break
        }
        if let first = word.first, first.isNumber || first == "-" {
            if !word.contains(where: { $0 == "." || $0 == "e" || $0 == "E" }) {
                if let v = Int64(word) { return .int(v) }
                if let v = UInt64(word) { return .uint(v) }
            }
            if let d = Double(word), d.isFinite { return .double(d) }
            throw ParseError(message: "stray '\(word)'")
        }
        throw ParseError(message: "invalid keyword '\(word)'")
    }
}
