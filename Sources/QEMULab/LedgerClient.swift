import NIOCore
import NIOPosix

/// Why a ledger request failed.
public enum LedgerError: Error, Sendable, Hashable, CustomStringConvertible {
    /// No ledger answered at the address before the deadline (the guest is not up, or gone).
    case connectFailed(port: Int, reason: String)
    /// The connection closed before the reply (the guest or its QEMU went away).
    case closed(request: String)
    /// No reply within the timeout.
    case timedOut(request: String)
    /// The guest answered something else (e.g. `error 7 fdatasync:I/O error`).
    case unexpectedReply(request: String, reply: String)
    /// Not sent: a record's text cannot hold a line break.
    case invalidText(String)

    public var description: String {
        switch self {
        case .connectFailed(let port, let reason): return "ledger at 127.0.0.1:\(port): cannot connect: \(reason)"
        case .closed(let request): return "ledger: connection closed before the reply to `\(request)`"
        case .timedOut(let request): return "ledger: no reply to `\(request)` in time"
        case .unexpectedReply(let request, let reply): return "ledger: `\(request)` answered `\(reply)`"
        case .invalidText(let text): return "ledger: a record's text cannot hold a line break: \(text.debugDescription)"
        }
    }
}

/// What a ledger holds: the record numbers of its valid records in file order, and how many
/// lines failed their checksum.
public struct LedgerContents: Sendable, Hashable {
    public var records: [Int]
    public var bad: Int

    public init(records: [Int], bad: Int) {
        self.records = records
        self.bad = bad
    }
}

/// A client of the Linux guest's ledger (guest/colorun-guest.c): one TCP connection, one
/// request at a time, each answered by one line.
public final class LedgerClient: Sendable {
    public let port: Int
    private let channel: any Channel
    private let handler: NIOLoopBound<LedgerLineHandler>

    private init(port: Int, channel: any Channel, handler: NIOLoopBound<LedgerLineHandler>) {
        self.port = port
        self.channel = channel
        self.handler = handler
    }

    /// Connects to 127.0.0.1:`port` and checks that a ledger answers `ping`. Retries until
    /// `timeout`: QEMU's user network accepts a forwarded connection even when nothing listens
    /// in the guest yet, and then closes it.
    public static func connect(
        port: Int, on group: any EventLoopGroup, timeout: Duration = .seconds(10)
    ) async throws(LedgerError) -> LedgerClient {
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        var lastReason = "timed out"
        while true {
            let remaining = deadline - clock.now
            if remaining <= .zero { throw .connectFailed(port: port, reason: lastReason) }
            do {
                let client = try await attempt(port: port, on: group, timeout: min(remaining, .seconds(2)))
                do {
                    let reply = try await client.request("ping", timeout: min(remaining, .seconds(5)))
                    if reply == "pong" { return client }
                    lastReason = "`ping` answered `\(reply)`"
                } catch {
                    lastReason = error.description
                }
                client.close()
            } catch {
                lastReason = "\(error)"
            }
            try? await Task.sleep(for: .milliseconds(50))
        }
    }

