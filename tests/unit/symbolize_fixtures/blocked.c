/* A process for tests/unit/test_unwind.py: blocks in read(0) three calls below main (or below
 * a thread's start with --thread), so a test can capture its registers and stack the way the
 * probes do at a syscall and unwind them. -DINNER_ATTR='static inline
 * __attribute__((always_inline))' inlines wait_for_stdin into save_vcpu_state. */
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#ifndef INNER_ATTR
#define INNER_ATTR __attribute__((noinline))
#endif

INNER_ATTR void wait_for_stdin(void)
{
    char buf[1];
    printf("ready\n");
    fflush(stdout);
    while (read(0, buf, sizeof buf) > 0) {
    }
}

/* Recursion not in tail position (the asm after the call): every level is a frame. */
__attribute__((noinline)) void save_vcpu_state(int depth)
{
    if (depth > 0)
        save_vcpu_state(depth - 1);
    else
        wait_for_stdin();
    __asm__ volatile("" ::: "memory");
}

static void *vcpu_thread(void *arg)
{
    (void)arg;
    save_vcpu_state(2);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "--thread") == 0) {
        pthread_t t;
        pthread_create(&t, NULL, vcpu_thread, NULL);
        pthread_join(t, NULL);
        return 0;
    }
    save_vcpu_state(2);
    return 0;
}
