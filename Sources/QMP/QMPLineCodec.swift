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
