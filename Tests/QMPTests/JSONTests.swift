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

    /// The client classifies each line without building its top-level object
    /// (`QMPServerMessage(line:)`); the message, or the error, must be the tree path's.
    @Test(arguments: [
        #"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}"#,
        #"{"return": {"status": "running", "singlestep": false, "running": true}}"#,
        #"{"return": {}, "id": 12}"#, #"{"id": "x", "return": [1, 2.5, null]}"#, #"  {"return":{}}  "#,
        #"{"error": {"class": "CommandNotFound", "desc": "The command nonexistent has not been found"}}"#,
        #"{"error": "odd"}"#,
        #"{"timestamp": {"seconds": 1796288449, "microseconds": 978069}, "event": "STOP"}"#,
        #"{"event": "BLOCK_JOB_READY", "data": {"device": "mirror0", "len": 16777216}, "timestamp": {"seconds": 1, "microseconds": 2}}"#,
        #"{"return": 1, "return": 2}"#, #"{"event": "A", "return": {}}"#, #"{"x": 1, "QMP": {}, "return": 3}"#,
        #"{"re\u0074urn": 5}"#, #"{"event": 5}"#, #"{}"#, #"{"unknown": true}"#, "[1]", "null", #""s""#, "3",
        "{", "{ ", #"{"return""#, #"{"return": "#, #"{"return": 1"#, #"{"return": 1,"#, #"{"return": 1,}"#,
        #"{"return" 1}"#, #"{1: 2}"#, #"{"return": 1} x"#, #"{"return": [}"#, #"{"return": tru}"#, "",
        #"{"return": "\ud800"}"#, #"{"return": 123456789012345678901234567890}"#, #"{"return": -9223372036854775808}"#,
        #"{"return": "#, String(repeating: "[", count: 300) + String(repeating: "]", count: 300),
        #"{"return": "# + String(repeating: "[", count: 300) + String(repeating: "]", count: 300) + "}",
    ])
    func lineClassifierAgreesWithTheTreePath(_ text: String) {
        typealias Outcome = Result<QMPServerMessage, QMPProtocolError>
        let bytes = Array(text.utf8)
        let tree: Outcome = bytes.withUnsafeBytes { raw in
            do throws(QMPProtocolError) { return .success(try QMPServerMessage(parsingWholeObject: raw)) } catch { return .failure(error) }
        }
        let line: Outcome = bytes.withUnsafeBytes { raw in
            do throws(QMPProtocolError) { return .success(try QMPServerMessage(line: raw)) } catch { return .failure(error) }
        }
        #expect(line == tree)
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
