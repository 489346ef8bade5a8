import JSON
import QMP

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// One disk of a Remus generation: the image that was the disk's active layer when the VM
/// was paused (frozen since: the snapshot put a new overlay on top of it) and its backing
/// chain as it was then.
struct ManifestDisk: Sendable, Hashable {
    /// The disk's name on the primary: its BlockBackend name, else its device's qdev id, else its node name.
    var device: String
    /// The node name a restored standby gives the disk (its `-device ...,drive=` names it).
    var node: String
    /// The frozen image.
    var top: String
    /// Its format (`qcow2` but for a first generation taken on a raw image).
    var format: String
    /// The frozen image and every image below it, top first, as at the pause.
    var chain: [String]

    var json: JSONValue {
        ["device": .string(device), "node": .string(node), "top": .string(top), "format": .string(format),
         "chain": .array(chain.map { .string($0) })]
    }

    init(device: String, node: String, top: String, format: String, chain: [String]) {
        self.device = device
        self.node = node
        self.top = top
        self.format = format
        self.chain = chain
    }

    init?(_ json: JSONValue) {
        guard let device = json["device"]?.stringValue, let node = json["node"]?.stringValue,
              let top = json["top"]?.stringValue, let chain = json["chain"]?.arrayValue?.compactMap(\.stringValue) else { return nil }
        self.init(device: device, node: node, top: top, format: json["format"]?.stringValue ?? "qcow2", chain: chain)
    }
}

/// What a Remus generation is made of, written last (atomically) when the generation is
/// committed: a generation without a manifest is torn and never listed or restored.
struct GenerationManifest: Sendable, Hashable {
    var generation: Int
    /// The memory (whole-VM migration stream) file and its size when committed.
    var memoryPath: String
    var memoryBytes: Int
    var disks: [ManifestDisk]
    /// The netdevs whose output was held until this generation was durable.
    var outputCommit: [String]
    /// The arbiter's fencing token (the create revision of the pair's key) of the node that
    /// wrote this generation, when the run has an arbiter: which primary's era it belongs to.
    var fencingToken: Int64?

    static let fileExtension = "manifest.json"

    var json: JSONValue {
        var fields: [String: JSONValue] = [
            "version": 1, "generation": .int(Int64(generation)),
            "memory": ["path": .string(memoryPath), "bytes": .int(Int64(memoryBytes))],
            "disks": .array(disks.map(\.json)), "output_commit": .array(outputCommit.map { .string($0) }),
        ]
        if let fencingToken { fields["fencing_token"] = .int(fencingToken) }
        return .object(fields)
    }

    init(generation: Int, memoryPath: String, memoryBytes: Int, disks: [ManifestDisk], outputCommit: [String]) {
        self.generation = generation
        self.memoryPath = memoryPath
        self.memoryBytes = memoryBytes
        self.disks = disks
        self.outputCommit = outputCommit
    }

    init?(_ json: JSONValue) {
        guard let generation = json["generation"]?.intValue, let memory = json["memory"],
              let path = memory["path"]?.stringValue, let bytes = memory["bytes"]?.intValue,
              let disks = json["disks"]?.arrayValue else { return nil }
        let parsed = disks.compactMap(ManifestDisk.init)
        guard parsed.count == disks.count else { return nil }
        self.init(generation: Int(generation), memoryPath: path, memoryBytes: Int(bytes), disks: parsed,
                  outputCommit: json["output_commit"]?.arrayValue?.compactMap(\.stringValue) ?? [])
        fencingToken = json["fencing_token"]?.intValue
    }

    static func path(in store: GenerationStore, _ number: Int) -> String {
        store.directory + "/gen-" + GenerationStore.pad(number) + "." + fileExtension
    }

    static func partialPath(in store: GenerationStore, _ number: Int) -> String {
        store.directory + "/.gen-" + GenerationStore.pad(number) + "." + fileExtension + ".partial"
    }

