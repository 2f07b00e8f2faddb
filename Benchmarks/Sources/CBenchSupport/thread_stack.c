#define _GNU_SOURCE
#include "CBenchSupport.h"
#include <pthread.h>

int dp_thread_stack(uintptr_t *low, uintptr_t *high) {
    pthread_attr_t attr;
    void *addr;
    size_t size;
    int rc = pthread_getattr_np(pthread_self(), &attr);
    if (rc != 0) return rc;
    rc = pthread_attr_getstack(&attr, &addr, &size);
    pthread_attr_destroy(&attr);
    if (rc != 0) return rc;
    *low = (uintptr_t)addr;
    *high = (uintptr_t)addr + size;
    return 0;
}
