// SPDX-License-Identifier: GPL-2.0
// kvmloop: a minimal KVM driver for the benchmark (bench/run.py).  libc + <linux/kvm.h> only.
//
// One VM, N vCPUs, B of them busy (one pthread each).  Each busy vCPU runs a real-mode loop
//     mov dx, PORT ; mov al, 0x42 ; 1: out dx, al ; jmp 1b
// so every KVM_RUN returns with KVM_EXIT_IO, and the thread re-enters KVM_RUN at once.  The
// other N-B vCPUs are created and their kvm_run mmapped (as a VMM does) but never run: they are
// the "tracked vCPUs" of the scaling rows.
//
// --violations K (busy vCPU 0 only): about every --pace-us microseconds, right after an IO exit
// and while its completion is pending, issue KVM_GET_REGS on the vCPU fd (a save mid-completion:
// the violation the daemon reports), stamping CLOCK_REALTIME right before the ioctl; then
// re-enter KVM_RUN.  The stamps (ns), the vCPU's exit count at that moment (= the daemon's
// `window`) and when the KVM_RUN that exited was entered (CLOCK_REALTIME ns: the window opened
// between the two stamps) go to --ts-file, one "ts_ns window entry_ns" line each.
//   --save-ioctls 2 (default) follows the KVM_GET_REGS with KVM_GET_SREGS: a snapshot, which the
//   daemon reports at once.  --save-ioctls 1 issues the KVM_GET_REGS alone: a register peek,
//   which the daemon holds until the window shows what it was (an inspection when re-entry
//   completes it, so no alert); with --hold-us longer than the daemon's --snapshot-idle the
//   window stays open and the peek is reported as a violation at the idle time.
//   --peek LIST replaces --save-ioctls with the state ioctls to issue, in order, comma-separated:
//   regs (KVM_GET_REGS), sregs (KVM_GET_SREGS), lapic (KVM_GET_LAPIC: needs --irqchip 1, an
//   in-kernel irqchip created before the vCPUs), setregs (KVM_SET_REGS of what regs read; regs
//   must come first). One kind alone (regs, lapic, regs,regs) is an inspection; two kinds a
//   snapshot; regs,setregs a restore. --pace-us 0 issues them at every exit. After the last
//   one the thread stops with that exit still pending: the process exits mid-completion.
//
// Prints one JSON object: exits, seconds, ns_per_exit (busy-thread time per exit), ...
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define GUEST_MEM (64 * 1024)
#define CODE_GPA 0x1000

static int kvm_fd, vm_fd;
static long run_size;
static unsigned port = 0x500;
static double duration_s = 1.0;
static uint64_t count_limit; // exits per busy vCPU (0: use duration)
static long violations;
static long pace_us = 1000;
static long save_ioctls = 2; // per violation: KVM_GET_REGS (1), + KVM_GET_SREGS (2)
static long hold_us;         // sleep after the save(s), before re-entering KVM_RUN
static const char *ts_file;
static double start_delay_s; // pause between creating the vCPUs and running them
static long irqchip;         // KVM_CREATE_IRQCHIP before the vCPUs (KVM_GET_LAPIC needs it)
enum peek_op { OP_REGS, OP_SREGS, OP_LAPIC, OP_SETREGS };
#define MAX_PEEK_OPS 8
static int peek_ops[MAX_PEEK_OPS] = {OP_REGS, OP_SREGS};
static int npeek = 2;

// "regs,lapic" into peek_ops; -1 on an unknown name, too many, or setregs before regs.
static int parse_peek(const char *list)
{
    static const char *names[] = {"regs", "sregs", "lapic", "setregs"};
    char buf[256];
    snprintf(buf, sizeof(buf), "%s", list);
    npeek = 0;
    int have_regs = 0;
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok;
         tok = strtok_r(NULL, ",", &save)) {
        int op = -1;
        for (int k = 0; k < 4; k++)
            if (!strcmp(tok, names[k]))
                op = k;
        if (op < 0 || npeek >= MAX_PEEK_OPS || (op == OP_SETREGS && !have_regs))
            return -1;
        have_regs |= op == OP_REGS;
        peek_ops[npeek++] = op;
    }
    return npeek ? 0 : -1;
}

