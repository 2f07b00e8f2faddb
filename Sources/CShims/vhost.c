// Shims for vhost-user: file descriptors passed over a UNIX socket (SCM_RIGHTS ancillary
// data is built with CMSG_* macros, which Swift cannot import), memfd_create and fstatfs
// (declared by glibc only under _GNU_SOURCE / not in Swift's Glibc module).
#define _GNU_SOURCE
#include "CShims.h"
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/vfs.h>
#include <unistd.h>

#define DP_MAX_FDS 8
#define DP_HUGETLBFS_MAGIC 0x958458f6

long dp_recv_with_fds(int sock, void *buf, size_t len, int *fds, int maxfds, int *nfds) {
    union {
        char buf[CMSG_SPACE(sizeof(int) * DP_MAX_FDS)];
        struct cmsghdr align;
    } control;
    struct iovec iov = { .iov_base = buf, .iov_len = len };
    struct msghdr msg = {
        .msg_iov = &iov, .msg_iovlen = 1,
        .msg_control = control.buf, .msg_controllen = sizeof control.buf,
    };
    *nfds = 0;
    ssize_t n;
    do {
        n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n < 0) return -errno;
    int got = 0;
    int dropped = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int *data = (int *)CMSG_DATA(c);
        for (size_t i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, data + i, sizeof fd);
            if (got < maxfds) fds[got++] = fd;
            else { close(fd); dropped = 1; }
        }
    }
    if (dropped || (msg.msg_flags & MSG_CTRUNC)) {
        // More descriptors than a message may carry: none of them is kept.
        for (int i = 0; i < got; i++) close(fds[i]);
        return -EMSGSIZE;
    }
    *nfds = got;
    return n;
}

long dp_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds) {
    if (nfds < 0 || nfds > DP_MAX_FDS) return -EINVAL;
    union {
        char buf[CMSG_SPACE(sizeof(int) * DP_MAX_FDS)];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof control);
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
    if (nfds > 0) {
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
    }
    ssize_t n;
    do {
        n = sendmsg(sock, &msg, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    return n < 0 ? -errno : n;
}

int dp_fallocate(int fd, int mode, long long offset, long long length) {
    return fallocate(fd, mode, (off_t)offset, (off_t)length) == 0 ? 0 : -errno;
}

int dp_memfd_create(const char *name) {
    int fd = memfd_create(name, MFD_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

long dp_file_page_size(int fd) {
    struct statfs fs;
    if (fstatfs(fd, &fs) == 0 && (unsigned long)fs.f_type == DP_HUGETLBFS_MAGIC && fs.f_bsize > 0) return fs.f_bsize;
    return sysconf(_SC_PAGESIZE);
}
