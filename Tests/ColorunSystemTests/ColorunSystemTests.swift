import ColorunSystem
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite(.timeLimit(.minutes(1))) struct SpawnTests {
    /// A child gets stdin and stdout on /dev/null, stderr on its file, no other descriptor of
    /// colorun's (even one not marked close-on-exec), no blocked or ignored signal.
    @Test func childStartsClean() throws {
        let directory = try makeTemporaryDirectory(prefix: "colorun-spawntest")
        defer { removeTree(directory) }
        let leaky = open("/dev/null", O_RDONLY)  // no O_CLOEXEC
        defer { close(leaky) }
        let previous = signal(SIGHUP, SIG_IGN)
        defer { signal(SIGHUP, previous) }

        let pid = try spawnChild(["sleep", "30"], lifetime: .owned, standardError: .appendingTo("\(directory)/err"))
        defer { _ = kill(pid, SIGKILL); _ = reapChild(pid, blocking: true) }
        // spawnChild returns once the exec has happened: /proc shows `sleep` itself.
        #expect(String(decoding: try readFile("/proc/\(pid)/comm"), as: UTF8.self) == "sleep\n")
        // sleep may hold a descriptor of its own for a moment while it starts up; an
        // inherited one would stay.
        var descriptors: [String] = []
        let deadline = ContinuousClock.now + .seconds(5)
        while true {
            descriptors = try listDirectory("/proc/\(pid)/fd").sorted()
            if descriptors == ["0", "1", "2"] || ContinuousClock.now >= deadline { break }
            usleep(1000)
        }
        #expect(descriptors == ["0", "1", "2"])
        #expect(link("/proc/\(pid)/fd/0") == "/dev/null")
        #expect(link("/proc/\(pid)/fd/1") == "/dev/null")
        #expect(link("/proc/\(pid)/fd/2") == "\(directory)/err")
        let status = String(decoding: try readFile("/proc/\(pid)/status"), as: UTF8.self)
        for field in ["SigBlk", "SigIgn"] {
            let line = status.split(separator: "\n").first { $0.hasPrefix(field + ":") }
            #expect(line.map { $0.split(separator: "\t").last.map { UInt64($0, radix: 16) } } == 0, "\(line ?? "")")
        }
        #expect(getsid(pid) == getsid(0), "an owned child stays in colorun's session")
    }

    /// stderr is appended to, not truncated; the exit status is the child's.
    @Test func standardErrorIsAppendedAndStatusReported() throws {
        let directory = try makeTemporaryDirectory(prefix: "colorun-spawntest")
        defer { removeTree(directory) }
        let path = "\(directory)/err"
        try writeFile(path, Array("first\n".utf8))
        let pid = try spawnChild(["sh", "-c", "echo second >&2; exit 7"], lifetime: .owned, standardError: .appendingTo(path))
        #expect(reapChild(pid, blocking: true) == .exited(code: 7))
        #expect(String(decoding: try readFile(path), as: UTF8.self) == "first\nsecond\n")
        #expect(reapChild(pid, blocking: false) == nil, "reaped twice")
    }

    /// A program that cannot be started is an error naming it, with the child's errno.
    @Test func unstartableProgramsAreErrors() throws {
        #expect {
            _ = try spawnChild(["/nonexistent/program"], lifetime: .owned)
        } throws: { error in
            let error = error as? SystemError
            return error?.code == ENOENT && error?.description.hasPrefix("cannot start /nonexistent/program: ") == true
        }
        #expect {
            let directory = try makeTemporaryDirectory(prefix: "colorun-spawntest")
            defer { removeTree(directory) }
            try writeFile("\(directory)/garbage", Array("\u{7f}ELF? no".utf8), mode: 0o755)
            _ = try spawnChild(["\(directory)/garbage"], lifetime: .detached)
        } throws: { error in
            (error as? SystemError)?.code == ENOEXEC
        }
        #expect {
            _ = try spawnChild(["colorun-no-such-program"], lifetime: .owned)
        } throws: { error in
            (error as? SystemError)?.description == "cannot start colorun-no-such-program: not found in PATH"
        }
        #expect(throws: SystemError.self) { _ = try spawnChild([], lifetime: .owned) }
    }
}

@Suite(.timeLimit(.minutes(1))) struct FileTests {
    @Test func writeReadListRemove() throws {
        let directory = try makeTemporaryDirectory(prefix: "colorun-filetest")
        defer { removeTree(directory) }
        #expect(directory.hasPrefix("/tmp/colorun-filetest-") && directory.count == "/tmp/colorun-filetest-".count + 6)
        let big = (0..<200_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        try writeFile("\(directory)/big", big)
        #expect(try readFile("\(directory)/big") == big)
        #expect(try readFile("/dev/null") == [])
        #expect(try listDirectory(directory) == ["big"])

        #expect {
            _ = try readFile("\(directory)/missing")
        } throws: { error in
            (error as? SystemError)?.code == ENOENT
        }
        #expect(throws: SystemError.self) { _ = try makeTemporaryDirectory(in: "\(directory)/missing", prefix: "x") }
    }

    /// removeTree removes nested directories and does not follow symbolic links out of the tree.
    @Test func removeTreeStaysInTheTree() throws {
        let outside = try makeTemporaryDirectory(prefix: "colorun-filetest")
        defer { removeTree(outside) }
        try writeFile("\(outside)/keep", [1])
        let tree = try makeTemporaryDirectory(prefix: "colorun-filetest")
        #expect(mkdir("\(tree)/a", 0o700) == 0 && mkdir("\(tree)/a/b", 0o700) == 0)
        try writeFile("\(tree)/a/b/file", [2])
        #expect(symlink(outside, "\(tree)/a/link") == 0)
        removeTree(tree)
        #expect(access(tree, F_OK) != 0)
        #expect(try readFile("\(outside)/keep") == [1])
        removeTree(tree)  // gone already: nothing happens
    }

    @Test func errnoTextNamesTheNumber() {
        #expect(errnoText(ENOENT) == "No such file or directory (errno 2)")
    }
}

/// The target of the symbolic link at `path`.
func link(_ path: String) -> String? {
    var buffer = [CChar](repeating: 0, count: 4096)
    let n = readlink(path, &buffer, buffer.count)
    guard n >= 0 else { return nil }
    return String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
}
