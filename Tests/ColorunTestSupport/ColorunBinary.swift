import Foundation

/// The built `colorun` binary, next to the test bundle in `.build/<triple>/debug/`, or nil when
/// it is not built (`swift build`). Tests that run colorun as its own process start this one.
public func builtColorunBinary() -> String? {
    let exe = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
    var dir = exe.deletingLastPathComponent()
    for _ in 0..<4 {
        let candidate = dir.appendingPathComponent("colorun").path
        if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        dir = dir.deletingLastPathComponent()
    }
    return nil
}
