import JSON
import ColorunSystem
import QMP

#if canImport(Glibc)
import Glibc
#endif

/// Which disks a Remus checkpoint snapshots.
enum RemusDiskSelection: Sendable, Hashable {
    /// Every writable qcow2 disk the domain has (`query-block`).
    case all
    /// These disks (a BlockBackend name, a device's qdev id, or a node name each).
    case named([String])
    /// No disk snapshots: the memory file alone.
    case none
}

/// A disk as the primary's QEMU has it now.
struct LiveDisk: Sendable, Hashable {
    /// BlockBackend name, else qdev id, else node name.
    var label: String
    /// The active layer's node and file.
    var topNode: String
    var topFile: String
    var format: String
    /// Every layer, active first: its file and node name (nil when QEMU did not list it).
    var chain: [(file: String, node: String?)]
    /// The node name a restored standby gives this disk.
    var standbyNode: String

    static func == (a: LiveDisk, b: LiveDisk) -> Bool { a.label == b.label && a.topNode == b.topNode && a.chain.map(\.file) == b.chain.map(\.file) }
    func hash(into hasher: inout Hasher) { hasher.combine(label); hasher.combine(topNode) }
}

/// The disk half of a Remus checkpoint: which disks, the snapshot transaction taken in the
/// pause, the housekeeping that keeps the chain short, and a standby's fresh overlays.
enum RemusDisks {
    /// The layers colorun makes for a domain live in `<store>/disks/`.
    static func directory(of store: GenerationStore) -> String { store.directory + "/disks" }

    /// The domain's disks, selected. With `.all`, a QEMU without `query-block` (the
    /// simulator) has none.
    static func discover(_ domain: some CheckpointTarget, selection: RemusDiskSelection, ownDirectory: String) async throws(DomainError) -> [LiveDisk] {
        if selection == .none { return [] }
        let blocks: JSONValue
        do {
            blocks = try await domain.execute("query-block", nil)
        } catch {
            if error.errorClass == "CommandNotFound" && selection == .all { return [] }
            throw error
        }
        let nodes = try await domain.execute("query-named-block-nodes", ["flat": true])
        var nodeOfFile: [String: String] = [:]
        for node in nodes.arrayValue ?? [] {
            guard let name = node["node-name"]?.stringValue, let file = node["file"]?.stringValue,
                  let driver = node["drv"]?.stringValue, !["file", "host_device", "host_cdrom"].contains(driver) else { continue }
            if nodeOfFile[file] == nil { nodeOfFile[file] = name }
        }
        var found: [LiveDisk] = []
        var matched: Set<String> = []
        for block in blocks.arrayValue ?? [] {
            guard let inserted = block["inserted"], let topNode = inserted["node-name"]?.stringValue,
                  let image = inserted["image"], let topFile = image["filename"]?.stringValue else { continue }
            let backend = block["device"]?.stringValue ?? ""
            let qdevID = qdevIdentifier(block["qdev"]?.stringValue ?? "")
            let label = !backend.isEmpty ? backend : (qdevID ?? topNode)
            var chain: [(file: String, node: String?)] = []
            var layer: JSONValue? = image
            while let current = layer, let file = current["filename"]?.stringValue, chain.count < 1024 {
                chain.append((file, chain.isEmpty ? topNode : nodeOfFile[file]))
                layer = current["backing-image"]
            }
            let format = image["format"]?.stringValue ?? inserted["drv"]?.stringValue ?? "qcow2"
            let userLayer = chain.first { !isOwn($0.file, ownDirectory) }
            let standbyNode = !backend.isEmpty ? backend : (userLayer?.node ?? topNode)
            let names = [label, backend, qdevID ?? "", topNode, standbyNode].filter { !$0.isEmpty }
            switch selection {
            case .none:
                return []
            case .all:
                guard inserted["ro"]?.boolValue != true, format == "qcow2" else { continue }
            case .named(let wanted):
                guard let hit = wanted.first(where: names.contains) else { continue }
                matched.insert(hit)
                if inserted["ro"]?.boolValue == true {
                    throw DomainError(domain: domain.name, command: "query-block", errorClass: "DiskNotWritable", desc: "disk '\(hit)' is read-only: nothing to snapshot")
                }
            }
            found.append(LiveDisk(label: label, topNode: topNode, topFile: topFile, format: format, chain: chain, standbyNode: standbyNode))
        }
        if case .named(let wanted) = selection, let missing = wanted.first(where: { !matched.contains($0) }) {
            let have = found.map(\.label).joined(separator: ", ")
            throw DomainError(domain: domain.name, command: "query-block", errorClass: "NoSuchDisk",
                              desc: "no disk named '\(missing)' (BlockBackend, qdev id or node name)\(have.isEmpty ? "" : "; matched: \(have)")")
        }
        return found
    }

