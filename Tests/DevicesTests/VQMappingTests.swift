import IOThreads
import Testing

@testable import Devices

@Suite("iothread-vq-mapping")
struct VQMappingTests {
    let a: IOThread
    let b: IOThread
    init() throws {
        a = try IOThread(id: "a")
        b = try IOThread(id: "b")
    }
    func lookup(_ id: String) -> IOThread? { id == "a" ? a : id == "b" ? b : nil }

    @Test("round robin: entry k gets queues k, k+K, …")
    func roundRobin() throws {
        let m = try resolveIOThreadVQMapping([.init(iothread: "a"), .init(iothread: "b")], numQueues: 5, lookup: lookup)
        #expect(m.queues.map(\.id) == ["a", "b", "a", "b", "a"])
    }

    @Test("explicit vqs are honoured")
    func explicit() throws {
        let m = try resolveIOThreadVQMapping([.init(iothread: "a", vqs: [2]), .init(iothread: "b", vqs: [0, 1])],
                                             numQueues: 3, lookup: lookup)
        #expect(m.queues.map(\.id) == ["b", "b", "a"])
    }

    @Test("QEMU's validation errors, word for word")
    func errors() {
        func err(_ e: [IOThreadVQMappingEntry], _ n: Int) -> String {
            do { _ = try resolveIOThreadVQMapping(e, numQueues: n, lookup: lookup); return "" } catch { return error.message }
        }
        #expect(err([.init(iothread: "zz")], 2) == "IOThread \"zz\" object does not exist")
        #expect(err([.init(iothread: "a"), .init(iothread: "a")], 2) == "duplicate IOThread name \"a\" in iothread-vq-mapping")
        #expect(err([.init(iothread: "a", vqs: [0]), .init(iothread: "b")], 2)
                == "either all items in iothread-vq-mapping must have vqs or none of them must have it")
        #expect(err([.init(iothread: "a", vqs: [0, 5])], 2)
                == "vq index 5 for IOThread \"a\" must be less than num_queues 2 in iothread-vq-mapping")
        #expect(err([.init(iothread: "a", vqs: [0]), .init(iothread: "b", vqs: [0])], 2)
                == "cannot assign vq 0 to IOThread \"b\" because it is already assigned")
        #expect(err([.init(iothread: "a", vqs: [0])], 2) == "missing vq 1 IOThread assignment in iothread-vq-mapping")
    }
}
