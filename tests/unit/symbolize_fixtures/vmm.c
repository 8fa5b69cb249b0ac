/* A stand-in VMM for tests/unit/test_symbolize.py: prints a frame-pointer walk of its own stack
 * (what bpf_get_stack with BPF_F_USER_STACK would capture at the ioctl), then blocks on stdin so
 * the test can symbolize it alive, then exits when stdin closes. Build with -O0
 * -fno-omit-frame-pointer: the walk reads the saved frame pointer and return address pairs. */
#include <stdint.h>
#include <stdio.h>
#include <unistd.h>

void vmm_save_state(void);

__attribute__((noinline)) void vmm_ioctl_wrapper(void) {
    void **fp = __builtin_frame_address(0);
    char buf[1];
    /* Innermost frame: an address inside this function, as the kernel sees the user IP. */
    printf("frame %#lx\n", (unsigned long)(uintptr_t)vmm_ioctl_wrapper + 4);
    /* Three return addresses: into vmm_save_state, main, and libc's start code. Past main the
     * frame pointer belongs to libc (built without frame pointers), so the walk stops there. */
    for (int depth = 0; depth < 3 && fp != NULL; depth++) {
        printf("frame %#lx\n", (unsigned long)(uintptr_t)fp[1]);
        fp = (void **)fp[0];
    }
    printf("read %#lx\n", (unsigned long)(uintptr_t)read);
    /* A function's entry: mapped and executable, but no call instruction before it. */
    printf("entry %#lx\n", (unsigned long)(uintptr_t)vmm_save_state);
    printf("ready\n");
    fflush(stdout);
    while (read(0, buf, sizeof buf) > 0) {
    }
}

__attribute__((noinline)) void vmm_save_state(void) {
    vmm_ioctl_wrapper();
}

int main(void) {
    vmm_save_state();
    return 0;
}
