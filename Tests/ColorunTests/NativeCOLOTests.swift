import ColorunTestSupport
import QEMULab
import QEMUSimulator
import Synchronization
import Testing
@testable import Colorun

#if canImport(Glibc)
import Glibc
#endif

/// Whether /dev/kvm can be opened: QEMU 7.2's COLO deadlocks under TCG (docs/qemu-notes.md), so the
/// real native-COLO test needs KVM.
let kvmUsable: Bool = {
    let fd = open("/dev/kvm", O_RDWR | O_CLOEXEC)
    if fd >= 0 { close(fd) } else { print("SKIP native COLO on real QEMU: /dev/kvm is not usable (QEMU 7.2's COLO deadlocks under TCG)") }
    return fd >= 0
}()

/// Runs `body` with a fresh COLO lab (KVM, COLO-shaped QEMUs); its QEMUs are gone when
/// this returns, also when `body` throws.
/// COLO domains' monitors can be slow while a secondary loads checkpoints on a busy host (the
/// lab's QEMUs also start slower there): the COLO runs give them 10 s rather than 2.
func coloTimeouts(_ options: inout PolicyOptions) {
    options.domainOptions = DomainOptions(connectTimeout: .seconds(10), commandTimeout: .seconds(10))
}

func withCOLOLab<T>(guest: COLOGuest = COLOGuest(), _ body: (Lab, COLOLab) async throws -> T) async throws -> T {
    let colo = try COLOLab(guest: guest)
    let lab = try Lab(colo: colo)
    do {
        let result = try await body(lab, colo)
        await lab.stopAll()
        return result
    } catch {
        await lab.stopAll()
        throw error
    }
}

