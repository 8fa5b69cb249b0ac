//! A minimal KVM VMM in Rust for the watch gate's tests (std only, raw ioctls): one real-mode
//! vCPU whose guest does `out dx, al` to port 0x3f8 in a loop.
//!
//! Buggy (default): after each KVM_EXIT_IO, `save_vcpu_state` reads KVM_GET_REGS and
//! KVM_GET_SREGS while the OUT still awaits its completion (KVM finishes it only on the next
//! KVM_RUN), then the exit is completed with KVM_RUN + immediate_exit=1.
//! `--correct`: the exit is completed first (KVM_RUN with immediate_exit=1, -EINTR), then saved.
//! `--fork`: the VM is created and run in a forked child; the parent passes its status on.
//! `--exit-now`: `_exit(0)` right after the last save, with the exit still pending.
//!
//! usage: buggy_vmm [--correct] [--fork] [--exit-now] [ITERATIONS]
//! Any build: the report's stack is unwound with the binary's CFI (.eh_frame); e.g.
//!   rustc -O -g -o buggy_vmm_rs buggy_vmm.rs

use std::ffi::c_void;
use std::fs::{File, OpenOptions};
use std::io::{Error, Write};
use std::os::unix::io::AsRawFd;
use std::process::exit;

extern "C" {
    fn ioctl(fd: i32, req: u64, ...) -> i32;
    fn mmap(addr: *mut c_void, len: usize, prot: i32, flags: i32, fd: i32, off: i64)
        -> *mut c_void;
    fn fork() -> i32;
    fn waitpid(pid: i32, status: *mut i32, options: i32) -> i32;
    fn getpid() -> i32;
    fn _exit(status: i32) -> !;
}

// <linux/kvm.h> (x86-64): _IO(KVMIO, n), _IOR/_IOW with the struct sizes below.
const KVM_GET_API_VERSION: u64 = 0xae00;
const KVM_CREATE_VM: u64 = 0xae01;
const KVM_GET_VCPU_MMAP_SIZE: u64 = 0xae04;
const KVM_CREATE_VCPU: u64 = 0xae41;
const KVM_SET_USER_MEMORY_REGION: u64 = 0x4020_ae46;
const KVM_SET_TSS_ADDR: u64 = 0xae47;
const KVM_RUN: u64 = 0xae80;
const KVM_GET_REGS: u64 = 0x8090_ae81;
const KVM_SET_REGS: u64 = 0x4090_ae82;
const KVM_GET_SREGS: u64 = 0x8138_ae83;
const KVM_SET_SREGS: u64 = 0x4138_ae84;
const KVM_API_VERSION: i32 = 12;
const KVM_EXIT_IO: u32 = 2;
const KVM_EXIT_IO_OUT: u8 = 1;

const PROT_READ: i32 = 1;
const PROT_WRITE: i32 = 2;
const MAP_SHARED: i32 = 1;
const MAP_PRIVATE: i32 = 2;
const MAP_ANONYMOUS: i32 = 0x20;
const EINTR: i32 = 4;

