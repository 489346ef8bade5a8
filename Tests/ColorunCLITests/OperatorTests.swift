import ColorunTestSupport
@testable import Colorun
@testable import ColorunOperator
import JSON
import Logging
@testable import LuaRuntime
import QMP
import Synchronization
import Testing

@Suite(.timeLimit(.minutes(1)), .machine(.shared)) struct SummaryTests {
    func report(_ outcome: LuaRunOutcome = .stopped) -> PolicyReport {
        var report = PolicyReport(outcome: outcome)
        report.checkpoints = 100
        report.failedCheckpoints = 2
        report.skippedTicks = 1
        report.pauseMilliseconds = (1...100).map { Double($0) / 10 }  // 0.1 ... 10.0 ms
        report.failovers = 1
        report.lastGood = ["web-p+web-s": 98, "db": 7]
        report.recovered = ["db"]
        report.resumedAtExit = ["web-p"]
        report.unresumed = ["web-s: ConnectFailed: no such file"]
        return report
    }

    @Test func summaryHasEveryPart() {
        let text = PolicySummary.format(report(), policy: "ha.lua", elapsedSeconds: 125)
        #expect(text.contains("colorun: ha.lua stopped after 2m05s"))
        #expect(text.contains("checkpoints:   100 ok, 2 failed, 1 skipped tick(s)"))
        #expect(text.contains("pause:         p50 5.00 ms, p99 9.90 ms, max 10.0 ms"))
        #expect(text.contains("failovers:     1"))
        #expect(text.contains("last good:     db generation 7"))
        #expect(text.contains("web-p+web-s generation 98"))
        #expect(text.contains("recovered:     db"))
        #expect(text.contains("resumed:       web-p"))
        #expect(text.contains("NOT RESUMED:   web-s: ConnectFailed: no such file"))
    }

    @Test func emptyAndFailedRuns() {
        let empty = PolicySummary.format(PolicyReport(outcome: .finished), policy: "p.lua", elapsedSeconds: 0.04)
        #expect(empty.contains("p.lua finished after 0.0s"))
        #expect(empty.contains("pause:         -"))
        #expect(!empty.contains("NOT RESUMED"))
        let failure = LuaTaskFailure(task: "main", message: "p.lua:3: boom", traceback: "stack traceback: ...")
        let failed = PolicySummary.format(PolicyReport(outcome: .failed(failure)), policy: "p.lua", elapsedSeconds: 3)
        #expect(failed.contains("p.lua FAILED after 3.0s"))
        #expect(failed.contains("error:         p.lua:3: boom"))
    }

    @Test func percentilesAndUnits() {
        #expect(PolicySummary.percentile([1, 2, 3, 4], 0.5) == 2)
        #expect(PolicySummary.percentile([1, 2, 3, 4], 0.99) == 4)
        #expect(PolicySummary.percentile([7], 0.99) == 7)
        #expect(PolicySummary.milliseconds(0.4234) == "0.42 ms")
        #expect(PolicySummary.milliseconds(123.4) == "123 ms")
        #expect(PolicySummary.milliseconds(1250) == "1.25 s")
        #expect(PolicySummary.elapsed(7300) == "2h01m")
    }

    @Test func statusLine() {
        var status = PolicyStatus()
        #expect(status.line() == "checkpoints 0 ok, 0 failed | last pause - | generation -")
        status.checkpoints = 42
        status.failedCheckpoints = 1
        status.lastPauseMilliseconds = 3.14159
        status.lastGeneration = 42
        status.failovers = 1
        #expect(status.line(elapsedSeconds: 61) == "1m01s | checkpoints 42 ok, 1 failed | last pause 3.14 ms | generation 42 | failovers 1")
    }
}

@Suite(.timeLimit(.minutes(1)), .machine(.shared)) struct JSONLogTests {
    @Test func linesAreJSONObjects() throws {
        let line = JSONLogHandler.line(
            timestamp: "2026-11-26T22:41:07.123Z", level: .warning, label: "colorun",
            message: "resumed \"web-p\"\nafter a crash\u{1}",
            metadata: ["domain": "web-p", "n": .stringConvertible(3), "list": ["a", "b"], "nested": ["k": "v"]])
        #expect(!line.contains("\n"))
        let value = try JSONParser.parse(line)
        #expect(value["ts"]?.stringValue == "2026-11-26T22:41:07.123Z")
        #expect(value["level"]?.stringValue == "warning")
        #expect(value["message"]?.stringValue == "resumed \"web-p\"\nafter a crash\u{1}")
        #expect(value["metadata"]?["domain"]?.stringValue == "web-p")
        #expect(value["metadata"]?["n"]?.stringValue == "3")
        #expect(value["metadata"]?["list"]?.arrayValue?.count == 2)
        #expect(value["metadata"]?["nested"]?["k"]?.stringValue == "v")
        #expect(line.hasPrefix("{\"ts\":"))
    }

    @Test func handlerWritesOneObjectPerEvent() throws {
        let sink = LogCollector()
        var logger = Logger(label: "colorun") { label in JSONLogHandler(label: label, write: { sink.append($0) }) }
        logger[metadataKey: "policy"] = "ha.lua"
        logger.info("checkpoint", metadata: ["generation": "4"])
        logger.debug("not shown at info")
        let lines = sink.lines
        #expect(lines.count == 1)
        let value = try JSONParser.parse(lines[0])
        #expect(value["metadata"]?["policy"]?.stringValue == "ha.lua")
        #expect(value["metadata"]?["generation"]?.stringValue == "4")
        let ts = value["ts"]?.stringValue ?? ""
        #expect(ts.count == 24 && ts.hasSuffix("Z"))
    }
}

@Suite(.timeLimit(.minutes(1)), .machine(.shared)) struct QMPOneShotTests {
    @Test func parsesEndpointAndArguments() throws {
        let (endpoint, args) = try QMPOneShot.parse(endpoint: "unix:/tmp/x.sock", arguments: #"{"filename": "/tmp/s", "live": false}"#)
        #expect(endpoint.description == "unix:/tmp/x.sock")
        #expect(args?["filename"] == .string("/tmp/s"))
        #expect(throws: QMPOneShot.Failure.self) { try QMPOneShot.parse(endpoint: "/tmp/x.sock", arguments: nil) }
        #expect(throws: QMPOneShot.Failure.self) { try QMPOneShot.parse(endpoint: "unix:/x", arguments: "[1]") }
        #expect(throws: QMPOneShot.Failure.self) { try QMPOneShot.parse(endpoint: "unix:/x", arguments: "{") }
    }

    @Test func prettyPrints() {
        let value: JSONValue = ["status": "running", "running": true, "list": [1, 2], "empty": [:]]
        #expect(QMPOneShot.pretty(value) == """
            {
              "empty": {},
              "list": [
                1,
                2
              ],
              "running": true,
              "status": "running"
            }
            """)
    }

    @Test func metricsListenAddresses() throws {
        #expect(try MetricsServer.parseListenAddress("127.0.0.1:9464") == ("127.0.0.1", 9464))
        #expect(try MetricsServer.parseListenAddress("[::1]:9464") == ("::1", 9464))
        #expect(try MetricsServer.parseListenAddress(":9464") == ("0.0.0.0", 9464))
        #expect(throws: PolicyError.self) { try MetricsServer.parseListenAddress("9464") }
        #expect(throws: PolicyError.self) { try MetricsServer.parseListenAddress("host:99999") }
    }
}
