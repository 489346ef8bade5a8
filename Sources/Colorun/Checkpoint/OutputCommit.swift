import JSON
import QMP
import Synchronization

/// Whose output a Remus checkpoint holds until the checkpoint is durable.
enum OutputCommitSelection: Sendable, Hashable {
    /// Every NIC's netdev (found with `qom-list`/`qom-get` under /machine/peripheral*).
    case auto
    /// These netdevs.
    case netdevs([String])
    /// No buffering: the guest's packets leave at once.
    case off
}

/// What colorun keeps about one Remus domain between checkpoints.
final class RemusDomainState: Sendable {
    /// Part of the names of the layers and nodes this run makes (a generation number reused
    /// after a restart never names a file or node in use).
    let token: String
    private let buffers = Mutex<[String]?>(nil)

    init() {
        token = String(UInt32.random(in: 0...UInt32.max), radix: 16)
    }

    /// The netdevs whose output colorun buffers now (nil: none installed or looked for yet).
    var bufferedNetdevs: [String]? {
        get { buffers.withLock { $0 } }
        set { buffers.withLock { $0 = newValue } }
    }
}

/// Output commit (Remus's rule: no packet leaves before the state that produced it is
/// durable): a `filter-buffer` on each NIC's netdev holds what the guest sends; a committed
/// checkpoint releases what was held up to its pause (`status` off, which flushes, then on).
enum OutputCommit {
    /// The release timer's period (µs, QEMU's maximum, about 71 minutes of guest time):
    /// toggling the status at each checkpoint re-arms it, and it runs on the virtual clock.
    static let interval: Int64 = 4_294_967_295

    static func filterID(_ netdev: String) -> String { "colorun-buffer-" + netdev }

    /// The netdevs of the domain's NICs. A QEMU without `qom-list` (the simulator) has none.
    static func discover(_ domain: some CheckpointTarget) async throws(DomainError) -> [String] {
        var netdevs: [String] = []
        for container in ["/machine/peripheral", "/machine/peripheral-anon"] {
            let children: JSONValue
            do {
                children = try await domain.execute("qom-list", ["path": .string(container)])
            } catch {
                if error.errorClass == "CommandNotFound" { return [] }
                throw error
            }
            for child in children.arrayValue ?? [] {
                guard let name = child["name"]?.stringValue, child["type"]?.stringValue?.hasPrefix("child<") == true else { continue }
                // Only a NIC has a `netdev` property; anything else answers an error.
                guard let netdev = try? await domain.execute("qom-get", ["path": .string(container + "/" + name), "property": "netdev"]).stringValue,
                      !netdev.isEmpty, !netdevs.contains(netdev) else { continue }
                netdevs.append(netdev)
            }
        }
        return netdevs
    }

    /// Brings the buffers to what `selection` asks, before the pause; returns the netdevs
    /// whose output this checkpoint holds. A filter left by an earlier run is reused.
    static func prepare(_ domain: some CheckpointTarget, _ selection: OutputCommitSelection, state: RemusDomainState) async throws(DomainError) -> [String] {
        let wanted: [String]
        switch selection {
        case .off:
            _ = await remove(domain, state: state)
            return []
        case .netdevs(let list):
            wanted = list
        case .auto:
            if let installed = state.bufferedNetdevs { return installed }
            wanted = try await discover(domain)
        }
        let installed = state.bufferedNetdevs ?? []
        for netdev in installed where !wanted.contains(netdev) {
            _ = try? await domain.execute("object-del", ["id": .string(filterID(netdev))])
        }
        for netdev in wanted where !installed.contains(netdev) {
            do throws(DomainError) {
                _ = try await domain.execute("object-add", [
                    "qom-type": "filter-buffer", "id": .string(filterID(netdev)), "netdev": .string(netdev),
                    "queue": "rx", "interval": .int(interval),
                ])
            } catch {
                // Left by a run that was killed: it holds this netdev's output already.
                guard error.desc.contains("duplicate") || error.desc.contains("already exists") else { throw error }
            }
        }
        state.bufferedNetdevs = wanted
        return wanted
    }

    /// Releases the held packets: everything the guest sent up to the pause.
    static func release(_ domain: some CheckpointTarget, _ netdevs: [String]) async throws(DomainError) {
        for netdev in netdevs {
            let path = JSONValue.string("/objects/" + filterID(netdev))
            _ = try await domain.execute("qom-set", ["path": path, "property": "status", "value": "off"])
            _ = try await domain.execute("qom-set", ["path": path, "property": "status", "value": "on"])
        }
    }

    /// Removes the buffers (`object-del` flushes what they hold). Returns the failures.
    static func remove(_ domain: some CheckpointTarget, state: RemusDomainState) async -> [DomainError] {
        guard let installed = state.bufferedNetdevs else { return [] }
        var failures: [DomainError] = []
        for netdev in installed {
            do throws(DomainError) {
                _ = try await domain.execute("object-del", ["id": .string(filterID(netdev))])
            } catch {
                if !error.monitorGone { failures.append(error) }
            }
        }
        state.bufferedNetdevs = nil
        return failures
    }
}