    private static func attempt(port: Int, on group: any EventLoopGroup, timeout: Duration) async throws -> LedgerClient {
        let loop = group.next()
        let channel = try await ClientBootstrap(group: loop)
            .connectTimeout(.nanoseconds(Int64(timeout.components.seconds) * 1_000_000_000 + timeout.components.attoseconds / 1_000_000_000))
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(LedgerLineHandler())
                }
            }
            .connect(host: "127.0.0.1", port: port).get()
        let handler = try await loop.submit {
            NIOLoopBound(try channel.pipeline.syncOperations.handler(type: LedgerLineHandler.self), eventLoop: loop)
        }.get()
        return LedgerClient(port: port, channel: channel, handler: handler)
    }

    /// Sends one request line and returns the reply line.
    public func request(_ line: String, timeout: Duration = .seconds(10)) async throws(LedgerError) -> String {
        try await exchange(line, until: { _ in true }, timeout: timeout).last!
    }

    /// Sends one request line and collects reply lines up to the one `isLast` accepts.
    private func exchange(_ line: String, until isLast: @escaping @Sendable (String) -> Bool, timeout: Duration) async throws(LedgerError) -> [String] {
        let handler = self.handler
        let channel = self.channel
        let loop = channel.eventLoop
        let nanos = Int64(timeout.components.seconds) * 1_000_000_000 + timeout.components.attoseconds / 1_000_000_000
        let future: EventLoopFuture<[String]> = loop.flatSubmit {
            let promise = loop.makePromise(of: [String].self)
            handler.value.expect(promise, isLast: isLast)
            channel.writeAndFlush(channel.allocator.buffer(string: line + "\n"), promise: nil)
            let timer = loop.scheduleTask(in: .nanoseconds(nanos)) {
                handler.value.fail(LedgerError.timedOut(request: line))
                channel.close(promise: nil)
            }
            promise.futureResult.whenComplete { _ in timer.cancel() }
            return promise.futureResult
        }
        do {
            return try await future.get()
        } catch let error as LedgerError {
            if case .closed = error { throw .closed(request: line) }
            throw error
        } catch {
            throw .closed(request: line)
        }
    }

    /// Appends record `number` (with optional `text`, no newlines) and returns once the guest
    /// has answered `ack number`, i.e. once the record is durable on the guest's disk.
    public func record(_ number: Int, text: String = "", timeout: Duration = .seconds(10)) async throws(LedgerError) {
        guard !text.contains(where: \.isNewline) else { throw .invalidText(text) }
        let line = text.isEmpty ? "record \(number)" : "record \(number) \(text)"
        let reply = try await request(line, timeout: timeout)
        guard reply == "ack \(number)" else { throw .unexpectedReply(request: line, reply: reply) }
    }

    /// The number of valid records and of lines that failed their checksum.
    public func count(timeout: Duration = .seconds(10)) async throws(LedgerError) -> (records: Int, bad: Int) {
        let reply = try await request("count", timeout: timeout)
        let fields = reply.split(separator: " ")
        guard fields.count == 3, fields[0] == "count", let records = Int(fields[1]), let bad = Int(fields[2]) else {
            throw .unexpectedReply(request: "count", reply: reply)
        }
        return (records, bad)
    }

    /// Every valid record's number, in the order they are in the ledger file.
    public func dump(timeout: Duration = .seconds(30)) async throws(LedgerError) -> LedgerContents {
        let lines = try await exchange("dump", until: { !$0.hasPrefix("r ") }, timeout: timeout)
        var records: [Int] = []
        records.reserveCapacity(lines.count)
        for line in lines.dropLast() {
            guard let number = Int(line.dropFirst(2)) else { throw .unexpectedReply(request: "dump", reply: line) }
            records.append(number)
        }
        let fields = lines.last!.split(separator: " ")
        guard fields.count == 3, fields[0] == "end", let count = Int(fields[1]), let bad = Int(fields[2]), count == records.count else {
            throw .unexpectedReply(request: "dump", reply: lines.last!)
        }
        return LedgerContents(records: records, bad: bad)
    }

    /// The boot's filesystem check of the guest's disk: "clean", "errors RC" (e2fsck -fn's
    /// exit code) or "none" (no disk).
    public func fsck(timeout: Duration = .seconds(10)) async throws(LedgerError) -> String {
        let reply = try await request("fsck", timeout: timeout)
        guard reply.hasPrefix("fsck ") else { throw .unexpectedReply(request: "fsck", reply: reply) }
        return String(reply.dropFirst(5))
    }

    /// Starts the memory mode: a process in the guest fills `mebibytes` MiB and then keeps
    /// writing to every page of it, `pagesPerSecond` pages a second (0: as fast as it can).
    /// Returns once the memory is filled. `dirty(mebibytes: 0)` stops it.
    public func dirty(mebibytes: Int, pagesPerSecond: Int = 0, timeout: Duration = .seconds(60)) async throws(LedgerError) {
        let line = "dirty \(mebibytes) \(pagesPerSecond)"
        let reply = try await request(line, timeout: timeout)
        guard reply == "dirty ready \(mebibytes)" else { throw .unexpectedReply(request: line, reply: reply) }
    }

    /// Asks the guest to sync, unmount its disk and power off (QEMU then exits, given
    /// `-no-reboot`). Returns once the guest said `bye`.
    public func powerOff(timeout: Duration = .seconds(10)) async throws(LedgerError) {
        let reply = try await request("poweroff", timeout: timeout)
        guard reply == "bye" else { throw .unexpectedReply(request: "poweroff", reply: reply) }
    }

    public func close() {
        channel.close(promise: nil)
    }

    deinit {
        channel.close(promise: nil)
    }
}

/// Splits the ledger's replies into lines and hands them to the one pending request.
final class LedgerLineHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    private var buffer: [UInt8] = []
    private var collected: [String] = []
    private var pending: (promise: EventLoopPromise<[String]>, isLast: @Sendable (String) -> Bool)?
    private var closed = false

    func expect(_ promise: EventLoopPromise<[String]>, isLast: @escaping @Sendable (String) -> Bool) {
        if closed {
            promise.fail(LedgerError.closed(request: ""))
            return
        }
        precondition(pending == nil, "one ledger request at a time")
        collected = []
        pending = (promise, isLast)
    }

    func fail(_ error: any Error) {
        guard let pending else { return }
        self.pending = nil
        pending.promise.fail(error)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let bytes = unwrapInboundIn(data)
        buffer.append(contentsOf: bytes.readableBytesView)
        while let newline = buffer.firstIndex(of: UInt8(ascii: "\n")) {
            var line = String(decoding: buffer[..<newline], as: UTF8.self)
            buffer.removeSubrange(...newline)
            if line.hasSuffix("\r") { line.removeLast() }
            guard let pending else { continue }  // nothing asked for it
            collected.append(line)
            if pending.isLast(line) {
                self.pending = nil
                pending.promise.succeed(collected)
            }
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        closed = true
        fail(LedgerError.closed(request: ""))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        fail(LedgerError.closed(request: ""))
        context.close(promise: nil)
    }
}
