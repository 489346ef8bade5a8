import JSON
import NIOCore
import QMP

/// Splits a client's byte stream into JSON values as QEMU's JSON streamer does: a value
/// ends where its braces balance, not at a newline (`{...}{...}` is two commands, and one
/// command may span reads and lines). A parse error becomes `QMPInput.invalid` with
/// QEMU's wording where the simulator knows it; the stream goes on after it.
public struct QMPInputSplitter: Sendable {
    /// QEMU's limit on one token (64 MiB); past it the value is discarded with an error.
    public static let defaultMaxValueLength = 64 * 1024 * 1024

    public let maxValueLength: Int
    private var pending: [UInt8] = []
    private var depth = 0
    private var inString = false
    private var escaped = false
    private var stringStart = 0
    /// Bytes of `pending` already scanned.
    private var scanned = 0

    public init(maxValueLength: Int = QMPInputSplitter.defaultMaxValueLength) {
        self.maxValueLength = maxValueLength
    }

    /// Feeds bytes and returns every input completed by them.
    public mutating func feed(_ bytes: some Sequence<UInt8>) -> [QMPInput] {
        pending.append(contentsOf: bytes)
        var out: [QMPInput] = []
        var i = scanned
        while i < pending.count {
            let byte = pending[i]
            if inString {
                if escaped {
                    escaped = false
                } else if byte == UInt8(ascii: "\\") {
                    escaped = true
                } else if byte == UInt8(ascii: "\"") {
                    inString = false
                    if depth == 0 {
                        out.append(Self.parse(pending[0...i]))
                        consume(through: i)
                        i = 0
                        continue
                    }
                } else if byte < 0x20 {
                    let token = String(decoding: pending[stringStart...i], as: UTF8.self)
                    out.append(.invalid(desc: "JSON parse error, stray '\(token)'"))
                    consume(through: i)
                    i = 0
                    continue
                }
                i += 1
                continue
            }
            switch byte {
            case UInt8(ascii: "\""):
                if depth == 0, let scalarEnd = scalarBefore(i) {
                    out.append(Self.parse(pending[0..<scalarEnd]))
                    consume(through: scalarEnd - 1)
                    i = 0
                    continue
                }
                inString = true
                stringStart = i
            case UInt8(ascii: "{"), UInt8(ascii: "["):
                if depth == 0, let scalarEnd = scalarBefore(i) {
                    out.append(Self.parse(pending[0..<scalarEnd]))
                    consume(through: scalarEnd - 1)
                    i = 0
                    continue
                }
                depth += 1
            case UInt8(ascii: "}"), UInt8(ascii: "]"):
                if depth == 0 {
                    if let scalarEnd = scalarBefore(i) {
                        out.append(Self.parse(pending[0..<scalarEnd]))
                        consume(through: scalarEnd - 1)
                        i = 0
                        continue
                    }
                    out.append(.invalid(desc: "JSON parse error, expecting value"))
                    consume(through: i)
                    i = 0
                    continue
                }
                depth -= 1
                if depth == 0 {
                    out.append(Self.parse(pending[0...i]))
                    consume(through: i)
                    i = 0
                    continue
                }
            case 0x20, 0x09, 0x0A, 0x0D:
                if depth == 0 {
                    if let scalarEnd = scalarBefore(i) {
                        out.append(Self.parse(pending[0..<scalarEnd]))
                    }
                    consume(through: i)
                    i = 0
                    continue
                }
            default:
                break
            }
            i += 1
        }
        scanned = i
        if pending.count > maxValueLength {
            out.append(.invalid(desc: "JSON parse error, token size limit exceeded"))
            pending.removeAll(keepingCapacity: false)
            reset()
        }
        return out
    }

    /// At depth 0, the end of a bare scalar (a number, a keyword) that precedes `index`.
    private func scalarBefore(_ index: Int) -> Int? {
        let leading = pending[0..<index].firstIndex(where: { ![0x20, 0x09, 0x0A, 0x0D].contains($0) })
        return leading == nil ? nil : index
    }

    private mutating func consume(through index: Int) {
        pending.removeFirst(index + 1)
        reset()
    }

    private mutating func reset() {
        depth = 0
        inString = false
        escaped = false
        scanned = 0
    }

    /// One complete value's text: JSON, or QEMU's parse error.
    static func parse(_ bytes: ArraySlice<UInt8>) -> QMPInput {
        do throws(JSONParseError) {
            return .value(try JSONParser.parse(bytes))
        } catch {
            return .invalid(desc: "JSON parse error, " + qemuReason(bytes, error))
        }
    }

    /// QEMU's words for the commonest JSON errors.
    static func qemuReason(_ bytes: ArraySlice<UInt8>, _ error: JSONParseError) -> String {
        let text = Array(bytes)
        let at = min(error.offset, text.count)
        func isLetter(_ b: UInt8) -> Bool { (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(b | 0x20) }
        if at < text.count, isLetter(text[at]) {
            var end = at
            while end < text.count, isLetter(text[end]) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(text[end]) { end += 1 }
            return "invalid keyword '\(String(decoding: text[at..<end], as: UTF8.self))'"
        }
        switch error.reason {
        case "expected ':'": return "missing : in object pair"
        case "expected a string key": return "key is not a string in object"
        case "expected ',' or '}'": return "expected separator in dict"
        case "expected ',' or ']'": return "expected separator in list"
        default: return "expecting value"
        }
    }
}

/// The NIO face of `QMPInputSplitter`: bytes in, `QMPInput` out.
public struct QMPInputDecoder: ByteToMessageDecoder {
    public typealias InboundOut = QMPInput

    private var splitter: QMPInputSplitter

    public init(maxValueLength: Int = QMPInputSplitter.defaultMaxValueLength) {
        splitter = QMPInputSplitter(maxValueLength: maxValueLength)
    }

    public mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard buffer.readableBytes > 0, let bytes = buffer.readBytes(length: buffer.readableBytes) else { return .needMoreData }
        for input in splitter.feed(bytes) {
            context.fireChannelRead(Self.wrapInboundOut(input))
        }
        return .needMoreData
    }

    public mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        try decode(context: context, buffer: &buffer)
    }
}

/// What the simulator writes: a JSON message (CRLF-terminated, as QEMU) or raw bytes (faults).
public enum QMPServerOutput: Sendable, Hashable {
    case json(JSONValue)
    case raw([UInt8])
}

/// Encodes `QMPServerOutput` onto the wire.
public struct QMPServerOutputEncoder: MessageToByteEncoder {
    public typealias OutboundIn = QMPServerOutput

    public init() {}

    public func encode(data: QMPServerOutput, out: inout ByteBuffer) throws {
        switch data {
        case .json(let value):
            out.writeBytes(JSONEncoding.encode(value))
            out.writeBytes([0x0D, 0x0A])
        case .raw(let bytes):
            out.writeBytes(bytes)
        }
    }
}
