import JSON

/// A key-value pair as etcd stores it (`mvccpb.KeyValue`), keys and values as text.
public struct EtcdKeyValue: Sendable, Hashable {
    public var key: String
    public var value: String
    /// The revision that created the key (0: never created). A key's create revision
    /// changes only when the key is deleted and created again.
    public var createRevision: Int64
    public var modRevision: Int64
    public var version: Int64
    /// The lease the key is attached to (0: none).
    public var lease: Int64

    public init(key: String, value: String, createRevision: Int64, modRevision: Int64, version: Int64, lease: Int64) {
        self.key = key
        self.value = value
        self.createRevision = createRevision
        self.modRevision = modRevision
        self.version = version
        self.lease = lease
    }

    init(_ json: JSONValue) throws(EtcdError) {
        guard let key = json["key"]?.stringValue, let keyText = Base64.decodeText(key) else {
            throw EtcdError(kind: .badResponse, endpoint: nil, message: "a key-value without a base64 key: \(json)")
        }
        self.init(
            key: keyText, value: json["value"]?.stringValue.flatMap(Base64.decodeText) ?? "",
            createRevision: json["create_revision"].int64, modRevision: json["mod_revision"].int64,
            version: json["version"].int64, lease: json["lease"].int64)
    }
}

/// A lease: keys attached to it are deleted when it expires or is revoked.
public struct EtcdLease: Sendable, Hashable {
    public var id: Int64
    /// The TTL etcd granted (it may raise a small TTL to its minimum).
    public var ttl: Int64
    public init(id: Int64, ttl: Int64) {
        self.id = id
        self.ttl = ttl
    }
}

/// One condition of a transaction (`etcdserverpb.Compare`).
public struct EtcdCompare: Sendable, Hashable {
    public enum Target: String, Sendable { case version = "VERSION", create = "CREATE", mod = "MOD", value = "VALUE", lease = "LEASE" }
    public enum Result: String, Sendable { case equal = "EQUAL", greater = "GREATER", less = "LESS", notEqual = "NOT_EQUAL" }
    public var key: String
    public var target: Target
    public var result: Result
    /// The number compared with (version, revision, lease id) or the value's text.
    public var operand: JSONValue

    /// The key's create revision compared with `revision` (0: the key does not exist).
    public static func createRevision(_ key: String, _ result: Result = .equal, _ revision: Int64) -> EtcdCompare {
        EtcdCompare(key: key, target: .create, result: result, operand: .string(String(revision)))
    }
    public static func modRevision(_ key: String, _ result: Result = .equal, _ revision: Int64) -> EtcdCompare {
        EtcdCompare(key: key, target: .mod, result: result, operand: .string(String(revision)))
    }
    public static func value(_ key: String, _ result: Result = .equal, _ value: String) -> EtcdCompare {
        EtcdCompare(key: key, target: .value, result: result, operand: .string(Base64.encode(value)))
    }
    public static func lease(_ key: String, _ result: Result = .equal, _ lease: Int64) -> EtcdCompare {
        EtcdCompare(key: key, target: .lease, result: result, operand: .string(String(lease)))
    }

    var json: JSONValue {
        let field: String
        switch target {
        case .version: field = "version"
        case .create: field = "create_revision"
        case .mod: field = "mod_revision"
        case .value: field = "value"
        case .lease: field = "lease"
        }
        return ["key": .string(Base64.encode(key)), "target": .string(target.rawValue), "result": .string(result.rawValue), field: operand]
    }
}

/// One operation of a transaction branch.
public enum EtcdOperation: Sendable, Hashable {
    case put(key: String, value: String, lease: Int64 = 0)
    case range(key: String, prefix: Bool = false)
    case delete(key: String, prefix: Bool = false)

