import ArgumentParser
import Glibc

struct Dataplane: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dataplane",
        abstract: "QEMU-style IOThreads on io_uring, in Swift: a QMP and vhost-user-blk server, and a load generator for virtio-blk-like devices.",
        version: "dataplane 0.2.0",
        subcommands: [Demo.self, Load.self, Sweep.self, Serve.self, Wake.self, SoakCommand.self]
    )
}

/// `--help`, `-h`, `help` and `--version` print to standard output and exit 0 (a bare
/// `dataplane` prints the help too); bad arguments get one line and exit code 2
/// (ArgumentParser's default is 64 with usage); a failure while running gets one line and
/// exit code 1.
@main
enum Main {
    static func main() async {
        do {
            var command = try Dataplane.parseAsRoot()
            if var async = command as? AsyncParsableCommand {
                try await async.run()
            } else {
                try command.run()
            }
        } catch let code as ExitCode {
            exit(code.rawValue)  // the command printed why
        } catch {
            // ArgumentParser reports a help or version request, and a root command run without
            // a subcommand, as errors whose exit code is success: print what they ask for.
            switch Dataplane.exitCode(for: error) {
            case .success:
                print(Dataplane.fullMessage(for: error))
                exit(0)
            case .validationFailure:
                let message = Dataplane.message(for: error).split(separator: "\n").first.map(String.init) ?? "\(error)"
                errorLine("dataplane: \(message)")
                exit(2)
            default:
                errorLine("dataplane: \(error)")
                exit(1)
            }
        }
    }
}

/// One line on standard error.
func errorLine(_ text: String) {
    let line = text + "\n"
    _ = line.withCString { write(2, $0, strlen($0)) }
}