    /// `/machine/peripheral/vd0/virtio-backend` → `vd0`; a bare id stays as it is.
    static func qdevIdentifier(_ qdev: String) -> String? {
        if qdev.isEmpty { return nil }
        let parts = qdev.split(separator: "/")
        if let at = parts.firstIndex(of: "peripheral"), at + 1 < parts.count { return String(parts[at + 1]) }
        return qdev.contains("/") ? nil : qdev
    }

    static func isOwn(_ file: String, _ ownDirectory: String) -> Bool {
        file.hasPrefix(ownDirectory + "/")
    }

    /// The `transaction` that freezes every disk's active layer under a new overlay, and the
    /// manifest entries of the frozen images. The overlay names carry `token` (one per run),
    /// so a generation number reused after a restart never names a file in use.
    static func snapshot(_ disks: [LiveDisk], generation: Int, token: String, ownDirectory: String)
        -> (arguments: [String: JSONValue], frozen: [ManifestDisk], overlays: [String])
    {
        var actions: [JSONValue] = []
        var frozen: [ManifestDisk] = []
        var overlays: [String] = []
        for (index, disk) in disks.enumerated() {
            let safe = String(disk.label.map { $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" ? $0 : "_" })
            let overlay = "\(ownDirectory)/\(safe)-\(GenerationStore.pad(generation))-\(token).qcow2"
            overlays.append(overlay)
            actions.append([
                "type": "blockdev-snapshot-sync",
                "data": [
                    "node-name": .string(disk.topNode), "snapshot-file": .string(overlay),
                    "snapshot-node-name": .string("crn\(generation)-\(index)-\(token)"), "format": "qcow2", "mode": "absolute-paths",
                ],
            ])
            frozen.append(ManifestDisk(device: disk.label, node: disk.standbyNode, top: disk.topFile, format: disk.format, chain: disk.chain.map(\.file)))
        }
        return (["actions": .array(actions)], frozen, overlays)
    }

    /// Waits until no merge colorun started on the domain is running (a snapshot must not
    /// race a `block-commit` of the same chain).
    static func waitForMerges(_ domain: some CheckpointTarget, timeout: Duration) async throws(DomainError) {
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        while true {
            let jobs: [JSONValue]
            do {
                jobs = try await domain.execute("query-block-jobs", nil).arrayValue ?? []
            } catch {
                if error.errorClass == "CommandNotFound" { return }   // no block layer (the simulator)
                throw error
            }
            if !jobs.contains(where: { ($0["device"]?.stringValue ?? "").hasPrefix(mergeJobPrefix) }) { return }
            if clock.now > deadline {
                throw DomainError(domain: domain.name, command: "query-block-jobs", errorClass: DomainError.timeout,
                                  desc: "a merge of older disk layers is still running after \(timeout)")
            }
            try? await Task.sleep(for: .milliseconds(2))
        }
    }

    static let mergeJobPrefix = "colorun-merge-"

    /// After a committed checkpoint: deletes the layers colorun made that neither the live
    /// chain nor a kept generation needs any more (those merged by an earlier job), then
    /// starts one `block-commit` per disk merging the layers below the oldest kept
    /// generation's frozen image into the first layer that is not colorun's (the disk's own
    /// image). Kept generations' chains are untouched in content: the job rewrites only the
    /// backing link of the layer above what it merges, when it completes. Returns what was done.
    static func housekeep(_ domain: some CheckpointTarget, store: GenerationStore, selection: RemusDiskSelection, generation: Int) async -> [String: JSONValue] {
        let own = directory(of: store)
        let kept = GenerationManifest.good(in: store).map(\.1)
        let live: [LiveDisk]
        do {
            live = try await discover(domain, selection: selection, ownDirectory: own)
        } catch {
            return ["error": .string(error.description)]
        }
        // Files still needed: every live layer and every kept generation's chain.
        var needed = Set(live.flatMap { $0.chain.map(\.file) })
        for manifest in kept {
            for disk in manifest.disks { needed.formUnion((try? QCOW2Chain.follow(disk.top)) ?? disk.chain) }
        }
        var deleted = 0
        for name in (try? GenerationStore.list(own)) ?? [] where name.hasSuffix(".qcow2") && !needed.contains(own + "/" + name) {
            if unlink(own + "/" + name) == 0 { deleted += 1 }
        }
        var merges = 0
        var failures: [JSONValue] = []
        if let oldest = kept.first {
            for (index, disk) in live.enumerated() {
                guard let frozen = oldest.disks.first(where: { $0.device == disk.label }),
                      let at = disk.chain.firstIndex(where: { $0.file == frozen.top }) else { continue }
                guard let baseAt = disk.chain.indices.first(where: { $0 > at && !isOwn(disk.chain[$0].file, own) }),
                      baseAt > at + 1 else { continue }
                guard let top = disk.chain[at + 1].node, let base = disk.chain[baseAt].node else { continue }
                do throws(DomainError) {
                    _ = try await domain.execute("block-commit", [
                        "job-id": .string("\(mergeJobPrefix)\(generation)-\(index)"), "device": .string(disk.topNode),
                        "top-node": .string(top), "base-node": .string(base),
                    ])
                    merges += 1
                } catch {
                    failures.append(.string(error.description))
                }
            }
        }
        var result: [String: JSONValue] = ["deleted_layers": .int(Int64(deleted)), "merges_started": .int(Int64(merges))]
        if !failures.isEmpty { result["merge_errors"] = .array(failures) }
        return result
    }

    // MARK: - A standby's disks

    /// Checks a standby's command line against the generation's disks: it must not open a
    /// checkpointed disk itself (colorun adds it, on a fresh overlay).
    static func checkStandbyArguments(_ argv: [String], manifest: GenerationManifest) throws(GenerationStoreError) {
        for (index, argument) in argv.enumerated() where index > 0 && ["-drive", "-blockdev", "--drive", "--blockdev"].contains(argv[index - 1]) {
            var values: [String: String] = [:]
            for part in argument.split(separator: ",") {
                let pair = part.split(separator: "=", maxSplits: 1)
                if pair.count == 2 { values[String(pair[0])] = String(pair[1]) }
            }
            for disk in manifest.disks {
                let names = [values["node-name"], values["id"]].compactMap { $0 }
                let files = [values["file"], values["file.filename"], values["filename"]].compactMap { $0 }
                if names.contains(disk.node) || files.contains(where: disk.chain.contains) {
                    throw GenerationStoreError(
                        path: argument,
                        reason: "the standby's command line opens checkpointed disk '\(disk.device)' itself (\(argv[index - 1]) \(argument)); "
                            + "leave it out: colorun adds -blockdev node-name=\(disk.node) on a fresh overlay over generation \(manifest.generation)'s frozen image, "
                            + "and the command line's -device ...,drive=\(disk.node) uses it")
                }
            }
        }
    }

    /// Creates a fresh overlay over each frozen image (`qemu-img create -f qcow2 -b FROZEN`)
    /// in `directory` and returns the `-blockdev` arguments that open them.
    static func prepareStandby(_ manifest: GenerationManifest, directory: String) throws(GenerationStoreError) -> [String] {
        guard !manifest.disks.isEmpty else { return [] }
        try GenerationStore.makeDirectories(directory)
        var arguments: [String] = []
        let stamp = String(realtimeNanoseconds(), radix: 36)
        for disk in manifest.disks {
            let safe = String(disk.node.map { $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" ? $0 : "_" })
            let overlay = "\(directory)/\(safe)-gen\(GenerationStore.pad(manifest.generation))-\(stamp).qcow2"
            let log = overlay + ".log"
            let pid: pid_t
            do {
                pid = try spawnChild(["qemu-img", "create", "-q", "-f", "qcow2", "-b", disk.top, "-F", disk.format, overlay],
                                     lifetime: .owned, standardOutput: .appendingTo(log), standardError: .appendingTo(log))
            } catch {
                throw GenerationStoreError(path: overlay, reason: "qemu-img: \(error)")
            }
            let status = reapChild(pid, blocking: true)
            let output = String(decoding: (try? readFile(log)) ?? [], as: UTF8.self)
            unlink(log)
            guard status == .exited(code: 0) else {
                throw GenerationStoreError(path: overlay, reason: "qemu-img create failed (\(status.map { "\($0)" } ?? "?")): \(output)")
            }
            let escaped = overlay.split(separator: ",", omittingEmptySubsequences: false).joined(separator: ",,")
            arguments += ["-blockdev", "driver=qcow2,node-name=\(disk.node),file.driver=file,file.filename=\(escaped)"]
        }
        return arguments
    }
}

extension RemusDisks {
    /// The overlay files named in `-blockdev ...,file.filename=FILE` arguments (commas in a
    /// value are doubled).
    static func overlayFiles(_ arguments: [String]) -> [String] {
        arguments.compactMap { argument -> String? in
            guard argument.hasPrefix("driver=") else { return nil }
            var fields: [String] = [""]
            var iterator = argument.makeIterator()
            while let character = iterator.next() {
                if character == "," {
                    guard let after = iterator.next() else { break }
                    if after == "," { fields[fields.count - 1].append(",") } else { fields.append(String(after)) }
                } else {
                    fields[fields.count - 1].append(character)
                }
            }
            return fields.first { $0.hasPrefix("file.filename=") }.map { String($0.dropFirst("file.filename=".count)) }
        }
    }

    /// Deletes a failed standby's overlays (never a frozen image: only the files named in
    /// its own `-blockdev` arguments).
    static func removeOverlays(_ arguments: [String]) {
        for file in overlayFiles(arguments) { unlink(file) }
    }
}

/// Wall-clock nanoseconds, for unique file names.
func realtimeNanoseconds() -> UInt64 {
    var spec = timespec()
    clock_gettime(CLOCK_REALTIME, &spec)
    return UInt64(spec.tv_sec) * 1_000_000_000 + UInt64(spec.tv_nsec)
}
