import ArgumentParser
import Glibc

struct Dataplane: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dataplane",
        abstract: "QEMU-style IOThreads on io_uring, in Swift: a load generator for virtio-blk-like devices.",
        subcommands: [Demo.self, Load.self, Sweep.self, Serve.self, Wake.self, SoakCommand.self]
    )
}

/// Bad arguments get one line and exit code 2 (ArgumentParser's default is 64 with usage);
/// a failure while running gets one line and exit code 1.
@main
enum Main {
    static func main() async {
        var command: ParsableCommand
        do {
            command = try Dataplane.parseAsRoot()
        } catch {
            if Dataplane.exitCode(for: error) == .success {
                print(Dataplane.fullMessage(for: error))
                exit(0)
            }
            let message = Dataplane.message(for: error).split(separator: "\n").first.map(String.init) ?? "\(error)"
            errorLine("dataplane: \(message)")
            exit(2)
        }
        do {
            if var async = command as? AsyncParsableCommand {
                try await async.run()
            } else {
                try command.run()
            }
        } catch let code as ExitCode {
            exit(code.rawValue)  // the command printed why
        } catch {
            errorLine("dataplane: \(error)")
            exit(1)
        }
    }
}

/// One line on standard error.
func errorLine(_ text: String) {
    let line = text + "\n"
    _ = line.withCString { write(2, $0, strlen($0)) }
}
