import ClusterLab
import Foundation
import ColorunTestSupport
import Logging

/// What one schedule gave, from the observer's samples.
struct Outcome: Sendable, CustomStringConvertible {
    var schedule: Schedule
    var arbiter: Bool
    /// When the fault was applied, and the partition healed (observer clock).
    var faultAt: Duration
    var healedAt: Duration?
    /// How long both VMs ran at the same time (the whole run).
    var overlap: Duration
    /// From the fault to the first sample that saw B's standby run; nil if it never ran.
    var failover: Duration?
    /// From the fault to the start of A's first stop of a second or more (a fence or a death;
    /// a checkpoint's pause is tens of milliseconds, a few hundred on a loaded machine); nil if
    /// A never stopped so long.
    var primaryStopped: Duration?
    var timeline: RunStateTimeline
    var logs: String

    /// Whether the fault should make B take over: the primary is dead, or cut off from etcd
    /// longer than the TTL (it fenced itself and its lease expired). colorun A killed with its
    /// QEMU alive may go either way (B takes over only after stopping A's VM) and is neither.
    var failoverExpected: Bool? {
        switch schedule.fault {
        case .killPrimary: return true
        case .killColorunA: return nil
        case .isolateA: return schedule.hold > TwoHostRig.ttl
        case .cutAB, .isolateB, .killEtcdLeader: return false
        }
    }

    var falseFailover: Bool { failoverExpected == false && failover != nil }
    var missedFailover: Bool { failoverExpected == true && failover == nil }

    var description: String {
        var text = "\(schedule) [arbiter \(arbiter ? "on" : "off")]: overlap \(overlap.wholeMilliseconds) ms"
        text += failover.map { ", B ran \($0.wholeMilliseconds) ms after the fault" } ?? ", B never ran"
        text += primaryStopped.map { ", A stopped \($0.wholeMilliseconds) ms after the fault" } ?? ", A never stopped"
        if falseFailover { text += " FALSE FAILOVER" }
        if missedFailover { text += " MISSED FAILOVER" }
        return text
    }
}

enum ScheduleRunner {
    /// Starts a fresh two-host rig, applies the schedule's fault, holds it, heals, watches a
    /// while longer, and tears everything down.
    static func run(_ schedule: Schedule, arbiter: Bool, logger: Logger) async throws -> Outcome {
        let rig: TwoHostRig
        do {
            rig = try await TwoHostRig.start(arbiter: arbiter, logger: logger)
        } catch {
            // A start-up that did not finish (a loaded machine) is not the schedule's result:
            // one more try, then the error.
            print("schedule \(schedule): the rig did not start, trying again: \(String(describing: error).prefix(2000))")
            rig = try await TwoHostRig.start(arbiter: arbiter, logger: logger)
        }
        let faultAt: Duration
        var healedAt: Duration?
        do {
            if schedule.fault == .killColorunA {
                // Kill colorun while the VM runs (not inside a checkpoint's pause), so that
                // only the fencing path can stop it.
                try await waitUntil("A's VM runs") { rig.observer.latest(TwoHostRig.vmA) == .running }
            }
            faultAt = rig.observer.mark(schedule.fault.rawValue)
            switch schedule.fault {
            case .isolateA: try rig.net.isolate("a")
            case .cutAB: try rig.net.cut("a", "b")
            case .isolateB: try rig.net.isolate("b")
            case .killPrimary:
                await rig.killColorunA()
                await rig.killQEMUA()
            case .killColorunA: await rig.killColorunA()
            case .killEtcdLeader:
                if let etcd = rig.etcd {
                    guard let leader = try etcd.leader() else { throw RigError("etcd has no leader to kill") }
                    try await etcd.kill(leader)
                    rig.observer.mark("etcd leader \(leader) killed")
                }
            }
            // The schedule's length: how long the partition lasts (or the run after a kill).
            try await Task.sleep(for: schedule.hold)
            if schedule.fault.isPartition {
                try rig.net.heal()
                healedAt = rig.observer.mark("healed")
            }
            try await Task.sleep(for: schedule.settle)
        } catch {
            logger.error("schedule \(schedule) failed: \(error)\n\(rig.logs())")
            await rig.shutdown()
            throw error
        }
        let logs = rig.logs()
        let timeline = await rig.shutdown()
        return Outcome(
            schedule: schedule, arbiter: arbiter, faultAt: faultAt, healedAt: healedAt,
            overlap: timeline.overlap(TwoHostRig.vms),
            failover: timeline.firstRunning(TwoHostRig.vmB, after: faultAt).map { $0 - faultAt },
            primaryStopped: timeline.firstStop(TwoHostRig.vmA, after: faultAt, atLeast: .seconds(1)).map { $0 - faultAt },
            timeline: timeline, logs: logs)
    }
}

/// The three figures of a randomized run.
struct RunFigures: CustomStringConvertible {
    var outcomes: [Outcome]
    var seed: UInt64

    var doublePrimarySchedules: [Outcome] { outcomes.filter { $0.overlap > .zero } }
    var maxOverlap: Duration { outcomes.map(\.overlap).max() ?? .zero }
    var totalOverlap: Duration { outcomes.reduce(.zero) { $0 + $1.overlap } }
    /// Failover times after a real primary death (colorun A and its QEMU killed).
    var deathFailovers: [Duration] { outcomes.filter { $0.schedule.fault == .killPrimary }.compactMap(\.failover).sorted() }
    var falseFailovers: Int { outcomes.filter(\.falseFailover).count }
    var missedFailovers: Int { outcomes.filter(\.missedFailover).count }

    var description: String {
        let arbiter = outcomes.first?.arbiter == true ? "on" : "off"
        var text = "randomized run: seed \(seed), \(outcomes.count) schedules, arbiter \(arbiter): "
        text += "both primary at once: \(doublePrimarySchedules.count) schedules, max \(maxOverlap.wholeMilliseconds) ms, total \(totalOverlap.wholeMilliseconds) ms; "
        let times = deathFailovers.map(\.wholeMilliseconds)
        if times.isEmpty {
            text += "failover after primary death: none measured; "
        } else {
            text += "failover after primary death: n=\(times.count) min \(times.first!) ms, median \(times[times.count / 2]) ms, max \(times.last!) ms; "
        }
        text += "false failovers: \(falseFailovers); missed failovers: \(missedFailovers)"
        return text
    }
}