    var json: JSONValue {
        switch self {
        case .put(let key, let value, let lease):
            var put: [String: JSONValue] = ["key": .string(Base64.encode(key)), "value": .string(Base64.encode(value))]
            if lease != 0 { put["lease"] = .string(String(lease)) }
            return ["request_put": .object(put)]
        case .range(let key, let prefix):
            return ["request_range": .object(EtcdClient.rangeFields(key, prefix: prefix))]
        case .delete(let key, let prefix):
            return ["request_delete_range": .object(EtcdClient.rangeFields(key, prefix: prefix))]
        }
    }
}

/// What a transaction did: which branch ran, the store's revision after it, and the results
/// of the branch's operations (for a range: the key-values found).
public struct EtcdTxnResult: Sendable, Hashable {
    public var succeeded: Bool
    /// The store's revision after the transaction: the create revision of a key it created.
    public var revision: Int64
    /// Per operation of the branch that ran: the key-values of a range, empty for others.
    public var ranges: [[EtcdKeyValue]]
}

/// A change seen by a watch.
public struct EtcdWatchEvent: Sendable, Hashable {
    public enum Kind: Sendable, Hashable { case put, delete }
    public var kind: Kind
    public var keyValue: EtcdKeyValue
}

/// A member's answer to a status request (`/v3/maintenance/status`).
public struct EtcdStatus: Sendable, Hashable {
    /// Member ids are unsigned 64-bit numbers: kept as etcd's decimal text.
    public var memberID: String
    public var leaderID: String
    public var raftTerm: Int64
    public var version: String
    public var isLeader: Bool { !leaderID.isEmpty && memberID == leaderID }
}

extension JSONValue {
    /// The store's revision in a reply's header.
    var headerRevision: Int64 {
        guard let header = self["header"] else { return 0 }
        return header["revision"].int64
    }
}

extension Optional where Wrapped == JSONValue {
    /// etcd's gateway writes 64-bit integers as strings and leaves zero values out.
    var int64: Int64 {
        switch self {
        case .some(.string(let text)): return Int64(text) ?? 0
        case .some(.int(let value)): return value
        default: return 0
        }
    }
}

/// Base64 (RFC 4648, with padding): the gateway's encoding of keys and values.
enum Base64 {
    private static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)
    private static let reverse: [UInt8] = {
        var table = [UInt8](repeating: 0xFF, count: 256)
        for (i, c) in alphabet.enumerated() { table[Int(c)] = UInt8(i) }
        return table
    }()

    static func encode(_ text: String) -> String { encode(Array(text.utf8)) }

    static func encode(_ bytes: [UInt8]) -> String {
        var out: [UInt8] = []
        out.reserveCapacity((bytes.count + 2) / 3 * 4)
        var i = 0
        while i < bytes.count {
            let b0 = bytes[i], b1 = i + 1 < bytes.count ? bytes[i + 1] : 0, b2 = i + 2 < bytes.count ? bytes[i + 2] : 0
            out.append(alphabet[Int(b0 >> 2)])
            out.append(alphabet[Int((b0 & 0x03) << 4 | b1 >> 4)])
            out.append(i + 1 < bytes.count ? alphabet[Int((b1 & 0x0F) << 2 | b2 >> 6)] : UInt8(ascii: "="))
            out.append(i + 2 < bytes.count ? alphabet[Int(b2 & 0x3F)] : UInt8(ascii: "="))
            i += 3
        }
        return String(decoding: out, as: UTF8.self)
    }

    static func decode(_ text: String) -> [UInt8]? {
        var out: [UInt8] = []
        var buffer: UInt32 = 0
        var bits = 0
        for c in text.utf8 {
            if c == UInt8(ascii: "=") { break }
            let v = reverse[Int(c)]
            guard v != 0xFF else { return nil }
            buffer = buffer << 6 | UInt32(v)
            bits += 6
            if bits >= 8 {
                bits -= 8
                out.append(UInt8((buffer >> UInt32(bits)) & 0xFF))
            }
        }
        return out
    }

    static func decodeText(_ text: String) -> String? {
        decode(text).map { String(decoding: $0, as: UTF8.self) }
    }
}
