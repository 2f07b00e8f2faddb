// Misuse of an export is a programming error: it crashes with a message that says what was
// violated.
import Devices
import Glibc
import IOThreads
import Testing

@testable import VhostUser

@Suite("vhost-user-blk: misuse crashes loudly")
struct ExportCrashTests {
    @Test("an export dropped without delete() crashes, naming the export")
    func droppedWithoutDelete() async {
        let result = await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            let t = try! IOThread(id: "iot0")
            var e: Export? = try! Export(id: "exp9", backend: .null, socketPath: "/tmp/dp-vhost-crash-test.sock", iothread: t)
            _ = e
            e = nil
        }
        unlink("/tmp/dp-vhost-crash-test.sock")  // the child died holding it
        let stderr = String(decoding: result?.standardErrorContent ?? [], as: UTF8.self)
        #expect(stderr.contains("BUG DETECTED: export 'exp9' destroyed without delete()"), "stderr: \(stderr)")
    }
}
