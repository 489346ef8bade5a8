/// The fleet as one instance sees it in etcd at one revision: the declared pairs, who owns
/// each, the live instances (a key on each one's lease) and those being drained.
public struct FleetView: Sendable, Hashable {
    public var pairs: Set<String>
    /// Pair to owner node (only pairs whose ownership key exists).
    public var owners: [String: String]
    public var nodes: Set<String>
    public var draining: Set<String>

    public init(pairs: Set<String> = [], owners: [String: String] = [:], nodes: Set<String> = [], draining: Set<String> = []) {
        self.pairs = pairs
        self.owners = owners
        self.nodes = nodes
        self.draining = draining
    }

    /// The nodes that take pairs: live and not draining, sorted by name.
    public var activeNodes: [String] { nodes.subtracting(draining).sorted() }

    /// Declared pairs without an owner.
    public var unowned: [String] { pairs.filter { owners[$0] == nil }.sorted() }

    /// How many pairs each node owns.
    public var counts: [String: Int] {
        var counts: [String: Int] = [:]
        for (pair, node) in owners where pairs.contains(pair) { counts[node, default: 0] += 1 }
        return counts
    }
}

/// The fleet's assignment rules, pure (each instance applies them to its own view; they
/// agree because they read the same etcd):
///
/// - Even shares: with P pairs and N active nodes (sorted by name), each node's quota is
///   P / N, and the first P mod N nodes get one more. A draining node's quota is 0.
/// - Claiming: a node under its quota claims unowned pairs, preferring those whose
///   rendezvous hash (pair, node) ranks it highest, so nodes claiming at once mostly pick
///   different pairs (the etcd transaction settles any race).
/// - Releasing (rebalance on join, drain): a node over its quota releases at most
///   `maxMoves` pairs at a time, never one with a checkpoint or restore in flight, and
///   releases more only after the previous ones were owned again.
public enum FleetPlan {
    public static func quota(of node: String, in view: FleetView) -> Int {
        let active = view.activeNodes
        guard let index = active.firstIndex(of: node) else { return 0 }
        let share = view.pairs.count / active.count
        return share + (index < view.pairs.count % active.count ? 1 : 0)
    }

    /// Which unowned pairs `node` should claim now (at most `limit`).
    ///
    /// Every node computes the same assignment of all unowned pairs from the same view (each
    /// pair, in name order, to the node with room that its rendezvous hash ranks highest), and
    /// claims its own part: nodes claiming at once do not collide, so a dead node's pairs are
    /// taken in one round of transactions.
    public static func claims(for node: String, in view: FleetView, limit: Int = .max) -> [String] {
        let owned = view.counts
        var room: [String: Int] = [:]
        for active in view.activeNodes { room[active] = quota(of: active, in: view) - (owned[active] ?? 0) }
        guard (room[node] ?? 0) > 0, limit > 0 else { return [] }
        var mine: [String] = []
        for pair in view.unowned {
            var best: (node: String, rank: UInt64)?
            for (candidate, left) in room where left > 0 {
                let r = rank(pair, candidate)
                if best == nil || r > best!.rank || (r == best!.rank && candidate < best!.node) { best = (candidate, r) }
            }
            guard let chosen = best?.node else { break }
            room[chosen]! -= 1
            if chosen == node {
                mine.append(pair)
                if mine.count == limit || room[node] == 0 { break }
            }
        }
        return mine
    }

    /// Which of `node`'s pairs it should release now: over its quota, at most `maxMoves`,
    /// none in `busy`, only when none of its earlier releases (`pending`) is still unowned;
    /// the pairs it ranks lowest first.
    public static func releases(for node: String, in view: FleetView, busy: Set<String>, pending: Set<String>, maxMoves: Int) -> [String] {
        guard pending.allSatisfy({ view.owners[$0] != nil || !view.pairs.contains($0) }) else { return [] }
        let mine = view.owners.filter { $0.value == node && view.pairs.contains($0.key) }.map(\.key)
        let excess = mine.count - quota(of: node, in: view)
        guard excess > 0 else { return [] }
        // Only move to someone who will take it: a node under its quota.
        let room = view.activeNodes.filter { $0 != node }.map { quota(of: $0, in: view) - (view.counts[$0] ?? 0) }.filter { $0 > 0 }.reduce(0, +)
        let count = min(excess, maxMoves, room)
        guard count > 0 else { return [] }
        return Array(mine.filter { !busy.contains($0) }.sorted { rank($0, node) < rank($1, node) }.prefix(count))
    }

    /// Rendezvous (highest random weight) rank of a node for a pair: FNV-1a 64 of
    /// "pair/node", mixed.
    public static func rank(_ pair: String, _ node: String) -> UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in pair.utf8 { hash = (hash ^ UInt64(byte)) &* 0x0000_0100_0000_01B3 }
        hash = (hash ^ 0x2F) &* 0x0000_0100_0000_01B3
        for byte in node.utf8 { hash = (hash ^ UInt64(byte)) &* 0x0000_0100_0000_01B3 }
        hash ^= hash >> 33
        hash = hash &* 0xff51_afd7_ed55_8ccd
        hash ^= hash >> 33
        return hash
    }
}
