import Fleet
import JSON
import Testing

@Suite("Fleet plan and declarations", .timeLimit(.minutes(1)))
struct FleetPlanTests {
    func view(pairs: Int, nodes: [String], owners: [String: String] = [:], draining: Set<String> = []) -> FleetView {
        FleetView(pairs: Set((0..<pairs).map { "pair\($0)" }), owners: owners, nodes: Set(nodes), draining: draining)
    }

    @Test func quotasSplitEvenlyAndSumToThePairs() {
        let v = view(pairs: 301, nodes: ["c", "a", "b"])
        let quotas = ["a", "b", "c"].map { FleetPlan.quota(of: $0, in: v) }
        #expect(quotas == [101, 100, 100])
        #expect(FleetPlan.quota(of: "gone", in: v) == 0)
        let drained = view(pairs: 300, nodes: ["a", "b", "c"], draining: ["b"])
        #expect(FleetPlan.quota(of: "b", in: drained) == 0)
        #expect(FleetPlan.quota(of: "a", in: drained) + FleetPlan.quota(of: "c", in: drained) == 300)
    }

    @Test func claimsFillTheQuotaAndNodesPreferDifferentPairs() {
        let v = view(pairs: 300, nodes: ["a", "b", "c"])
        let a = FleetPlan.claims(for: "a", in: v), b = FleetPlan.claims(for: "b", in: v)
        #expect(a.count == 100 && b.count == 100)
        // One assignment computed by every node: two nodes claiming at once never collide.
        #expect(Set(a).isDisjoint(with: b))
        #expect(Set(a + b + FleetPlan.claims(for: "c", in: v)).count == 300)
        #expect(FleetPlan.claims(for: "a", in: v, limit: 7).count == 7)
        // A node at its quota claims nothing.
        var owners: [String: String] = [:]
        for pair in a { owners[pair] = "a" }
        #expect(FleetPlan.claims(for: "a", in: view(pairs: 300, nodes: ["a", "b", "c"], owners: owners)).isEmpty)
    }

    @Test func aDeadNodesPairsAreClaimedBySurvivors() {
        // 300 pairs owned by a, b, c; c dies (its node key and owner keys expire together).
        var owners: [String: String] = [:]
        for i in 0..<300 where i % 3 != 2 { owners["pair\(i)"] = i % 3 == 0 ? "a" : "b" }
        let v = view(pairs: 300, nodes: ["a", "b"], owners: owners)
        let a = FleetPlan.claims(for: "a", in: v), b = FleetPlan.claims(for: "b", in: v)
        #expect(a.count == 50 && b.count == 50)
        #expect(Set(a).isDisjoint(with: b))
        #expect(Set(a + b).isSubset(of: Set(v.unowned)))
    }

    @Test func releasesAreAtMostKNeverBusyAndWaitForTheLastMoves() {
        var owners: [String: String] = [:]
        for i in 0..<300 { owners["pair\(i)"] = i % 2 == 0 ? "a" : "b" }
        // c joined: a and b own 150 each, their quota is 100.
        let v = view(pairs: 300, nodes: ["a", "b", "c"], owners: owners)
        let busy: Set<String> = ["pair0", "pair2", "pair4"]
        let first = FleetPlan.releases(for: "a", in: v, busy: busy, pending: [], maxMoves: 8)
        #expect(first.count == 8)
        #expect(Set(first).isDisjoint(with: busy))
        #expect(first.allSatisfy { owners[$0] == "a" })
        // Released pairs not owned again yet: no further release.
        var after = v
        for pair in first { after.owners[pair] = nil }
        #expect(FleetPlan.releases(for: "a", in: after, busy: [], pending: Set(first), maxMoves: 8).isEmpty)
        // Once c owns them, the next K go.
        for pair in first { after.owners[pair] = "c" }
        #expect(FleetPlan.releases(for: "a", in: after, busy: [], pending: Set(first), maxMoves: 8).count == 8)
        // Nobody under quota (a lone node): nothing is released into the void.
        let alone = view(pairs: 10, nodes: ["a"], owners: Dictionary(uniqueKeysWithValues: (0..<10).map { ("pair\($0)", "a") }), draining: ["a"])
        #expect(FleetPlan.releases(for: "a", in: alone, busy: [], pending: [], maxMoves: 8).isEmpty)
    }

    @Test func aDrainingNodeGivesEverythingAway() {
        let owners = Dictionary(uniqueKeysWithValues: (0..<20).map { ("pair\($0)", $0 < 10 ? "a" : "b") })
        let v = view(pairs: 20, nodes: ["a", "b"], owners: owners, draining: ["a"])
        #expect(FleetPlan.releases(for: "a", in: v, busy: [], pending: [], maxMoves: 4).count == 4)
        #expect(FleetPlan.claims(for: "a", in: FleetView(pairs: ["x"], nodes: ["a", "b"], draining: ["a"])).isEmpty)
    }

    @Test func declarationsAreValidatedWithThePlaceNamed() throws {
        let good = PairDeclaration(name: "web1", policy: "fleet-pair.lua", domains: ["primary": "tcp:10.0.0.1:4444", "secondary": "unix:/run/s.qmp"], settings: ["interval": "1s"])
        try good.validate()
        #expect(good.arguments == ["interval=1s"])
        let parsed = try PairDeclaration(name: "web1", json: try JSONParser.parse(good.jsonText), place: "etcd")
        #expect(parsed == good)

        func failure(_ declaration: PairDeclaration) -> String {
            do { try declaration.validate(); return "" } catch { return error.description }
        }
        #expect(failure(PairDeclaration(name: "web 1", policy: "p.lua", domains: ["p": "tcp:h:1"])).contains("pair 'web 1'"))
        #expect(failure(PairDeclaration(name: "w", policy: "../p.lua", domains: ["p": "tcp:h:1"])).contains("policy '../p.lua'"))
        #expect(failure(PairDeclaration(name: "w", policy: "/etc/p.lua", domains: ["p": "tcp:h:1"])).contains("relative"))
        #expect(failure(PairDeclaration(name: "w", policy: "p.lua", domains: [:])).contains("no domain"))
        #expect(failure(PairDeclaration(name: "w", policy: "p.lua", domains: ["p": "http://x"])).contains("domain 'p'"))

        let file = Array(#"{"a": {"policy": "p.lua", "domains": {"p": "tcp:h:1"}}, "b": {"policy": "p.lua", "domain": {}}}"#.utf8)
        #expect(throws: FleetError.self) { try PairDeclaration.parseFile(file, path: "pairs.json") }
        do {
            _ = try PairDeclaration.parseFile(file, path: "pairs.json")
        } catch {
            #expect(error.description.contains("pairs.json: pair 'b': unknown field 'domain'"))
        }
    }
}
