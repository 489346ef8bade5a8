import ArgumentParser
import Colorun
import Etcd

/// `--etcd`, `--node`, `--pair`, `--etcd-ttl` and the TLS files: the arbiter of a two-host pair.
struct ArbiterArguments: ParsableArguments {
    @Option(name: .customLong("etcd"), help: ArgumentHelp(
        "etcd's client URLs, comma-separated (http://HOST:PORT or https://HOST:PORT): run under the arbiter of a two-host pair.",
        valueName: "URL[,URL...]"))
    var etcd: String?

    @Option(name: .customLong("node"), help: ArgumentHelp(
        "This host's name in the pair (needed with --etcd): the value of the pair's key while this host holds it.", valueName: "NAME"))
    var node: String?

    @Option(name: .customLong("pair"), help: ArgumentHelp(
        "The pair's name; its key is /colorun/pairs/PAIR/active (default: the policy file's name without .lua; both hosts must agree).",
        valueName: "NAME"))
    var pair: String?

    @Option(name: .customLong("etcd-ttl"), help: ArgumentHelp(
        "The lease TTL, whole seconds (default 10s): the holder renews every TTL/4 and fences itself when no renewal succeeded for 3/4 TTL; the other host promotes after the TTL.",
        valueName: "D"))
    var ttl: DurationArgument?

    @Option(name: .customLong("etcd-ca"), help: ArgumentHelp("CA certificate (PEM) that signed etcd's certificates (https endpoints).", valueName: "FILE"))
    var caFile: String?

    @Option(name: .customLong("etcd-cert"), help: ArgumentHelp("Client certificate (PEM) for etcd's --client-cert-auth.", valueName: "FILE"))
    var certFile: String?

    @Option(name: .customLong("etcd-key"), help: ArgumentHelp("The client certificate's key (PEM).", valueName: "FILE"))
    var keyFile: String?

    /// The arbiter's options, nil without --etcd; errors name the flag.
    func makeOptions(policyPath: String) throws -> ArbiterOptions? {
        guard let etcd else {
            if node != nil || pair != nil || ttl != nil || caFile != nil || certFile != nil || keyFile != nil {
                throw ValidationError("--node, --pair, --etcd-ttl and --etcd-ca/-cert/-key need --etcd URL")
            }
            return nil
        }
        let endpoints = try etcdEndpoints(etcd)
        guard let node else { throw ValidationError("--etcd needs --node NAME (this host's name in the pair)") }
        guard ArbiterOptions.isValidName(node) else {
            throw ValidationError("--node '\(node)': a node name may use letters, digits, '-', '_' and '.'")
        }
        let pairName = pair ?? ArbiterOptions.defaultPair(policyPath: policyPath)
        guard ArbiterOptions.isValidName(pairName) else {
            throw ValidationError("--pair '\(pairName)': a pair name may use letters, digits, '-', '_' and '.'" + (pair == nil ? " (it defaults to the policy file's name: give --pair)" : ""))
        }
        var ttlSeconds: Int64 = 10
        if let ttl {
            let seconds = ttl.duration.seconds
            guard seconds >= 1, seconds == seconds.rounded() else {
                throw ValidationError("--etcd-ttl '\(ttl.duration)': whole seconds, at least 1 (etcd's leases count in seconds)")
            }
            ttlSeconds = Int64(seconds)
        }
        var tls: EtcdTLS?
        if caFile != nil || certFile != nil || keyFile != nil {
            guard (certFile == nil) == (keyFile == nil) else { throw ValidationError("--etcd-cert and --etcd-key go together") }
            tls = EtcdTLS(caFile: caFile, certFile: certFile, keyFile: keyFile)
        }
        return ArbiterOptions(endpoints: endpoints, node: node, pair: pairName, ttlSeconds: ttlSeconds, tls: tls)
    }
}

extension String {
    fileprivate var trimmingSpaces: String {
        String(drop(while: { $0 == " " }).reversed().drop(while: { $0 == " " }).reversed())
    }
}

/// The URLs an `--etcd` option names (comma-separated, each http:// or https://), for the
/// two-host arbiter and the fleet alike; errors name the flag.
func etcdEndpoints(_ text: String) throws -> [String] {
    let endpoints = text.split(separator: ",").map { String($0).trimmingSpaces }.filter { !$0.isEmpty }
    guard !endpoints.isEmpty else { throw ValidationError("--etcd '\(text)': give at least one URL (http://HOST:PORT)") }
    for endpoint in endpoints where !(endpoint.hasPrefix("http://") || endpoint.hasPrefix("https://")) {
        throw ValidationError("--etcd '\(endpoint)': a URL is http://HOST:PORT or https://HOST:PORT")
    }
    return endpoints
}
