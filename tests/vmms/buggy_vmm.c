/* A minimal KVM VMM for the watch gate's tests: raw ioctls on /dev/kvm, one real-mode vCPU whose
 * guest does `out dx, al` to port 0x3f8 in a loop.
 *
 * Buggy (default): after each KVM_EXIT_IO, save_vcpu_state() reads KVM_GET_REGS and
 * KVM_GET_SREGS while the OUT still awaits its completion (KVM finishes it only on the next
 * KVM_RUN), then the exit is completed with KVM_RUN + immediate_exit=1.
 * --correct: the exit is completed first (KVM_RUN with immediate_exit=1, -EINTR), then saved.
 * --fork: the VM is created and run in a forked child; the parent waits and passes its status.
 * --exit-now: _exit(0) right after the last save, with the exit still pending.
 * --short-stack: the save's KVM_GET_SREGS is issued on a stack that ends SHORT_STACK_BYTES
 *   below a page never touched (see ioctl_on_short_stack).
 *
 * usage: buggy_vmm [--correct] [--fork] [--exit-now] [--two-sites] [--short-stack] [ITERATIONS]
 * Any build: the report's stack is unwound with the binary's CFI (.eh_frame), e.g.
 *   gcc -g -O2 -o buggy_vmm buggy_vmm.c
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define LOAD_ADDR 0x1000
#define MEM_SIZE 0x10000
#define TSS_ADDR 0x7fffd000
#define SERIAL_PORT 0x3f8

static void die(const char *what)
{
    fprintf(stderr, "buggy_vmm: %s: %s\n", what, strerror(errno));
    exit(1);
}

struct vm {
    int kvm, vm, vcpu;
    struct kvm_run *run;
};

/* mov dx, 0x3f8; mov al, 0x41; out dx, al; jmp short -3 (back to the out) */
static const uint8_t guest_code[] = {0xba, 0xf8, 0x03, 0xb0, 0x41, 0xee, 0xeb, 0xfd};

