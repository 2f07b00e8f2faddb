// The one error type of the Devices module.

/// An error a device reports to its caller (bad configuration, wrong state).
public struct DeviceError: Error, Equatable, CustomStringConvertible, Sendable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
