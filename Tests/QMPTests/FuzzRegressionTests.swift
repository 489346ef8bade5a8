import ColorunTestSupport
import JSON
import NIOCore
import Testing
@testable import QMP

/// Inputs and properties from fuzzing the decoder (scripts/fuzz, Fuzz/FuzzQMP). The first
/// input stopped the fuzzer's round-trip property: an exponent past Double's range parses
/// to infinity (as QEMU's strtod-based parser does), which the encoder writes as `null` by
/// design. The fuzzer now checks the round trip modulo that rule; these pin it down.
@Suite(.timeLimit(.minutes(1)), .machine(.shared)) struct FuzzRegressionTests {
    @Test func outOfRangeExponentParsesAsInfinityAndEncodesAsNull() throws {
        let value = try JSONParser.parse("[1, -2.5e9223372036854775807]\n")
        #expect(value == .array([.int(1), .double(-.infinity)]))
        #expect(String(decoding: JSONEncoding.encode(value), as: UTF8.self) == "[1,null]")
    }

    /// The line decoder gives the same values whatever the reads look like.
    @Test(arguments: [1, 2, 3, 7, 64])
    func lineDecoderIgnoresHowInputIsSplit(_ chunk: Int) throws {
        let text = #"{"return": {}, "id": 1}"# + "\r\n\n" + #"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}"# + "\r\n"
        let input = Array(text.utf8)
        var decoder = QMPJSONLineDecoder(maxLineLength: 4096)
        var buffer = ByteBufferAllocator().buffer(capacity: input.count)
        var values: [JSONValue] = []
        var offset = 0
        while offset < input.count {
            let end = min(input.count, offset + chunk)
            buffer.writeBytes(input[offset..<end])
            offset = end
            while let value = try decoder.nextValue(from: &buffer) { values.append(value) }
        }
        #expect(values.count == 2)
        #expect(values[0]["id"] == 1)
        guard case .event(let event) = try QMPServerMessage(json: values[1]) else {
            Issue.record("not an event: \(values[1])")
            return
        }
        #expect(event.name == "STOP")
        #expect(abs(event.timestamp - 1.000002) < 1e-9)
    }
}
