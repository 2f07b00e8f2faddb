import Foundation

/// Text and HTML renderings of load results.
public enum Report {
    /// A plain table, one row per labelled result.
    public static func table(_ rows: [(String, LoadResult)]) -> String {
        let header = ["setting", "IOPS", "p50 ns", "p99 ns", "p99.9 ns", "CPU ns/req", "kicks/req", "irqs/req", "lost", "dup"]
        var lines: [[String]] = [header]
        for (label, r) in rows {
            lines.append([label, String(Int(r.iops.rounded())), "\(r.latencyNs.p50)", "\(r.latencyNs.p99)",
                          "\(r.latencyNs.p999)", String(Int(r.iothreadCPUNsPerRequest.rounded())),
                          String(format: "%.3f", r.kicksPerRequest), String(format: "%.3f", r.interruptsPerRequest),
                          "\(r.requests.lost)", "\(r.requests.duplicated)"])
        }
        let widths = (0..<header.count).map { c in lines.map { $0[c].count }.max()! }
        return lines.map { row in
            row.enumerated().map { c, cell in
                c == 0 ? cell.padding(toLength: widths[c], withPad: " ", startingAt: 0)
                    : String(repeating: " ", count: widths[c] - cell.count) + cell
            }.joined(separator: "  ")
        }.joined(separator: "\n")
    }

    /// The result as one JSON document.
    public static func json(_ result: LoadResult) throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        return String(decoding: try encoder.encode(result), as: UTF8.self)
    }

    /// A self-contained HTML page: one bar chart (inline SVG) per figure, then the table.
    public static func html(title: String, _ rows: [(String, LoadResult)]) -> String {
        let figures: [(String, (LoadResult) -> Double)] = [
            ("IOPS", { $0.iops }),
            ("Latency p50 (ns)", { Double($0.latencyNs.p50) }),
            ("Latency p99 (ns)", { Double($0.latencyNs.p99) }),
            ("Latency p99.9 (ns)", { Double($0.latencyNs.p999) }),
            ("IOThread CPU per request (ns)", { $0.iothreadCPUNsPerRequest }),
        ]
        var body = ""
        for (name, value) in figures {
            body += "<section class=\"chart\"><h2>\(escape(name))</h2>\n" + barChart(rows.map { ($0.0, value($0.1)) }) + "</section>\n"
        }
        let machine = rows.first.map { "\($0.1.machine.cpu), \($0.1.machine.vcpus) vCPUs, kernel \($0.1.machine.kernel), \($0.1.machine.build) build, fdmon \($0.1.fdmon)" } ?? ""
        return """
        <!DOCTYPE html>
        <html lang="en"><head><meta charset="utf-8"><title>\(escape(title))</title>
        <style>body{font-family:sans-serif;margin:2em;max-width:60em}svg text{font-size:12px}
        .chart{margin-bottom:2em}pre{background:#f4f4f4;padding:1em;overflow:auto}</style></head>
        <body><h1>\(escape(title))</h1><p>\(escape(machine))</p>
        \(body)<h2>Table</h2><pre>\(escape(table(rows)))</pre></body></html>

        """
    }

    static func barChart(_ bars: [(String, Double)]) -> String {
        let width = 720.0, barHeight = 22.0, labelWidth = 260.0
        let maxValue = max(bars.map(\.1).max() ?? 1, 1)
        var svg = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(width))\" height=\"\(Int(Double(bars.count) * (barHeight + 6) + 10))\">\n"
        for (i, (label, value)) in bars.enumerated() {
            let y = 5 + Double(i) * (barHeight + 6)
            let w = (width - labelWidth - 90) * value / maxValue
            svg += "<text x=\"0\" y=\"\(y + 15)\">\(escape(label))</text>"
            svg += "<rect x=\"\(labelWidth)\" y=\"\(y)\" width=\"\(String(format: "%.1f", w))\" height=\"\(barHeight)\" fill=\"#4a7ab5\"/>"
            svg += "<text x=\"\(String(format: "%.1f", labelWidth + w + 4))\" y=\"\(y + 15)\">\(Int(value.rounded()))</text>\n"
        }
        return svg + "</svg>\n"
    }

    static func escape(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
            .replacingOccurrences(of: ">", with: "&gt;").replacingOccurrences(of: "\"", with: "&quot;")
    }
}