    /// Writes the manifest durably: a partial name, fsync, rename, fsync of the directory.
    func write(in store: GenerationStore) throws(GenerationStoreError) {
        let partial = Self.partialPath(in: store, generation)
        let bytes = JSONEncoding.encode(json) + [UInt8(ascii: "\n")]
        let fd = open(partial, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw GenerationStoreError(path: partial, reason: GenerationStore.errnoText()) }
        var written = 0
        while written < bytes.count {
            let n = bytes[written...].withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                let reason = GenerationStore.errnoText()
                close(fd)
                unlink(partial)
                throw GenerationStoreError(path: partial, reason: "write failed: \(reason)")
            }
            written += n
        }
        let synced = fsync(fd) == 0
        let reason = GenerationStore.errnoText()
        close(fd)
        guard synced else {
            unlink(partial)
            throw GenerationStoreError(path: partial, reason: "fsync failed: \(reason)")
        }
        let final = Self.path(in: store, generation)
        guard rename(partial, final) == 0 else {
            let reason = GenerationStore.errnoText()
            unlink(partial)
            throw GenerationStoreError(path: final, reason: "rename failed: \(reason)")
        }
        GenerationStore.syncDirectory(store.directory)
    }

    /// Reads generation `number`'s manifest and checks everything it names: the memory file
    /// whole (its committed size, QEMU's header) and, for each disk, the frozen image and every
    /// image its backing links lead to (followed in the qcow2 headers as they are now: merging
    /// older layers down rewrites a link, never the data a generation sees).
    static func load(from store: GenerationStore, _ number: Int) throws(GenerationStoreError) -> GenerationManifest {
        let path = Self.path(in: store, number)
        let bytes = try readWhole(path)
        guard let json = try? JSONParser.parse(bytes), let manifest = GenerationManifest(json), manifest.generation == number else {
            throw GenerationStoreError(path: path, reason: "not a generation manifest")
        }
        let size = try GenerationStore.validate(path: manifest.memoryPath, magic: CheckpointEngine.stateMagic)
        guard size == manifest.memoryBytes else {
            throw GenerationStoreError(path: manifest.memoryPath, reason: "memory file is \(size) bytes, the manifest says \(manifest.memoryBytes)")
        }
        for disk in manifest.disks {
            _ = try QCOW2Chain.follow(disk.top)
        }
        return manifest
    }

    /// The complete generations of a Remus store, oldest first: those whose memory file is
    /// listed and whose manifest (and everything it names) checks out. Torn ones are skipped.
    static func good(in store: GenerationStore) -> [(Generation, GenerationManifest)] {
        let listed = (try? store.generations()) ?? []
        return listed.compactMap { generation in
            (try? load(from: store, generation.number)).map { (generation, $0) }
        }
    }

    /// Removes manifests whose memory file the store has pruned (or never committed).
    static func prune(in store: GenerationStore) {
        let listed = Set(((try? store.generations()) ?? []).map(\.number))
        let suffix = "." + fileExtension
        for name in (try? GenerationStore.list(store.directory)) ?? [] where name.hasPrefix("gen-") && name.hasSuffix(suffix) {
            guard let number = Int(name.dropFirst(4).dropLast(suffix.count)), !listed.contains(number) else { continue }
            unlink(store.directory + "/" + name)
        }
    }

    static func readWhole(_ path: String) throws(GenerationStoreError) -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw GenerationStoreError(path: path, reason: "no manifest: \(GenerationStore.errnoText())") }
        defer { close(fd) }
        var result: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { throw GenerationStoreError(path: path, reason: GenerationStore.errnoText()) }
            if n == 0 { return result }
            result += buffer[0..<n]
            guard result.count < 16 << 20 else { throw GenerationStoreError(path: path, reason: "manifest too large") }
        }
    }
}

/// Backing chains read from qcow2 headers (no QEMU needed).
enum QCOW2Chain {
    static let magic: [UInt8] = [0x51, 0x46, 0x49, 0xFB]

    /// The image and every image below it, top first. Throws when a file is missing or
    /// unreadable. A file that is not qcow2 ends the chain (a raw base).
    static func follow(_ top: String) throws(GenerationStoreError) -> [String] {
        var chain: [String] = []
        var next: String? = top
        while let path = next {
            guard chain.count < 256, !chain.contains(path) else {
                throw GenerationStoreError(path: path, reason: "backing chain loops or is too long")
            }
            chain.append(path)
            next = try backing(of: path)
        }
        return chain
    }

    /// The backing file named in a qcow2 header (relative names resolved against the image's
    /// directory, as QEMU does); nil for a qcow2 without one or a file that is not qcow2.
    static func backing(of path: String) throws(GenerationStoreError) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw GenerationStoreError(path: path, reason: "missing disk image: \(GenerationStore.errnoText())") }
        defer { close(fd) }
        var header = [UInt8](repeating: 0, count: 20)
        let n = header.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 20, 0) }
        guard n == 20, Array(header[0..<4]) == magic else { return nil }
        let offset = header[8..<16].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        let size = header[16..<20].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
        guard offset > 0, size > 0 else { return nil }
        guard size <= 1023 else { throw GenerationStoreError(path: path, reason: "backing file name too long") }
        var name = [UInt8](repeating: 0, count: Int(size))
        let got = name.withUnsafeMutableBytes { pread(fd, $0.baseAddress, Int(size), off_t(offset)) }
        guard got == Int(size) else { throw GenerationStoreError(path: path, reason: "truncated qcow2 header") }
        let backing = String(decoding: name, as: UTF8.self)
        if backing.hasPrefix("/") || backing.contains(":") { return backing }
        let directory = path.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
        return directory.isEmpty ? backing : directory + "/" + backing
    }

    /// fsyncs a file (a no-op cost when it is clean).
    static func sync(_ path: String) throws(GenerationStoreError) {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw GenerationStoreError(path: path, reason: GenerationStore.errnoText()) }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw GenerationStoreError(path: path, reason: "fsync failed: \(GenerationStore.errnoText())") }
    }
}
