// The command table: each command's name, argument spec and handler in one place. The
// built-in commands are QEMU's (and qemu-storage-daemon's) with their names, arguments and
// error texts; an embedder adds its own with `Monitor.register(_:)` (QEMU reserves the
// `__RFQDN_` prefix, such as `__com.example_do-thing`, for downstream commands).
import IOThreads

/// The QAPI types arguments are checked against.
public enum QMPArgumentType: String, Sendable {
    case string, int = "integer", bool = "boolean", array, any
}

/// A command's arguments, validated before any side effect, with QEMU's texts.
public struct QMPArguments: Sendable {
    let values: [String: JSON]

    /// Checks `args` against `spec`: an unknown member, a wrong type or a missing required
    /// member is refused as QEMU refuses it.
    public init(_ args: JSON, _ spec: [String: QMPArgumentType], required: Set<String> = []) throws(QMPError) {
        guard case .object(let members) = args else { throw QMPError("QMP input member 'arguments' must be an object") }
        var values: [String: JSON] = [:]
        for (k, v) in members {
            guard let type = spec[k] else { throw QMPError("Parameter '\(k)' is unexpected") }
            let ok: Bool
            switch type {
            case .string: ok = v.stringValue != nil
            case .int: ok = v.intValue != nil
            case .bool: if case .bool = v { ok = true } else { ok = false }
            case .array: if case .array = v { ok = true } else { ok = false }
            case .any: ok = true
            }
            guard ok else { throw QMPError("Invalid parameter type for '\(k)', expected: \(type.rawValue)") }
            values[k] = v
        }
        for r in required.sorted() where values[r] == nil { throw QMPError("Parameter '\(r)' is missing") }
        self.values = values
    }

    public subscript(key: String) -> JSON? { values[key] }
    public func string(_ key: String) -> String? { values[key]?.stringValue }
    public func bool(_ key: String) -> Bool? { if case .bool(let b)? = values[key] { return b } else { return nil } }
}

/// What a handler gets: its validated arguments, the monitor (whose state it may use: it runs
/// on the monitor's thread) and the session that sent the command.
public struct QMPCall: Sendable {
    public let arguments: QMPArguments
    public let monitor: Monitor
    public let session: MonitorSession
}

/// One command of the table.
public struct QMPCommand: Sendable {
    public enum Handler: Sendable {
        /// Answered before the next message is taken.
        case sync(@Sendable (QMPCall) throws(QMPError) -> JSON)
        /// Runs as a task on the monitor's thread (it may await work done on other threads);
        /// no other command starts before it is answered.
        case async(@Sendable (QMPCall) async throws(QMPError) -> JSON)
    }

    public let name: String
    public let arguments: [String: QMPArgumentType]
    public let required: Set<String>
    public let handler: Handler

    public init(_ name: String, arguments: [String: QMPArgumentType] = [:], required: Set<String> = [], _ handler: Handler) {
        self.name = name
        self.arguments = arguments
        self.required = required
        self.handler = handler
    }
}

extension Monitor {
    /// Adds `command` to the table, or replaces the command of that name. Monitor thread.
    public func register(_ command: QMPCommand) {
        if table[command.name] == nil { tableOrder.append(command.name) }
        table[command.name] = command
    }

    /// The names in the table, in the order they were registered (`query-commands`).
    public var commandNames: [String] { tableOrder }

    /// The names of the commands every monitor starts with.
    public static var builtinCommandNames: [String] { builtinCommands.map(\.name) }

