import ColorunTestSupport
import JSON
import NIOCore
import Testing
@testable import QMP

/// The client writes commands with `QMPCommandLineEncoder` straight into its buffers: the
/// bytes must be those of the JSONValue path (`QMPCommand.json` through the line encoder).
@Suite(.timeLimit(.minutes(1)), .machine(.shared)) struct CommandEncodingTests {
    static let commands: [QMPCommand] = [
        QMPCommand(name: "query-status", id: .int(1)),
        QMPCommand(name: "stop", id: .int(0)),
        QMPCommand(name: "cont", id: .int(Int64.max)),
        QMPCommand(name: "qmp_capabilities", arguments: ["enable": ["oob"]], id: .int(42)),
        QMPCommand(name: "xen-save-devices-state", arguments: ["filename": "/tmp/a \"b\"\\c\n", "live": false], id: .int(7)),
        QMPCommand(name: "migrate-set-parameters", arguments: ["max-bandwidth": .int(1 << 40), "x": .double(0.5), "l": [1, nil, "z"]], id: .int(123_456_789)),
        QMPCommand(name: "odd\"name\\\t", id: .int(-5)),
        QMPCommand(name: "x-colo-lost-heartbeat", id: .int(9), outOfBand: true),
        QMPCommand(name: "é-ünicode", arguments: [:], id: .int(10)),
        // The client's commands: no id (replies are matched in order).
        QMPCommand(name: "query-status"),
        QMPCommand(name: "xen-load-devices-state", arguments: ["filename": "/run/colorun/gen-7.devstate"]),
    ]

    @Test(arguments: commands)
    func sameBytesAsTheJSONValuePath(_ command: QMPCommand) throws {
        var expected = ByteBuffer()
        try QMPJSONLineEncoder(crlf: false).encode(data: command.json, out: &expected)
        var direct = ByteBuffer()
        QMPCommandLineEncoder.write(name: command.name, arguments: command.arguments, id: command.id?.intValue,
                                    outOfBand: command.outOfBand, into: &direct)
        #expect(String(buffer: direct) == String(buffer: expected))
        // and QMP's parser reads it back as the command
        let line = direct.readableBytesView.dropLast()  // the LF
        #expect(try JSONParser.parse(Array(line)) == command.json)
    }
}
