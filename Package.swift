// swift-tools-version: 6.2
import PackageDescription

// Module map of colorun, one module per concern:
//   CLua             system Lua 5.4 (pkg-config lua5.4), its macros as static inline functions
//   CLuaShims        the C side of the Lua layer: trampolines that raise errors and yield, hooks, allocator
//   JSON             JSON values, the strict parser and the encoder (no dependencies)
//   QMP              the QMP wire protocol: messages, the line codec (no sockets)
//   QMPClient        connections to a QEMU monitor over SwiftNIO (unix:/tcp:/tls: endpoints; TLS by swift-nio-ssl)
//   Etcd             a small etcd v3 client over etcd's JSON gateway (AsyncHTTPClient): kv, txn, leases, watch
//   ColorunSystem    POSIX plumbing: child processes that die with colorun (or outlive it), files,
//                    directories, errno text; CColorunSystem is its fork/exec in C and the Linux file
//                    calls Swift's Glibc does not show (sync_file_range, syncfs) for group commits
//   QEMULab          real QEMU processes for tests and lab runs (run directory, counting guest, Linux guest)
//   ClusterLab       real etcd members and two-host tests on one machine: network namespaces joined by a
//                    bridge, partitions and heals, processes run inside a namespace, the run-state observer
//   LuaRuntime       a small, safe Lua layer, the sandbox, limits and the coroutine scheduler
//   QEMUSimulator    a simulated QEMU that answers as QEMU 7.2 does, with scriptable faults
//   Colorun          the policy API bound into Lua: qmp.*, domains, checkpoints, failover, exec.run, the
//                    API table behind the editor stubs, the lab (--lab) and simulated domains (--sim)
//   Fleet            many colorun instances sharing the pairs declared in etcd: ownership on one lease per
//                    instance, take-over, gradual rebalance, drain, fencing tokens into the generation store
//   ColorunOperator  the operator's side: summary, status line, JSON logs, metrics endpoint and its Prometheus
//                    export (HELP texts), one-shot qmp, check
//   ColorunCLI       the `colorun` command (swift-argument-parser), a thin layer over Colorun and ColorunOperator;
//                    a run's services (policy, metrics server) under swift-service-lifecycle
//   QEMUSimCLI       the `qemu-sim` command: simulated domains on UNIX sockets
//   QEMULabProbe     a process for QEMULabTests to kill: it starts lab QEMUs, or a child, and waits
//   QMPBench         the `qmp-bench` command: query-status latency through both QMPClient APIs
//   ColorunBench     the `colorun-bench` command: colorun vs its baselines (scripts/bench)
//   Fuzz*            libFuzzer targets and their shared driver, declared only when COLORUN_FUZZ is set (scripts/fuzz)
let nio: [Target.Dependency] = [
    .product(name: "NIOCore", package: "swift-nio"),
    .product(name: "NIOPosix", package: "swift-nio"),
]
let logging: Target.Dependency = .product(name: "Logging", package: "swift-log")
let metrics: Target.Dependency = .product(name: "CoreMetrics", package: "swift-metrics")
let prometheus: Target.Dependency = .product(name: "Prometheus", package: "swift-prometheus")
let http: Target.Dependency = .product(name: "NIOHTTP1", package: "swift-nio")
let ssl: Target.Dependency = .product(name: "NIOSSL", package: "swift-nio-ssl")

