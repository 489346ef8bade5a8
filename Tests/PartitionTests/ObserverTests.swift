import ClusterLab
import ColorunTestSupport
import Logging
import NIOPosix
import QEMULab
import QMPClient
import Testing

/// The observer's arithmetic on made-up samples (no QEMU).
@Suite(.timeLimit(.minutes(1)), .machine(.shared))
struct TimelineTests {
    func ms(_ n: Int) -> Duration { .milliseconds(n) }

    func timeline(_ a: [(Int, ObservedState)], _ b: [(Int, ObservedState)], end: Int) -> RunStateTimeline {
        RunStateTimeline(
            samples: ["a": a.map { ObservedSample(at: ms($0.0), state: $0.1) }, "b": b.map { ObservedSample(at: ms($0.0), state: $0.1) }],
            marks: [], end: ms(end))
    }

    @Test func overlapIsTheTimeBothRan() {
        // a runs 0-100 and 200-300; b runs 50-250.
        let t = timeline(
            [(0, .running), (50, .running), (100, .stopped("paused")), (200, .running), (300, .unreachable)],
            [(0, .unreachable), (50, .running), (150, .running), (250, .stopped("paused"))], end: 400)
        #expect(t.runningSpans("a") == [ms(0)..<ms(100), ms(200)..<ms(300)])
        #expect(t.runningSpans("b") == [ms(50)..<ms(250)])
        #expect(t.overlap("a", "b") == ms(100))
        #expect(t.overlap("a", "b", from: ms(220)) == ms(30))
        #expect(t.firstRunning("b") == ms(50))
        #expect(t.firstRunning("a", after: ms(101)) == ms(200))
    }

    @Test func overlapOfThreeIsTheTimeTwoOrMoreRan() {
        var t = timeline(
            [(0, .running), (100, .stopped("paused")), (200, .running), (300, .unreachable)],
            [(0, .unreachable), (50, .running), (250, .stopped("paused"))], end: 400)
        t.samples["c"] = [ObservedSample(at: ms(0), state: .unreachable), ObservedSample(at: ms(280), state: .running),
                          ObservedSample(at: ms(350), state: .unreachable)]
        // a and b: 50-100 and 200-250; a and c: 280-300.
        #expect(t.overlap(["a", "b", "c"]) == ms(120))
        #expect(t.overlap(["b", "c"]) == .zero)
    }

    @Test func neverBothRunningIsZeroOverlap() {
        let t = timeline([(0, .running), (100, .unreachable)], [(0, .stopped("inmigrate")), (100, .running)], end: 300)
        #expect(t.overlap("a", "b") == .zero)
        #expect(t.overlap("b", "a") == .zero)
    }

    @Test func aShortPauseIsNotAStop() {
        let t = timeline([(0, .running), (10, .stopped("paused")), (20, .running), (100, .stopped("paused")), (400, .stopped("paused"))],
                         [], end: 500)
        #expect(t.firstStop("a", after: .zero, atLeast: ms(200)) == ms(100))
        #expect(t.firstStop("a", after: .zero, atLeast: ms(450)) == nil)
    }
}

/// The observer against a real QEMU: its own monitor sees a pause, a resume and a death, and
/// the monitor the test (colorun's part) uses is not disturbed.
@Suite(.timeLimit(.minutes(2)), .machine(.exclusive))
struct ObserverTests {
    let logger = Logger(label: "test.observer")

    @Test func aSecondMonitorSeesPauseResumeAndDeath() async throws {
        let dir = makeTempDirectory("colorun-obs")
        defer { removeDirectory(dir) }
        let qemu = try QEMUInstance.start(QEMUSpec(
            countingGuest: true, extraArguments: ["-qmp", "unix:\(dir)/observer.qmp,server=on,wait=off"]))
        defer { _ = qemu }
        let observer = RunStateObserver(["vm": .unix(path: "\(dir)/observer.qmp")], logger: logger)
        let connection = try await qemu.connect(on: MultiThreadedEventLoopGroup.singleton, logger: logger)
        try await waitUntil("the observer sees the guest run", timeout: .seconds(20)) { observer.latest("vm") == .running }

        let stopped = observer.mark("stop")
        _ = try await connection.execute("stop")
        try await waitUntil("the observer sees the pause") { observer.latest("vm") == .stopped("paused") }
        let resumed = observer.mark("cont")
        _ = try await connection.execute("cont")
        try await waitUntil("the observer sees the resume") { observer.latest("vm") == .running }
        _ = await connection.close()
        let killed = observer.mark("kill")
        qemu.kill(SIGKILL)
        try await waitUntil("the observer sees the death") { observer.latest("vm") == .unreachable }
        let timeline = await observer.stop()

        let samples = try #require(timeline.samples["vm"])
        // In order: running, paused, running again, gone. (Sample times are send times: a
        // sample sent just before a change may carry the new state, so the order of the
        // states is what is checked, not their times against the marks.)
        var changes: [ObservedState] = []
        for sample in samples where sample.state != changes.last { changes.append(sample.state) }
        var expected: [ObservedState] = [.running, .stopped("paused"), .running, .unreachable]
        for state in changes where state == expected.first { expected.removeFirst() }
        #expect(expected.isEmpty, "states seen: \(changes), marks at \(stopped), \(resumed), \(killed)")
        #expect(samples.last?.state == .unreachable)
        let gaps = zip(samples, samples.dropFirst()).map { $0.1.at - $0.0.at }.sorted()
        print("observer: \(samples.count) samples, median gap \(gaps[gaps.count / 2]) (target 10 ms)")
    }
}
