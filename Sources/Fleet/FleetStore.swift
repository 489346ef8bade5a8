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
        /// Each parsed declaration's mod revision: the next snapshot reuses what did not change.
        var declarationRevisions: [String: Int64] = [:]

        public var view: FleetView {
            FleetView(pairs: Set(declarations.keys), owners: owners.mapValues(\.node), nodes: nodes, draining: draining)
        }
    }

    /// Reads the whole fleet (one range request). Declarations unchanged since `previous` are
    /// taken from it instead of parsed again (an instance reads thousands at every reconcile).
    public func snapshot(reusing previous: Snapshot? = nil) async throws(EtcdError) -> Snapshot {
        let (kvs, revision) = try await client.range(prefix + "/", prefix: true)
        var snapshot = Snapshot(revision: revision)
        for kv in kvs {
            let rest = kv.key.dropFirst(prefix.count + 1)
            guard let slash = rest.firstIndex(of: "/") else { continue }
            let kind = rest[..<slash], name = String(rest[rest.index(after: slash)...])
            switch kind {
            case "pairs":
                if let previous, previous.declarationRevisions[name] == kv.modRevision, let declaration = previous.declarations[name] {
                    snapshot.declarations[name] = declaration
                    snapshot.declarationRevisions[name] = kv.modRevision
                    continue
                }
                do {
                    let json = try JSONParser.parse(kv.value)
                    snapshot.declarations[name] = try PairDeclaration(name: name, json: json, place: kv.key)
                    snapshot.declarationRevisions[name] = kv.modRevision
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

    /// etcd's default `--max-txn-ops`: the most compares, or operations in one branch, a
    /// transaction may have.
    public static let maxTxnOps = 128

    /// Writes declarations, all or nothing. Every declaration is checked first, and the
    /// pairs already declared are read (one request): without `replace` an existing one is an
    /// error and nothing is written. Up to `maxTxnOps` pairs go in one transaction; more go in
    /// transactions of `maxTxnOps`, each guarded by the revisions read (so a pair someone
    /// else declared or changed meanwhile fails its batch), and when a later batch fails the
    /// earlier ones are undone (their keys deleted, or put back as they were with `replace`),
    /// each guarded by the revision that wrote it, so a change by someone else since is never
    /// undone. The error then says what failed and that nothing was left written (or which
    /// keys could not be undone). `beforeBatch` (tests) runs before each batch's transaction.
    public func add(_ declarations: [PairDeclaration], replace: Bool = false, maxTxnOps: Int = FleetStore.maxTxnOps,
                    beforeBatch: (@Sendable (Int) async -> Void)? = nil) async throws(FleetError) {
        guard !declarations.isEmpty else { throw FleetError("no pair to add") }
        guard maxTxnOps >= 1 else { throw FleetError("maxTxnOps must be at least 1") }
        for declaration in declarations { try declaration.validate() }
        let names = declarations.map(\.name)
        if Set(names).count != names.count { throw FleetError("a pair is declared twice in one add") }

        let before: [String: EtcdKeyValue]
        let readRevision: Int64
        do {
            let (kvs, revision) = try await client.range(prefix + "/pairs/", prefix: true)
            before = Dictionary(kvs.map { ($0.key, $0) }, uniquingKeysWith: { a, _ in a })
            readRevision = revision
        } catch {
            throw FleetError("\(error); nothing was written")
        }
        if !replace {
            let existing = names.filter { before[pairKey($0)] != nil }
            guard existing.isEmpty else {
                throw FleetError("already declared: \(existing.joined(separator: ", ")) (use --replace to overwrite); nothing was written")
            }
        }

        var written: [(batch: [PairDeclaration], revision: Int64?)] = []
        var start = 0, number = 0
        while start < declarations.count {
            let batch = Array(declarations[start..<min(start + maxTxnOps, declarations.count)])
            await beforeBatch?(number)
            let compare = batch.map { declaration -> EtcdCompare in
                let key = pairKey(declaration.name)
                if let old = before[key] { return .modRevision(key, .equal, old.modRevision) }
                return .createRevision(key, .equal, 0)
            }
            let failure: String
            do {
                let result = try await client.txn(compare: compare, success: batch.map { .put(key: pairKey($0.name), value: $0.jsonText) },
                                                  failure: batch.map { .range(key: pairKey($0.name)) })
                if result.succeeded {
                    written.append((batch, result.revision))
                    start += batch.count
                    number += 1
                    continue
                }
                let changed = zip(batch, result.ranges).filter { declaration, now in
                    now.first?.modRevision != before[pairKey(declaration.name)]?.modRevision
                }.map(\.0.name)
                failure = "declared or changed by someone else meanwhile: \(changed.joined(separator: ", "))"
            } catch {
                // The outcome is unknown: undo this batch too, if it was written.
                written.append((batch, nil))
                failure = "\(error)"
            }
            guard !written.isEmpty else { throw FleetError("\(failure); nothing was written") }
            let left = await undo(written, before: before, readRevision: readRevision)
            let count = written.reduce(0) { $0 + $1.batch.count }
            if left.isEmpty {
                throw FleetError("\(failure); nothing was written (the \(count) pair(s) of the earlier transactions were undone)")
            }
            throw FleetError("\(failure); the earlier transactions could not all be undone: still written: \(left.joined(separator: ", "))")
        }
    }

    /// Undoes the batches `add` wrote: each key deleted (or put back as it was), only if it
    /// still holds what the batch wrote (its mod revision is the batch's; for a batch whose
    /// outcome is unknown, its value is ours and was written after `readRevision`). Returns
    /// the pairs it could not undo.
    private func undo(_ written: [(batch: [PairDeclaration], revision: Int64?)], before: [String: EtcdKeyValue], readRevision: Int64) async -> [String] {
        func compares(_ declaration: PairDeclaration, _ revision: Int64?) -> [EtcdCompare] {
            let key = pairKey(declaration.name)
            if let revision { return [.modRevision(key, .equal, revision)] }
            return [.value(key, .equal, declaration.jsonText), .modRevision(key, .greater, readRevision)]
        }
        func restore(_ declaration: PairDeclaration) -> EtcdOperation {
            let key = pairKey(declaration.name)
            if let old = before[key] { return .put(key: key, value: old.value) }
            return .delete(key: key)
        }
        var left: [String] = []
        for (batch, revision) in written.reversed() {
            // The batch at once (one compare per pair: it fits like the batch did), else pair
            // by pair (and always so for a batch whose outcome is unknown: two compares each).
            if revision != nil, let result = try? await client.txn(compare: batch.flatMap { compares($0, revision) }, success: batch.map(restore)),
               result.succeeded {
                continue
            }
            for declaration in batch {
                if let result = try? await client.txn(compare: compares(declaration, revision), success: [restore(declaration)]), result.succeeded {
                    continue
                }
                // Not undone: fine if the key no longer holds what we wrote (someone changed it
                // since, or the unknown batch was never written).
                guard let now = try? await client.range(pairKey(declaration.name)) else {
                    left.append(declaration.name)
                    continue
                }
                let kv = now.kvs.first
                let ours = revision.map { kv?.modRevision == $0 } ?? (kv?.value == declaration.jsonText && (kv?.modRevision ?? 0) > readRevision)
                if ours { left.append(declaration.name) }
            }
        }
        return left
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
