/// A growable array in memory it manages itself, for the request table.
///
/// `ContiguousArray` is copy-on-write: every mutation first asks whether the buffer is
/// uniquely referenced (an out-of-line runtime call), several times per request. This one
/// is `~Copyable`, so there is nothing to share and nothing to ask. Indices are checked.
struct RawArray<Element>: ~Copyable {
    private var base: UnsafeMutablePointer<Element>
    private(set) var count = 0
    private var capacity: Int

    init(capacity: Int = 16) {
        self.capacity = max(1, capacity)
        base = .allocate(capacity: self.capacity)
    }

    deinit {
        base.deinitialize(count: count)
        base.deallocate()
    }

    var isEmpty: Bool { count == 0 }

    subscript(i: Int) -> Element {
        unsafeAddress {
            precondition(UInt(bitPattern: i) < UInt(bitPattern: count), "RawArray index out of range")
            return UnsafePointer(base + i)
        }
        unsafeMutableAddress {
            precondition(UInt(bitPattern: i) < UInt(bitPattern: count), "RawArray index out of range")
            return base + i
        }
    }

    mutating func append(_ element: consuming Element) {
        if count == capacity { grow() }
        (base + count).initialize(to: element)
        count += 1
    }

    mutating func removeLast() -> Element {
        precondition(count > 0, "RawArray.removeLast on an empty array")
        count -= 1
        return (base + count).move()
    }

    /// Exchanges two elements with bitwise moves (no reference counting).
    mutating func swapAt(_ i: Int, _ j: Int) {
        precondition(UInt(bitPattern: i) < UInt(bitPattern: count) && UInt(bitPattern: j) < UInt(bitPattern: count),
                     "RawArray index out of range")
        guard i != j else { return }
        let t = (base + i).move()
        (base + i).moveInitialize(from: base + j, count: 1)
        (base + j).initialize(to: t)
    }

    /// Removes the first element (the rest move down: meant for a handful of elements).
    mutating func removeFirst() {
        precondition(count > 0, "RawArray.removeFirst on an empty array")
        base.deinitialize(count: 1)
        (base).moveInitialize(from: base + 1, count: count - 1)
        count -= 1
    }

    /// Removes every element and keeps the memory.
    mutating func removeAll() {
        base.deinitialize(count: count)
        count = 0
    }

    private mutating func grow() {
        let bigger = UnsafeMutablePointer<Element>.allocate(capacity: capacity * 2)
        bigger.moveInitialize(from: base, count: count)
        base.deallocate()
        base = bigger
        capacity *= 2
    }
}
