// The C reference for Dataplane's benchmarks: the same workloads (W1 wake-rtt, W2
// bh-throughput, W3 virtqueue, W4 io, W5 timers; Benchmarks/WORKLOADS.md) on raw
// liburing, with the same wake-up protocol as AioContext (notify_me / notified, an eventfd
// watched by a multishot POLL_ADD), the same split-ring layout and notification suppression
// as Sources/Devices, and QEMU's adaptive-polling rule, so that `make bench` can print
// Dataplane's figures as ratios of these.
//
// Usage: cref w1 POLL_MAX_NS | w2 | w5
//        cref w3 QD POLL_MAX_NS blocking|spinning WARMUP_MS DURATION_MS
//        cref w4nop | w4read FILE DURATION_MS
// Prints one line of key=value pairs.
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
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
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

// ---- Latency histogram: log-linear, 1024 sub-buckets per power of two (3 significant
// digits, as the HdrHistogram Dataplane's side uses) ----

enum { HSUB = 1024, HBUCKETS = 56 * HSUB };
struct hist { uint64_t count[HBUCKETS]; uint64_t total; };

static void hist_record(struct hist *h, uint64_t v) {
    unsigned b;
    if (v < 2 * HSUB) {
        b = (unsigned)v;
    } else {
        int e = 63 - __builtin_clzll(v) - 10;   // v >> e is in [1024, 2047]
        b = (unsigned)(e * HSUB + (v >> e));
    }
    if (b >= HBUCKETS) b = HBUCKETS - 1;
    h->count[b]++;
    h->total++;
}

static uint64_t hist_value(unsigned b) {
    if (b < 2 * HSUB) return b;
    unsigned e = b / HSUB - 1;
    return ((uint64_t)(b - e * HSUB) << e) + ((uint64_t)1 << e) / 2;  // the bucket's middle
}

static uint64_t hist_percentile(const struct hist *h, double p) {
    if (h->total == 0) return 0;
    uint64_t want = (uint64_t)((double)h->total * p / 100.0);
    if (want >= h->total) want = h->total - 1;
    uint64_t seen = 0;
    for (unsigned b = 0; b < HBUCKETS; b++) {
        seen += h->count[b];
        if (seen > want) return hist_value(b);
    }
    return hist_value(HBUCKETS - 1);
}

