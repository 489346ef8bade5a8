import Etcd
import NIOCore

/// `--etcd URL[,URL...] --node NAME [--pair NAME] [--etcd-ttl D]`: the arbiter of a
/// replicated pair whose two sides run on two hosts, each with its own colorun.
public struct ArbiterOptions: Sendable, Hashable {
    /// etcd's client URLs (`http://HOST:PORT` or `https://HOST:PORT`).
    public var endpoints: [String]
    /// This host's name in the pair (the value of the key while it holds it).
    public var node: String
    /// The pair's name: the key is `/colorun/pairs/<pair>/active`.
    public var pair: String
    /// The lease TTL, whole seconds (etcd's leases count in seconds).
    public var ttlSeconds: Int64
    public var tls: EtcdTLS?

    public init(endpoints: [String], node: String, pair: String, ttlSeconds: Int64 = 10, tls: EtcdTLS? = nil) {
        self.endpoints = endpoints
        self.node = node
        self.pair = pair
        self.ttlSeconds = ttlSeconds
        self.tls = tls
    }

    /// The default pair name: the policy file's name without its directory and `.lua`
    /// (both hosts run the same policy file, so they agree on it).
    public static func defaultPair(policyPath: String) -> String {
        var name = String(policyPath.split(separator: "/").last ?? "policy")
        if name.hasSuffix(".lua") { name.removeLast(4) }
        return name.isEmpty ? "policy" : name
    }

    /// Names usable in a key: letters, digits, '-', '_', '.'.
    public static func isValidName(_ name: String) -> Bool {
        !name.isEmpty && name.count <= 128 && name.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || "-_.".contains($0)) }
    }

    /// The key naming the node allowed to run as primary, attached to that node's lease.
    public var key: String { "/colorun/pairs/\(pair)/active" }
    /// Where each promotion is recorded (node, token, what), written in the promotion's transaction.
    public var promotionKey: String { "/colorun/pairs/\(pair)/promoted" }

    // The timing (docs/operations.md, "Timing"): Patroni's loop_wait + 2*retry_timeout <= ttl,
    // with a margin taken off the TTL for pausing the VM before the lease can expire.
    /// How often the holder renews its lease (Patroni's loop_wait): ttl/4.
    public var renewInterval: TimeAmount { .nanoseconds(ttlSeconds * 1_000_000_000 / 4) }
    /// The timeout of each etcd request (Patroni's retry_timeout): ttl/4.
    public var requestTimeout: TimeAmount { .nanoseconds(ttlSeconds * 1_000_000_000 / 4) }
    /// Taken off the TTL: the time the fence has to pause the VM before the lease can expire: ttl/4.
    public var margin: TimeAmount { .nanoseconds(ttlSeconds * 1_000_000_000 / 4) }
    /// After the send time of the last renewal that succeeded, the holder fences itself at
    /// this offset unless a later renewal succeeded: ttl - margin = 3/4 ttl
    /// (= renewInterval + 2 * requestTimeout: two full renewal attempts fit before it).
    public var fenceAfter: TimeAmount { .nanoseconds(ttlSeconds * 1_000_000_000) - margin }
}
