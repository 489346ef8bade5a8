import JSON
import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Frames QMP's newline-delimited JSON: hands out each line's content, without its line end.
///
/// Lines may end in LF or CRLF (QEMU sends CRLF). Blank lines are skipped. A line longer
/// than `maxLineLength` is a `QMPProtocolError`: the pipeline's owner closes the connection;
/// nothing traps. The decoders below parse what it hands out.
public struct QMPLineFramer {
    /// QEMU's replies are small; a device-state dump is never sent inline. 16 MiB is generous.
    public static let defaultMaxLineLength = 16 * 1024 * 1024

    public let maxLineLength: Int
    /// How many bytes at the buffer's reader index were scanned already without a newline.
    private var scanned = 0

    public init(maxLineLength: Int = QMPLineFramer.defaultMaxLineLength) {
        self.maxLineLength = maxLineLength
    }

    /// Calls `body` with the content of the next complete line in `buffer` (consumed) and
    /// returns its result, or returns nil when `buffer` holds no complete line yet.
    public mutating func nextLine<T>(
        from buffer: inout ByteBuffer, _ body: (UnsafeRawBufferPointer) throws(QMPProtocolError) -> T
    ) throws(QMPProtocolError) -> T? {
        while true {
            // memchr over the bytes not yet scanned: a long line arriving in many reads is
            // scanned once, at memory speed (a byte-wise walk of ByteBufferView is slow,
            // dramatically so in debug builds).
            let scanFrom = scanned
            let found: Int? = buffer.withUnsafeReadableBytes { raw in
                guard raw.count > scanFrom, let base = raw.baseAddress,
                    let hit = memchr(base + scanFrom, 0x0A, raw.count - scanFrom)
                else { return nil }
                return base.distance(to: UnsafeRawPointer(hit))
            }
            guard let length = found else {
                scanned = buffer.readableBytes
                if scanned > maxLineLength { throw .lineTooLong(limit: maxLineLength) }
                return nil
            }
            scanned = 0
            if length > maxLineLength {
                throw .lineTooLong(limit: maxLineLength)
            }
            let result: Result<T, QMPProtocolError>? = buffer.readWithUnsafeReadableBytes { raw in
                var content = UnsafeRawBufferPointer(rebasing: raw.prefix(length))
                if let last = content.last, last == UInt8(ascii: "\r") {
                    content = UnsafeRawBufferPointer(rebasing: content.dropLast())
                }
                if content.allSatisfy({ $0 == 0x20 || $0 == 0x09 }) { return (length + 1, nil) }
                do throws(QMPProtocolError) {
                    return (length + 1, .success(try body(content)))
                } catch {
                    return (length + 1, .failure(error))
                }
            }
            switch result {
            case nil: continue  // a blank line
            case .success(let value): return value
            case .failure(let error): throw error
            }
        }
    }
}

/// Frames QMP's lines and classifies each as a `QMPServerMessage`, without building the
/// top-level JSON object (see `QMPServerMessage.init(line:)`): the client's decoder.
public struct QMPServerMessageDecoder {
    private var framer: QMPLineFramer

    public init(maxLineLength: Int = QMPLineFramer.defaultMaxLineLength) {
        framer = QMPLineFramer(maxLineLength: maxLineLength)
    }

    /// The next message, or nil when `buffer` holds no complete line yet.
    public mutating func nextMessage(from buffer: inout ByteBuffer) throws(QMPProtocolError) -> QMPServerMessage? {
        try framer.nextLine(from: &buffer) { line throws(QMPProtocolError) in try QMPServerMessage(line: line) }
    }
}

/// Frames QMP's lines and parses each into a `JSONValue`: for a reader that wants the whole
/// object (a test's fake QMP server reading commands, the fuzzer's round-trip property).
public struct QMPJSONLineDecoder: ByteToMessageDecoder {
    public typealias InboundOut = JSONValue

    public static let defaultMaxLineLength = QMPLineFramer.defaultMaxLineLength

    private var framer: QMPLineFramer
    public var maxLineLength: Int { framer.maxLineLength }