const LOAD_ADDR: u64 = 0x1000;
const MEM_SIZE: usize = 0x10000;
const TSS_ADDR: u64 = 0x7fff_d000;
const SERIAL_PORT: u16 = 0x3f8;
// mov dx, 0x3f8; mov al, 0x41; out dx, al; jmp short -3 (back to the out)
const GUEST_CODE: [u8; 8] = [0xba, 0xf8, 0x03, 0xb0, 0x41, 0xee, 0xeb, 0xfd];

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct KvmRegs {
    gpr: [u64; 16], // rax rbx rcx rdx rsi rdi rsp rbp r8..r15
    rip: u64,
    rflags: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct KvmSegment {
    base: u64,
    limit: u32,
    selector: u16,
    type_: u8,
    present: u8,
    dpl: u8,
    db: u8,
    s: u8,
    l: u8,
    g: u8,
    avl: u8,
    unusable: u8,
    padding: u8,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct KvmDtable {
    base: u64,
    limit: u16,
    padding: [u16; 3],
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct KvmSregs {
    cs: KvmSegment,
    ds: KvmSegment,
    es: KvmSegment,
    fs: KvmSegment,
    gs: KvmSegment,
    ss: KvmSegment,
    tr: KvmSegment,
    ldt: KvmSegment,
    gdt: KvmDtable,
    idt: KvmDtable,
    cr0: u64,
    cr2: u64,
    cr3: u64,
    cr4: u64,
    cr8: u64,
    efer: u64,
    apic_base: u64,
    interrupt_bitmap: [u64; 4],
}

#[repr(C)]
struct MemoryRegion {
    slot: u32,
    flags: u32,
    guest_phys_addr: u64,
    memory_size: u64,
    userspace_addr: u64,
}

// The head of struct kvm_run and the `io` member of its exit union (offset 32).
#[repr(C)]
struct KvmRun {
    request_interrupt_window: u8,
    immediate_exit: u8,
    padding1: [u8; 6],
    exit_reason: u32,
    ready_for_interrupt_injection: u8,
    if_flag: u8,
    flags: u16,
    cr8: u64,
    apic_base: u64,
    io_direction: u8,
    io_size: u8,
    io_port: u16,
    io_count: u32,
    io_data_offset: u64,
}

fn die(what: &str) -> ! {
    eprintln!("buggy_vmm: {}: {}", what, Error::last_os_error());
    exit(1)
}

fn check(ret: i32, what: &str) -> i32 {
    if ret < 0 {
        die(what)
    }
    ret
}

struct Vm {
    _kvm: File,
    vcpu: i32,
    run: *mut KvmRun,
}

fn setup() -> Vm {
    let kvm = OpenOptions::new().read(true).write(true).open("/dev/kvm")
        .unwrap_or_else(|e| {
            eprintln!("buggy_vmm: open /dev/kvm: {}", e);
            exit(1)
        });
    let sys = kvm.as_raw_fd();
    unsafe {
        if ioctl(sys, KVM_GET_API_VERSION, 0u64) != KVM_API_VERSION {
            die("KVM_GET_API_VERSION");
        }
        let vm = check(ioctl(sys, KVM_CREATE_VM, 0u64), "KVM_CREATE_VM");
        check(ioctl(vm, KVM_SET_TSS_ADDR, TSS_ADDR), "KVM_SET_TSS_ADDR");
        let mem = mmap(std::ptr::null_mut(), MEM_SIZE, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if mem as isize == -1 {
            die("mmap guest memory");
        }
        std::ptr::copy_nonoverlapping(GUEST_CODE.as_ptr(),
                                      (mem as *mut u8).add(LOAD_ADDR as usize), GUEST_CODE.len());
        let region = MemoryRegion { slot: 0, flags: 0, guest_phys_addr: 0,
                                    memory_size: MEM_SIZE as u64, userspace_addr: mem as u64 };
        check(ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region as *const MemoryRegion),
              "KVM_SET_USER_MEMORY_REGION");
        let vcpu = check(ioctl(vm, KVM_CREATE_VCPU, 0u64), "KVM_CREATE_VCPU");
        let size = check(ioctl(sys, KVM_GET_VCPU_MMAP_SIZE, 0u64), "KVM_GET_VCPU_MMAP_SIZE");
        let run = mmap(std::ptr::null_mut(), size as usize, PROT_READ | PROT_WRITE, MAP_SHARED,
                       vcpu, 0);
        if run as isize == -1 {
            die("mmap kvm_run");
        }
        let mut sregs = KvmSregs::default();
        check(ioctl(vcpu, KVM_GET_SREGS, &mut sregs as *mut KvmSregs), "KVM_GET_SREGS (setup)");
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        check(ioctl(vcpu, KVM_SET_SREGS, &sregs as *const KvmSregs), "KVM_SET_SREGS");
        let mut regs = KvmRegs::default();
        regs.rip = LOAD_ADDR;
        regs.rflags = 0x2;
        check(ioctl(vcpu, KVM_SET_REGS, &regs as *const KvmRegs), "KVM_SET_REGS");
        Vm { _kvm: kvm, vcpu, run: run as *mut KvmRun }
    }
}

/// KVM_RUN until an OUT to the serial port; anything else is a failure.
fn run_to_io(vm: &Vm) {
    unsafe {
        std::ptr::write_volatile(&mut (*vm.run).immediate_exit, 0);
        check(ioctl(vm.vcpu, KVM_RUN, 0u64), "KVM_RUN");
        let run = &*vm.run;
        if run.exit_reason != KVM_EXIT_IO || run.io_port != SERIAL_PORT
            || run.io_direction != KVM_EXIT_IO_OUT {
            eprintln!("buggy_vmm: unexpected exit {}", run.exit_reason);
            exit(1);
        }
    }
}

/// Re-enter KVM_RUN with immediate_exit=1: KVM finishes the pending OUT, then returns -EINTR.
fn complete_exit(vm: &Vm) {
    unsafe {
        std::ptr::write_volatile(&mut (*vm.run).immediate_exit, 1);
        let ret = ioctl(vm.vcpu, KVM_RUN, 0u64);
        if ret == 0 || Error::last_os_error().raw_os_error() != Some(EINTR) {
            die("KVM_RUN (immediate_exit) did not return EINTR");
        }
        std::ptr::write_volatile(&mut (*vm.run).immediate_exit, 0);
    }
}

/// The state a snapshot would carry. Never inlined: a frame of its own in the stack.
#[inline(never)]
fn save_vcpu_state(vm: &Vm, regs: &mut KvmRegs, sregs: &mut KvmSregs) {
    unsafe {
        check(ioctl(vm.vcpu, KVM_GET_REGS, regs as *mut KvmRegs), "KVM_GET_REGS");
        check(ioctl(vm.vcpu, KVM_GET_SREGS, sregs as *mut KvmSregs), "KVM_GET_SREGS");
    }
}

fn vmm(iterations: u32, correct: bool, exit_now: bool) -> i32 {
    let vm = setup();
    let mut regs = KvmRegs::default();
    let mut sregs = KvmSregs::default();
    for i in 0..iterations {
        run_to_io(&vm);
        if correct {
            complete_exit(&vm);
            save_vcpu_state(&vm, &mut regs, &mut sregs);
        } else {
            save_vcpu_state(&vm, &mut regs, &mut sregs); // the bug: the OUT is still pending
            if exit_now && i + 1 == iterations {
                unsafe { _exit(0) } // gone at once, the exit never completed
            }
            complete_exit(&vm);
        }
    }
    println!("buggy_vmm: pid {}, {} iterations, {}, rip {:#x}", unsafe { getpid() }, iterations,
             if correct { "correct" } else { "buggy" }, regs.rip);
    let _ = std::io::stdout().flush();
    0
}

fn main() {
    let (mut iterations, mut correct, mut fork_child, mut exit_now) = (3u32, false, false, false);
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--correct" => correct = true,
            "--fork" => fork_child = true,
            "--exit-now" => exit_now = true,
            n => match n.parse::<u32>() {
                Ok(v) if v > 0 => iterations = v,
                _ => {
                    eprintln!("usage: buggy_vmm [--correct] [--fork] [--exit-now] [ITERATIONS]");
                    exit(2);
                }
            },
        }
    }
    if !fork_child {
        exit(vmm(iterations, correct, exit_now));
    }
    let _ = std::io::stdout().flush();
    let child = unsafe { fork() };
    if child < 0 {
        die("fork");
    }
    if child == 0 {
        let status = vmm(iterations, correct, exit_now);
        unsafe { _exit(status) }
    }
    let mut status = 0i32;
    if unsafe { waitpid(child, &mut status, 0) } < 0 {
        die("waitpid");
    }
    println!("buggy_vmm: parent {}, child {}", unsafe { getpid() }, child);
    // WIFEXITED / WEXITSTATUS / WTERMSIG
    exit(if status & 0x7f == 0 { (status >> 8) & 0xff } else { 128 + (status & 0x7f) });
}
