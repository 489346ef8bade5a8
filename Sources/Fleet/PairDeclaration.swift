import Colorun
import JSON
import QMPClient

/// What went wrong in the fleet: a bad declaration (`place` names the pair, or the file and
/// entry it came from), etcd, or a pair's run.
public struct FleetError: Error, Sendable, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// One replicated pair as declared in etcd (one key per pair, `<prefix>/pairs/<name>`):
/// the policy that drives it (a file name under the instances' `--policy-dir`), its domains'
/// QMP endpoints, and its settings (passed to the policy as `key=value` arguments).
public struct PairDeclaration: Sendable, Hashable {
    public var name: String
    public var policy: String
    /// Domain name to endpoint text (`unix:PATH`, `tcp:HOST:PORT`).
    public var domains: [String: String]
    public var settings: [String: String]

    public init(name: String, policy: String, domains: [String: String], settings: [String: String] = [:]) {
        self.name = name
        self.policy = policy
        self.domains = domains
        self.settings = settings
    }

    /// Checks the declaration; the error names the pair and what is wrong.
    public func validate() throws(FleetError) {
        guard DomainSpec.isValidName(name), name.count <= 128 else {
            throw FleetError("pair '\(name)': a pair name uses letters, digits, '-', '_' and '.' (at most 128)")
        }
        guard !policy.isEmpty, !policy.hasPrefix("/"), !policy.split(separator: "/").contains(".."), policy.hasSuffix(".lua") else {
            throw FleetError("pair '\(name)': policy '\(policy)' must be a .lua file name relative to the instances' --policy-dir (no '/' at the start, no '..')")
        }
        guard !domains.isEmpty else { throw FleetError("pair '\(name)': no domain (give --domain NAME=ENDPOINT)") }
        for (domain, endpoint) in domains.sorted(by: { $0.key < $1.key }) {
            guard DomainSpec.isValidName(domain) else {
                throw FleetError("pair '\(name)': bad domain name '\(domain)': use letters, digits, '-', '_' and '.'")
            }
            do {
                _ = try QMPEndpoint(parsing: endpoint)
            } catch {
                throw FleetError("pair '\(name)': domain '\(domain)': \(error)")
            }
        }
        for key in settings.keys.sorted() where key.isEmpty || key.contains("=") || !key.allSatisfy({ $0.isASCII && !$0.isWhitespace }) {
            throw FleetError("pair '\(name)': bad setting name '\(key)' (no '=', no spaces)")
        }
    }

    /// The policy's domains for a session.
    public func domainSpecs() throws(FleetError) -> [DomainSpec] {
        var specs: [DomainSpec] = []
        for (domain, endpoint) in domains.sorted(by: { $0.key < $1.key }) {
            do {
                specs.append(try DomainSpec(parsing: "\(domain)=\(endpoint)"))
            } catch {
                throw FleetError("pair '\(name)': \(error)")
            }
        }
        return specs
    }

    /// The settings as the policy's arguments, `key=value`, sorted by key.
    public var arguments: [String] { settings.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" } }

    public var json: JSONValue {
        ["policy": .string(policy), "domains": .object(domains.mapValues { .string($0) }), "settings": .object(settings.mapValues { .string($0) })]
    }

    public var jsonText: String { String(decoding: JSONEncoding.encode(json), as: UTF8.self) }

    /// Reads a declaration's JSON (`{"policy", "domains": {NAME: ENDPOINT}, "settings": {K: V}}`);
    /// `place` says where it came from in the error. Validates it.
    public init(name: String, json: JSONValue, place: String) throws(FleetError) {
        guard case .object(let fields) = json else { throw FleetError("\(place): pair '\(name)': a declaration is a JSON object") }
        for key in fields.keys.sorted() where !["policy", "domains", "settings", "name"].contains(key) {
            throw FleetError("\(place): pair '\(name)': unknown field '\(key)' (known: policy, domains, settings)")
        }
        guard let policy = fields["policy"]?.stringValue else { throw FleetError("\(place): pair '\(name)': 'policy' (a string) is missing") }
        guard let domainObject = fields["domains"]?.objectValue else {
            throw FleetError("\(place): pair '\(name)': 'domains' (an object NAME: ENDPOINT) is missing")
        }
        var domains: [String: String] = [:]
        for (key, value) in domainObject {
            guard let text = value.stringValue else { throw FleetError("\(place): pair '\(name)': domain '\(key)': the endpoint must be a string") }
            domains[key] = text
        }
        var settings: [String: String] = [:]
        for (key, value) in fields["settings"]?.objectValue ?? [:] {
            switch value {
            case .string(let text): settings[key] = text
            case .int(let number): settings[key] = String(number)
            case .double(let number): settings[key] = String(number)
            case .bool(let flag): settings[key] = flag ? "true" : "false"
            default: throw FleetError("\(place): pair '\(name)': setting '\(key)' must be a string, number or boolean")
            }
        }
        self.init(name: name, policy: policy, domains: domains, settings: settings)
        do {
            try validate()
        } catch {
            throw FleetError("\(place): \(error.description)")
        }
    }

    /// Parses a declarations file: `{"PAIR": {declaration}, ...}`. Every entry is checked
    /// before anything is written.
    public static func parseFile(_ bytes: [UInt8], path: String) throws(FleetError) -> [PairDeclaration] {
        let json: JSONValue
        do {
            json = try JSONParser.parse(bytes)
        } catch {
            throw FleetError("\(path): \(error)")
        }
        guard case .object(let entries) = json, !entries.isEmpty else {
            throw FleetError("\(path): expected a JSON object {\"PAIR\": {\"policy\": ..., \"domains\": {...}}, ...}")
        }
        var result: [PairDeclaration] = []
        for (name, entry) in entries.sorted(by: { $0.key < $1.key }) {
            result.append(try PairDeclaration(name: name, json: entry, place: path))
        }
        return result
    }
}
