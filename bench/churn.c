// SPDX-License-Identifier: GPL-2.0
// churn: VM churn and hostile VMM names for the fault campaign (bench/faults.py).
// libc + <linux/kvm.h> only.
//
// Churn (argv): --vms N VMs of 1..4 vCPUs (1 + i % 4) over --workers W processes, each VM one of
// these cases in turn (i % 7), every vCPU running the guest loop `out dx, al; jmp` on port 0x500
// so each KVM_RUN returns with a KVM_EXIT_IO whose completion is pending:
//   0 clean         run each vCPU, complete the exit with immediate_exit=1, read its state, close
//   1 pending       run each vCPU once and close every fd with the completion still pending
//   2 dup           dup / dup2 / dup3 / fcntl(F_DUPFD_CLOEXEC) of a vCPU fd, close the original,
//                   run through a dup, close the dups one by one or with close_range
//   3 reuse         close a pending vCPU fd, open /dev/null on the same number and issue
//                   KVM_GET_REGS on it (not a vCPU: ENOTTY), close it, create a new vCPU that
//                   gets the number again, run it, close all
//   4 sigkill       a child runs every vCPU flat out from its own thread; the parent SIGKILLs it
//                   while they are inside KVM_RUN
//   5 fork-holder   a child makes the VM (exit pending), forks a grandchild that inherits the
//                   vCPU fds and outlives it (its state ioctls fail: another mm), then exits
//   6 exit-pending  a child makes the VM, runs once and _exit()s with the fds open
// Workers are subreapers: orphaned grandchildren are reaped by them. No state ioctl is ever
// issued while a completion is pending (the churn raises no alert). Prints one JSON object.
//
// Hostile names (environment, so argv[0..] and comm are entirely the caller's): with
// CHURN_HOSTILE_COMM_HEX set, set comm to those bytes (prctl PR_SET_NAME, 15 at most), make one VM
// of one vCPU and issue CHURN_HOSTILE_VIOLATIONS (default 3) snapshots mid-completion
// (KVM_GET_REGS + KVM_GET_SREGS after an IO exit), re-entering after each, then sleep
// CHURN_HOSTILE_LINGER_MS (default 300) with the VM open (so the daemon reads its /proc), exit.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define GUEST_MEM (64 * 1024)
#define CODE_GPA 0x1000
#define PORT 0x500
#define MAX_VCPUS 4
#define CASES 7

static int kvm_fd;
static long run_size;
static uint8_t *guest_mem;

struct vm {
    int vm_fd;
    int n;
    int fd[MAX_VCPUS];
    struct kvm_run *run[MAX_VCPUS];
};

static const char *case_names[CASES] = {"clean", "pending", "dup", "reuse", "sigkill",
                                        "fork_holder", "exit_pending"};

