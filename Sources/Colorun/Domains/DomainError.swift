import JSON
import QMP

/// A failed operation on one domain, as policies see it: a Lua error whose value is
/// `{domain=, command=, class=, desc=}` and which prints as
/// `web-p: xen-load-devices-state: GenericError: Cannot update device state while vm is running`.
///
/// `class` is QEMU's error class (`GenericError`, `CommandNotFound`, ...) or one of colorun's
/// own: `Timeout` (no reply in time), `Disconnected` (the monitor connection ended),
/// `ConnectFailed` (no monitor to talk to), `ProtocolError` (the peer broke QMP).
struct DomainError: Error, Sendable, Hashable, CustomStringConvertible {
    var domain: String
    var command: String
    var errorClass: String
    var desc: String

    init(domain: String, command: String, errorClass: String, desc: String) {
        self.domain = domain
        self.command = command
        self.errorClass = errorClass
        self.desc = desc
    }

    var description: String { "\(domain): \(command): \(errorClass): \(desc)" }

    var fields: [String: JSONValue] {
        ["domain": .string(domain), "command": .string(command), "class": .string(errorClass), "desc": .string(desc)]
    }

    /// Nothing listens on the monitor any more (refused, or the socket file is gone): the
    /// QEMU process is not running, so there is no paused VM to resume.
    var monitorGone: Bool {
        errorClass == DomainError.connectFailed
            && (desc.contains("Connection refused") || desc.contains("No such file or directory"))
    }

    /// The domain refused the command before sending it (`DomainOptions.refusedCommands`).
    static let refused = "Refused"
    static let timeout = "Timeout"
    /// A `cont` refused because the arbiter fenced the domain.
    static let fenced = "Fenced"
    static let disconnected = "Disconnected"
    static let connectFailed = "ConnectFailed"
    static let protocolError = "ProtocolError"
}
