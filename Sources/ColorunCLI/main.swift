// The `colorun` command. Parsing happens here; the work lives in the Colorun library.
// Exit codes: 0 clean end, 1 the policy failed, 2 usage or load error.
import ArgumentParser
import ColorunSystem

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

// A thousand pairs need more descriptors than the usual soft limit of 1,024.
raiseOpenFileLimit()

do {
    var command = try ColorunCommand.parseAsRoot()
    if let subcommand = command as? any ColorunSubcommand {
        try await subcommand.execute()
    } else {
        try command.run()
    }
} catch {
    ColorunCommand.exitAfter(error)
}
