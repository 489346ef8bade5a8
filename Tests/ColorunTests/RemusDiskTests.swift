import ColorunTestSupport
import ColorunSystem
import Logging
import NIOPosix
import QEMULab
import JSON
import QMP
import Synchronization
import Testing
@testable import Colorun

#if canImport(Glibc)
import Glibc
#endif

/// Remus checkpoints of a guest with a disk (a qcow2 image under the counting guest,
/// written from the test with HMP's qemu-io) and a NIC: the disk is consistent with each
/// generation, torn generations are never listed, and output commit holds packets until the
/// checkpoint is durable. Real QEMU under TCG.
@Suite(.serialized, .timeLimit(.minutes(5)), .machine(.exclusive)) struct RemusDiskTests {
    /// Where the pattern writes go (past the boot sector).
    static let offset = 1 << 20

    /// A primary with an IDE disk `vd0` on node `d0` (a fresh qcow2) and, if asked, an e1000 on netdev `n0`.
    final class Rig: Sendable {
        let directory: String
        let base: String
        let store: GenerationStore
        let primary: QEMUInstance
        let domain: Domain
        let instances = Mutex<[QEMUInstance]>([])

        static let diskDevice = ["-device", "ide-hd,drive=d0,id=vd0"]

        /// A standby's QEMU command line for `remus.restore{qemu = ...}`, as a Lua table
        /// literal (the disk device, no disk node: colorun adds it), and the monitor socket it opens.
        func standbyCommandLine() -> (lua: String, socket: String) {
            let guestImage = directory + "/guest.img"
            writeFile(guestImage, CountingGuest.bootSector)
            let socket = directory + "/standby.qmp"
            let argv = ["qemu-system-x86_64"]
                + QEMUSpec(countingGuest: true, extraArguments: Self.diskDevice).arguments(qmpSocket: socket, guestImage: guestImage)
            return ("{" + argv.map { "\"\($0)\"" }.joined(separator: ", ") + "}", socket)
        }

        init(keep: Int = 2, nic: Bool = false) throws {
            directory = makeTempDirectory("colorun-rdisk")
            base = directory + "/base.qcow2"
            try runTool(["qemu-img", "create", "-q", "-f", "qcow2", base, "16M"])
            store = try GenerationStore(directory: directory + "/state/checkpoints/primary", fileExtension: "vmstate", keep: keep)
            var extra = ["-blockdev", "driver=qcow2,node-name=d0,file.driver=file,file.filename=\(base)"] + Self.diskDevice
            if nic { extra += ["-netdev", "user,id=n0", "-device", "e1000,netdev=n0,id=nic0"] }
            primary = try QEMUInstance.start(QEMUSpec(countingGuest: true, extraArguments: extra))
            domain = Domain(name: "primary", endpoint: primary.qmpEndpoint, eventLoop: MultiThreadedEventLoopGroup.singleton.next(),
                            logger: Logger(label: "test"))
            let started = primary
            instances.withLock { $0.append(started) }
        }

        /// Starts a standby on generation `number`'s frozen chain (fresh overlays), loaded and paused.
        func restore(_ number: Int, tag: String) async throws -> (domain: Domain, overlay: String) {
            let manifest = try GenerationManifest.load(from: store, number)
            let disks = try RemusDisks.prepareStandby(manifest, directory: directory + "/standby-" + tag)
            let standby = try QEMUInstance.start(QEMUSpec(
                incoming: "exec:cat '\(manifest.memoryPath)'", countingGuest: true, extraArguments: Self.diskDevice + disks))
            instances.withLock { $0.append(standby) }
            let domain = Domain(name: "standby-\(tag)", endpoint: standby.qmpEndpoint, eventLoop: MultiThreadedEventLoopGroup.singleton.next(),
                                logger: Logger(label: "test"))
            _ = try await CheckpointEngine.bringUpStandby(domain, resume: false)
            let overlay = try #require(disks.last?.split(separator: "=").last.map(String.init))
            return (domain, overlay)
        }

        func tearDown() async {
            for instance in instances.withLock({ $0 }) { await instance.stop() }
            removeTree(directory)
        }
    }

    static func runTool(_ argv: [String]) throws {
        let pid = try spawnChild(argv, lifetime: .owned)
        let status = reapChild(pid, blocking: true)
        guard status == .exited(code: 0) else { throw SystemError("\(argv[0]) \(status.map { "\($0)" } ?? "?")") }
    }

    static func hmp(_ domain: Domain, _ command: String) async throws -> String {
        try await domain.execute("human-monitor-command", ["command-line": .string(command)]).stringValue ?? ""
    }

    static func write(_ domain: Domain, pattern: UInt8, at offset: Int = offset) async throws {
        let out = try await hmp(domain, "qemu-io -d vd0 \"write -P \(pattern) \(offset) 4k\"")
        #expect(!out.contains("rror"), "qemu-io write: \(out)")
    }

    /// The active layer of the primary's disk.
    static func activeImage(_ domain: Domain, store: GenerationStore) async throws -> String {
        let disks = try await RemusDisks.discover(domain, selection: .all, ownDirectory: RemusDisks.directory(of: store))
        return try #require(disks.first?.topFile)
    }

    /// Whether the 4 KiB at `offset` of the disk seen through `image` (and its backing chain)
    /// hold `pattern`, by the qemu-io tool's own verification (HMP's qemu-io prints on QEMU's
    /// stdout). `-U`: the image may be open in a running QEMU (flush first).
    static func holds(_ image: String, pattern: UInt8, at offset: Int = offset) throws -> Bool {
        let out = image + ".qemu-io.out"
        defer { unlink(out) }
        let pid = try spawnChild(["qemu-io", "-U", "-r", "-f", "qcow2", "-c", "read -P \(pattern) \(offset) 4k", image],
                                 lifetime: .owned, standardOutput: .appendingTo(out), standardError: .appendingTo(out))
        _ = reapChild(pid, blocking: true)
        let text = String(decoding: (try? readFile(out)) ?? [], as: UTF8.self)
        #expect(text.contains("read 4096/4096"), "qemu-io: \(text)")
        return text.contains("read 4096/4096") && !text.contains("Pattern verification failed")
    }

    static func flush(_ domain: Domain) async throws {
        _ = try await hmp(domain, "qemu-io -d vd0 flush")
    }

    /// The bytes of every file, to show the frozen images were never written.
    static func contents(_ files: [String]) throws -> [[UInt8]] {
        try files.map { try readFile($0) }
    }

    static func chainLength(_ domain: Domain, store: GenerationStore) async throws -> Int {
        try await RemusDisks.waitForMerges(domain, timeout: .seconds(20))
        let disks = try await RemusDisks.discover(domain, selection: .all, ownDirectory: RemusDisks.directory(of: store))
        #expect(disks.count == 1)
        return disks.first?.chain.count ?? 0
    }

    /// Pattern A, checkpoint, pattern B, SIGKILL: the standby reads A, not B; a second
    /// standby from the same generation reads A too (the frozen images were not written).
    @Test func restoredStandbySeesTheDiskAsAtTheCheckpoint() async throws {
        let rig = try Rig()
        do {
            try await Self.write(rig.domain, pattern: 0x22)
            let result = try await CheckpointEngine.remusCheckpoint(rig.domain, store: rig.store, disks: .all, outputCommit: .auto)
            #expect(result.extra["disks"]?.arrayValue?.count == 1)
            #expect(try await Self.hmp(rig.domain, "info status").contains("running"))
            try await Self.write(rig.domain, pattern: 0x33)
            try await Self.flush(rig.domain)
            let active = try await Self.activeImage(rig.domain, store: rig.store)
            #expect(active != rig.base, "the snapshot put a new active layer on top")
            #expect(try Self.holds(active, pattern: 0x33), "the primary's disk has the write made after the checkpoint")
            rig.primary.kill(SIGKILL)
            _ = await rig.primary.waitForExit()

            let manifest = try GenerationManifest.load(from: rig.store, result.generation)
            #expect(manifest.disks.map(\.node) == ["d0"])
            #expect(manifest.disks.first?.top == rig.base, "generation 1 froze the disk's own image")
            let chain = manifest.disks.flatMap(\.chain)
            let frozenBefore = try Self.contents(chain)
            for tag in ["first", "second"] {
                let (standby, overlay) = try await rig.restore(result.generation, tag: tag)
                #expect(try Self.holds(overlay, pattern: 0x22), "\(tag) standby: the checkpoint's write")
                #expect(!(try Self.holds(overlay, pattern: 0x33)), "\(tag) standby: no write from after the checkpoint")
                // The standby writes to its own overlay, never to the frozen chain.
                try await Self.write(standby, pattern: 0x44)
                try await Self.flush(standby)
                #expect(try Self.holds(overlay, pattern: 0x44), "\(tag) standby: its own write lands in its overlay")
                _ = try? await standby.execute("quit", nil)
            }
            #expect(try Self.contents(chain) == frozenBefore, "the frozen images were never written")
        } catch {
            await rig.tearDown()
            throw error
        }
        await rig.tearDown()
    }

    /// 20 checkpoints, a new pattern before each: the chain stays at most keep + 2 layers,
    /// merged layers are deleted, and each kept generation restores with its own last write.
    @Test func chainStaysBoundedAndKeptGenerationsRestore() async throws {
        let keep = 2
        let rig = try Rig(keep: keep)
        do {
            var lengths: [Int] = []
            var pauses: [Double] = []
            var patternOf: [Int: UInt8] = [:]
            for round in 0..<20 {
                let pattern = UInt8(0x40 + round)
                try await Self.write(rig.domain, pattern: pattern)
                let result = try await CheckpointEngine.remusCheckpoint(rig.domain, store: rig.store, disks: .all, outputCommit: .off)
                patternOf[result.generation] = pattern
                pauses.append(result.pauseMilliseconds)
                lengths.append(try await Self.chainLength(rig.domain, store: rig.store))
                let layers = try GenerationStore.list(RemusDisks.directory(of: rig.store)).filter { $0.hasSuffix(".qcow2") }
                // The live chain's own layers, plus at most the one merged by the job just finished
                // (deleted by the next checkpoint's housekeeping).
                #expect(layers.count <= keep + 2, "round \(round): colorun's layer files \(layers)")
            }
            #expect(lengths.allSatisfy { $0 <= keep + 2 }, "chain lengths \(lengths)")
            #expect(lengths.last == keep + 2)
            let manifests = try GenerationStore.list(rig.store.directory).filter { $0.hasSuffix(".manifest.json") }
            #expect(manifests.count == keep, "pruned generations' manifests go with them: \(manifests)")
            print("disk snapshots, keep \(keep): pause p50 \(median(pauses)) ms; chain lengths \(lengths)")
            try await Self.write(rig.domain, pattern: 0x7f)
            rig.primary.kill(SIGKILL)
            _ = await rig.primary.waitForExit()

            let kept = GenerationManifest.good(in: rig.store).map(\.0.number)
            #expect(kept == [19, 20])
            for number in kept {
                let (standby, overlay) = try await rig.restore(number, tag: "g\(number)")
                let pattern = try #require(patternOf[number])
                #expect(try Self.holds(overlay, pattern: pattern), "generation \(number) holds its last write")
                #expect(!(try Self.holds(overlay, pattern: pattern + 1)), "generation \(number) holds no later write")
                #expect(try await Self.hmp(standby, "info status").contains("paused"))
                _ = try? await standby.execute("quit", nil)
            }
        } catch {
            await rig.tearDown()
            throw error
        }
        await rig.tearDown()
    }

    /// A generation without its manifest, with a truncated memory file, or with a missing
    /// chain file is torn: not listed, not loadable.
    @Test func tornGenerationsAreNeverListed() async throws {
        let rig = try Rig(keep: 4)
        do {
            var generations: [Int] = []
            for round in 0..<4 {
                try await Self.write(rig.domain, pattern: UInt8(0x50 + round))
                generations.append(try await CheckpointEngine.remusCheckpoint(rig.domain, store: rig.store, disks: .all).generation)
            }
            #expect(GenerationManifest.good(in: rig.store).map(\.0.number) == generations)
            let manifests = try generations.map { try GenerationManifest.load(from: rig.store, $0) }
            rig.primary.kill(SIGKILL)
            _ = await rig.primary.waitForExit()

            // 4: no manifest. 3: memory file cut in half. 2 (and 3, 4 above it): its frozen image gone.
            #expect(unlink(GenerationManifest.path(in: rig.store, generations[3])) == 0)
            #expect(truncate(manifests[2].memoryPath, off_t(manifests[2].memoryBytes / 2)) == 0)
            let frozen2 = try #require(manifests[1].disks.first?.top)
            #expect(frozen2 != rig.base)
            #expect(unlink(frozen2) == 0)

            #expect(GenerationManifest.good(in: rig.store).map(\.0.number) == [generations[0]])
            for number in generations.dropFirst() {
                #expect(throws: GenerationStoreError.self) { try GenerationManifest.load(from: rig.store, number) }
            }
            let (standby, overlay) = try await rig.restore(generations[0], tag: "g1")
            #expect(try Self.holds(overlay, pattern: 0x50))
            #expect(!(try Self.holds(overlay, pattern: 0x51)))
            _ = try? await standby.execute("quit", nil)
        } catch {
            await rig.tearDown()
            throw error
        }
        await rig.tearDown()
    }

    /// A checkpoint target that records the commands it passes on, and can fail one.
    final class Recorder: CheckpointTarget {
        let inner: Domain
        let log = Mutex<[String]>([])
        let failing: String?
        /// Called on each `qom-set` (to look at the state directory at release time).
        let onRelease: @Sendable () -> Void

        init(_ inner: Domain, failing: String? = nil, onRelease: @escaping @Sendable () -> Void = {}) {
            self.inner = inner
            self.failing = failing
            self.onRelease = onRelease
        }

        var name: String { inner.name }
        var commands: [String] { log.withLock { $0 } }

        func stop() async throws(DomainError) {
            log.withLock { $0.append("stop") }
            try await inner.stop()
        }

        func resume() async throws(DomainError) {
            log.withLock { $0.append("cont") }
            try await inner.resume()
        }

        func execute(_ command: String, _ arguments: [String: JSONValue]?) async throws(DomainError) -> JSONValue {
            var entry = command
            if command == "qom-set" { entry += " " + (arguments?["value"]?.stringValue ?? "") }
            if command == "object-add" { entry += " " + (arguments?["netdev"]?.stringValue ?? "") }
            log.withLock { $0.append(entry) }
            if command == "qom-set" { onRelease() }
            if command == failing {
                throw DomainError(domain: name, command: command, errorClass: "GenericError", desc: "injected by the test")
            }
            return try await inner.execute(command, arguments)
        }

        func disconnect() async { await inner.disconnect() }
    }

    static func objects(_ domain: Domain) async throws -> [String] {
        try await domain.execute("qom-list", ["path": "/objects"]).arrayValue?.compactMap { $0["name"]?.stringValue } ?? []
    }

    /// Output commit: the NIC's netdev gets a filter-buffer at the first checkpoint; each
    /// checkpoint releases (status off, on) only after its manifest is durable, before `cont`;
    /// a failed checkpoint releases nothing and still resumes; the buffer goes at the end;
    /// with output commit off there is none.
    @Test func outputCommitHoldsUntilTheCheckpointIsDurable() async throws {
        let rig = try Rig(nic: true)
        do {
            let state = RemusDomainState()
            let manifestAtRelease = Mutex<[Bool]>([])
            let store = rig.store
            let recorder = Recorder(rig.domain) {
                let next = (store.lastGood ?? 0)
                let path = GenerationManifest.path(in: store, next)
                manifestAtRelease.withLock { $0.append(next > 0 && access(path, F_OK) == 0) }
            }
            let first = try await CheckpointEngine.remusCheckpoint(recorder, store: rig.store, disks: .none, outputCommit: .auto, state: state)
            #expect(first.extra["output_commit"] == ["n0"])
            #expect(state.bufferedNetdevs == ["n0"])
            #expect(try await Self.objects(rig.domain).contains("colorun-buffer-n0"))
            let filter = try await rig.domain.execute("qom-get", ["path": "/objects/colorun-buffer-n0", "property": "status"])
            #expect(filter.stringValue == "on", "the buffer is on between checkpoints")
            let commands = recorder.commands
            let order = commands.filter { ["object-add n0", "stop", "migrate", "qom-set off", "qom-set on", "cont"].contains($0) }
            #expect(order == ["object-add n0", "stop", "migrate", "qom-set off", "qom-set on", "cont"], "\(commands)")
            #expect(manifestAtRelease.withLock { $0 } == [true, true], "released only once the manifest is durable")

            // A second checkpoint reuses the buffer.
            let before = recorder.commands.count
            _ = try await CheckpointEngine.remusCheckpoint(recorder, store: rig.store, disks: .none, outputCommit: .auto, state: state)
            let second = Array(recorder.commands.dropFirst(before))
            #expect(!second.contains { $0.hasPrefix("object-add") })
            #expect(second.filter { $0.hasPrefix("qom-set") } == ["qom-set off", "qom-set on"])

            // A checkpoint that fails (migrate) releases nothing and resumes the VM.
            let failing = Recorder(rig.domain, failing: "migrate")
            await #expect(throws: CheckpointError.self) {
                try await CheckpointEngine.remusCheckpoint(failing, store: rig.store, disks: .none, outputCommit: .auto, state: state)
            }
            #expect(!failing.commands.contains { $0.hasPrefix("qom-set") }, "\(failing.commands)")
            #expect(failing.commands.last == "cont")
            #expect(try await Self.hmp(rig.domain, "info status").contains("running"))

            // Off: the buffer is removed, and no release is sent.
            let off = Recorder(rig.domain)
            _ = try await CheckpointEngine.remusCheckpoint(off, store: rig.store, disks: .none, outputCommit: .off, state: state)
            #expect(off.commands.contains("object-del"))
            #expect(!off.commands.contains { $0.hasPrefix("qom-set") || $0.hasPrefix("object-add") })
            #expect(!(try await Self.objects(rig.domain).contains("colorun-buffer-n0")))
            #expect(state.bufferedNetdevs == nil)

            // On again, then the end of the run removes it.
            _ = try await CheckpointEngine.remusCheckpoint(rig.domain, store: rig.store, disks: .none, outputCommit: .netdevs(["n0"]), state: state)
            #expect(try await Self.objects(rig.domain).contains("colorun-buffer-n0"))
            #expect(await OutputCommit.remove(rig.domain, state: state).isEmpty)
            #expect(!(try await Self.objects(rig.domain).contains("colorun-buffer-n0")))
        } catch {
            await rig.tearDown()
            throw error
        }
        await rig.tearDown()
    }

    /// The pause p50 of a Remus checkpoint: memory only, with disk snapshots, with output
    /// commit, with both (printed; docs/lua-api.md quotes them).
    @Test func pauseCosts() async throws {
        let rig = try Rig(keep: 2, nic: true)
        do {
            let modes: [(String, RemusDiskSelection, OutputCommitSelection)] = [
                ("memory only", .none, .off), ("disk snapshots", .all, .off),
                ("output commit", .none, .auto), ("disks + output commit", .all, .auto),
            ]
            let state = RemusDomainState()
            for (label, disks, output) in modes {
                var pauses: [Double] = []
                for round in 0..<15 {
                    try await Self.write(rig.domain, pattern: UInt8(round + 1))
                    let result = try await CheckpointEngine.remusCheckpoint(rig.domain, store: rig.store, disks: disks, outputCommit: output, state: state)
                    pauses.append(result.pauseMilliseconds)
                }
                print("remus pause, \(label): p50 \(median(pauses)) ms, max \(pauses.max() ?? 0) ms")
                #expect(median(pauses) < 1000)
            }
            _ = await OutputCommit.remove(rig.domain, state: state)
        } catch {
            await rig.tearDown()
            throw error
        }
        await rig.tearDown()
    }
}

private func median(_ values: [Double]) -> Double {
    let sorted = values.sorted()
    return sorted.isEmpty ? 0 : (sorted[sorted.count / 2] * 100).rounded() / 100
}