let package = Package(
    name: "colorun",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "colorun", targets: ["ColorunCLI"]),
        .executable(name: "qemu-sim", targets: ["QEMUSimCLI"]),
        .executable(name: "qmp-bench", targets: ["QMPBench"]),
        .executable(name: "colorun-bench", targets: ["ColorunBench"]),
        .library(name: "QMPClient", targets: ["QMPClient"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/swiftlang/swift-subprocess", from: "1.0.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/swift-server/async-http-client", from: "1.37.0"),
    ],
    targets: [
        .systemLibrary(
            name: "CLua",
            pkgConfig: "lua5.4",
            providers: [.apt(["liblua5.4-dev"])]
        ),
        .target(name: "CLuaShims", dependencies: ["CLua"]),
        .target(name: "JSON"),
        .target(name: "QMP", dependencies: ["JSON", .product(name: "NIOCore", package: "swift-nio")]),
        .target(name: "QMPClient", dependencies: ["JSON", "QMP", logging, ssl] + nio),
        .target(
            name: "Etcd",
            dependencies: [
                "JSON", logging, http, .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ] + nio
        ),
        .target(name: "CColorunSystem"),
        .target(name: "ColorunSystem", dependencies: ["CColorunSystem"]),
        .target(
            name: "QEMULab",
            dependencies: [
                "ColorunSystem", "JSON", "QMP", "QMPClient", logging, .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ]
        ),
        .target(
            name: "ClusterLab",
            dependencies: ["ColorunSystem", "Etcd", "JSON", "QMPClient", "QEMULab", logging] + nio
        ),
        .target(
            name: "LuaRuntime",
            dependencies: [
                "CLua", "CLuaShims", "JSON", logging,
                .product(name: "NIOCore", package: "swift-nio"),
            ]
        ),
        .target(name: "QEMUSimulator", dependencies: ["JSON", "QMP", logging] + nio),
        .target(
            name: "Colorun",
            dependencies: [
                "ColorunSystem", "Etcd", "JSON", "LuaRuntime", "QMP", "QMPClient", "QEMULab", "QEMUSimulator", logging, metrics,
                .product(name: "Subprocess", package: "swift-subprocess"),
            ] + nio
        ),
        .target(name: "Fleet", dependencies: ["Colorun", "Etcd", "JSON", "QMPClient", logging, metrics] + nio),
        .target(
            name: "ColorunOperator",
            dependencies: ["Colorun", "ColorunSystem", "JSON", "LuaRuntime", "QMP", "QMPClient", logging, metrics, prometheus, http] + nio
        ),
        .executableTarget(
            name: "ColorunCLI",
            dependencies: [
                "Colorun", "ColorunOperator", "ColorunSystem", "Etcd", "Fleet", "QEMULab", "LuaRuntime", "QMP", "QMPClient", logging, metrics, prometheus,
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            ] + nio
        ),
        .executableTarget(
            name: "QEMUSimCLI",
            dependencies: ["QEMUSimulator", "ColorunSystem", logging, .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),
        // QEMULabTests' process to kill: starts lab QEMUs, or a child that must (not) outlive it.
        .executableTarget(name: "QEMULabProbe", dependencies: ["QEMULab", "ColorunSystem"]),
        .executableTarget(name: "QMPBench", dependencies: ["QMPClient", "QEMULab", logging] + nio),
        .executableTarget(
            name: "ColorunBench",
            dependencies: ["Colorun", "ColorunSystem", "JSON", "LuaRuntime", "QMP", "QEMULab", logging] + nio
        ),
        // What the test targets share: simulated pairs, log collectors, temp directories,
        // waiting with a deadline, and the `.machine(_:)` trait that keeps suites needing the
        // whole machine apart under parallel `swift test`.
        .target(name: "ColorunTestSupport", dependencies: ["ColorunSystem", "QEMUSimulator", logging], path: "Tests/ColorunTestSupport"),
        .testTarget(name: "QMPTests", dependencies: ["JSON", "QMP", "ColorunTestSupport"]),
        .testTarget(name: "ColorunSystemTests", dependencies: ["ColorunSystem"]),
        .testTarget(
            name: "FleetTests",
            dependencies: ["Fleet", "Colorun", "ColorunSystem", "Etcd", "ClusterLab", "JSON", "QEMUSimulator", "ColorunTestSupport", logging] + nio
        ),
        .testTarget(name: "EtcdTests", dependencies: ["Etcd", "ClusterLab", "ColorunSystem", "ColorunTestSupport"] + nio),
        .testTarget(name: "QEMULabTests", dependencies: ["QEMULab", "ColorunSystem", "ColorunTestSupport", logging]),
        .testTarget(
            name: "QMPClientTests",
            dependencies: [
                "JSON", "QMPClient", "QMP", "QEMULab", "ColorunSystem", "ColorunTestSupport", logging, .product(name: "NIOEmbedded", package: "swift-nio"),
            ] + nio
        ),
        .testTarget(name: "LuaRuntimeTests", dependencies: ["JSON", "LuaRuntime", "CLua", "ColorunTestSupport", logging] + nio),
        .testTarget(name: "QEMUSimulatorTests", dependencies: ["ColorunSystem", "JSON", "QEMUSimulator", "QMPClient", "QMP", "ColorunTestSupport"]),
        .testTarget(
            name: "ColorunCLITests",
            dependencies: [
                "Colorun", "ColorunOperator", "ColorunSystem", "JSON", "LuaRuntime", "QEMUSimulator", "QMPClient", "QMP",
                "ColorunTestSupport", "ClusterLab", "Etcd", "QEMULab", logging, metrics, prometheus,
            ] + nio
        ),
        // Root and network namespaces: two hosts, each with its own colorun and QEMU, and etcd.
        .testTarget(
            name: "PartitionTests",
            dependencies: ["ClusterLab", "ColorunSystem", "QEMULab", "QMPClient", "JSON", "ColorunTestSupport", logging] + nio
        ),
        .testTarget(name: "GuestTests", dependencies: ["QEMULab", "QMPClient", "JSON", "ColorunTestSupport", logging] + nio),
        .testTarget(
            name: "ColorunTests",
            dependencies: [
                "Colorun", "ColorunSystem", "JSON", "LuaRuntime", "QEMUSimulator", "QMPClient", "QEMULab", "QMP", "ColorunTestSupport", logging,
            ] + nio
        ),
    ],
    swiftLanguageModes: [.v6]
)

// The fuzz targets exist only for scripts/fuzz (which sets COLORUN_FUZZ=1 and builds them
// with -sanitize=fuzzer in its own scratch path): `swift build` and `swift test` never see them.
if Context.environment["COLORUN_FUZZ"] != nil {
    package.products += [
        .executable(name: "fuzz-qmp", targets: ["FuzzQMP"]),
        .executable(name: "fuzz-policy", targets: ["FuzzPolicy"]),
    ]
    package.targets += [
        .target(name: "FuzzDriver", path: "Fuzz/FuzzDriver"),
        .executableTarget(name: "FuzzQMP", dependencies: ["FuzzDriver", "JSON", "QMP", .product(name: "NIOCore", package: "swift-nio")], path: "Fuzz/FuzzQMP"),
        .executableTarget(name: "FuzzPolicy", dependencies: ["FuzzDriver", "LuaRuntime", logging] + nio, path: "Fuzz/FuzzPolicy"),
    ]
}
