// swift-tools-version:6.1
// The benchmarks live in a package of their own so that `swift test` at the top level
// does not build package-benchmark, SwiftNIO and their dependencies.
import PackageDescription

let package = Package(
    name: "DataplaneBenchmarks",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(name: "Dataplane", path: ".."),
        // The other default trait needs a package that is not in our mirror.
        .package(url: "https://github.com/ordo-one/benchmark", from: "1.38.0", traits: ["MallocInterposer"]),
        // The second reference for W1, W2 and W5 (MultiThreadedEventLoopGroup).
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.0"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.1.0"),
    ],
    targets: [
        // `swift package benchmark`: allocation counts (gated) and times (reported).
        .executableTarget(
            name: "AioBenchmarks",
            dependencies: [
                .product(name: "Benchmark", package: "benchmark"),
                .product(name: "Aio", package: "Dataplane"),
                .product(name: "IOThreads", package: "Dataplane"),
                .product(name: "Devices", package: "Dataplane"),
            ],
            path: "Benchmarks/AioBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
        // C for `compare`: a malloc counter (its allocation rows, off unless enabled), stack ranges.
        .target(name: "CBenchSupport", path: "Sources/CBenchSupport"),
        // `make bench`: W1–W6, memory and idle CPU beside the C reference (cref/) and SwiftNIO.
        .executableTarget(
            name: "compare",
            dependencies: [
                "CBenchSupport",
                .product(name: "Aio", package: "Dataplane"),
                .product(name: "IOThreads", package: "Dataplane"),
                .product(name: "Devices", package: "Dataplane"),
                .product(name: "LoadGen", package: "Dataplane"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ],
            path: "Sources/compare"
        ),
    ],
    swiftLanguageModes: [.v6]
)