static void die(const char *what)
{
    fprintf(stderr, "churn[%d]: %s: %s\n", getpid(), what, strerror(errno));
    _exit(1);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void init_regs(int fd)
{
    struct kvm_sregs sregs;
    if (ioctl(fd, KVM_GET_SREGS, &sregs) < 0)
        die("KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if (ioctl(fd, KVM_SET_SREGS, &sregs) < 0)
        die("KVM_SET_SREGS");
    struct kvm_regs regs;
    memset(&regs, 0, sizeof(regs));
    regs.rip = CODE_GPA;
    regs.rflags = 0x2;
    if (ioctl(fd, KVM_SET_REGS, &regs) < 0)
        die("KVM_SET_REGS");
}

static void add_vcpu(struct vm *v, int index)
{
    int fd = ioctl(v->vm_fd, KVM_CREATE_VCPU, (unsigned long)index);
    if (fd < 0)
        die("KVM_CREATE_VCPU");
    struct kvm_run *r = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (r == MAP_FAILED)
        die("mmap kvm_run");
    init_regs(fd);
    v->fd[index] = fd;
    v->run[index] = r;
}

static void make_vm(struct vm *v, int nvcpus)
{
    memset(v, 0, sizeof(*v));
    v->vm_fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
    if (v->vm_fd < 0)
        die("KVM_CREATE_VM");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = GUEST_MEM,
        .userspace_addr = (uint64_t)(uintptr_t)guest_mem,
    };
    if (ioctl(v->vm_fd, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");
    v->n = nvcpus;
    for (int i = 0; i < nvcpus; i++)
        add_vcpu(v, i);
}

// One KVM_RUN: returns with the IO exit pending.
static void run_once(int fd, struct kvm_run *r)
{
    for (;;) {
        if (ioctl(fd, KVM_RUN, 0) == 0)
            break;
        if (errno != EINTR)
            die("KVM_RUN");
    }
    if (r->exit_reason != KVM_EXIT_IO || r->io.port != PORT) {
        fprintf(stderr, "churn: unexpected exit %u\n", r->exit_reason);
        _exit(1);
    }
}

// Complete the pending exit without running the guest again: immediate_exit, -EINTR.
static void complete(int fd, struct kvm_run *r)
{
    r->immediate_exit = 1;
    if (ioctl(fd, KVM_RUN, 0) == 0 || errno != EINTR)
        die("KVM_RUN immediate_exit");
    r->immediate_exit = 0;
}

static void unmap_all(struct vm *v)
{
    for (int i = 0; i < v->n; i++)
        if (v->run[i])
            munmap(v->run[i], run_size);
}

static void close_all(struct vm *v)
{
    unmap_all(v);
    for (int i = 0; i < v->n; i++)
        if (v->fd[i] >= 0)
            close(v->fd[i]);
    close(v->vm_fd);
}

static void case_clean(int nv)
{
    struct vm v;
    make_vm(&v, nv);
    for (int i = 0; i < nv; i++) {
        run_once(v.fd[i], v.run[i]);
        run_once(v.fd[i], v.run[i]);
        complete(v.fd[i], v.run[i]);
        struct kvm_regs regs;
        if (ioctl(v.fd[i], KVM_GET_REGS, &regs) < 0)
            die("KVM_GET_REGS");
    }
    close_all(&v);
}

static void case_pending(int nv)
{
    struct vm v;
    make_vm(&v, nv);
    for (int i = 0; i < nv; i++)
        run_once(v.fd[i], v.run[i]);
    close_all(&v);
}

static void case_dup(int nv, int variant)
{
    struct vm v;
    make_vm(&v, nv);
    int d1 = dup(v.fd[0]);
    int d2 = dup2(v.fd[0], 700);
    int d3 = dup3(v.fd[0], 701, O_CLOEXEC);
    int d4 = fcntl(v.fd[0], F_DUPFD_CLOEXEC, 702);
    if (d1 < 0 || d2 < 0 || d3 < 0 || d4 < 0)
        die("dup");
    close(v.fd[0]);
    v.fd[0] = -1;
    run_once(d2, v.run[0]);  // pending, through a dup
    complete(d3, v.run[0]);  // completed through another
    run_once(d4, v.run[0]);  // pending again
    for (int i = 1; i < nv; i++)
        run_once(v.fd[i], v.run[i]);
    close(d1);
    if (variant & 1) {
        // 700..702, then everything from the first vCPU fd up: close_range
        syscall(SYS_close_range, 700u, 702u, 0u);
        unmap_all(&v);
        int lowest = v.vm_fd;
        for (int i = 1; i < nv; i++)
            if (v.fd[i] < lowest)
                lowest = v.fd[i];
        syscall(SYS_close_range, (unsigned)lowest, 699u, 0u);
    } else {
        close(d2);
        close(d3);
        close(d4);
        close_all(&v);
    }
}

static void case_reuse(int nv)
{
    struct vm v;
    make_vm(&v, nv);
    for (int i = 0; i < nv; i++)
        run_once(v.fd[i], v.run[i]);
    int k = nv - 1;
    int old = v.fd[k];
    munmap(v.run[k], run_size);
    v.run[k] = NULL;
    close(old);
    int nul = open("/dev/null", O_RDWR);
    if (nul != old) {
        fprintf(stderr, "churn: fd %d not reused (got %d)\n", old, nul);
        _exit(1);
    }
    struct kvm_regs regs;
    if (ioctl(nul, KVM_GET_REGS, &regs) == 0)  // not a vCPU: ENOTTY
        die("KVM_GET_REGS on /dev/null succeeded");
    close(nul);
    int fd = ioctl(v.vm_fd, KVM_CREATE_VCPU, (unsigned long)MAX_VCPUS);  // a new vCPU id
    if (fd < 0)
        die("KVM_CREATE_VCPU (reuse)");
    struct kvm_run *r = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (r == MAP_FAILED)
        die("mmap");
    init_regs(fd);
    run_once(fd, r);
    v.fd[k] = fd;
    v.run[k] = r;
    close_all(&v);
}

struct spin {
    int fd;
    struct kvm_run *run;
    int pipe_w;
};

static void *spin(void *arg)
{
    struct spin *s = arg;
    char c = 1;
    int told = 0;
    for (;;) {
        if (ioctl(s->fd, KVM_RUN, 0) < 0 && errno != EINTR)
            die("KVM_RUN (spin)");
        if (!told) {
            if (write(s->pipe_w, &c, 1) != 1)
                die("write");
            told = 1;
        }
    }
    return NULL;
}

static void reap(pid_t pid)
{
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            die("waitpid");
}

static void case_sigkill(int nv)
{
    int p[2];
    if (pipe(p) < 0)
        die("pipe");
    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        close(p[0]);
        struct vm v;
        make_vm(&v, nv);
        static struct spin s[MAX_VCPUS];
        pthread_t t;
        for (int i = 0; i < nv; i++) {
            s[i] = (struct spin){v.fd[i], v.run[i], p[1]};
            if ((errno = pthread_create(&t, NULL, spin, &s[i])))
                die("pthread_create");
        }
        for (;;)
            pause();
    }
    close(p[1]);
    char buf[MAX_VCPUS];
    size_t got = 0;
    while (got < (size_t)nv) {  // every vCPU thread has been through KVM_RUN once
        ssize_t n = read(p[0], buf, sizeof(buf));
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    struct timespec d = {0, 300 * 1000};
    nanosleep(&d, NULL);  // flat out inside KVM_RUN (each exit re-enters at once)
    kill(pid, SIGKILL);
    close(p[0]);
    reap(pid);
}

static void case_fork_holder(int nv)
{
    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        struct vm v;
        make_vm(&v, nv);
        for (int i = 0; i < nv; i++)
            run_once(v.fd[i], v.run[i]);
        pid_t parent = getpid();
        pid_t g = fork();
        if (g < 0)
            die("fork");
        if (g == 0) {
            // The grandchild: holds every vCPU fd of its parent's VM and outlives it.
            struct timespec tick = {0, 100 * 1000};
            while (getppid() == parent)
                nanosleep(&tick, NULL);
            struct timespec d = {0, 2 * 1000 * 1000};
            nanosleep(&d, NULL);
            struct kvm_regs regs;
            ioctl(v.fd[0], KVM_GET_REGS, &regs);  // another mm: EIO
            for (int i = 0; i < nv; i += 2)
                close(v.fd[i]);
            _exit(0);
        }
        _exit(0);  // exits first, with its fds open and the exits pending
    }
    reap(pid);
}

static void case_exit_pending(int nv)
{
    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        struct vm v;
        make_vm(&v, nv);
        for (int i = 0; i < nv; i++)
            run_once(v.fd[i], v.run[i]);
        _exit(0);
    }
    reap(pid);
}

static void setup(void)
{
    kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm_fd < 0)
        die("open /dev/kvm");
    run_size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size <= 0)
        die("KVM_GET_VCPU_MMAP_SIZE");
    guest_mem = mmap(NULL, GUEST_MEM, PROT_READ | PROT_WRITE,
                     MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (guest_mem == MAP_FAILED)
        die("mmap guest memory");
    const uint8_t code[] = {
        0xba, (uint8_t)(PORT & 0xff), (uint8_t)(PORT >> 8),  // mov dx, port
        0xb0, 0x42,                                          // mov al, 0x42
        0xee,                                                // 1: out dx, al
        0xeb, 0xfd,                                          // jmp 1b
    };
    memcpy(guest_mem + CODE_GPA, code, sizeof(code));
}

