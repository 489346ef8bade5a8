import ColorunTestSupport
import JSON
import Testing
import NIOCore
@testable import QMP

@Suite(.timeLimit(.minutes(1)), .machine(.shared)) struct JSONTests {
    @Test func integersStayIntegers() throws {
        #expect(try JSONParser.parse("1") == .int(1))
        #expect(try JSONParser.parse("1.0") == .double(1))
        #expect(try JSONParser.parse("-12e2") == .double(-1200))
        #expect(try JSONParser.parse("92233720368547758070") == .double(92233720368547758080))
    }

    @Test func roundTripsQEMUReplies() throws {
        let text = #"{"return": {"status": "running", "singlestep": false, "running": true}, "id": 1}"#
        let value = try JSONParser.parse(text)
        #expect(value["return"]?["status"] == "running")
        #expect(value["id"] == 1)
        #expect(try JSONParser.parse(value.description) == value)
    }

    @Test func escapes() throws {
        let value = try JSONParser.parse(#""a\"b\\c\n\u00e9\ud83d\ude00""#)
        #expect(value == .string("a\"b\\c\né😀"))
        #expect(try JSONParser.parse(value.description) == value)
        #expect(JSONValue.string("\u{01}").description == #""\u0001""#)
    }

    @Test(arguments: ["", "{", "[1,]", "{\"a\" 1}", "tru", "01", "1.", "\"\u{01}\"", "{} x", "-", "\"\\x\""])
    func rejectsMalformed(_ text: String) {
        #expect(throws: JSONParseError.self) { try JSONParser.parse(text) }
    }

    @Test func boundsNesting() {
        let deep = String(repeating: "[", count: 10_000) + String(repeating: "]", count: 10_000)
        #expect(throws: JSONParseError.self) { try JSONParser.parse(deep) }
    }
}

@Suite(.timeLimit(.minutes(1)), .machine(.shared)) struct LineCodecTests {
    @Test func framesCRLFLinesAcrossReads() throws {
        var decoder = QMPJSONLineDecoder()
        var buffer = ByteBuffer(string: "{\"return\": {}, \"id\": 1}\r\n{\"event\": \"ST")
        #expect(try decoder.nextValue(from: &buffer) == ["return": [:], "id": 1])
        #expect(try decoder.nextValue(from: &buffer) == nil)
        buffer.writeString("OP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 5}}\r\n\r\n")
        let event = try #require(try decoder.nextValue(from: &buffer))
        guard case .event(let e) = try QMPServerMessage(json: event) else { Issue.record("not an event"); return }
        #expect(e.name == "STOP")
        #expect(try decoder.nextValue(from: &buffer) == nil)
    }

    @Test func rejectsOversizedLine() {
        var decoder = QMPJSONLineDecoder(maxLineLength: 16)
        var buffer = ByteBuffer(string: String(repeating: "x", count: 40))
        #expect(throws: QMPProtocolError.lineTooLong(limit: 16)) { try decoder.nextValue(from: &buffer) }
    }

    @Test func scansEachByteOnceAcrossReads() throws {
        var decoder = QMPJSONLineDecoder(maxLineLength: 64)
        var buffer = ByteBuffer()
        let line = #"{"return": {"status": "running"}, "id": 7}"#
        for chunk in line.utf8.map({ [$0] }) {
            buffer.writeBytes(chunk)
            #expect(try decoder.nextValue(from: &buffer) == nil)
        }
        buffer.writeString("\r\n \r\n{\"return\": 1}\n{\"ret")
        #expect(try decoder.nextValue(from: &buffer)?["id"] == 7)
        #expect(try decoder.nextValue(from: &buffer) == ["return": 1])
        #expect(try decoder.nextValue(from: &buffer) == nil)
        buffer.writeString(String(repeating: " ", count: 60))
        #expect(throws: QMPProtocolError.lineTooLong(limit: 64)) { try decoder.nextValue(from: &buffer) }
    }

    @Test func rejectsJunk() {
        var decoder = QMPJSONLineDecoder()
        var buffer = ByteBuffer(string: "junk\n")
        #expect(throws: QMPProtocolError.self) { try decoder.nextValue(from: &buffer) }
    }

    @Test func classifiesErrorReply() throws {
        let json = try JSONParser.parse(#"{"id": 6, "error": {"class": "GenericError", "desc": "Cannot update device state while vm is running"}}"#)
        guard case .reply(let reply) = try QMPServerMessage(json: json) else { Issue.record("not a reply"); return }
        #expect(reply.id == 6)
        #expect(throws: QMPErrorBodyError(QMPErrorBody(errorClass: "GenericError", desc: "Cannot update device state while vm is running"))) {
            try reply.result.get()
        }
    }
}
