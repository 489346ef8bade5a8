// The libFuzzer driver both fuzz targets share: each target's main calls
// `runFuzzer(fuzzOne)` with its own one-input function. Built only by scripts/fuzz
// (COLORUN_FUZZ=1, -sanitize=fuzzer), which links libFuzzer.
#if canImport(Glibc)
import Glibc
#endif

/// One fuzz input: the bytes and their count; returns 0 (libFuzzer's convention).
public typealias FuzzCallback = @convention(c) (UnsafePointer<UInt8>?, Int) -> Int32

@_silgen_name("LLVMFuzzerRunDriver")
private func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<Int32>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
    _ callback: FuzzCallback) -> Int32

nonisolated(unsafe) private var target: FuzzCallback?

// libFuzzer's own entry point also names this symbol; it forwards to the running target.
@_cdecl("LLVMFuzzerTestOneInput")
public func testOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    target?(data, size) ?? 0
}

/// Runs libFuzzer with the process's arguments (corpus directories, -max_total_time=...)
/// on `callback`, and exits with libFuzzer's status.
public func runFuzzer(_ callback: FuzzCallback) -> Never {
    target = callback
    var argc = CommandLine.argc
    var argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = CommandLine.unsafeArgv
    exit(LLVMFuzzerRunDriver(&argc, &argv, callback))
}
