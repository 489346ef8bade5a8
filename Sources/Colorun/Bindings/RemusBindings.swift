import JSON
import LuaRuntime
import NIOCore
import NIOPosix
import QMP

/// The Remus options and restore plumbing: disks, generation manifests, output commit.
extension PolicySession {
    /// The spec key through which the disk arguments of a restore reach the launchers.
    static let standbyDiskArgumentsKey = "colorun_disk_arguments"

    /// `remus.checkpoint`'s `disks` (nil: all writable qcow2 disks; false: none; a list of
    /// names) and `output_commit` (nil or true: every NIC; false: off; a list of netdevs).
    func remusOptions(_ call: LuaCall, disks: Int, outputCommit: Int) throws -> (RemusDiskSelection, OutputCommitSelection) {
        func names(_ index: Int, _ option: String) throws -> [String]? {
            switch call.type(index) {
            case .none, .nil: return nil
            case .boolean: return call.boolean(index) ? nil : []
            case .table:
                guard let list = try call.json(index).arrayValue?.compactMap(\.stringValue) else {
                    throw LuaHostError.message("remus.checkpoint: '\(option)' must be false or a list of names")
                }
                return list
            default:
                throw LuaHostError.message("remus.checkpoint: '\(option)' must be false or a list of names, not a \(call.type(index).name)")
            }
        }
        let diskNames = try names(disks, "disks")
        let netdevs = try names(outputCommit, "output_commit")
        let diskSelection: RemusDiskSelection = diskNames.map { $0.isEmpty ? .none : .named($0) } ?? .all
        let outputSelection: OutputCommitSelection = netdevs.map { $0.isEmpty ? .off : .netdevs($0) } ?? .auto
        return (diskSelection, outputSelection)
    }

    func remusState(_ name: String) -> RemusDomainState {
        if let state = remusStates[name] { return state }
        let state = RemusDomainState()
        remusStates[name] = state
        return state
    }

    /// The good generations of a series: for a Remus series, those whose manifest checks out.
    func remusGenerations(_ store: GenerationStore) -> [Generation] {
        guard store.fileExtension == "vmstate" else { return (try? store.generations()) ?? [] }
        return GenerationManifest.good(in: store).map(\.0)
    }

    /// Checks generation `number` again; when it has disks, checks that the standby's
    /// command line does not open them itself and returns the manifest (its overlays are
    /// made off the event loop: `standbyOverlays`).
    func standbyManifest(spec: JSONValue, generation number: Int, store: GenerationStore) throws -> GenerationManifest? {
        let manifest: GenerationManifest
        do {
            manifest = try GenerationManifest.load(from: store, number)
        } catch {
            throw LuaHostError.structured(["class": "TornCheckpoint", "desc": .string(error.description), "step": "restore"], message: "remus.restore: \(error)")
        }
        guard !manifest.disks.isEmpty else { return nil }
        if spec["lab"]?.boolValue != true {
            do {
                try RemusDisks.checkStandbyArguments(spec["qemu"]?.arrayValue?.compactMap(\.stringValue) ?? [], manifest: manifest)
            } catch {
                throw Self.restoreFailed(error)
            }
        }
        return manifest
    }

    /// Makes the standby's fresh overlays (`qemu-img create`, on the blocking I/O pool) and
    /// returns the `-blockdev` arguments that open them.
    static func standbyOverlays(_ manifest: GenerationManifest?, directory: String, io: NIOThreadPool) async throws(GenerationStoreError) -> [String] {
        guard let manifest else { return [] }
        return try await CheckpointEngine.blocking(io) { () throws(GenerationStoreError) -> [String] in
            try RemusDisks.prepareStandby(manifest, directory: directory)
        }
    }

    static func restoreFailed(_ error: GenerationStoreError) -> LuaHostError {
        LuaHostError.structured(["class": "RestoreFailed", "desc": .string(error.description), "step": "restore"], message: "remus.restore: \(error)")
    }

    /// At the end of a run: removes the output buffers colorun installed (`object-del`
    /// releases what they still hold: with no checkpoint to come, holding it longer protects
    /// nothing and would cut the guest off the network).
    func removeOutputBuffers() -> EventLoopFuture<Void> {
        let targets = remusStates.compactMap { name, state in domains[name].map { ($0, state) } }
        guard !targets.isEmpty else { return eventLoop.makeSucceededVoidFuture() }
        let promise = eventLoop.makePromise(of: Void.self)
        let logger = self.logger
        let work = UncheckedSendable(targets)
        promise.completeWithTask {
            for (domain, state) in work.value where state.bufferedNetdevs?.isEmpty == false {
                for failure in await OutputCommit.remove(domain, state: state) {
                    logger.error("could not remove an output buffer", metadata: ["error": .string(failure.description)])
                }
            }
        }
        return promise.futureResult
    }
}
