// CLiburing: makes liburing (Debian's liburing-dev, 2.3+) importable from Swift.
//
// Only the `Uring` module imports this. Everything here is either an include or a
// `static inline` shim for something Swift cannot import by itself; each says why.
#ifndef DATAPLANE_CLIBURING_H
#define DATAPLANE_CLIBURING_H

// These come *before* <liburing.h> on purpose. liburing.h defines _XOPEN_SOURCE before it
// includes glibc headers; if this module is the first to pull in <sys/select.h>, `fd_set`
// gets a different member name (`fds_bits` instead of `__fds_bits`) than in SwiftGlibc and a
// clean build fails with "'__fds_bits' from module 'SwiftGlibc' is not present in
// definition of 'fd_set' in module 'CLiburing'" (an incremental build then passes).
#include <sys/select.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/eventfd.h>
#include <sys/epoll.h>
#include <sys/syscall.h>
#include <poll.h>
#include <time.h>
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include <liburing.h>

// IOSQE_* flags are defined from an enum's bit positions (`1U << IOSQE_IO_LINK_BIT`);
// Swift does not import such macros. Shimmed as functions.
static inline unsigned dp_iosqe_io_link(void) { return IOSQE_IO_LINK; }
static inline unsigned dp_iosqe_async(void) { return IOSQE_ASYNC; }

// `io_uring_for_each_cqe` is a function-like macro, which Swift never imports. This walks
// the ready CQEs the same way, copies up to `max` of them out, and advances the CQ past
// them in one store, so the caller can dispatch (and even re-enter the loop) with the ring
// already consumed. The ring is set up without IORING_SETUP_CQE32, so a CQE is 16 bytes.
static inline unsigned dp_cq_take(struct io_uring *ring, struct io_uring_cqe *out, unsigned max) {
    unsigned head, n = 0;
    struct io_uring_cqe *cqe;
    io_uring_for_each_cqe(ring, head, cqe) {
        if (n == max) break;
        out[n++] = *cqe;
    }
    io_uring_cq_advance(ring, n);
    return n;
}

// The raw io_uring_setup(2) system call, for the availability probe: liburing's
// io_uring_queue_init does the same but we want the bare errno without mmaps. glibc has no
// wrapper; `syscall` is variadic, which Swift cannot call.
static inline int dp_io_uring_setup_raw(unsigned entries, struct io_uring_params *p) {
    long r = syscall(__NR_io_uring_setup, entries, p);
    return r < 0 ? -errno : (int)r;
}

#endif
