#define _GNU_SOURCE
#include "CShims.h"
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <sys/prctl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <linux/audit.h>
#include <stddef.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

int dp_gettid(void) { return (int)syscall(SYS_gettid); }

int dp_epoll_pwait2(int epfd, struct epoll_event *events, int maxevents, const struct timespec *timeout) {
#ifdef SYS_epoll_pwait2
    // The raw system call, so that this also works where glibc predates the wrapper.
    long r = syscall(SYS_epoll_pwait2, epfd, events, maxevents, timeout, NULL, (size_t)8);
    return r < 0 ? -errno : (int)r;
#else
    (void)epfd; (void)events; (void)maxevents; (void)timeout;
    return -ENOSYS;
#endif
}

int dp_set_thread_name(const char *name) {
    char buf[16];
    strncpy(buf, name, sizeof buf - 1);
    buf[sizeof buf - 1] = 0;
    return -pthread_setname_np(pthread_self(), buf);
}

int dp_set_affinity(const int *cpus, int count) {
    cpu_set_t set;
    CPU_ZERO(&set);
    for (int i = 0; i < count; i++) {
        if (cpus[i] < 0 || cpus[i] >= CPU_SETSIZE) return -EINVAL;
        CPU_SET(cpus[i], &set);
    }
    return -pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

int dp_set_timer_slack(unsigned long ns) {
    return prctl(PR_SET_TIMERSLACK, ns, 0, 0, 0) == 0 ? 0 : -errno;
}

int dp_o_direct(void) { return O_DIRECT; }

int dp_unix_listen(const char *path, int backlog) {
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof addr.sun_path) return -ENAMETOOLONG;
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    struct stat st;
    if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode)) unlink(path);
    mode_t old = umask(0177);  // the socket file is created 0600
    int rc = bind(fd, (struct sockaddr *)&addr, sizeof addr);
    int err = errno;
    umask(old);
    if (rc < 0 || listen(fd, backlog) < 0) {
        if (rc >= 0) err = errno;
        close(fd);
        return -err;
    }
    return fd;
}

int dp_unix_connect(const char *path) {
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof addr.sun_path) return -ENAMETOOLONG;
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        int err = errno;
        close(fd);
        return -err;
    }
    return fd;
}

static volatile int stop_fd = -1;
static void on_stop_signal(int sig) {
    (void)sig;
    uint64_t one = 1;
    int saved = errno;
    if (stop_fd >= 0 && write(stop_fd, &one, sizeof one) < 0) {}
    errno = saved;
}

void dp_stop_signals_to_eventfd(int fd) {
    stop_fd = fd;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

int dp_deny_io_uring_setup(int err) {
#ifdef SYS_io_uring_setup
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_io_uring_setup, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (err & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = { .len = sizeof filter / sizeof filter[0], .filter = filter };
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return -errno;
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0) return -errno;
    return 0;
#else
    (void)err;
    return -ENOSYS;
#endif
}
