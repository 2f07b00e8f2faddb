// The C reference for Dataplane's benchmarks: the same workloads (W1 wake-rtt, W2
// bh-throughput, W5 timers; ../../../shared/spec/WORKLOADS.md) on raw liburing, with the same
// wake-up protocol as AioContext (notify_me / notified, an eventfd watched by a multishot
// POLL_ADD), so that `make bench` can print Dataplane's figures as ratios of these.
//
// Usage: cref w1 POLL_MAX_NS | cref w2 | cref w5. Prints one line of key=value pairs.
#define _GNU_SOURCE
#include <errno.h>
#include <liburing.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int cmp64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

// ---- A minimal loop: lock-free stack of work items, notify protocol, ring ----

struct node { struct node *next; void (*fn)(struct node *); };

struct loop {
    struct io_uring ring;
    int efd;
    _Atomic(struct node *) head;
    atomic_uint notify_me;
    atomic_bool notified;
    atomic_bool stop;
    int64_t poll_max_ns;   // 0: never poll; else busy-poll up to this long before sleeping
    atomic_ulong eventfd_writes, enters;
};

static void loop_notify(struct loop *l) {
    if (atomic_exchange(&l->notified, true)) return;
    if (atomic_load(&l->notify_me)) {
        uint64_t one = 1;
        atomic_fetch_add_explicit(&l->eventfd_writes, 1, memory_order_relaxed);
        if (write(l->efd, &one, 8) < 0) {}
    }
}

static void loop_push(struct loop *l, struct node *n) {
    struct node *old = atomic_load_explicit(&l->head, memory_order_relaxed);
    do { n->next = old; } while (!atomic_compare_exchange_weak_explicit(&l->head, &old, n, memory_order_release, memory_order_relaxed));
    loop_notify(l);
}

static void arm(struct loop *l) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&l->ring);
    io_uring_prep_poll_multishot(sqe, l->efd, POLLIN);
    io_uring_sqe_set_data64(sqe, 1);
}

static int run_items(struct loop *l) {
    struct node *n = atomic_exchange_explicit(&l->head, NULL, memory_order_acquire);
    // FIFO, as Dataplane runs a batch
    struct node *rev = NULL;
    while (n) { struct node *next = n->next; n->next = rev; rev = n; n = next; }
    int ran = 0;
    while (rev) { struct node *next = rev->next; rev->fn(rev); rev = next; ran++; }
    return ran;
}

static void loop_iteration(struct loop *l) {
    if (l->poll_max_ns > 0 && !atomic_load_explicit(&l->notified, memory_order_relaxed)) {
        int64_t end = now_ns() + l->poll_max_ns;
        while (now_ns() < end && !atomic_load_explicit(&l->notified, memory_order_relaxed)) {}
    }
    bool block = !atomic_load(&l->notified) && atomic_load_explicit(&l->head, memory_order_relaxed) == NULL;
    if (block) {
        atomic_fetch_add(&l->notify_me, 2);
        if (atomic_load(&l->notified)) block = false;
    }
    if (block) {
        atomic_fetch_add_explicit(&l->enters, 1, memory_order_relaxed);
        io_uring_submit_and_wait(&l->ring, 1);
        atomic_fetch_sub(&l->notify_me, 2);
    } else if (io_uring_sq_ready(&l->ring)) {
        io_uring_submit(&l->ring);
    }
    atomic_store_explicit(&l->notified, false, memory_order_relaxed);
    atomic_thread_fence(memory_order_seq_cst);
    struct io_uring_cqe *cqe;
    unsigned head, seen = 0;
    io_uring_for_each_cqe(&l->ring, head, cqe) {
        if (!(cqe->flags & IORING_CQE_F_MORE)) arm(l);
        uint64_t v;
        if (read(l->efd, &v, 8) < 0) {}
        seen++;
    }
    io_uring_cq_advance(&l->ring, seen);
    run_items(l);
}

static void *loop_main(void *arg) {
    struct loop *l = arg;
    if (io_uring_queue_init(256, &l->ring, IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_SUBMIT_ALL) < 0) abort();
    arm(l);
    io_uring_submit(&l->ring);
    while (!atomic_load_explicit(&l->stop, memory_order_relaxed)) loop_iteration(l);
    io_uring_queue_exit(&l->ring);
    return NULL;
}

static void stop_fn(struct node *n) { (void)n; }

static void loop_start(struct loop *l, pthread_t *t, int64_t poll_max_ns) {
    memset(l, 0, sizeof *l);
    l->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    l->poll_max_ns = poll_max_ns;
    pthread_create(t, NULL, loop_main, l);
}

static void loop_stop(struct loop *l, pthread_t t) {
    static struct node n = { .fn = stop_fn };
    atomic_store(&l->stop, true);
    loop_push(l, &n);
    pthread_join(t, NULL);
    close(l->efd);
}

