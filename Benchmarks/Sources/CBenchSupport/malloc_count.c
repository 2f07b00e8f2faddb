// See include/CBenchSupport.h. Forwards to glibc's own entry points (__libc_*), which
// glibc exports for exactly this purpose.
#define _GNU_SOURCE
#include "CBenchSupport.h"
#include <errno.h>
#include <stdatomic.h>
#include <stddef.h>

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);

static atomic_int enabled;
static atomic_ulong counted;

static inline void bump(void) {
    if (atomic_load_explicit(&enabled, memory_order_relaxed))
        atomic_fetch_add_explicit(&counted, 1, memory_order_relaxed);
}

void dp_malloc_count_enable(int on) { atomic_store(&enabled, on); }
uint64_t dp_malloc_count(void) { return atomic_load(&counted); }

void *malloc(size_t n) { bump(); return __libc_malloc(n); }
void *calloc(size_t n, size_t m) { bump(); return __libc_calloc(n, m); }
void *realloc(void *p, size_t n) { bump(); return __libc_realloc(p, n); }
void *memalign(size_t a, size_t n) { bump(); return __libc_memalign(a, n); }
void *aligned_alloc(size_t a, size_t n) { bump(); return __libc_memalign(a, n); }
int posix_memalign(void **out, size_t a, size_t n) {
    bump();
    void *p = __libc_memalign(a, n);
    if (!p) return ENOMEM;
    *out = p;
    return 0;
}