    public init(maxLineLength: Int = QMPJSONLineDecoder.defaultMaxLineLength) {
        framer = QMPLineFramer(maxLineLength: maxLineLength)
    }

    public mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let value = try nextValue(from: &buffer) else { return .needMoreData }
        context.fireChannelRead(Self.wrapInboundOut(value))
        return .continue
    }

    public mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        // A trailing partial line at EOF is dropped: QEMU always ends its lines.
        try decode(context: context, buffer: &buffer)
    }

    /// The framing and parsing, without a channel: returns the next value, or nil when
    /// `buffer` holds no complete line yet.
    public mutating func nextValue(from buffer: inout ByteBuffer) throws(QMPProtocolError) -> JSONValue? {
        try framer.nextLine(from: &buffer) { line throws(QMPProtocolError) in
            do throws(JSONParseError) { return try JSONParser.parse(line) } catch { throw .malformedJSON(error) }
        }
    }
}

/// Writes a `JSONValue` as one line of JSON (CRLF from a server, as QEMU does; LF from a client).
public struct QMPJSONLineEncoder: MessageToByteEncoder {
    public typealias OutboundIn = JSONValue

    public let lineEnding: [UInt8]

    public init(crlf: Bool) {
        lineEnding = crlf ? [0x0D, 0x0A] : [0x0A]
    }

    public func encode(data: JSONValue, out: inout ByteBuffer) throws {
        out.writeBytes(JSONEncoding.encode(data))
        out.writeBytes(lineEnding)
    }
}

/// Writes client commands straight into a channel's buffer, one line each (LF).
///
/// The bytes are those of `QMPJSONLineEncoder(crlf: false)` applied to `QMPCommand.json`
/// (compact, keys sorted: `arguments`, `exec-oob`/`execute`, `id`), without building the
/// `JSONValue` tree, sorting its keys or copying through an intermediate array: a command
/// without arguments (`query-status`, `stop`, `cont`) costs no allocation besides the buffer.
/// Compact matters beyond our CPU: QEMU reads a command one byte per main-loop iteration.
public enum QMPCommandLineEncoder {
    /// The bytes the line of `name` with `arguments` and `id` will take, about (a capacity hint).
    public static func estimatedLength(name: String, hasArguments: Bool) -> Int {
        name.utf8.count + 40 + (hasArguments ? 128 : 0)
    }

    public static func write(name: String, arguments: [String: JSONValue]?, id: Int64?, outOfBand: Bool = false,
                             into out: inout ByteBuffer) {
        out.writeStaticString("{")
        if let arguments {
            out.writeStaticString("\"arguments\":")
            out.writeBytes(JSONEncoding.encode(.object(arguments)))
            out.writeStaticString(",")
        }
        out.writeStaticString(outOfBand ? "\"exec-oob\":" : "\"execute\":")
        if name.utf8.allSatisfy({ $0 >= 0x20 && $0 != UInt8(ascii: "\"") && $0 != UInt8(ascii: "\\") }) {
            out.writeStaticString("\"")
            out.writeString(name)
            out.writeStaticString("\"")
        } else {
            var escaped: [UInt8] = []
            JSONEncoding.writeString(name, into: &escaped)
            out.writeBytes(escaped)
        }
        if let id {
            out.writeStaticString(",\"id\":")
            writeDecimal(id, into: &out)
        }
        out.writeStaticString("}\n")
    }

    /// `String(value)`'s digits without making the String.
    static func writeDecimal(_ value: Int64, into out: inout ByteBuffer) {
        if value < 0 { out.writeStaticString("-") }
        var magnitude = value.magnitude
        var digits: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)  // 32 bytes: 20 digits fit
        let count = withUnsafeMutableBytes(of: &digits) { raw -> Int in
            var i = raw.count
            repeat {
                i -= 1
                raw[i] = UInt8(ascii: "0") + UInt8(magnitude % 10)
                magnitude /= 10
            } while magnitude > 0
            return raw.count - i
        }
        _ = withUnsafeBytes(of: &digits) { raw in
            out.writeBytes(UnsafeRawBufferPointer(rebasing: raw[(raw.count - count)...]))
        }
    }
}
