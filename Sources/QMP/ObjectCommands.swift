// IOThreads over QMP (object-add, object-del, query-iothreads, x-query-iothread-stats, HMP's
// `info iothreads`) and the QOM commands over IOThreads and devices (qom-list, qom-get,
// qom-set), with QEMU's texts. Monitor thread.
import Aio
import Devices
import IOThreads

/// What a QOM path names.
enum QOMObject {
    case iothread(IOThread)
    case device(String, DeviceEntry)
}

extension Monitor {
    static var objectAddArguments: [String: QMPArgumentType] {
        var spec: [String: QMPArgumentType] = ["qom-type": .string, "id": .string]
        for n in IOThreadProperties.names { spec[n] = .int }
        return spec
    }

    func objectAdd(_ a: QMPArguments) throws(QMPError) {
        let type = a.string("qom-type")!
        guard type == "iothread" else { throw QMPError("Parameter 'qom-type' does not accept value '\(type)'") }
        var props = IOThreadProperties()
        for n in IOThreadProperties.names {
            if let v = a[n]?.intValue {
                do throws(IOThreadError) { try props.set(n, to: v) } catch { throw QMPError(error.message) }
            }
        }
        do throws(IOThreadError) { try registry.create(id: a.string("id")!, properties: props) } catch {
            throw QMPError(error.message)
        }
    }

    /// Refused while anything holds the IOThread (QEMU's text for an object in use): a device,
    /// a device being unplugged (until its DEVICE_DELETED), an export, a node placed there.
    func objectDel(_ id: String) throws(QMPError) {
        do throws(IOThreadError) { try registry.remove(id) } catch { throw QMPError(error.message) }
    }

    // MARK: - QOM paths

    /// Resolves a QOM path: `/objects/ID` (an IOThread), `/machine/peripheral/ID` (a device,
    /// also with `/virtio-backend`), or a partial path (an id) that names exactly one of them.
    func resolve(_ path: String) throws(QMPError) -> QOMObject {
        func device(_ id: String) -> QOMObject? { devices[id].map { .device(id, $0) } }
        func iothread(_ id: String) -> QOMObject? { registry.lookup(id).map { .iothread($0) } }
        var found: QOMObject?
        if path.hasPrefix("/objects/") {
            found = iothread(String(path.dropFirst(9)))
        } else if path.hasPrefix("/machine/peripheral/") {
            var rest = String(path.dropFirst(20))
            if rest.hasSuffix("/virtio-backend") { rest.removeLast(15) }
            found = device(rest).flatMap { o in
                guard case .device(_, let e) = o, path == e.qomPath || path == e.holderPath else { return nil }
                return o
            }
        } else if !path.hasPrefix("/") && !path.contains("/") {
            let matches = [iothread(path), device(path)].compactMap { $0 }
            if matches.count > 1 { throw QMPError("Path '\(path)' is ambiguous") }
            found = matches.first
        }
        guard let found else { throw QMPError("DeviceNotFound", "Device '\(path)' not found") }
        return found
    }

    func qomList(_ path: String) throws(QMPError) -> JSON {
        switch try resolve(path) {
        case .iothread:
            var props: [JSON] = [.object([("name", .string("type")), ("type", .string("string"))])]
            props += IOThreadProperties.names.map { .object([("name", .string($0)), ("type", .string("int"))]) }
            return .array(props)
        case .device:
            return .array([
                .object([("name", .string("type")), ("type", .string("string"))]),
                .object([("name", .string("iothread")), ("type", .string("link<iothread>"))]),
                .object([("name", .string("num-queues")), ("type", .string("uint16"))]),
                .object([("name", .string("queue-size")), ("type", .string("uint16"))]),
            ])
        }
    }

    func qomGet(_ path: String, _ property: String) throws(QMPError) -> JSON {
        switch try resolve(path) {
        case .iothread(let t):
            if property == "type" { return .string("iothread") }
            do throws(IOThreadError) { return .int(try t.property(property)) } catch { throw QMPError(error.message) }
        case .device(_, let e):
            switch property {
            case "type": return .string(e.driver)
            case "num-queues": return .int(Int64(e.device.layouts.count))
            case "queue-size": return .int(Int64(e.device.layouts[0].size))
            case "iothread":
                // A link reads as the path of what it points to; a vq mapping has no single one.
                guard let t = e.singleIOThread else { return .string("") }
                return .string("/objects/\(t.id)")
            default: throw QMPError("Property '\(e.driver).\(property)' not found")
            }
        }
    }