// ---- W1 wake-rtt ----

static atomic_bool w1_flag;
static void w1_fn(struct node *n) { (void)n; atomic_store_explicit(&w1_flag, true, memory_order_release); }

static void w1(int64_t poll_max_ns) {
    struct loop l; pthread_t t;
    loop_start(&l, &t, poll_max_ns);
    usleep(10000);
    enum { WARM = 20000, N = 200000 };
    int64_t *s = malloc(sizeof(int64_t) * N);
    struct node n = { .fn = w1_fn };
    unsigned long w0 = 0, e0 = 0;
    for (int i = 0; i < WARM + N; i++) {
        if (i == WARM) { w0 = atomic_load(&l.eventfd_writes); e0 = atomic_load(&l.enters); }
        atomic_store_explicit(&w1_flag, false, memory_order_relaxed);
        int64_t t0 = now_ns();
        loop_push(&l, &n);
        while (!atomic_load_explicit(&w1_flag, memory_order_acquire)) {}
        if (i >= WARM) s[i - WARM] = now_ns() - t0;
    }
    qsort(s, N, sizeof *s, cmp64);
    printf("p50=%lld p99=%lld p999=%lld eventfd_per_op=%.3f enters_per_op=%.3f\n",
           (long long)s[N / 2], (long long)s[N * 99 / 100], (long long)s[N * 999 / 1000],
           (double)(atomic_load(&l.eventfd_writes) - w0) / N, (double)(atomic_load(&l.enters) - e0) / N);
    loop_stop(&l, t);
    free(s);
}

// ---- W2 bh-throughput: preallocated nodes ----

static atomic_long w2_ran;
static void w2_fn(struct node *n) { (void)n; atomic_fetch_add_explicit(&w2_ran, 1, memory_order_relaxed); }

static void w2(void) {
    struct loop l; pthread_t t;
    loop_start(&l, &t, 0);
    usleep(10000);
    enum { N = 2000000 };
    struct node *nodes = calloc(N, sizeof *nodes);
    for (int i = 0; i < N; i++) nodes[i].fn = w2_fn;
    int64_t t0 = now_ns();
    for (int i = 0; i < N; i++) loop_push(&l, &nodes[i]);
    while (atomic_load_explicit(&w2_ran, memory_order_relaxed) < N) {}
    int64_t dt = now_ns() - t0;
    printf("per_second=%.0f\n", (double)N * 1e9 / (double)dt);
    loop_stop(&l, t);
    free(nodes);
}

// ---- W5 timers: 10k one-shot timeouts, deadlines uniform in 0-10 ms ----
// Deadlines start 20 ms after `start` (in Dataplane's run too), so that arming all 10k
// is done before the first one is due and lateness measures the loop, not the set-up.

static void w5(void) {
    enum { N = 10000 };
    struct io_uring ring;
    if (io_uring_queue_init(256, &ring, 0) < 0) abort();
    int64_t *deadline = malloc(sizeof(int64_t) * N), *late = malloc(sizeof(int64_t) * N);
    srand(42);
    int64_t start = now_ns();
    for (int i = 0; i < N; i++) deadline[i] = start + 20000000 + (int64_t)(rand() % 10000000);
    // Sorted deadlines; one wait per distinct next deadline (what a timer heap does).
    qsort(deadline, N, sizeof *deadline, cmp64);
    int fired = 0;
    while (fired < N) {
        int64_t now = now_ns();
        while (fired < N && deadline[fired] <= now) { late[fired] = now - deadline[fired]; fired++; }
        if (fired == N) break;
        int64_t wait = deadline[fired] - now;
        struct __kernel_timespec ts = { .tv_sec = wait / 1000000000, .tv_nsec = wait % 1000000000 };
        struct io_uring_cqe *cqe;
        io_uring_submit_and_wait_timeout(&ring, &cqe, 1, &ts, NULL);
    }
    qsort(late, N, sizeof *late, cmp64);
    printf("p50=%lld p99=%lld max=%lld\n", (long long)late[N / 2], (long long)late[N * 99 / 100], (long long)late[N - 1]);
    io_uring_queue_exit(&ring);
    free(deadline); free(late);
}

int main(int argc, char **argv) {
    prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0);  // as Dataplane's IOThreads (and QEMU) do; inherited by threads
    if (argc >= 2 && !strcmp(argv[1], "w1")) { w1(argc >= 3 ? atoll(argv[2]) : 0); return 0; }
    if (argc >= 2 && !strcmp(argv[1], "w2")) { w2(); return 0; }
    if (argc >= 2 && !strcmp(argv[1], "w5")) { w5(); return 0; }
    fprintf(stderr, "usage: cref w1 POLL_MAX_NS | w2 | w5\n");
    return 2;
}
