/// An error from creating, configuring or looking up an IOThread. The messages are QEMU's,
/// so that a monitor can pass them on unchanged.
public struct IOThreadError: Error, Equatable, CustomStringConvertible, Sendable {
    public enum Kind: Sendable, Equatable {
        /// A property value out of range (QEMU's "value must be in range" texts).
        case invalidValue
        /// An id that is not a well-formed object id.
        case invalidID
        /// An id already in use.
        case duplicateID
        /// No IOThread with that id.
        case notFound
        /// The IOThread has holders and cannot be stopped or deleted.
        case inUse
        /// The IOThread is stopping or stopped: it cannot be held.
        case stopped
        /// The thread or its context could not be created.
        case resource
    }

    public let kind: Kind
    public let message: String

    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    public var description: String { message }
}