    /// IOThread properties, live; and, beyond QEMU (which refuses it), a device's `iothread`
    /// while the guest runs: every queue moves there (``VirtioBlkDevice/move(to:)``).
    func qomSet(_ path: String, _ property: String, _ value: JSON) async throws(QMPError) {
        switch try resolve(path) {
        case .iothread(let t):
            guard let v = value.intValue else { throw QMPError("Invalid parameter type for '\(property)', expected: integer") }
            do throws(IOThreadError) { try t.setProperty(property, to: v) } catch { throw QMPError(error.message) }
        case .device(let id, let e):
            guard property == "iothread" else {
                if ["type", "num-queues", "queue-size"].contains(property) {
                    throw QMPError("Attempt to set property '\(property)' on device '\(id)' (type '\(e.driver)') after it was realized")
                }
                throw QMPError("Property '\(e.driver).\(property)' not found")
            }
            guard let name = value.stringValue else { throw QMPError("Invalid parameter type for 'iothread', expected: string") }
            try await moveDevice(id, e, to: name)
        }
    }

    // MARK: - Listings

    static func holderJSON(_ h: IOThreadHolder) -> JSON {
        .object([("type", .string(h.kind)), (h.memberName, .string(h.name))])
    }

    /// `IOThreadInfo` with the holders series' `holders` (newest first) after `thread-id`.
    static func iothreadInfo(_ t: IOThread) -> JSON {
        let p = t.properties
        return .object([
            ("id", .string(t.id)), ("thread-id", .int(Int64(t.threadID))),
            ("holders", .array(t.holders.map(holderJSON))),
            ("poll-max-ns", .int(p.pollMaxNs)), ("poll-grow", .int(p.pollGrow)), ("poll-shrink", .int(p.pollShrink)),
            ("aio-max-batch", .int(p.aioMaxBatch)),
        ])
    }

    static func iothreadStats(_ t: IOThread) -> JSON {
        let s = t.statistics
        let windows = s.pollWindows.sorted { $0.key < $1.key }.map { JSON.object([("fd", .int(Int64($0.key))), ("ns", .int($0.value))]) }
        return .object([
            ("id", .string(t.id)), ("backend", .string(t.backendKind.rawValue)),
            ("iterations", .uint(s.iterations)), ("bh-run", .uint(s.bottomHalvesRun)),
            ("dispatches", .uint(s.handlerDispatches)), ("completions", .uint(s.completions)),
            ("poll-hits", .uint(s.pollHits)), ("poll-misses", .uint(s.pollMisses)),
            ("polling-ns", .uint(s.pollNanoseconds)), ("blocked-ns", .uint(s.blockedNanoseconds)),
            ("eventfd-writes", .uint(s.eventfdWrites)), ("ring-enters", .uint(s.ringEnters)),
            ("cpu-ns", .int(t.cpuTimeNanoseconds)), ("poll-windows", .array(windows)),
        ])
    }

    func hmp(_ line: String) -> String {
        let words = line.split(separator: " ").map(String.init)
        switch words.first {
        case "help", "?":
            return "help|? [cmd] -- show the help\r\ninfo iothreads -- show the IOThreads\r\n"
        case "info":
            guard words.count > 1 else { return "info iothreads -- show the IOThreads\r\n" }
            guard words[1] == "iothreads" else { return "info: unknown subcommand '\(words[1])'\r\n" }
            var out = ""
            for t in registry.all {
                let p = t.properties
                out += "\(t.id):\r\n  thread_id=\(t.threadID)\r\n"
                out += "  holders=\(t.holders.map(\.name).joined(separator: ","))\r\n"
                out += "  poll-max-ns=\(p.pollMaxNs)\r\n  poll-grow=\(p.pollGrow)\r\n"
                out += "  poll-shrink=\(p.pollShrink)\r\n  aio-max-batch=\(p.aioMaxBatch)\r\n"
            }
            return out
        default:
            return "unknown command: '\(words.first ?? "")'\r\n"
        }
    }
}
