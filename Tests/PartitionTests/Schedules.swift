import ClusterLab
import Foundation
import Logging

/// What a schedule does to the two hosts (issue 10's scenarios).
enum Fault: String, CaseIterable, Sendable {
    /// Host A's port on the switch down: A reaches neither B nor etcd.
    case isolateA = "A isolated"
    /// Packets between A and B dropped; both still reach etcd.
    case cutAB = "A-B link cut"
    /// Host B's port down.
    case isolateB = "B isolated"
    /// colorun A and A's QEMU SIGKILLed: the primary is really dead.
    case killPrimary = "colorun A and its QEMU SIGKILLed"
    /// colorun A SIGKILLed, its QEMU left running.
    case killColorunA = "colorun A SIGKILLed, QEMU alive"
    /// The etcd member that leads SIGKILLed (3 members: the cluster keeps a quorum).
    case killEtcdLeader = "etcd leader SIGKILLed"

    var isPartition: Bool { [.isolateA, .cutAB, .isolateB].contains(self) }
}

/// One schedule of the randomized run: a fault, how long a partition lasts before it heals
/// (or how long the run goes on after a kill), and how long it is watched after the heal.
struct Schedule: Sendable, CustomStringConvertible {
    var index: Int
    var fault: Fault
    var hold: Duration
    var settle: Duration

    var description: String { "#\(index) \(fault.rawValue) for \(hold.wholeMilliseconds) ms, then \(settle.wholeMilliseconds) ms" }
}

/// A small seeded generator (SplitMix64): the same seed gives the same schedules.
struct SeededGenerator: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

enum Schedules {
    /// `count` schedules from `seed`. Faults come in shuffled rounds of all six, so the first
    /// four schedules hold at least one partition (what the arbiter-less run needs to show a
    /// double primary). A partition is short (TTL/8 to TTL/4: a renewal sent after
    /// the heal still comes before the fence, at 3/4 TTL after the last one that succeeded,
    /// with the renewal that was in flight timing out at TTL/4) or long (the TTL and 2 s more: the holder
    /// has fenced and the lease expired); nothing in between, where either outcome is right.
    static func make(count: Int, seed: UInt64, ttl: Duration) -> [Schedule] {
        var rng = SeededGenerator(seed: seed)
        var round: [Fault] = []
        return (0..<count).map { index in
            if round.isEmpty { round = Fault.allCases.shuffled(using: &rng) }
            let fault = round.removeFirst()
            let ms = ttl.wholeMilliseconds
            let hold: Duration
            if fault.isPartition && Bool.random(using: &rng) {
                hold = .milliseconds(Int64.random(in: (ms / 8)...(ms / 4), using: &rng))
            } else {
                hold = .milliseconds(ms + Int64.random(in: 2000...3000, using: &rng))
            }
            return Schedule(index: index, fault: fault, hold: hold, settle: .milliseconds(1500))
        }
    }
}
