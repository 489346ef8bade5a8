import ColorunSystem

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Which generations of a staged store are in which slot file: the store's
/// `generations.index`, two places for one record each (as LMDB's two meta pages, or a
/// database's double-written control file).
///
/// A record lists every committed slot generation (number, slot, length, CRC-32C of the
/// bytes) under a sequence number and ends with the CRC-32C of itself. A new record goes
/// into the place that does *not* hold the newest good record, so a write torn by a crash
/// leaves the newest good one whole; a reader takes the place whose record checks out with
/// the higher sequence. The store writes a generation's bytes only into a slot that the
/// newest durable record does not list, and makes them durable before the record that lists
/// them is written: whichever record a crash leaves as the newest, every slot it lists holds
/// the bytes it names (and the CRC says so when read back).
///
/// Layout, little-endian: `CLRNGIX1` (8 bytes), version (u32, 1), entry count (u32),
/// sequence (u64); per entry generation (u64), length (u64), slot (u32), CRC-32C of the
/// slot's bytes (u32); the record's CRC-32C (u32). Place p starts at byte p × `placeSize`.
enum GenerationIndex {
    struct Entry: Sendable, Hashable {
        var generation: Int
        var slot: Int
        var bytes: Int
        var checksum: UInt32
    }

    struct Record: Sendable, Hashable {
        var sequence: UInt64
        var entries: [Entry]
    }

    static let fileName = "generations.index"
    static let magic: [UInt8] = Array("CLRNGIX1".utf8)
    static let version: UInt32 = 1
    static let headerSize = 24
    static let entrySize = 24
    /// Bytes reserved for each of the two records.
    static let placeSize = 32 * 1024
    /// The most generations a record lists (a staged store's `keep` is at most this).
    static let maxEntries = 1000

    static func encode(_ record: Record) -> [UInt8] {
        precondition(record.entries.count <= maxEntries)
        var out: [UInt8] = []
        out.reserveCapacity(headerSize + entrySize * record.entries.count + 4)
        out += magic
        append(&out, UInt64(version) | UInt64(record.entries.count) << 32, 8)
        append(&out, record.sequence, 8)
        for entry in record.entries {
            append(&out, UInt64(entry.generation), 8)
            append(&out, UInt64(entry.bytes), 8)
            append(&out, UInt64(entry.slot) | UInt64(entry.checksum) << 32, 8)
        }
        append(&out, UInt64(crc32c(out)), 4)
        return out
    }

    /// The record in `bytes` (one place, possibly followed by other bytes), or nil when it is
    /// not one whole: wrong magic or version, a count out of range, a CRC that does not match
    /// (torn, or never written).
    static func decode(_ bytes: UnsafeRawBufferPointer) -> Record? {
        guard bytes.count >= headerSize + 4, bytes.prefix(8).elementsEqual(magic) else { return nil }
        let versionAndCount = load(bytes, 8)
        let count = Int(versionAndCount >> 32)
        guard UInt32(truncatingIfNeeded: versionAndCount) == version, count <= maxEntries else { return nil }
        let length = headerSize + entrySize * count
        guard bytes.count >= length + 4,
              UInt32(truncatingIfNeeded: load(bytes, length, width: 4)) == crc32c(UnsafeRawBufferPointer(rebasing: bytes[0..<length]))
        else { return nil }
        var entries: [Entry] = []
        entries.reserveCapacity(count)
        for i in 0..<count {
            let at = headerSize + entrySize * i
            let slotAndChecksum = load(bytes, at + 16)
            guard let generation = Int(exactly: load(bytes, at)), let size = Int(exactly: load(bytes, at + 8)) else { return nil }
            entries.append(Entry(generation: generation, slot: Int(UInt32(truncatingIfNeeded: slotAndChecksum)), bytes: size,
                                 checksum: UInt32(truncatingIfNeeded: slotAndChecksum >> 32)))
        }
        return Record(sequence: load(bytes, 16), entries: entries)
    }

    /// The newest whole record of the index open at `fd` and its place (0 or 1); nil when
    /// neither place holds one.
    static func read(_ fd: Int32) -> (record: Record, place: Int)? {
        var best: (record: Record, place: Int)?
        var buffer = [UInt8](repeating: 0, count: placeSize)
        for place in 0..<2 {
            let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, placeSize, off_t(place * placeSize)) }
            guard n > 0, let record = buffer.withUnsafeBytes({ decode(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }) else { continue }
            if best == nil || record.sequence > best!.record.sequence { best = (record, place) }
        }
        return best
    }

    /// Writes `record` into `place` (not durable until the caller syncs).
    static func write(_ record: Record, place: Int, to fd: Int32) throws(GenerationStoreError) {
        let bytes = encode(record)
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress! + done, $0.count - done, off_t(place * placeSize + done)) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw GenerationStoreError(path: fileName, reason: "index write failed: \(GenerationStore.errnoText())") }
            done += n
        }
    }

    private static func append(_ out: inout [UInt8], _ value: UInt64, _ width: Int) {
        for i in 0..<width { out.append(UInt8(truncatingIfNeeded: value >> (8 * UInt64(i)))) }
    }

    private static func load(_ bytes: UnsafeRawBufferPointer, _ at: Int, width: Int = 8) -> UInt64 {
        var value: UInt64 = 0
        for i in 0..<width { value |= UInt64(bytes[at + i]) << (8 * UInt64(i)) }
        return value
    }
}
