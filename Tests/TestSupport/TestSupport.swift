// Helpers shared by the test targets: one copy instead of one per target.
import Aio
import Devices
import Glibc
import IOThreads

/// The backends a test runs on: the automatic choice (io_uring where the kernel allows it)
/// and epoll; only epoll in the suite's DATAPLANE_FDMON=epoll pass.
public let backendsUnderTest: [AioContext.Backend] = {
    if let v = getenv("DATAPLANE_FDMON"), String(cString: v) == "epoll" { return [.epoll] }
    return [.automatic, .epoll]
}()

/// SplitMix64: small, fast, and the same sequence everywhere for a seed (seeded tests print
/// their seed; the same seed replays the same choices).
public struct SeededRandom: RandomNumberGenerator {
    public var state: UInt64
    public init(state: UInt64) { self.state = state }
    public mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
    /// A number in 0..<n.
    public mutating func below(_ n: Int) -> Int { Int(next() % UInt64(n)) }
}

/// Waits (bounded, 10 s by default) until `condition` holds; returns whether it did.
public func eventually(seconds: Double = 10, _ condition: () -> Bool) -> Bool {
    let deadline = monotonicNanoseconds() + Int64(seconds * 1e9)
    while !condition() {
        if monotonicNanoseconds() > deadline { return false }
        usleep(200)
    }
    return true
}

/// An IOThread on `backend` with the given poll window.
public func makeIOThread(_ id: String, _ backend: AioContext.Backend, pollMaxNs: Int64 = 32768) throws -> IOThread {
    var p = IOThreadProperties()
    p.pollMaxNs = pollMaxNs
    return try IOThread(id: id, properties: p, backend: backend)
}

/// Polls the guest side until `n` completions arrived (or 10 s passed); returns how many.
public func reap(_ guest: GuestQueue, count n: Int, into body: (UInt64, UInt8, UInt32, Int) -> Void) -> Int {
    var got = 0
    let deadline = monotonicNanoseconds() + 10_000_000_000
    while got < n && monotonicNanoseconds() < deadline {
        got += guest.reap(body)
        if got < n { guest.waitForInterrupt(timeoutMs: 10) }
    }
    return got
}

// MARK: - This process's descriptors and threads, from /proc

/// The numeric entries of a /proc directory (descriptors or thread ids of this process);
/// empty when the directory cannot be opened (no descriptor left for it).
public func procEntries(_ path: String) -> [String] { listProcEntries(path) ?? [] }

/// The numeric entries of a /proc directory, or nil when it cannot be opened: with
/// descriptors exhausted, an empty answer would read as "nothing there".
public func listProcEntries(_ path: String) -> [String]? {
    guard let dir = opendir(path) else { return nil }
    defer { closedir(dir) }
    var names: [String] = []
    while let e = readdir(dir) {
        let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
        if name.first?.isNumber == true { names.append(name) }
    }
    return names
}

/// What descriptor `fd` (a name from /proc/self/fd) points to, or nil when it is gone (the
/// listing's own descriptor, or one closed meanwhile).
public func descriptorTarget(_ fd: String) -> String? {
    var target = [CChar](repeating: 0, count: 256)
    let n = readlink("/proc/self/fd/\(fd)", &target, 255)
    guard n > 0 else { return nil }
    return String(decoding: target[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// The kinds of descriptor an AioContext creates.
public let contextDescriptorKinds = ["eventfd", "io_uring", "eventpoll"]

/// This process's eventfd, io_uring and epoll descriptors as "fd -> target" (the kinds a
/// context creates), so that a leaked one shows even when it took a number a /dev/null filler
/// of the descriptor-exhaustion tests had before. Only those kinds: the harness, the sanitizer
/// runtimes and other tests' inherited files come and go in an exit-test child on their own.
public func contextDescriptors() -> Set<String> { listContextDescriptors() ?? [] }

/// ``contextDescriptors()``, or nil when /proc/self/fd could not be opened (no descriptor left
/// for the listing): a leak check must look again then, not compare against an empty set.
public func listContextDescriptors() -> Set<String>? {
    guard let fds = listProcEntries("/proc/self/fd") else { return nil }
    return Set(fds.compactMap { fd -> String? in
        guard let text = descriptorTarget(fd), contextDescriptorKinds.contains(where: { text.contains($0) }) else { return nil }
        return "\(fd) -> \(text)"
    })
}

/// A file of `size` bytes that no path names (created in /tmp and unlinked at once), or nil
/// when it cannot be made. Close the descriptor to free it.
public func anonymousFile(size: Int) -> Int32? {
    var path = Array("/tmp/dp-test-XXXXXX".utf8CString)
    let fd = mkstemp(&path)
    guard fd >= 0 else { return nil }
    unlink(path)
    _ = fcntl(fd, F_SETFD, FD_CLOEXEC)  // exit-test children must not inherit it
    guard ftruncate(fd, off_t(size)) == 0 else {
        close(fd)
        return nil
    }
    return fd
}

/// Descriptors held open on /dev/null, to run a process out of them (exhaustion tests).
public final class DescriptorFillers {
    public private(set) var fds: [Int32] = []
    public init() {}

    /// Opens /dev/null until the process has no descriptor left.
    public func fill() {
        while true {
            let fd = open("/dev/null", O_RDONLY | O_CLOEXEC)
            if fd < 0 { break }
            fds.append(fd)
        }
    }

    /// Closes the newest filler (one descriptor free) and returns its number, or nil if there
    /// is none.
    @discardableResult
    public func freeOne() -> Int32? {
        guard let fd = fds.popLast() else { return nil }
        close(fd)
        return fd
    }

    /// Closes every filler.
    public func closeAll() {
        for fd in fds { close(fd) }
        fds.removeAll()
    }

    /// The context-kind descriptors ("fd -> target": a leak shows even in a number a filler
    /// had before), listed with one filler closed (listing /proc takes a descriptor), then
    /// filled again. Other threads of the process (an exit test's harness) may take that
    /// spare first: a listing that could not be made is made again, never read as "none"
    /// (an empty listing made every existing eventfd look leaked). Exits with `code` when
    /// no listing could be made.
    public func contextDescriptorsWithOneSpare(orExit code: Int32) -> Set<String> {
        for _ in 0..<100 {
            fill()
            guard freeOne() != nil else { break }
            let listed = listContextDescriptors()
            fill()
            if let listed { return listed }
        }
        exit(code)
    }
}

/// Whether descriptor `fd` is open and one of the kinds an AioContext creates.
public func isContextDescriptor(_ fd: Int32) -> Bool {
    guard let text = descriptorTarget(String(fd)) else { return false }
    return contextDescriptorKinds.contains { text.contains($0) }
}

/// Open descriptors of this process whose target contains one of `kinds` (all if empty).
public func openFileDescriptorCount(kinds: [String] = []) -> Int {
    let fds = procEntries("/proc/self/fd")
    if kinds.isEmpty { return fds.count }
    return fds.filter { fd in descriptorTarget(fd).map { t in kinds.contains(where: { t.contains($0) }) } ?? false }.count
}