static void setup(struct vm *v)
{
    v->kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (v->kvm < 0)
        die("open /dev/kvm");
    if (ioctl(v->kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
        die("KVM_GET_API_VERSION");
    v->vm = ioctl(v->kvm, KVM_CREATE_VM, 0);
    if (v->vm < 0)
        die("KVM_CREATE_VM");
    if (ioctl(v->vm, KVM_SET_TSS_ADDR, TSS_ADDR) < 0)
        die("KVM_SET_TSS_ADDR");
    uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                        -1, 0);
    if (mem == MAP_FAILED)
        die("mmap guest memory");
    memcpy(mem + LOAD_ADDR, guest_code, sizeof(guest_code));
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE,
        .userspace_addr = (uint64_t)(uintptr_t)mem,
    };
    if (ioctl(v->vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");
    v->vcpu = ioctl(v->vm, KVM_CREATE_VCPU, 0);
    if (v->vcpu < 0)
        die("KVM_CREATE_VCPU");
    int size = ioctl(v->kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (size < (int)sizeof(struct kvm_run))
        die("KVM_GET_VCPU_MMAP_SIZE");
    v->run = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, v->vcpu, 0);
    if (v->run == MAP_FAILED)
        die("mmap kvm_run");
    struct kvm_sregs sregs;
    if (ioctl(v->vcpu, KVM_GET_SREGS, &sregs) < 0)
        die("KVM_GET_SREGS (setup)");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if (ioctl(v->vcpu, KVM_SET_SREGS, &sregs) < 0)
        die("KVM_SET_SREGS");
    struct kvm_regs regs;
    memset(&regs, 0, sizeof(regs));
    regs.rip = LOAD_ADDR;
    regs.rflags = 0x2;
    if (ioctl(v->vcpu, KVM_SET_REGS, &regs) < 0)
        die("KVM_SET_REGS");
}

/* KVM_RUN until an OUT to the serial port; anything else is a failure. */
static void run_to_io(struct vm *v)
{
    v->run->immediate_exit = 0;
    if (ioctl(v->vcpu, KVM_RUN, 0) < 0)
        die("KVM_RUN");
    if (v->run->exit_reason != KVM_EXIT_IO || v->run->io.port != SERIAL_PORT ||
        v->run->io.direction != KVM_EXIT_IO_OUT) {
        fprintf(stderr, "buggy_vmm: unexpected exit %u\n", v->run->exit_reason);
        exit(1);
    }
}

/* Re-enter KVM_RUN with immediate_exit=1: KVM finishes the pending OUT, then returns -EINTR. */
static void complete_exit(struct vm *v)
{
    v->run->immediate_exit = 1;
    if (ioctl(v->vcpu, KVM_RUN, 0) == 0 || errno != EINTR)
        die("KVM_RUN (immediate_exit) did not return EINTR");
    v->run->immediate_exit = 0;
}

/* The state a snapshot would carry. Not inlined, so it is a frame of its own in the stack;
 * -DSAVE_VCPU_STATE_ATTR='static inline __attribute__((always_inline))' makes the build where
 * it is inlined into its caller (the report names it as an inlined frame). */
#ifndef SAVE_VCPU_STATE_ATTR
#define SAVE_VCPU_STATE_ATTR __attribute__((noinline))
#endif
SAVE_VCPU_STATE_ATTR void save_vcpu_state(struct vm *v, struct kvm_regs *regs,
                                               struct kvm_sregs *sregs)
{
    if (ioctl(v->vcpu, KVM_GET_REGS, regs) < 0)
        die("KVM_GET_REGS");
    if (ioctl(v->vcpu, KVM_GET_SREGS, sregs) < 0)
        die("KVM_GET_SREGS");
}

/* --two-sites: two distinct bugs, one KVM_GET_SREGS per exit alternately from two call sites
 * (debug_dump_sregs on even iterations, checkpoint_sregs on odd ones), each alone in its window:
 * two findings of the same ioctl told apart by their call site, and no snapshot.
 *
 * A debug dump that reads the segment registers while the OUT is still pending. */
__attribute__((noinline)) void debug_dump_sregs(struct vm *v, struct kvm_sregs *sregs)
{
    if (ioctl(v->vcpu, KVM_GET_SREGS, sregs) < 0)
        die("KVM_GET_SREGS (debug dump)");
}

/* A checkpoint of the segment registers, also taken while the OUT is still pending. */
__attribute__((noinline)) void checkpoint_sregs(struct vm *v, struct kvm_sregs *sregs)
{
    if (ioctl(v->vcpu, KVM_GET_SREGS, sregs) < 0)
        die("KVM_GET_SREGS (checkpoint)");
}

static int two_sites, short_stack;

/* --short-stack: an ioctl issued (raw syscall, x86-64) on a stack of our own that ends
 * SHORT_STACK_BYTES below a page never touched, so not present: as a main thread's stack
 * ends below the gap of untouched pages exec leaves above the auxiliary vector. The probe's
 * copy of the stack top must stop exactly at that page, not at the last whole 512-byte piece
 * (which here is none of it). */
#define SHORT_STACK_BYTES 96
__attribute__((noinline)) long ioctl_on_short_stack(int fd, unsigned long request, void *arg)
{
    static uint8_t *area;
    long page = sysconf(_SC_PAGESIZE);
    if (!area) {
        area = mmap(NULL, 2 * (size_t)page, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (area == MAP_FAILED)
            die("mmap short stack");
        memset(area, 0xa5, (size_t)page);  /* the first page only: the second stays absent */
    }
    void *sp = area + page - SHORT_STACK_BYTES;
    long ret;
    __asm__ volatile("mov %%rsp, %%r12\n\t"
                     "mov %[sp], %%rsp\n\t"
                     "syscall\n\t"
                     "mov %%r12, %%rsp"
                     : "=a"(ret)
                     : "0"((long)SYS_ioctl), "D"((long)fd), "S"(request), "d"(arg), [sp] "r"(sp)
                     : "rcx", "r11", "r12", "memory");
    if (ret < 0) {
        errno = (int)-ret;
        return -1;
    }
    return ret;
}

static int vmm(int iterations, int correct, int exit_now)
{
    struct vm v;
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    setup(&v);
    memset(&regs, 0, sizeof(regs));
    for (int i = 0; i < iterations; i++) {
        run_to_io(&v);
        if (two_sites) {
            if (i % 2 == 0)
                debug_dump_sregs(&v, &sregs);  /* bug 1 */
            else
                checkpoint_sregs(&v, &sregs);  /* bug 2 */
            complete_exit(&v);
        } else if (correct) {
            complete_exit(&v);
            save_vcpu_state(&v, &regs, &sregs);
        } else {
            if (short_stack) {  /* the same bug, its second read on a short stack */
                if (ioctl(v.vcpu, KVM_GET_REGS, &regs) < 0)
                    die("KVM_GET_REGS");
                if (ioctl_on_short_stack(v.vcpu, KVM_GET_SREGS, &sregs) < 0)
                    die("KVM_GET_SREGS (short stack)");
            } else {
                save_vcpu_state(&v, &regs, &sregs);  /* the bug: the OUT is still pending */
            }
            if (exit_now && i == iterations - 1)
                _exit(0);  /* gone at once, the exit never completed */
            complete_exit(&v);
        }
    }
    printf("buggy_vmm: pid %d, %d iterations, %s, rip %#llx\n", (int)getpid(), iterations,
           two_sites ? "two-sites" : correct ? "correct" : "buggy", (unsigned long long)regs.rip);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv)
{
    int iterations = 3, correct = 0, fork_child = 0, exit_now = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--correct"))
            correct = 1;
        else if (!strcmp(argv[i], "--fork"))
            fork_child = 1;
        else if (!strcmp(argv[i], "--exit-now"))
            exit_now = 1;
        else if (!strcmp(argv[i], "--two-sites"))
            two_sites = 1;
        else if (!strcmp(argv[i], "--short-stack"))
            short_stack = 1;
        else if (argv[i][0] != '-' && atoi(argv[i]) > 0)
            iterations = atoi(argv[i]);
        else {
            fprintf(stderr, "usage: %s [--correct] [--fork] [--exit-now] [--two-sites] "
                    "[--short-stack] [ITERATIONS]\n", argv[0]);
            return 2;
        }
    }
    if (!fork_child)
        return vmm(iterations, correct, exit_now);
    fflush(stdout);
    pid_t child = fork();
    if (child < 0)
        die("fork");
    if (child == 0)
        _exit(vmm(iterations, correct, exit_now));
    int status;
    if (waitpid(child, &status, 0) < 0)
        die("waitpid");
    printf("buggy_vmm: parent %d, child %d\n", (int)getpid(), (int)child);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
