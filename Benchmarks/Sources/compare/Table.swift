// The one table `make bench` prints: per row the workload, Dataplane, the C reference and
// SwiftNIO (medians of the repeats with [min–max]), the ratios, the goal and whether it is met.
import Glibc

/// Results of one implementation over the repeats: each run is a dictionary of figures.
struct Runs {
    var runs: [[String: Double]] = []

    mutating func append(_ r: [String: Double]) { runs.append(r) }

    /// Median, min and max of `key` over the runs (nil when no run has it).
    func stat(_ key: String) -> Stat? {
        let v = runs.compactMap { $0[key] }.sorted()
        guard !v.isEmpty else { return nil }
        return Stat(median: v[v.count / 2], min: v.first!, max: v.last!, count: v.count)
    }

    var isEmpty: Bool { runs.isEmpty }
}

struct Stat {
    var median, min, max: Double
    var count: Int

    init(median: Double, min: Double, max: Double, count: Int) {
        self.median = median
        self.min = min
        self.max = max
        self.count = count
    }

    /// A single measurement (no spread).
    init(_ x: Double) { self.init(median: x, min: x, max: x, count: 1) }
}

/// How a figure is printed.
enum Unit {
    case ns      // latency in ns, printed as ns or µs
    case rate    // per second, printed with k/M
    case count   // small counts and fractions (per-operation figures)
    case percent
    case kib

    func format(_ x: Double) -> String {
        switch self {
        case .ns:
            if abs(x) >= 100_000 { return "\(round1(x / 1000))µs" }
            return "\(Int(x.rounded()))"
        case .rate:
            if x >= 1e6 { return "\(round2(x / 1e6))M" }
            if x >= 1e4 { return "\(Int((x / 1e3).rounded()))k" }
            return "\(Int(x.rounded()))"
        case .count:
            if x == x.rounded() && abs(x) < 1e6 { return "\(Int(x))" }
            if abs(x) >= 100 { return "\(Int(x.rounded()))" }
            return "\((x * 1000).rounded() / 1000)"
        case .percent:
            return "\(round2(x))%"
        case .kib:
            return "\(Int(x.rounded()))KiB"
        }
    }
}

func round1(_ x: Double) -> Double { (x * 10).rounded() / 10 }
func round2(_ x: Double) -> Double { (x * 100).rounded() / 100 }

struct Row {
    var workload: String
    var dataplane: String = ""
    var cref: String = ""
    var nio: String = ""
    var ratios: String = ""
    var goal: String = ""
    /// nil: reported only (no goal).
    var met: Bool? = nil
}

func cell(_ s: Stat?, _ unit: Unit) -> String {
    guard let s else { return "–" }
    if s.count == 1 || s.min == s.max { return unit.format(s.median) }
    return "\(unit.format(s.median)) [\(unit.format(s.min))–\(unit.format(s.max))]"
}

func ratioText(_ a: Stat?, _ b: Stat?, _ name: String) -> String? {
    guard let a, let b, b.median != 0 else { return nil }
    return "\(round2(a.median / b.median))× \(name)"
}

final class Table {
    var rows: [Row] = []
    var notes: [String] = []

    /// A row comparing one figure across the implementations that have it.
    func add(_ workload: String, _ unit: Unit, dp: Stat?, c: Stat? = nil, nio: Stat? = nil,
             goal: String = "", met: Bool? = nil, ratios: Bool = true) {
        var r = Row(workload: workload, dataplane: cell(dp, unit), cref: cell(c, unit), nio: cell(nio, unit))
        if c == nil { r.cref = "" }
        if nio == nil { r.nio = "" }
        if ratios {
            r.ratios = [ratioText(dp, c, "C"), ratioText(dp, nio, "NIO")].compactMap { $0 }.joined(separator: ", ")
        }
        r.goal = goal
        r.met = met
        rows.append(r)
        flushRow(r)
    }

    func add(_ r: Row) {
        rows.append(r)
        flushRow(r)
    }

    static let widths = [50, 26, 26, 26, 22, 34]
    static let header = ["workload", "Dataplane", "C reference", "SwiftNIO", "ratio", "goal", "met"]

    func line(_ fields: [String]) -> String {
        var s = ""
        for (i, f) in fields.enumerated() {
            if i < Table.widths.count {
                s += f + String(repeating: " ", count: max(1, Table.widths[i] - f.count))
            } else {
                s += f
            }
        }
        while s.hasSuffix(" ") { s.removeLast() }
        return s
    }

    func text(_ r: Row) -> String {
        let met = r.met.map { $0 ? "met" : "NOT MET" } ?? ""
        return line([r.workload, r.dataplane, r.cref, r.nio, r.ratios, r.goal, met])
    }

    /// Progress: each row goes to stderr as soon as it is known; the whole table to stdout at the end.
    func flushRow(_ r: Row) {
        eprint(text(r))
    }

    func printAll(title: [String]) {
        for t in title { print(t) }
        print("")
        print(line(Table.header))
        print(String(repeating: "-", count: Table.widths.reduce(0, +) + 8))
        for r in rows { print(text(r)) }
        let goals = rows.compactMap(\.met)
        print("")
        print("goals met: \(goals.filter { $0 }.count) of \(goals.count)")
        for n in notes { print(n) }
    }
}