    static var builtinCommands: [QMPCommand] {
        [
            QMPCommand("qmp_capabilities", arguments: ["enable": .array], .sync { call throws(QMPError) in
                if case .array(let caps)? = call.arguments["enable"], !caps.isEmpty {
                    let names = caps.map { $0.stringValue ?? $0.serialized }
                    throw QMPError("Capability \(names.joined(separator: ", ")) not available")
                }
                call.session.negotiated = true
                return .object([])
            }),
            QMPCommand("query-version", .sync { _ in Monitor.version }),
            QMPCommand("query-commands", .sync { call in
                .array(call.monitor.commandNames.map { .object([("name", .string($0))]) })
            }),
            QMPCommand("query-iothreads", .sync { call in .array(call.monitor.registry.all.map(iothreadInfo)) }),
            QMPCommand("x-query-iothread-stats", .sync { call in .array(call.monitor.registry.all.map(iothreadStats)) }),
            QMPCommand("object-add", arguments: objectAddArguments, required: ["qom-type", "id"], .sync { call throws(QMPError) in
                try call.monitor.objectAdd(call.arguments)
                return .object([])
            }),
            QMPCommand("object-del", arguments: ["id": .string], required: ["id"], .sync { call throws(QMPError) in
                try call.monitor.objectDel(call.arguments.string("id")!)
                return .object([])
            }),
            QMPCommand("qom-list", arguments: ["path": .string], required: ["path"], .sync { call throws(QMPError) in
                try call.monitor.qomList(call.arguments.string("path")!)
            }),
            QMPCommand("qom-get", arguments: ["path": .string, "property": .string], required: ["path", "property"],
                       .sync { call throws(QMPError) in
                try call.monitor.qomGet(call.arguments.string("path")!, call.arguments.string("property")!)
            }),
            QMPCommand("qom-set", arguments: ["path": .string, "property": .string, "value": .any],
                       required: ["path", "property", "value"], .async { call throws(QMPError) in
                try await call.monitor.qomSet(call.arguments.string("path")!, call.arguments.string("property")!,
                                              call.arguments["value"]!)
                return .object([])
            }),
            QMPCommand("device_add", arguments: deviceAddArguments, required: ["driver", "id"], .async { call throws(QMPError) in
                try await call.monitor.deviceAdd(call.arguments)
                return .object([])
            }),
            QMPCommand("device_del", arguments: ["id": .string], required: ["id"], .sync { call throws(QMPError) in
                try call.monitor.deviceDel(call.arguments.string("id")!)
                return .object([])
            }),
            QMPCommand("blockdev-add", arguments: blockdevAddArguments, required: ["driver", "node-name"],
                       .sync { call throws(QMPError) in
                try call.monitor.blockdevAdd(call.arguments)
                return .object([])
            }),
            QMPCommand("blockdev-del", arguments: ["node-name": .string], required: ["node-name"], .sync { call throws(QMPError) in
                try call.monitor.blockdevDel(call.arguments.string("node-name")!)
                return .object([])
            }),
            QMPCommand("block-export-add", arguments: blockExportAddArguments, required: ["type", "id", "node-name"],
                       .sync { call throws(QMPError) in
                try call.monitor.blockExportAdd(call.arguments)
                return .object([])
            }),
            QMPCommand("block-export-del", arguments: ["id": .string, "mode": .string], required: ["id"],
                       .async { call throws(QMPError) in
                try await call.monitor.blockExportDel(call.arguments)
                return .object([])
            }),
            QMPCommand("query-block-exports", .sync { call in call.monitor.queryBlockExports() }),
            QMPCommand("x-blockdev-set-iothread", arguments: ["node-name": .string, "iothread": .any, "force": .bool],
                       required: ["node-name", "iothread"], .async { call throws(QMPError) in
                try await call.monitor.setNodeIOThread(call.arguments)
                return .object([])
            }),
            QMPCommand("human-monitor-command", arguments: ["command-line": .string, "cpu-index": .int],
                       required: ["command-line"], .sync { call in
                .string(call.monitor.hmp(call.arguments.string("command-line")!))
            }),
            QMPCommand("quit", .sync { call in
                let monitor = call.monitor
                // The answer goes out first: the shutdown starts once this command is answered.
                monitor.shutdown { monitor.onQuit?() }
                return .object([])
            }),
        ]
    }

    /// Runs a command at startup (the command line's `--object`, `--blockdev`, `--export`),
    /// with the same validation and texts as over QMP. Monitor thread; synchronous commands
    /// only.
    public func runStartupCommand(_ name: String, _ args: JSON) throws(QMPError) {
        guard let command = table[name], case .sync(let body) = command.handler else {
            throw QMPError("CommandNotFound", "The command \(name) has not been found")
        }
        let arguments = try QMPArguments(args, command.arguments, required: command.required)
        let session = MonitorSession { _ in }
        session.negotiated = true
        _ = try body(QMPCall(arguments: arguments, monitor: self, session: session))
    }
}
