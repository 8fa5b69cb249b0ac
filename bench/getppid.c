// SPDX-License-Identifier: GPL-2.0
// getppid: a tight getppid() loop (a syscall the tracer never probes), for the cost every other
// syscall pays while syscall tracepoints are attached.  Prints {"calls", "seconds", "ns_per_call"}.
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? atof(argv[1]) : 1.0;
    uint64_t start = now_ns(), deadline = start + (uint64_t)(seconds * 1e9), n = 0, t;
    do {
        for (int i = 0; i < 1024; i++)
            syscall(SYS_getppid);  // not the libc wrapper: never cached
        n += 1024;
    } while ((t = now_ns()) < deadline);
    double s = (t - start) / 1e9;
    printf("{\"calls\": %llu, \"seconds\": %.6f, \"ns_per_call\": %.2f}\n",
           (unsigned long long)n, s, s * 1e9 / (double)n);
    return 0;
}
