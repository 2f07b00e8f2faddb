import ArgumentParser

@main
struct Dataplane: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dataplane",
        abstract: "QEMU-style IOThreads on io_uring, in Swift.",
        subcommands: [Demo.self]
    )
}
