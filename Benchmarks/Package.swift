// swift-tools-version:6.1
// The benchmarks live in a package of their own so that `swift test` at the top level
// does not build package-benchmark and its dependencies.
import PackageDescription

let package = Package(
    name: "DataplaneBenchmarks",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(name: "Dataplane", path: ".."),
        // The other default trait needs a package that is not in our mirror.
        .package(url: "https://github.com/ordo-one/benchmark", from: "1.38.0", traits: ["MallocInterposer"]),
    ],
    targets: [
        // `swift package benchmark`: allocation counts (gated) and times (reported).
        .executableTarget(
            name: "AioBenchmarks",
            dependencies: [
                .product(name: "Benchmark", package: "benchmark"),
                .product(name: "Aio", package: "Dataplane"),
                .product(name: "IOThreads", package: "Dataplane"),
            ],
            path: "Benchmarks/AioBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
        // `make bench`: W1, W2, W5 side by side with the C reference (cref/), as ratios.
        .executableTarget(
            name: "compare",
            dependencies: [
                .product(name: "Aio", package: "Dataplane"),
                .product(name: "IOThreads", package: "Dataplane"),
            ],
            path: "Sources/compare"
        ),
    ],
    swiftLanguageModes: [.v6]
)
