// C++ stand-in VMM: ns::Class::method(int) prints a return address inside itself (through a
// helper that reads its own return address), then the process blocks on stdin.
#include <cstdint>
#include <cstdio>
#include <unistd.h>

__attribute__((noinline)) static void report_caller() {
    std::printf("frame %#lx\n", (unsigned long)(std::uintptr_t)__builtin_return_address(0));
}

namespace ns {
class Class {
  public:
    __attribute__((noinline)) int method(int x);
};

int Class::method(int x) {
    report_caller();
    return x + 1;
}
}  // namespace ns

int main() {
    ns::Class c;
    volatile int r = c.method(41);
    (void)r;
    std::printf("ready\n");
    std::fflush(stdout);
    char buf[1];
    while (read(0, buf, sizeof buf) > 0) {
    }
    return 0;
}
