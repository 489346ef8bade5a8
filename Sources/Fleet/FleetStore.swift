import Etcd
import JSON

/// The fleet's keys in etcd, under one prefix (default `/colorun/fleet`):
///
/// | key | value | lease |
/// | --- | --- | --- |
/// | `PREFIX/pairs/PAIR` | the pair's declaration (JSON) | none |
/// | `PREFIX/owners/PAIR` | the owner node's name; its create revision is the fencing token | the owner's |
/// | `PREFIX/nodes/NODE` | `{"ttl": N}` while the instance lives | the instance's |
/// | `PREFIX/drain/NODE` | `drain`: the node gives its pairs away and takes none | none |
public struct FleetStore: Sendable {
    public let client: EtcdClient
    public let prefix: String

    public init(client: EtcdClient, prefix: String = "/colorun/fleet") {
        self.client = client
        var prefix = prefix
        while prefix.hasSuffix("/") { prefix.removeLast() }
        self.prefix = prefix
    }

    public func pairKey(_ pair: String) -> String { "\(prefix)/pairs/\(pair)" }
    public func ownerKey(_ pair: String) -> String { "\(prefix)/owners/\(pair)" }
    public func nodeKey(_ node: String) -> String { "\(prefix)/nodes/\(node)" }
    public func drainKey(_ node: String) -> String { "\(prefix)/drain/\(node)" }

    /// One owner key as read.
    public struct Ownership: Sendable, Hashable {
        public var node: String
        public var lease: Int64
        /// The key's create revision: the fencing token.
        public var token: Int64
    }

    /// Everything under the prefix at one revision.
    public struct Snapshot: Sendable {
        public var revision: Int64
        public var declarations: [String: PairDeclaration] = [:]
        /// Declarations that did not parse (key, error): reported, not run.
        public var bad: [(String, String)] = []
        public var owners: [String: Ownership] = [:]
        public var nodes: Set<String> = []
        public var draining: Set<String> = []

        public var view: FleetView {
            FleetView(pairs: Set(declarations.keys), owners: owners.mapValues(\.node), nodes: nodes, draining: draining)
        }
    }

    /// Reads the whole fleet (one range request).
    public func snapshot() async throws(EtcdError) -> Snapshot {
        let (kvs, revision) = try await client.range(prefix + "/", prefix: true)
        var snapshot = Snapshot(revision: revision)
        for kv in kvs {
            let rest = kv.key.dropFirst(prefix.count + 1)
            guard let slash = rest.firstIndex(of: "/") else { continue }
            let kind = rest[..<slash], name = String(rest[rest.index(after: slash)...])
            switch kind {
            case "pairs":
                do {
                    let json = try JSONParser.parse(kv.value)
                    snapshot.declarations[name] = try PairDeclaration(name: name, json: json, place: kv.key)
                } catch {
                    snapshot.bad.append((kv.key, "\(error)"))
                }
            case "owners": snapshot.owners[name] = Ownership(node: kv.value, lease: kv.lease, token: kv.createRevision)
            case "nodes": snapshot.nodes.insert(name)
            case "drain": snapshot.draining.insert(name)
            default: continue
            }
        }
        return snapshot
    }

    /// Writes declarations, each checked first; none is written if one is bad or (without
    /// `replace`) already declared. One transaction (etcd allows 128 operations in one: more
    /// pairs are written in transactions of 64, each all-or-nothing, and the error says
    /// which were written).
    public func add(_ declarations: [PairDeclaration], replace: Bool = false) async throws(FleetError) {
        guard !declarations.isEmpty else { throw FleetError("no pair to add") }
        for declaration in declarations { try declaration.validate() }
        let names = declarations.map(\.name)
        if Set(names).count != names.count { throw FleetError("a pair is declared twice in one add") }
        var written: [String] = []
        var start = 0
        while start < declarations.count {
            let batch = Array(declarations[start..<min(start + 64, declarations.count)])
            let compare = replace ? [] : batch.map { EtcdCompare.createRevision(pairKey($0.name), .equal, 0) }
            let result: EtcdTxnResult
            do {
                result = try await client.txn(compare: compare, success: batch.map { .put(key: pairKey($0.name), value: $0.jsonText) },
                                              failure: batch.map { .range(key: pairKey($0.name)) })
            } catch {
                throw FleetError("\(error)" + (written.isEmpty ? "; nothing was written" : "; written before: \(written.count) pair(s) up to \(written.last!)"))
            }
            guard result.succeeded else {
                let existing = zip(batch, result.ranges).filter { !$0.1.isEmpty }.map(\.0.name)
                throw FleetError("already declared: \(existing.joined(separator: ", ")) (use --replace to overwrite)"
                    + (written.isEmpty ? "; nothing was written" : "; written before: \(written.count) pair(s) up to \(written.last!)"))
            }
            written += batch.map(\.name)
            start += batch.count
        }
    }

    /// Removes declared pairs (their owners stop them); an unknown name is an error and
    /// nothing is removed.
    public func remove(_ names: [String]) async throws(FleetError) {
        guard !names.isEmpty else { throw FleetError("no pair to remove") }
        let compare = names.map { EtcdCompare.createRevision(pairKey($0), .greater, 0) }
        let result: EtcdTxnResult
        do {
            result = try await client.txn(compare: compare, success: names.map { .delete(key: pairKey($0)) }, failure: names.map { .range(key: pairKey($0)) })
        } catch {
            throw FleetError("\(error); nothing was removed")
        }
        guard result.succeeded else {
            let missing = zip(names, result.ranges).filter { $0.1.isEmpty }.map(\.0)
            throw FleetError("not declared: \(missing.joined(separator: ", ")); nothing was removed")
        }
    }

    /// Marks a node as draining (or lifts it).
    public func drain(_ node: String, undo: Bool = false) async throws(EtcdError) {
        if undo {
            try await client.delete(drainKey(node))
        } else {
            try await client.put(drainKey(node), "drain")
        }
    }
}
