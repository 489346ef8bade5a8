// libFuzzer target for colorun's QMP decoding: JSONParser.parse, QMPJSONLineDecoder.nextValue,
// QMPServerMessage(json:) and QMPServerMessage(line:). Built and run only by scripts/fuzz (COLORUN_FUZZ=1, -sanitize=fuzzer).
//
// Properties checked beyond "does not crash":
//   - a value the parser accepts encodes to JSON that parses back to an equal value (after
//     mapping non-finite doubles, e.g. from 1e400, to null: the encoder's documented rule);
//   - the line decoder gives the same values whatever the input is split into;
//   - the client's line classifier (no tree of the whole message) gives the tree path's
//     message, or its error, for any input.
import FuzzDriver
import JSON
import NIOCore
#if canImport(Glibc)
import Glibc
#endif
import QMP

func check(_ condition: Bool, _ message: @autoclosure () -> String) {
    if !condition {
        let text = Array("FUZZ PROPERTY FAILED: \(message())\n".utf8)
        _ = text.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
        abort()
    }
}

/// What the encoder makes of a value: non-finite doubles become null.
func normalized(_ value: JSONValue) -> JSONValue {
    switch value {
    case .double(let d) where !d.isFinite: return .null
    case .array(let elements): return .array(elements.map(normalized))
    case .object(let members): return .object(members.mapValues(normalized))
    default: return value
    }
}

func decodeLines(_ bytes: UnsafeRawBufferPointer, chunk: Int) -> [JSONValue]? {
    var decoder = QMPJSONLineDecoder(maxLineLength: 4096)
    var buffer = ByteBufferAllocator().buffer(capacity: bytes.count)
    var values: [JSONValue] = []
    var offset = 0
    while offset < bytes.count {
        let end = min(bytes.count, offset + chunk)
        buffer.writeBytes(UnsafeRawBufferPointer(rebasing: bytes[offset..<end]))
        offset = end
        do {
            while let value = try decoder.nextValue(from: &buffer) {
                values.append(value)
                _ = try? QMPServerMessage(json: value)
            }
        } catch {
            return nil  // a protocol error: the connection would be closed
        }
    }
    return values
}

func classifyByTree(_ bytes: UnsafeRawBufferPointer) -> Result<QMPServerMessage, QMPProtocolError> {
    do throws(QMPProtocolError) { return .success(try QMPServerMessage(parsingWholeObject: bytes)) } catch { return .failure(error) }
}

func classifyByLine(_ bytes: UnsafeRawBufferPointer) -> Result<QMPServerMessage, QMPProtocolError> {
    do throws(QMPProtocolError) { return .success(try QMPServerMessage(line: bytes)) } catch { return .failure(error) }
}

func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard let data else { return 0 }
    let bytes = UnsafeRawBufferPointer(start: data, count: size)
    let byTree = classifyByTree(bytes), byLine = classifyByLine(bytes)
    check(byTree == byLine, "the line classifier differs from the tree path: \(byLine) vs \(byTree)")
    if let value = try? JSONParser.parse(bytes) {
        _ = try? QMPServerMessage(json: value)
        let encoded = JSONEncoding.encode(value)
        let again: JSONValue
        do {
            again = try JSONParser.parse(encoded)
        } catch {
            check(false, "encoding of an accepted value does not parse: \(error); encoded \(String(decoding: encoded, as: UTF8.self))")
            return 0
        }
        check(again == normalized(value), "round trip changed the value: \(value) -> \(again)")
    }
    let whole = decodeLines(bytes, chunk: max(size, 1))
    let split = decodeLines(bytes, chunk: size > 0 ? Int(bytes[0] % 7) + 1 : 1)
    if let whole, let split {
        check(whole == split, "line decoder depends on how the input is split: \(whole) vs \(split)")
    }
    return 0
}

runFuzzer { data, size in fuzzOne(data, size) }