static int hostile(void)
{
    const char *hex = getenv("CHURN_HOSTILE_COMM_HEX");
    const char *nv = getenv("CHURN_HOSTILE_VIOLATIONS");
    const char *linger = getenv("CHURN_HOSTILE_LINGER_MS");
    long violations = nv ? atol(nv) : 3;
    long linger_ms = linger ? atol(linger) : 300;
    char comm[16] = {0};
    size_t n = strlen(hex) / 2;
    if (n > 15)
        n = 15;
    for (size_t i = 0; i < n; i++) {
        unsigned b;
        sscanf(hex + 2 * i, "%2x", &b);
        comm[i] = (char)b ? (char)b : '?';
    }
    prctl(PR_SET_NAME, comm, 0, 0, 0);
    setup();
    struct vm v;
    make_vm(&v, 1);
    long done = 0;
    for (long i = 0; i < violations; i++) {
        run_once(v.fd[0], v.run[0]);
        struct kvm_regs regs;
        struct kvm_sregs sregs;
        if (ioctl(v.fd[0], KVM_GET_REGS, &regs) < 0 || ioctl(v.fd[0], KVM_GET_SREGS, &sregs) < 0)
            die("state ioctl");
        done++;
    }
    run_once(v.fd[0], v.run[0]);
    complete(v.fd[0], v.run[0]);
    struct timespec d = {linger_ms / 1000, (linger_ms % 1000) * 1000000};
    nanosleep(&d, NULL);
    close_all(&v);
    printf("{\"pid\": %d, \"violations\": %ld}\n", getpid(), done);
    return 0;
}

