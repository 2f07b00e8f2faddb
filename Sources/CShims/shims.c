#define _GNU_SOURCE
#include "CShims.h"
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <sys/prctl.h>
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
