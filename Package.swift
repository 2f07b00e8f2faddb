// swift-tools-version:6.1
import PackageDescription

let strict: [SwiftSetting] = [
    .enableUpcomingFeature("MemberImportVisibility"),
]

let package = Package(
    name: "Dataplane",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "Aio", targets: ["Aio"]),
        .library(name: "Uring", targets: ["Uring"]),
        .library(name: "IOThreads", targets: ["IOThreads"]),
        .library(name: "Devices", targets: ["Devices"]),
        .library(name: "LoadGen", targets: ["LoadGen"]),
        .library(name: "VhostUser", targets: ["VhostUser"]),
        .library(name: "QMP", targets: ["QMP"]),
        .executable(name: "dataplane", targets: ["dataplane"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.1.0"),
    ],
    targets: [
        // liburing, from Debian's liburing-dev. Only `Uring` imports it.
        .systemLibrary(
            name: "CLiburing",
            path: "CLiburing",
            pkgConfig: "liburing",
            providers: [.apt(["liburing-dev"])]
        ),
        .target(name: "Uring", dependencies: ["CLiburing"], swiftSettings: strict),
        // System calls Glibc does not import (gettid, epoll_pwait2, thread names).
        .target(name: "CShims"),
        .target(name: "Aio", dependencies: ["Uring", "CShims"], swiftSettings: strict),
        .target(name: "IOThreads", dependencies: ["Aio", "CShims"], swiftSettings: strict),
        .target(name: "Devices", dependencies: ["IOThreads", "Aio", "CShims"], swiftSettings: strict),
        .target(name: "VhostUser", dependencies: ["Devices", "IOThreads", "Aio", "CShims"], swiftSettings: strict),
        .target(name: "QMP", dependencies: ["Devices", "VhostUser", "IOThreads", "Aio", "CShims"], swiftSettings: strict),
        .target(
            name: "LoadGen",
            dependencies: ["Devices", "IOThreads", "Aio", .product(name: "Histogram", package: "hdrhistogram-swift")],
            swiftSettings: strict
        ),
        .executableTarget(
            name: "dataplane",
            dependencies: ["Aio", "IOThreads", "Devices", "LoadGen", "QMP", "CShims", .product(name: "ArgumentParser", package: "swift-argument-parser")],
            swiftSettings: strict
        ),
        .testTarget(name: "UringTests", dependencies: ["Uring", "CShims"], swiftSettings: strict),
        .testTarget(name: "AioTests", dependencies: ["Aio", "Uring", "CShims", "TestSupport"], swiftSettings: strict),
        // Helpers several test targets share (not a product).
        .target(name: "TestSupport", dependencies: ["Devices", "IOThreads", "Aio"], path: "Tests/TestSupport",
                swiftSettings: strict),
        .testTarget(name: "IOThreadsTests", dependencies: ["IOThreads", "Aio", "TestSupport"], swiftSettings: strict),
        .testTarget(name: "DevicesTests", dependencies: ["Devices", "IOThreads", "Aio", "CShims", "TestSupport"],
                    swiftSettings: strict),
        .testTarget(name: "QMPTests", dependencies: ["QMP", "VhostUser", "Devices", "Aio", "IOThreads", "CShims"], swiftSettings: strict),
        .testTarget(name: "VhostUserTests", dependencies: ["VhostUser", "Devices", "IOThreads", "Aio", "CShims", "TestSupport"],
                    swiftSettings: strict),
        .testTarget(name: "LoadGenTests", dependencies: ["LoadGen", "Devices", "Aio", "TestSupport"], swiftSettings: strict),
    ],
    swiftLanguageModes: [.v6]
)