@Suite(.serialized, .timeLimit(.minutes(3)), .machine(.exclusive)) struct NativeCOLOTests {
    /// The helpers' errors and the failover against the simulator (which has COLO modes).
    @Test func failoverOnASimulatedSecondary() async throws {
        try await withSimulatedPair { pair in
            pair.secondary.setCOLOMode(.secondary)
            let run = try await runPolicy(#"""
                local p, s = domain.get("web-p"), domain.get("web-s")
                local ok, err = pcall(colo.native.failover, p)
                assert(not ok and err.desc == "The feature 'colo' is not enabled", tostring(err))
                local exited = false
                colo.native.on_exit(s, function(ev) exited = ev.data.reason == "request" end)
                assert(colo.native.status(s).mode == "secondary")
                colo.native.failover(s)
                local st = colo.native.status(s)
                assert(st.mode == "none" and st["last-mode"] == "secondary" and st.reason == "request", json.encode(st))
                for i = 1, 2000 do   -- the COLO_EXIT event is on its way: wait for it (10 s at most)
                  if exited then break end
                  sleep("5ms")
                end
                assert(exited, "COLO_EXIT reached the handler")
                assert(s:status().running)
                policy.stop()
                """#, domains: pair.domains)
            guard case .stopped = run.report.outcome else {
                Issue.record("\(run.report.outcome)")
                return
            }
            #expect(run.report.failovers == 1)
        }
    }

    /// The layout check, on plain (not COLO-shaped) QEMU under TCG: it names what is missing
    /// and where the layout comes from, and colo.native.start refuses before touching either.
    @Test func layoutCheckNamesWhatIsMissing() async throws {
        let lab = try Lab(names: ["primary", "secondary"])
        let run = try await runPolicy(#"""
            local p, s = domain.get("primary"), domain.get("secondary")
            local ok, missing = colo.native.check(p, "primary")
            assert(not ok and missing[1]:find("no drive 'colo-disk0'", 1, true), json.encode(missing))
            ok, missing = colo.native.check(s, "secondary")
            assert(not ok and #missing == 4, json.encode(missing))
            assert(missing[2]:find("no drive 'parent0'", 1, true) and missing[3]:find("no replication node", 1, true)
              and missing[4]:find("not waiting for the migration", 1, true), json.encode(missing))
            local ok2, err = pcall(colo.native.start, p, s, {uri = "unix:/nonexistent", nbd = "127.0.0.1:1", net = "127.0.0.1:2"})
            assert(not ok2, "start refused")
            log.info("start: " .. tostring(err))
            assert(tostring(err):find("colorun colo-args primary", 1, true), tostring(err))
            for _, c in ipairs(qmp.execute(p, "query-chardev")) do assert(not c.label:find("^colo"), "nothing was added") end
            local ok3, err3 = pcall(colo.native.start, p, s, {uri = "unix:/x", nbd = "nohost", net = "127.0.0.1:2"})
            assert(not ok3 and tostring(err3):find("'nbd' must be HOST:PORT", 1, true), tostring(err3))
            policy.stop()
            """#, lab: lab)
        guard case .stopped = run.report.outcome else {
            Issue.record("\(run.report.outcome)\n\(run.logs.text)")
            return
        }
        #expect(run.logs.text.contains("is not COLO-shaped for the primary: no drive 'colo-disk0'"), "\(run.logs.text)")
    }

    /// Real QEMU with KVM: a write checkpointed before the primary dies is on the promoted
    /// secondary; a write after the last checkpoint is rolled back (x-checkpoint-delay 60 s,
    /// so no periodic checkpoint comes between), as COLO says.
    @Test(.enabled(if: kvmUsable, "needs /dev/kvm: QEMU 7.2's COLO deadlocks under TCG"))
    func writeAfterTheLastCheckpointIsRolledBack() async throws {
        try await withCOLOLab { lab, _ in
            let run = try await runPolicy(#"""
                local p, s = domain.get("primary"), domain.get("secondary")
                local a = lab.colo(s)
                colo.native.start(p, s, {uri = a.uri, nbd = a.nbd, net = a.net, delay = "60s"})
                local function hmp(line) qmp.execute(p, "human-monitor-command", {["command-line"] = line}) end
                hmp('qemu-io colo-disk0 "write -P 0x5a 0 64k"')
                colo.native.checkpoint(p)
                hmp('qemu-io colo-disk0 "write -P 0xa5 64k 64k"')
                assert(lab.disk_pattern(p, 65536, 65536) == 0xa5, "the primary has the late write")
                lab.kill(p)
                local f = colo.native.failover(s)
                assert(f.running and f.failed == 0, json.encode(f))
                assert(colo.native.status(s).mode == "none")
                local c1 = lab.counter(s)
                sleep("100ms")
                assert(lab.counter(s) > c1, "the promoted secondary's guest runs on")
                local early, late = lab.disk_pattern(s, 0, 65536), lab.disk_pattern(s, 65536, 65536)
                log.info("after failover", {early = early, late = late})
                assert(early == 0x5a, "the checkpointed write is on the secondary: " .. early)
                assert(late == 0, "the write after the last checkpoint is rolled back: " .. late)
                policy.stop()
                """#, lab: lab, configure: coloTimeouts)
            guard case .stopped = run.report.outcome else {
                Issue.record("\(run.report.outcome)\n\(run.logs.text)")
                return
            }
            #expect(run.report.failovers == 1)
        }
    }
}

/// Reads the frames a `-netdev socket,listen=` peer sends (a 4-byte big-endian length, then the
/// frame) without blocking a thread: a task polls the socket every 2 ms.
final class FramePeer: @unchecked Sendable {
    private let fd: Int32
    private let state = Mutex<(frames: [[UInt8]], marks: [String: Int])>(([], [:]))
    private var task: Task<Void, Never>?

    /// Connects to 127.0.0.1:port (retrying for 10 s while QEMU comes up).
    init(address: String) throws {
        let port = UInt16(address.split(separator: ":").last.flatMap { Int($0) } ?? 0)
        var sa = sockaddr_in()
        sa.sin_family = sa_family_t(AF_INET)
        sa.sin_port = port.bigEndian
        sa.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
        var connected: Int32 = -1
        for _ in 0..<1000 {
            let s = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            let r = withUnsafePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(s, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
            if r == 0 { connected = s; break }
            Glibc.close(s)
            usleep(10_000)
        }
        guard connected >= 0 else { throw QEMULabError("cannot connect to the netdev at \(address)") }
        fd = connected
        task = Task { [self] in
            var buffer: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 65536)
            while !Task.isCancelled {
                let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
                if n > 0 {
                    buffer += chunk[0..<n]
                    while buffer.count >= 4 {
                        let length = Int(buffer[0]) << 24 | Int(buffer[1]) << 16 | Int(buffer[2]) << 8 | Int(buffer[3])
                        guard buffer.count >= 4 + length else { break }
                        let frame = Array(buffer[4..<(4 + length)])
                        buffer.removeFirst(4 + length)
                        state.withLock { $0.frames.append(frame) }
                    }
                } else if n == 0 {
                    return
                } else {
                    try? await Task.sleep(for: .milliseconds(2))
                }
            }
        }
    }

    /// The guest's frames ("COLO" at the tag offset) received so far.
    var frames: [[UInt8]] {
        state.withLock { $0.frames }.filter { $0.count == 60 && Array($0[COLOGuest.tagOffset..<(COLOGuest.tagOffset + 4)]) == Array("COLO".utf8) }
    }

    /// Remembers how many frames had arrived at a named moment.
    func mark(_ name: String) { state.withLock { $0.marks[name] = $0.frames.count } }
    func count(at name: String) -> Int? { state.withLock { $0.marks[name] } }

    func close() {
        task?.cancel()
        Glibc.close(fd)
    }
}

extension NativeCOLOTests {
    struct NetworkRun {
        var checkpoints: Int
        var released: Int
        var secondaryBeforeFailover: Int
        var secondaryAfterFailover: Int
    }

    /// The COLO lab with the frame-sending guest: COLO runs 2 s (x-checkpoint-delay 10 s, so
    /// checkpoints within come from colo-compare), counting the primary's checkpoints (STOP
    /// events) and the frames colo-compare releases to the primary's netdev peer; then the
    /// primary is killed and the secondary promoted, and its own netdev peer, silent while its
    /// output went to the primary's colo-compare, gets its frames.
    func runNetwork(divergent: Bool) async throws -> NetworkRun {
        try await withCOLOLab(guest: COLOGuest(send: true, divergent: divergent, delay: 200)) { lab, colo in
            let peers = Mutex<[String: FramePeer]>([:])
            let run = try await runPolicy(#"""
                local p, s = domain.get("primary"), domain.get("secondary")
                test.connect()
                local a = lab.colo(s)
                colo.native.start(p, s, {uri = a.uri, nbd = a.nbd, net = a.net, delay = "10s"})
                local stops = 0
                local sub = p:on("STOP", function() stops = stops + 1 end)
                test.start()
                sleep("2s")
                sub.cancel()
                test.stop()
                log.info("network", {checkpoints = stops})
                lab.kill(p)
                test.failover()
                colo.native.failover(s)
                sleep("500ms")
                test.after()
                policy.stop()
                """#, hooks: [
                    "connect": {
                        let p = try FramePeer(address: colo.addresses("primary")!.netdev)
                        let s = try FramePeer(address: colo.addresses("secondary")!.netdev)
                        peers.withLock { $0 = ["primary": p, "secondary": s] }
                    },
                    "start": { peers.withLock { for peer in $0.values { peer.mark("start") } } },
                    "stop": { peers.withLock { for peer in $0.values { peer.mark("stop") } } },
                    "failover": { peers.withLock { for peer in $0.values { peer.mark("failover") } } },
                    "after": { peers.withLock { for peer in $0.values { peer.mark("after") } } },
                ], lab: lab, configure: coloTimeouts)
            let (p, s) = peers.withLock { ($0["primary"], $0["secondary"]) }
            defer { p?.close(); s?.close() }
            guard case .stopped = run.report.outcome, let p, let s else {
                Issue.record("\(run.report.outcome)\n\(run.logs.text)")
                throw QEMULabError("the network run failed")
            }
            let line = run.logs.lines.first { $0.contains("network") && $0.contains("checkpoints=") } ?? ""
            let checkpoints = line.split(separator: " ").first { $0.hasPrefix("checkpoints=") }.flatMap { Int($0.dropFirst("checkpoints=".count)) } ?? -1
            let sequences = p.frames.map { Int($0[COLOGuest.sequenceOffset]) | Int($0[COLOGuest.sequenceOffset + 1]) << 8 }
            print("native COLO network (\(divergent ? "divergent" : "identical") output): \(checkpoints) checkpoints in 2 s, "
                + "\(p.count(at: "stop")! - p.count(at: "start")!) frames released to the primary's peer in 2 s "
                + "(\(sequences.count) in all, last seq \(sequences.last ?? -1)); the secondary's peer: "
                + "\(s.count(at: "failover")!) frames before the failover, \(s.count(at: "after")! - s.count(at: "failover")!) in 0.5 s after")
            return NetworkRun(checkpoints: checkpoints, released: p.count(at: "stop")! - p.count(at: "start")!,
                              secondaryBeforeFailover: s.count(at: "failover")!,
                              secondaryAfterFailover: s.count(at: "after")! - s.count(at: "failover")!)
        }
    }

    /// The network wiring proven by its effect: identical output from both replicas is released
    /// by colo-compare to the outside; divergent output (the TSC in every frame) forces
    /// checkpoints; the secondary's output reaches its own netdev only after the failover
    /// removed its redirectors.
    @Test(.enabled(if: kvmUsable, "needs /dev/kvm: QEMU 7.2's COLO deadlocks under TCG"))
    func networkWiringByEffect() async throws {
        let same = try await runNetwork(divergent: false)
        let divergent = try await runNetwork(divergent: true)
        #expect(same.released > 0, "colo-compare releases the primary's frames")
        #expect(divergent.checkpoints > same.checkpoints, "divergent output forces checkpoints (\(divergent.checkpoints) vs \(same.checkpoints))")
        for run in [same, divergent] {
            #expect(run.secondaryBeforeFailover == 0, "the secondary's output goes to colo-compare, not out")
            #expect(run.secondaryAfterFailover > 0, "the promoted secondary's output goes out")
        }
    }
}

/// A listening TCP socket on a loopback port, taking it from QEMU.
final class TakenPort: Sendable {
    let fd: Int32
    init(_ address: String) throws {
        let port = UInt16(address.split(separator: ":").last.flatMap { Int($0) } ?? 0)
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var sa = sockaddr_in()
        sa.sin_family = sa_family_t(AF_INET)
        sa.sin_port = port.bigEndian
        sa.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
        let bound = withUnsafePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard fd >= 0, bound == 0, listen(fd, 1) == 0 else {
            if fd >= 0 { Glibc.close(fd) }
            throw QEMULabError("cannot take the port \(address)")
        }
    }
    func close() { Glibc.close(fd) }
}

extension NativeCOLOTests {
    /// colo.native.start takes back what it wired when a step fails, on real QEMU (KVM): the
    /// secondary's NBD port taken (nbd-server-start fails after the primary's six chardevs and
    /// the secondary's x-colo), then a migration to nowhere (fails after every object, the
    /// replication node and the quorum child were added). Each time the error names the domain
    /// and step, nothing colorun added is left on either side, the primary runs, the secondary
    /// still waits for its migration; and a third start with the right addresses reaches COLO.
    @Test(.enabled(if: kvmUsable, "needs /dev/kvm: QEMU 7.2's COLO deadlocks under TCG"))
    func startUndoesPartialWiring() async throws {
        try await withCOLOLab { lab, colo in
            let taken = Mutex<TakenPort?>(nil)
            let run = try await runPolicy(#"""
                local p, s = domain.get("primary"), domain.get("secondary")
                local a = lab.colo(s)
                local function leftovers(d)
                  local found = {}
                  for _, c in ipairs(qmp.execute(d, "query-chardev")) do
                    if c.label:find("^colo") then found[#found + 1] = c.label end
                  end
                  for _, o in ipairs(qmp.execute(d, "qom-list", {path = "/objects"})) do
                    if o.name:find("^colo") then found[#found + 1] = o.name end
                  end
                  for _, n in ipairs(qmp.execute(d, "query-named-block-nodes", {flat = true})) do
                    if n["node-name"] == "replication0" then found[#found + 1] = "replication0" end
                  end
                  for _, c in ipairs(qmp.execute(d, "query-migrate-capabilities")) do
                    if c.capability == "x-colo" and c.state then found[#found + 1] = "x-colo" end
                  end
                  return table.concat(found, ",")
                end
                local function clean(what)
                  assert(leftovers(p) == "", what .. ": left on the primary: " .. leftovers(p))
                  assert(leftovers(s) == "", what .. ": left on the secondary: " .. leftovers(s))
                  assert(p:status().running, what .. ": the primary runs")
                  assert(s:status().status == "inmigrate", what .. ": the secondary still waits: " .. s:status().status)
                  local ok, missing = colo.native.check(p, "primary")
                  assert(ok, json.encode(missing))
                end
                test.take_port()
                local ok, err = pcall(colo.native.start, p, s, {uri = a.uri, nbd = a.nbd, net = a.net})
                assert(not ok and type(err) == "table", tostring(err))
                log.info("nbd port taken: " .. tostring(err), {undone = err.undone})
                assert(err.domain == "secondary" and err.command == "nbd-server-start", json.encode(err))
                assert(err.undone == 7, "six chardevs and x-colo taken back: " .. tostring(err.undone))
                clean("nbd port taken")
                test.free_port()
                ok, err = pcall(colo.native.start, p, s, {uri = "unix:/nonexistent/colo.mig", nbd = a.nbd, net = a.net, timeout = "5s"})
                assert(not ok, "a migration to nowhere fails")
                log.info("migration to nowhere: " .. tostring(err))
                assert(tostring(err):find("migration to the secondary failed", 1, true), tostring(err))
                assert(tostring(err):find("wiring steps taken back", 1, true), tostring(err))
                clean("migration to nowhere")
                local r = colo.native.start(p, s, {uri = a.uri, nbd = a.nbd, net = a.net})
                assert(r.mode == "primary" and r.undo == nil, json.encode(r))
                assert(colo.native.status(s).mode == "secondary")
                policy.stop()
                """#, hooks: [
                    "take_port": { let port = try TakenPort(colo.addresses("secondary")!.nbd); taken.withLock { $0 = port } },
                    "free_port": { taken.withLock { $0?.close(); $0 = nil } },
                ], lab: lab, configure: coloTimeouts)
            taken.withLock { $0?.close() }
            guard case .stopped = run.report.outcome else {
                Issue.record("\(run.report.outcome)\n\(run.logs.text)")
                return
            }
            #expect(run.logs.text.contains("colo.native.start failed; 7 wiring steps taken back"), "\(run.logs.text)")
        }
    }
}