struct vcpu {
    int fd;
    int index;
    struct kvm_run *run;
    pthread_t thread;
    uint64_t exits;
    double seconds;
    long violations_done;
    uint64_t *ts;       // violation stamps (CLOCK_REALTIME ns)
    uint64_t *windows;  // exit count at each violation
    uint64_t *entries;  // when the KVM_RUN that exited before each violation was entered
    int error;
};

static void die(const char *what)
{
    fprintf(stderr, "kvmloop: %s: %s\n", what, strerror(errno));
    exit(1);
}

static uint64_t now_ns(clockid_t clk)
{
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void setup_vcpu(struct vcpu *v, int index)
{
    v->index = index;
    v->fd = ioctl(vm_fd, KVM_CREATE_VCPU, (unsigned long)index);
    if (v->fd < 0)
        die("KVM_CREATE_VCPU");
    v->run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
    if (v->run == MAP_FAILED)
        die("mmap kvm_run");
}

static void init_regs(struct vcpu *v)
{
    struct kvm_sregs sregs;
    if (ioctl(v->fd, KVM_GET_SREGS, &sregs) < 0)
        die("KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if (ioctl(v->fd, KVM_SET_SREGS, &sregs) < 0)
        die("KVM_SET_SREGS");
    struct kvm_regs regs;
    memset(&regs, 0, sizeof(regs));
    regs.rip = CODE_GPA;
    regs.rflags = 0x2;
    if (ioctl(v->fd, KVM_SET_REGS, &regs) < 0)
        die("KVM_SET_REGS");
}

static void peek(struct vcpu *v)
{
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    struct kvm_lapic_state lapic;
    for (int k = 0; k < npeek; k++) {
        int op = peek_ops[k];
        if (op == OP_REGS && ioctl(v->fd, KVM_GET_REGS, &regs) < 0)
            die("KVM_GET_REGS");
        if (op == OP_SREGS && ioctl(v->fd, KVM_GET_SREGS, &sregs) < 0)
            die("KVM_GET_SREGS");
        if (op == OP_LAPIC && ioctl(v->fd, KVM_GET_LAPIC, &lapic) < 0)
            die("KVM_GET_LAPIC");
        if (op == OP_SETREGS && ioctl(v->fd, KVM_SET_REGS, &regs) < 0)
            die("KVM_SET_REGS");
    }
}

static int check_exit(struct vcpu *v)
{
    struct kvm_run *r = v->run;
    if (r->exit_reason != KVM_EXIT_IO || r->io.port != port) {
        fprintf(stderr, "kvmloop: vcpu %d: unexpected exit %u (port 0x%x)\n", v->index,
                r->exit_reason, r->exit_reason == KVM_EXIT_IO ? r->io.port : 0);
        return -1;
    }
    return 0;
}

static void *busy(void *arg)
{
    struct vcpu *v = arg;
    uint64_t start = now_ns(CLOCK_MONOTONIC);
    uint64_t deadline = start + (uint64_t)(duration_s * 1e9);
    uint64_t next_violation = start + (uint64_t)pace_us * 1000;
    int violating = v->index == 0 && violations > 0;
    uint64_t n = 0;
    uint64_t entered = 0;
    for (;;) {
        if (violating)
            entered = now_ns(CLOCK_REALTIME);
        if (ioctl(v->fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "kvmloop: KVM_RUN: %s\n", strerror(errno));
            v->error = 1;
            break;
        }
        n++;
        if (check_exit(v)) {
            v->error = 1;
            break;
        }
        if (violating) {
            uint64_t t = now_ns(CLOCK_MONOTONIC);
            if (t >= next_violation) {
                uint64_t stamp = now_ns(CLOCK_REALTIME);
                peek(v);
                if (hold_us > 0) {
                    struct timespec hold = {hold_us / 1000000, (hold_us % 1000000) * 1000};
                    nanosleep(&hold, NULL);
                }
                v->ts[v->violations_done] = stamp;
                v->windows[v->violations_done] = n;
                v->entries[v->violations_done] = entered;
                v->violations_done++;
                next_violation = t + (uint64_t)pace_us * 1000;
                if (v->violations_done >= violations)
                    break;
            }
            continue;
        }
        if (count_limit) {
            if (n >= count_limit)
                break;
        } else if ((n & 255) == 0 && now_ns(CLOCK_MONOTONIC) >= deadline) {
            break;
        }
    }
    v->exits = n;
    v->seconds = (now_ns(CLOCK_MONOTONIC) - start) / 1e9;
    return NULL;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: kvmloop [--vcpus N] [--busy B] [--seconds S | --count C] [--port P]\n"
            "               [--violations K --ts-file PATH [--pace-us U] [--save-ioctls 1|2]\n"
            "                [--peek regs,sregs,lapic,setregs] [--hold-us U]] [--irqchip 1]\n"
            "               [--start-delay S]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    long nvcpus = 1, nbusy = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc)
            usage();
        const char *val = argv[++i];
        if (!strcmp(a, "--vcpus"))
            nvcpus = atol(val);
        else if (!strcmp(a, "--busy"))
            nbusy = atol(val);
        else if (!strcmp(a, "--seconds"))
            duration_s = atof(val);
        else if (!strcmp(a, "--count"))
            count_limit = strtoull(val, NULL, 0);
        else if (!strcmp(a, "--port"))
            port = (unsigned)strtoul(val, NULL, 0);
        else if (!strcmp(a, "--violations"))
            violations = atol(val);
        else if (!strcmp(a, "--ts-file"))
            ts_file = val;
        else if (!strcmp(a, "--pace-us"))
            pace_us = atol(val);
        else if (!strcmp(a, "--save-ioctls")) {
            save_ioctls = atol(val);
            npeek = save_ioctls == 1 ? 1 : 2;
        } else if (!strcmp(a, "--peek")) {
            if (parse_peek(val))
                usage();
        } else if (!strcmp(a, "--irqchip"))
            irqchip = atol(val);
        else if (!strcmp(a, "--hold-us"))
            hold_us = atol(val);
        else if (!strcmp(a, "--start-delay"))
            start_delay_s = atof(val);
        else
            usage();
    }
    if (nvcpus < 1 || nbusy < 0 || nbusy > nvcpus || (violations && (!ts_file || nbusy < 1)) ||
        save_ioctls < 1 || save_ioctls > 2 || hold_us < 0)
        usage();

    // One fd per vCPU plus a few: raise the soft limit to the hard one.
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    getrlimit(RLIMIT_NOFILE, &rl);
    if ((rlim_t)nvcpus + 16 > rl.rlim_cur) {
        fprintf(stderr, "kvmloop: %ld vCPUs need %ld fds but RLIMIT_NOFILE is %llu (ulimit -n)\n",
                nvcpus, nvcpus + 16, (unsigned long long)rl.rlim_cur);
        return 1;
    }

    kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm_fd < 0)
        die("open /dev/kvm");
    vm_fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
    if (vm_fd < 0)
        die("KVM_CREATE_VM");
    int max_vcpus = ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_MAX_VCPUS);
    if (max_vcpus <= 0)
        max_vcpus = ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_NR_VCPUS);
    if (max_vcpus <= 0)
        max_vcpus = 4;
    if (nvcpus > max_vcpus) {
        fprintf(stderr, "kvmloop: %ld vCPUs requested but KVM_CAP_MAX_VCPUS is %d\n", nvcpus,
                max_vcpus);
        return 1;
    }
    if (irqchip && ioctl(vm_fd, KVM_CREATE_IRQCHIP, 0) < 0)
        die("KVM_CREATE_IRQCHIP");
    run_size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size <= 0)
        die("KVM_GET_VCPU_MMAP_SIZE");

    uint8_t *mem = mmap(NULL, GUEST_MEM, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED)
        die("mmap guest memory");
    const uint8_t code[] = {
        0xba, (uint8_t)(port & 0xff), (uint8_t)(port >> 8),  // mov dx, port
        0xb0, 0x42,                                          // mov al, 0x42
        0xee,                                                // 1: out dx, al
        0xeb, 0xfd,                                          // jmp 1b
    };
    memcpy(mem + CODE_GPA, code, sizeof(code));
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = GUEST_MEM,
        .userspace_addr = (uint64_t)(uintptr_t)mem,
    };
    if (ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");

    struct vcpu *vcpus = calloc((size_t)nvcpus, sizeof(*vcpus));
    if (!vcpus)
        die("calloc");
    uint64_t t0 = now_ns(CLOCK_MONOTONIC);
    for (long i = 0; i < nvcpus; i++)
        setup_vcpu(&vcpus[i], (int)i);
    double create_s = (now_ns(CLOCK_MONOTONIC) - t0) / 1e9;
    for (long i = 0; i < nbusy; i++)
        init_regs(&vcpus[i]);
    if (violations) {
        vcpus[0].ts = calloc((size_t)violations, sizeof(uint64_t));
        vcpus[0].windows = calloc((size_t)violations, sizeof(uint64_t));
        vcpus[0].entries = calloc((size_t)violations, sizeof(uint64_t));
        if (!vcpus[0].ts || !vcpus[0].windows || !vcpus[0].entries)
            die("calloc");
    }

    // A tracer learns each new vCPU from an event: give it time to take them all in before
    // the timed loop, so the scaling rows measure per-exit cost, not start-up work.
    if (start_delay_s > 0) {
        struct timespec d = {(time_t)start_delay_s,
                             (long)((start_delay_s - (double)(time_t)start_delay_s) * 1e9)};
        nanosleep(&d, NULL);
    }
    uint64_t w0 = now_ns(CLOCK_MONOTONIC);
    for (long i = 0; i < nbusy; i++)
        if ((errno = pthread_create(&vcpus[i].thread, NULL, busy, &vcpus[i])))
            die("pthread_create");
    int failed = 0;
    uint64_t exits = 0;
    double thread_s = 0;
    for (long i = 0; i < nbusy; i++) {
        pthread_join(vcpus[i].thread, NULL);
        exits += vcpus[i].exits;
        thread_s += vcpus[i].seconds;
        failed |= vcpus[i].error;
    }
    double wall_s = (now_ns(CLOCK_MONOTONIC) - w0) / 1e9;

    if (violations) {
        FILE *f = fopen(ts_file, "w");
        if (!f)
            die(ts_file);
        for (long i = 0; i < vcpus[0].violations_done; i++)
            fprintf(f, "%llu %llu %llu\n", (unsigned long long)vcpus[0].ts[i],
                    (unsigned long long)vcpus[0].windows[i],
                    (unsigned long long)vcpus[0].entries[i]);
        fclose(f);
    }
    printf("{\"exits\": %llu, \"seconds\": %.6f, \"ns_per_exit\": %.2f, \"exits_per_s\": %.0f, "
           "\"vcpus\": %ld, \"busy\": %ld, \"max_vcpus\": %d, \"create_seconds\": %.4f, "
           "\"violations\": %ld, \"pid\": %d}\n",
           (unsigned long long)exits, wall_s, exits ? thread_s * 1e9 / (double)exits : 0.0,
           wall_s > 0 ? (double)exits / wall_s : 0.0, nvcpus, nbusy, max_vcpus, create_s,
           violations ? vcpus[0].violations_done : 0L, (int)getpid());
    return failed;
}
