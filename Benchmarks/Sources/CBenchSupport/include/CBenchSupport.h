// C support for `compare`: a malloc counter and what Glibc's module does not import.
#pragma once
#include <stdint.h>

/// Starts (1) or stops (0) counting malloc-family calls in the whole process. Off by
/// default: a disabled counter costs one relaxed load and a predictable branch per
/// allocation. Defining malloc & co. in the executable interposes them for every library.
void dp_malloc_count_enable(int on);
/// Allocations (malloc, calloc, realloc, posix_memalign, aligned_alloc, memalign) counted so far.
uint64_t dp_malloc_count(void);

/// The calling thread's stack, [low, high) (pthread_getattr_np, a GNU extension).
int dp_thread_stack(uintptr_t *low, uintptr_t *high);
