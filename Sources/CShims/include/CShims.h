// CShims: the few Linux system calls that Swift's Glibc module does not import, because
// glibc declares them only under _GNU_SOURCE (which that module is not built with) or
// because they are variadic. Each wrapper returns -errno on failure.
#ifndef DATAPLANE_CSHIMS_H
#define DATAPLANE_CSHIMS_H

#include <sys/epoll.h>
#include <time.h>
#include <sys/eventfd.h>

/// gettid(2): the calling thread's kernel thread id.
int dp_gettid(void);

/// epoll_pwait2(2) (Linux 5.11+): epoll_wait with a nanosecond timeout (NULL: infinite).
/// Returns the event count or -errno (-ENOSYS on older kernels).
int dp_epoll_pwait2(int epfd, struct epoll_event *events, int maxevents, const struct timespec *timeout);

/// pthread_setname_np(3) for the calling thread (at most 15 bytes, truncated here).
int dp_set_thread_name(const char *name);

/// prctl(PR_SET_TIMERSLACK, ns) for the calling thread (variadic in glibc). Returns 0 or -errno.
int dp_set_timer_slack(unsigned long ns);

/// O_DIRECT (glibc defines it only under _GNU_SOURCE).
int dp_o_direct(void);

/// A listening AF_UNIX stream socket at `path` (non-blocking, close-on-exec), created with
/// mode 0600. An existing socket file there is replaced. Returns the fd or -errno.
int dp_unix_listen(const char *path, int backlog);

/// Connects a blocking AF_UNIX stream socket to `path`. Returns the fd or -errno.
int dp_unix_connect(const char *path);

/// Installs SIGINT and SIGTERM handlers that write 1 to the eventfd `fd` (async-signal-safe).
void dp_stop_signals_to_eventfd(int fd);

/// For fault-injection tests: installs a seccomp filter (no new privileges first) under
/// which io_uring_setup fails with `err`, as container runtimes' default profiles do.
/// Irreversible for the process. Returns 0 or -errno.
int dp_deny_io_uring_setup(int err);

/// Pins the calling thread to the given CPUs. Returns 0 or -errno.
int dp_set_affinity(const int *cpus, int count);

// Atomic access to shared memory that Swift sees as raw bytes (virtqueue rings shared with a
// guest thread or another process). Swift's Atomic must own its storage; these work on any
// suitably aligned address. ThreadSanitizer sees them (they are compiler builtins here).
static inline unsigned short dp_load_acquire_u16(const unsigned short *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void dp_store_release_u16(unsigned short *p, unsigned short v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline unsigned short dp_load_relaxed_u16(const unsigned short *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void dp_store_relaxed_u16(unsigned short *p, unsigned short v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline void dp_fence_seq_cst(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// vhost-user (vhost.c).
#include <stddef.h>

/// recvmsg(2) of up to `len` bytes from a non-blocking read, collecting SCM_RIGHTS
/// descriptors (close-on-exec) into `fds` (at most `maxfds`, at most 8), their count in
/// `*nfds`. Returns the bytes read (0 at end of file) or -errno; -EMSGSIZE when more
/// descriptors came than fit (all of them are closed then).
long dp_recv_with_fds(int sock, void *buf, size_t len, int *fds, int maxfds, int *nfds);

/// sendmsg(2) of `len` bytes with `nfds` (0...8) descriptors as SCM_RIGHTS, MSG_NOSIGNAL.
/// Returns the bytes sent or -errno.
long dp_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds);

/// fallocate(2) (glibc declares it only under _GNU_SOURCE). Returns 0 or -errno.
int dp_fallocate(int fd, int mode, long long offset, long long length);

/// memfd_create(2) with MFD_CLOEXEC. Returns the fd or -errno.
int dp_memfd_create(const char *name);

/// The page size a mapping of `fd` must be aligned to: the huge page size on hugetlbfs,
/// else the base page size.
long dp_file_page_size(int fd);

#endif
