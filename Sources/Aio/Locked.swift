import Glibc

/// A value behind a `pthread_mutex_t`.
///
/// Why not `Synchronization.Mutex`: on Linux it is built on futexes inside the standard
/// library, which ThreadSanitizer does not see, so every correctly locked access is reported
/// as a race (reproduced with two threads appending to a `Mutex<[Int]>`). TSan intercepts
/// `pthread_mutex_lock`, so with this lock the sanitizer runs stay meaningful. The lock is
/// uncontended on every hot path we have, where the two cost the same.
///
/// `@unchecked Sendable`: `value` is only reached inside `withLock`, with the mutex held.
public final class Locked<Value: ~Copyable>: @unchecked Sendable {
    @usableFromInline let mutex: UnsafeMutablePointer<pthread_mutex_t>
    @usableFromInline var value: Value

    public init(_ value: consuming Value) {
        self.value = value
        mutex = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    /// Runs `body` with the mutex held.
    @inlinable
    public func withLock<R, E: Error>(_ body: (inout Value) throws(E) -> R) throws(E) -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value)
    }
}
