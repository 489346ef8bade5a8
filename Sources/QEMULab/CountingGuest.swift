import JSON
import NIOCore
import QMP
import QMPClient

/// A 512-byte boot sector that proves a VM really runs: it increments the dword at
/// guest-physical 0x7e00 forever (`xor ax,ax; mov ds,ax; inc dword [0x7e00]; jmp` back).
public enum CountingGuest {
    /// Guest-physical address of the counter.
    public static let counterAddress = 0x7e00

    /// The boot sector: code, zero padding, the 55 AA signature at offset 510.
    public static var bootSector: [UInt8] {
        var sector = [UInt8](repeating: 0, count: 512)
        let code: [UInt8] = [0x31, 0xc0, 0x8e, 0xd8, 0x66, 0xff, 0x06, 0x00, 0x7e, 0xeb, 0xf9]
        sector.replaceSubrange(0..<code.count, with: code)
        sector[510] = 0x55
        sector[511] = 0xaa
        return sector
    }

    /// The HMP command that prints the counter: `xp /1wx 0x7e00`.
    public static let readCommandArguments: [String: JSONValue] = ["command-line": "xp /1wx 0x7e00"]

    /// Parses HMP's `0000000000007e00: 0x0000002a\r\n` into 42.
    public static func parseCounter(_ reply: JSONValue) -> UInt32? {
        guard let text = reply.stringValue, let range = text.firstRange(of: ": 0x") else { return nil }
        let hex = text[range.upperBound...].prefix { $0.isHexDigit }
        return UInt32(hex, radix: 16)
    }

    /// Reads the counter through `human-monitor-command`.
    public static func readCounter(_ connection: QMPConnection, timeout: TimeAmount? = nil) async throws(QMPClientError) -> UInt32 {
        let reply = try await connection.execute("human-monitor-command", arguments: readCommandArguments, timeout: timeout)
        guard let value = parseCounter(reply) else {
            throw .protocolError(.unexpectedMessage("unreadable xp output: \(reply)"), command: "human-monitor-command", endpoint: connection.endpoint)
        }
        return value
    }

    /// Reads the counter with a callback on the connection's loop.
    public static func readCounter(
        _ connection: QMPConnection, timeout: TimeAmount? = nil,
        _ completion: @escaping @Sendable (Result<UInt32, QMPClientError>) -> Void
    ) {
        connection.send("human-monitor-command", arguments: readCommandArguments, timeout: timeout) { result in
            completion(result.flatMap { reply in
                guard let value = parseCounter(reply) else {
                    return .failure(.protocolError(
                        .unexpectedMessage("unreadable xp output: \(reply)"), command: "human-monitor-command", endpoint: connection.endpoint))
                }
                return .success(value)
            })
        }
    }
}
