import ArgumentParser
import Colorun
import ColorunSystem

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

struct StubsCommand: ColorunSubcommand {
    static let configuration = CommandConfiguration(
        commandName: "stubs",
        abstract: "Write editor support for policies: a luacheck standard and lua-language-server definitions.",
        discussion: """
            Writes into DIR (created if needed): .luacheckrc (a luacheck standard `colorun`: \\
            the sandbox's globals and colorun's modules with their exact fields; run \\
            `luacheck --config DIR/.luacheckrc policy.lua`), colorun-meta/colorun.lua (a \\
            lua-language-server `---@meta` file: every function with its parameters, the fields \\
            of its option tables and its return types) and .luarc.json (points \\
            lua-language-server at colorun-meta, Lua 5.4). All are made from the same API table \\
            as docs/lua-api.md's function list; existing files are replaced.
            """
    )

    @Argument(help: ArgumentHelp("Where to write the files.", valueName: "DIR"))
    var directory: String

    func run() async throws { try await execute() }

    func execute() async throws {
        for (path, contents) in LuaAPIStubs.files() {
            let full = directory + "/" + path
            let parent = String(full[..<full.lastIndex(of: "/")!])
            do {
                try makeDirectories(parent)
                try writeFile(full, Array(contents.utf8))
            } catch {
                writeStandardError("colorun stubs: \(full): \(error)")
                throw ExitCode(2)
            }
            writeStandardOutput(full + "\n")
        }
    }
}

/// mkdir -p.
func makeDirectories(_ path: String) throws {
    var current = path.hasPrefix("/") ? "" : "."
    for part in path.split(separator: "/") {
        current += "/" + part
        if mkdir(current, 0o755) != 0 && errno != EEXIST {
            throw ValidationError("cannot create \(current): \(errnoText())")
        }
    }
}