static int64_t thread_cpu_ns(pthread_t t) {
    clockid_t c;
    struct timespec ts;
    if (pthread_getcpuclockid(t, &c) != 0 || clock_gettime(c, &ts) != 0) return 0;
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

// ---- QEMU's adaptive polling rule (adjust_polling_time; Sources/Aio/AdaptivePolling.swift) ----

static int64_t poll_adjust(int64_t n, int64_t block_ns, int64_t max_ns) {
    if (block_ns <= n) return n;              // polling found it in time
    if (block_ns > max_ns) return 0;          // polling did not pay: shrink (poll-shrink 0)
    if (n < max_ns && block_ns < max_ns) {    // a little too late: grow (poll-grow 0: x2)
        int64_t g = n ? n * 2 : 4000;
        return g < max_ns ? g : max_ns;
    }
    return n;
}

// ---- W3 virtqueue: a null virtio-blk-like device on a split ring in shared memory ----
// Layout as SplitRingLayout.at(0, size: 256) and GuestQueue: descriptors at 0, avail ring,
// used ring (4-byte aligned), guest buffers from the next page: headers (16 B), status
// bytes, then 4 KiB data buffers. The device runs a loop like an IOThread's: multishot
// POLL_ADD on the kick eventfd, QEMU's adaptive polling of avail.idx with NO_NOTIFY set
// while polling, one interrupt eventfd write per batch unless NO_INTERRUPT.

enum { QSIZE = 256, QMASK = QSIZE - 1, QCAP = QSIZE / 3 };
#define F_NEXT 1
#define F_WRITE 2
#define USED_F_NO_NOTIFY 1
#define AVAIL_F_NO_INTERRUPT 1

struct vq {
    uint8_t *mem;
    size_t mem_size;
    uint8_t *desc;
    uint16_t *avail;   // flags, idx, ring[QSIZE]
    uint16_t *used;    // flags, idx, then {u32 id, u32 len}[QSIZE]
    uint64_t buf_base;
    int kick, irq;
    // device side
    uint16_t last_avail, used_idx;
    int64_t poll_max_ns;
    atomic_bool stop;
    atomic_ulong kicks, irqs, completions;
    // guest side
    int qd, spinning;
    atomic_bool guest_stop, measuring;
};

static uint64_t g_header(struct vq *q, int s) { return q->buf_base + (uint64_t)s * 16; }
static uint64_t g_status(struct vq *q, int s) { return q->buf_base + QCAP * 16 + (uint64_t)s; }
static uint64_t g_data(struct vq *q, int s) { return q->buf_base + ((QCAP * 17 + 4095) / 4096) * 4096 + (uint64_t)s * 4096; }

static uint16_t ld_acq16(uint16_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static void st_rel16(uint16_t *p, uint16_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static uint16_t ld_rlx16(uint16_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static void st_rlx16(uint16_t *p, uint16_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }

static uint8_t *gpa(struct vq *q, uint64_t addr, uint64_t len) {
    if (addr > q->mem_size || len > q->mem_size - addr) return NULL;
    return q->mem + addr;
}

static void vq_init(struct vq *q) {
    memset(q, 0, sizeof *q);
    uint64_t avail = 16 * QSIZE;
    uint64_t used = (avail + 6 + 2 * QSIZE + 3) & ~(uint64_t)3;
    uint64_t end = used + 6 + 8 * QSIZE;
    q->buf_base = (end + 4095) & ~(uint64_t)4095;
    q->mem_size = q->buf_base + ((QCAP * 17 + 4095) / 4096) * 4096 + QCAP * 4096;
    q->mem = mmap(NULL, q->mem_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (q->mem == MAP_FAILED) abort();
    q->desc = q->mem;
    q->avail = (uint16_t *)(q->mem + avail);
    q->used = (uint16_t *)(q->mem + used);
    q->kick = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    q->irq = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
}

// Pops every available request, completes it (null backend), publishes each used entry,
// then one interrupt unless the guest suppressed them. Returns how many.
static int vq_process(struct vq *q) {
    uint16_t avail = ld_acq16(&q->avail[1]);
    int n = 0;
    while (q->last_avail != avail) {
        unsigned head = q->avail[2 + (q->last_avail & QMASK)] & QMASK;
        q->last_avail++;
        // Parse header, data, status; every address checked against guest memory.
        uint64_t addr[3]; uint32_t len[3]; uint16_t flags[3];
        int k = 0; unsigned i = head; int ok = 1;
        for (;;) {
            uint8_t *d = q->desc + 16 * i;
            memcpy(&addr[k], d, 8); memcpy(&len[k], d + 8, 4); memcpy(&flags[k], d + 12, 2);
            uint16_t next; memcpy(&next, d + 14, 2);
            if (!gpa(q, addr[k], len[k])) { ok = 0; break; }
            k++;
            if (!(flags[k - 1] & F_NEXT)) break;
            if (k == 3 || next >= QSIZE) { ok = 0; break; }
            i = next;
        }
        uint32_t written = 0;
        if (ok && k >= 2 && len[0] >= 16 && !(flags[0] & F_WRITE) && (flags[k - 1] & F_WRITE) && len[k - 1] >= 1) {
            uint32_t type; memcpy(&type, q->mem + addr[0], 4);
            *gpa(q, addr[k - 1], 1) = 0;  // VIRTIO_BLK_S_OK
            written = (type == 0 && k == 3 ? len[1] : 0) + 1;
        }
        uint8_t *u = (uint8_t *)q->used + 4 + 8 * (q->used_idx & QMASK);
        uint32_t id = head;
        memcpy(u, &id, 4); memcpy(u + 4, &written, 4);
        q->used_idx++;
        st_rel16(&q->used[1], q->used_idx);
        n++;
    }
    if (n) {
        atomic_fetch_add_explicit(&q->completions, n, memory_order_relaxed);
        atomic_thread_fence(memory_order_seq_cst);  // used idx before reading the guest's flag
        if (!(ld_rlx16(&q->avail[0]) & AVAIL_F_NO_INTERRUPT)) {
            atomic_fetch_add_explicit(&q->irqs, 1, memory_order_relaxed);
            uint64_t one = 1;
            if (write(q->irq, &one, 8) < 0) {}
        }
    }
    return n;
}

static void arm_fd(struct io_uring *ring, int fd) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    io_uring_prep_poll_multishot(sqe, fd, POLLIN);
    io_uring_sqe_set_data64(sqe, 1);
}

static void *vq_device(void *arg) {
    struct vq *q = arg;
    struct io_uring ring;
    if (io_uring_queue_init(256, &ring, IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_SUBMIT_ALL) < 0) abort();
    arm_fd(&ring, q->kick);
    io_uring_submit(&ring);
    st_rlx16(&q->used[0], 0);  // kicks on
    int64_t poll_ns = 0;
    int polling = 0;
    while (!atomic_load_explicit(&q->stop, memory_order_relaxed)) {
        int64_t start = q->poll_max_ns ? now_ns() : 0;
        int found = 0;
        if (q->poll_max_ns && poll_ns > 0) {
            if (!polling) { st_rlx16(&q->used[0], USED_F_NO_NOTIFY); polling = 1; }  // poll begin
            int64_t now;
            do {
                if (ld_rlx16(&q->avail[1]) != q->last_avail) { found = 1; break; }
                if (io_uring_cq_ready(&ring)) break;
                now = now_ns();
            } while (now - start < poll_ns);
        }
        if (!found && polling && !io_uring_cq_ready(&ring)) {
            // Poll end before blocking: let the guest kick again, then look once more.
            st_rlx16(&q->used[0], 0);
            polling = 0;
            atomic_thread_fence(memory_order_seq_cst);
            if (ld_rlx16(&q->avail[1]) != q->last_avail) found = 1;
        }
        if (!found) io_uring_submit_and_wait(&ring, 1);
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;
        int kicked = 0;
        io_uring_for_each_cqe(&ring, head, cqe) {
            if (!(cqe->flags & IORING_CQE_F_MORE)) arm_fd(&ring, q->kick);
            seen++;
            kicked = 1;
        }
        io_uring_cq_advance(&ring, seen);
        if (kicked) {
            uint64_t v;
            if (read(q->kick, &v, 8) == 8) atomic_fetch_add_explicit(&q->kicks, 1, memory_order_relaxed);
        }
        vq_process(q);
        if (q->poll_max_ns && (found || kicked)) poll_ns = poll_adjust(poll_ns, now_ns() - start, q->poll_max_ns);
    }
    io_uring_queue_exit(&ring);
    return NULL;
}

struct guest_result { struct hist h; uint64_t submitted, completed, measured, unexpected; };

static void *vq_guest(void *arg) {
    struct vq *q = arg;
    struct guest_result *r = calloc(1, sizeof *r);
    int free_slots[QCAP], nfree = QCAP, busy[QCAP] = {0};
    int64_t issue[QCAP];
    for (int i = 0; i < QCAP; i++) free_slots[i] = QCAP - 1 - i;
    uint16_t avail_idx = 0, last_used = 0;
    st_rlx16(&q->avail[0], q->spinning ? AVAIL_F_NO_INTERRUPT : 0);
    for (;;) {
        int stopping = atomic_load_explicit(&q->guest_stop, memory_order_acquire);
        int64_t now = now_ns();
        if (!stopping) {
            int submitted = 0;
            while (QCAP - nfree < q->qd) {
                int s = free_slots[--nfree];
                busy[s] = 1;
                issue[s] = now;
                uint8_t *h = q->mem + g_header(q, s);
                uint32_t type = 0, zero = 0; uint64_t sector = 0;
                memcpy(h, &type, 4); memcpy(h + 4, &zero, 4); memcpy(h + 8, &sector, 8);
                q->mem[g_status(q, s)] = 0xFF;
                int d = s * 3;
                struct { uint64_t a; uint32_t l; uint16_t f, n; } dd[3] = {
                    { g_header(q, s), 16, F_NEXT, (uint16_t)(d + 1) },
                    { g_data(q, s), 4096, F_NEXT | F_WRITE, (uint16_t)(d + 2) },
                    { g_status(q, s), 1, F_WRITE, 0 },
                };
                for (int j = 0; j < 3; j++) {
                    uint8_t *p = q->desc + 16 * (d + j);
                    memcpy(p, &dd[j].a, 8); memcpy(p + 8, &dd[j].l, 4); memcpy(p + 12, &dd[j].f, 2); memcpy(p + 14, &dd[j].n, 2);
                }
                q->avail[2 + (avail_idx & QMASK)] = (uint16_t)d;
                avail_idx++;
                st_rel16(&q->avail[1], avail_idx);
                r->submitted++;
                submitted = 1;
            }
            if (submitted) {
                atomic_thread_fence(memory_order_seq_cst);  // avail idx before the device's flag
                if (!(ld_rlx16(&q->used[0]) & USED_F_NO_NOTIFY)) {
                    uint64_t one = 1;
                    if (write(q->kick, &one, 8) < 0) {}
                }
            }
        }
        int recording = atomic_load_explicit(&q->measuring, memory_order_relaxed);
        int64_t done = now_ns();
        uint16_t used = ld_acq16(&q->used[1]);
        int n = 0;
        while (last_used != used) {
            uint8_t *u = (uint8_t *)q->used + 4 + 8 * (last_used & QMASK);
            uint32_t id; memcpy(&id, u, 4);
            last_used++;
            int s = (int)id / 3;
            if (id % 3 || s >= QCAP || !busy[s]) { r->unexpected++; continue; }
            busy[s] = 0;
            free_slots[nfree++] = s;
            if (q->mem[g_status(q, s)] != 0) r->unexpected++;
            if (recording) { hist_record(&r->h, (uint64_t)(done - issue[s] > 0 ? done - issue[s] : 1)); r->measured++; }
            n++;
        }
        r->completed += n;
        if (stopping && nfree == QCAP) break;
        if (n == 0 && !q->spinning) {
            struct pollfd p = { .fd = q->irq, .events = POLLIN };
            poll(&p, 1, 10);
            uint64_t v;
            if (read(q->irq, &v, 8) < 0) {}
        }
    }
    return r;
}

static void w3(int qd, int64_t poll_max_ns, int spinning, int warm_ms, int dur_ms) {
    static struct vq q;
    vq_init(&q);
    q.poll_max_ns = poll_max_ns;
    q.qd = qd;
    q.spinning = spinning;
    pthread_t dev, guest;
    pthread_create(&dev, NULL, vq_device, &q);
    usleep(10000);
    pthread_create(&guest, NULL, vq_guest, &q);
    usleep((useconds_t)warm_ms * 1000);
    unsigned long k0 = atomic_load(&q.kicks), i0 = atomic_load(&q.irqs), c0 = atomic_load(&q.completions);
    int64_t cpu0 = thread_cpu_ns(dev);
    atomic_store(&q.measuring, true);
    int64_t t0 = now_ns();
    usleep((useconds_t)dur_ms * 1000);
    atomic_store(&q.measuring, false);
    int64_t elapsed = now_ns() - t0;
    unsigned long k1 = atomic_load(&q.kicks), i1 = atomic_load(&q.irqs), c1 = atomic_load(&q.completions);
    int64_t cpu1 = thread_cpu_ns(dev);
    atomic_store(&q.guest_stop, true);
    struct guest_result *r;
    pthread_join(guest, (void **)&r);
    atomic_store(&q.stop, true);
    uint64_t one = 1;
    if (write(q.kick, &one, 8) < 0) {}
    pthread_join(dev, NULL);
    double c = (double)(c1 - c0);
    printf("iops=%.0f p50=%llu p99=%llu p999=%llu kicks_per_req=%.4f irqs_per_req=%.4f cpu_ns_per_req=%.0f lost=%llu unexpected=%llu\n",
           (double)r->measured * 1e9 / (double)elapsed,
           (unsigned long long)hist_percentile(&r->h, 50), (unsigned long long)hist_percentile(&r->h, 99),
           (unsigned long long)hist_percentile(&r->h, 99.9),
           c ? (double)(k1 - k0) / c : 0, c ? (double)(i1 - i0) / c : 0, c ? (double)(cpu1 - cpu0) / c : 0,
           (unsigned long long)(r->submitted - r->completed), (unsigned long long)r->unexpected);
    free(r);
}

// ---- W4 io: (a) NOPs in batches of 32; (b) 4 KiB random reads at QD 32 from a file ----

static void w4nop(void) {
    struct io_uring ring;
    if (io_uring_queue_init(256, &ring, IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_SUBMIT_ALL) < 0) abort();
    enum { BATCH = 32, N = 2000000, WARM = 100000 };
    int64_t t0 = 0;
    for (int done = 0; done < WARM + N; done += BATCH) {
        if (done == WARM) t0 = now_ns();
        for (int i = 0; i < BATCH; i++) {
            struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
            io_uring_prep_nop(sqe);
            io_uring_sqe_set_data64(sqe, (uint64_t)i);
        }
        int got = 0;
        io_uring_submit_and_wait(&ring, BATCH);
        while (got < BATCH) {
            struct io_uring_cqe *cqe;
            unsigned head, seen = 0;
            io_uring_for_each_cqe(&ring, head, cqe) seen++;
            io_uring_cq_advance(&ring, seen);
            got += (int)seen;
            if (got < BATCH) io_uring_submit_and_wait(&ring, 1);
        }
    }
    printf("per_second=%.0f\n", (double)N * 1e9 / (double)(now_ns() - t0));
    io_uring_queue_exit(&ring);
}

static uint64_t xorshift(uint64_t *s) { uint64_t x = *s; x ^= x << 13; x ^= x >> 7; x ^= x << 17; return *s = x; }

static void w4read(const char *path, int dur_ms) {
    enum { QD = 32, BS = 4096 };
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) { perror(path); exit(1); }
    off_t size = lseek(fd, 0, SEEK_END);
    uint64_t blocks = (uint64_t)size / BS;
    struct io_uring ring;
    if (io_uring_queue_init(256, &ring, IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_SUBMIT_ALL) < 0) abort();
    uint8_t *bufs = aligned_alloc(4096, QD * BS);
    int64_t issued[QD];
    uint64_t seed = 0x9E3779B97F4A7C15ull;
    static struct hist h;
    uint64_t measured = 0, errors = 0;
    for (int s = 0; s < QD; s++) {
        struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
        io_uring_prep_read(sqe, fd, bufs + s * BS, BS, (xorshift(&seed) % blocks) * BS);
        io_uring_sqe_set_data64(sqe, (uint64_t)s);
        issued[s] = now_ns();
    }
    int64_t begin = now_ns(), t0 = begin + 200000000, end = t0 + (int64_t)dur_ms * 1000000;
    int64_t now = begin;
    while (now < end) {
        io_uring_submit_and_wait(&ring, 1);
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;
        now = now_ns();
        int resubmit[QD], nr = 0;
        io_uring_for_each_cqe(&ring, head, cqe) {
            int s = (int)cqe->user_data;
            if (cqe->res != BS) errors++;
            if (now >= t0) { hist_record(&h, (uint64_t)(now - issued[s])); measured++; }
            resubmit[nr++] = s;
            seen++;
        }
        io_uring_cq_advance(&ring, seen);
        for (int i = 0; i < nr; i++) {
            int s = resubmit[i];
            struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
            io_uring_prep_read(sqe, fd, bufs + s * BS, BS, (xorshift(&seed) % blocks) * BS);
            io_uring_sqe_set_data64(sqe, (uint64_t)s);
            issued[s] = now_ns();
        }
    }
    int64_t elapsed = now - t0;
    printf("iops=%.0f p50=%llu p99=%llu errors=%llu\n", (double)measured * 1e9 / (double)elapsed,
           (unsigned long long)hist_percentile(&h, 50), (unsigned long long)hist_percentile(&h, 99),
           (unsigned long long)errors);
    io_uring_queue_exit(&ring);
    close(fd);
    free(bufs);
}

int main(int argc, char **argv) {
    prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0);  // as Dataplane's IOThreads (and QEMU) do; inherited by threads
    if (argc >= 2 && !strcmp(argv[1], "w1")) { w1(argc >= 3 ? atoll(argv[2]) : 0); return 0; }
    if (argc >= 2 && !strcmp(argv[1], "w2")) { w2(); return 0; }
    if (argc >= 2 && !strcmp(argv[1], "w5")) { w5(); return 0; }
    if (argc >= 7 && !strcmp(argv[1], "w3")) {
        w3(atoi(argv[2]), atoll(argv[3]), !strcmp(argv[4], "spinning"), atoi(argv[5]), atoi(argv[6]));
        return 0;
    }
    if (argc >= 2 && !strcmp(argv[1], "w4nop")) { w4nop(); return 0; }
    if (argc >= 4 && !strcmp(argv[1], "w4read")) { w4read(argv[2], atoi(argv[3])); return 0; }
    fprintf(stderr, "usage: cref w1 POLL_MAX_NS | w2 | w5 | w3 QD POLL_MAX_NS blocking|spinning WARMUP_MS DURATION_MS\n"
                    "       | w4nop | w4read FILE DURATION_MS\n");
    return 2;
}
