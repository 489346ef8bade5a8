import JSON
import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Frames QMP's newline-delimited JSON and parses each line into a `JSONValue`.
///
/// Lines may end in LF or CRLF (QEMU sends CRLF). Blank lines are skipped. A line longer
/// than `maxLineLength` or one that is not JSON is a `QMPProtocolError`: the pipeline's
/// owner closes the connection; nothing traps.
public struct QMPJSONLineDecoder: ByteToMessageDecoder {
    public typealias InboundOut = JSONValue

    /// QEMU's replies are small; a device-state dump is never sent inline. 16 MiB is generous.
    public static let defaultMaxLineLength = 16 * 1024 * 1024

    public let maxLineLength: Int
    private var scanned = 0

    public init(maxLineLength: Int = QMPJSONLineDecoder.defaultMaxLineLength) {
        self.maxLineLength = maxLineLength
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
            var line = buffer.readSlice(length: length + 1)!
            var contentLength = length
            if contentLength > 0, line.getInteger(at: line.readerIndex + contentLength - 1, as: UInt8.self) == UInt8(ascii: "\r") {
                contentLength -= 1
            }
            let isBlank = line.readableBytesView.prefix(contentLength).allSatisfy { $0 == 0x20 || $0 == 0x09 }
            if isBlank { continue }
            let result: Result<JSONValue, JSONParseError> = line.readWithUnsafeReadableBytes { raw in
                let content = UnsafeRawBufferPointer(rebasing: raw.prefix(contentLength))
                do throws(JSONParseError) {
                    return (raw.count, .success(try JSONParser.parse(content)))
                } catch {
                    return (raw.count, .failure(error))
                }
            }
            switch result {
            case .success(let value): return value
            case .failure(let error): throw .malformedJSON(error)
            }
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
public enum QMPCommandLineEncoder {
    /// The bytes the line of `name` with `arguments` and `id` will take, about (a capacity hint).
    public static func estimatedLength(name: String, hasArguments: Bool) -> Int {
        name.utf8.count + 40 + (hasArguments ? 128 : 0)
    }

    public static func write(name: String, arguments: [String: JSONValue]?, id: Int64, outOfBand: Bool = false,
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
        out.writeStaticString(",\"id\":")
        writeDecimal(id, into: &out)
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