static void worker(long first, long count, long *counts)
{
    for (long i = first; i < first + count; i++) {
        int nv = 1 + (int)(i % MAX_VCPUS);
        int c = (int)(i % CASES);
        switch (c) {
        case 0: case_clean(nv); break;
        case 1: case_pending(nv); break;
        case 2: case_dup(nv, (int)(i / CASES)); break;
        case 3: case_reuse(nv); break;
        case 4: case_sigkill(nv); break;
        case 5: case_fork_holder(nv); break;
        default: case_exit_pending(nv); break;
        }
        counts[c]++;
        counts[CASES] += nv;
        // Orphaned grandchildren (fork_holder) come back to this subreaper.
        while (waitpid(-1, NULL, WNOHANG) > 0)
            ;
    }
    while (wait(NULL) > 0)
        ;
}

static void usage(void)
{
    fprintf(stderr, "usage: churn --vms N [--workers W]\n"
                    "       CHURN_HOSTILE_COMM_HEX=... churn ANY ARGV (hostile-name mode)\n");
    exit(2);
}

int main(int argc, char **argv)
{
    if (getenv("CHURN_HOSTILE_COMM_HEX"))
        return hostile();
    long vms = 0, workers = 2;
    for (int i = 1; i < argc; i++) {
        if (i + 1 >= argc)
            usage();
        const char *a = argv[i], *val = argv[++i];
        if (!strcmp(a, "--vms"))
            vms = atol(val);
        else if (!strcmp(a, "--workers"))
            workers = atol(val);
        else
            usage();
    }
    if (vms < 1 || workers < 1)
        usage();
    setup();
    // A shared page per worker for its counts (cases, then vCPUs).
    long *counts = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (counts == MAP_FAILED)
        die("mmap counts");
    double t0 = now_s();
    long per = vms / workers, extra = vms % workers, first = 0;
    pid_t pids[64];
    if (workers > 64)
        usage();
    for (long w = 0; w < workers; w++) {
        long n = per + (w < extra ? 1 : 0);
        pid_t pid = fork();
        if (pid < 0)
            die("fork");
        if (pid == 0) {
            prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
            worker(first, n, counts + w * (CASES + 1));
            _exit(0);
        }
        pids[w] = pid;
        first += n;
    }
    int failed = 0;
    for (long w = 0; w < workers; w++) {
        int status;
        waitpid(pids[w], &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status))
            failed = 1;
    }
    double secs = now_s() - t0;
    long total[CASES + 1] = {0};
    for (long w = 0; w < workers; w++)
        for (int c = 0; c <= CASES; c++)
            total[c] += counts[w * (CASES + 1) + c];
    long done = 0;
    for (int c = 0; c < CASES; c++)
        done += total[c];
    printf("{\"vms\": %ld, \"vcpus\": %ld, \"seconds\": %.3f, \"workers\": %ld, \"cases\": {", done,
           total[CASES], secs, workers);
    for (int c = 0; c < CASES; c++)
        printf("%s\"%s\": %ld", c ? ", " : "", case_names[c], total[c]);
    printf("}, \"pid\": %d, \"failed\": %d}\n", getpid(), failed);
    return failed;
}
