// SPDX-License-Identifier: GPL-2.0
// kvm-completion-tracer probes (loaded by tracer/probes.py through bcc).
//
// Per vCPU, in the kernel:  IDLE --KVM_RUN--> RUNNING --kvm_userspace_exit--> PENDING | IDLE
// A save or restore ioctl on a vCPU fd while its vCPU is PENDING is judged at the ioctl's entry,
// so the verdict follows the real interleaving of threads however late Python reads the ring:
// a lone read of one kind is held until the window shows what it was (state_ioctl_mid), anything
// else is reported at once.
// One that entered while the vCPU was RUNNING waits on the vCPU mutex in KVM; it is judged when
// it returns: if a completion-needing exit happened meanwhile, it ran mid-completion.
//
// ABI relied on (no kernel-internal struct is ever read):
//  - syscalls:sys_{enter,exit}_{ioctl,dup,dup2,dup3,fcntl,mmap,close,close_range}: syscall args;
//    or, with RAW_SYSCALLS, raw_syscalls:sys_{enter,exit} and the saved user registers at the
//    x86-64 UAPI struct pt_regs offsets (<asm/ptrace.h>, checked by tests/unit/test_syscall_abi.py).
//  - raw tracepoint kvm_userspace_exit(__u32 reason, int errno): fired by kvm_vcpu_ioctl's
//    KVM_RUN case, in the vCPU thread, after the arch run returns (errno 0: a real exit to
//    userspace; -EINTR: immediate exit or signal, nothing pending).
//  - kvm:kvm_exit (exit_reason, isa, vcpu_id) and kvm:kvm_entry (vcpu_id): classic fields.
//  - sched:sched_process_exit (group_dead where the kernel has it), sched:sched_process_exec.
//  - struct kvm_run (UAPI): immediate_exit at 1, exit union at 32, read from the VMM's own
//    mapping with bpf_probe_read_user in the vCPU thread.
// Constants come from tracer/abi.py (checked against <linux/kvm.h>) as -D flags: KVM_RUN_NR,
// KVM_CREATE_VCPU_NR, KVM_ENABLE_CAP_NR, KVM_CAP_DISABLE_QUIRKS_NR, KVM_CAP_DISABLE_QUIRKS2_NR,
// QUIRK_OUT_7E_INC_RIP, KVMIO_TYPE, KVM_RUN_IMMEDIATE_EXIT_OFF, KVM_RUN_UNION_OFF, ACCESS_BYTES,
// MAX_EXIT_REASON, EINTR_ERRNO; HIST_SLOTS from tracer/counters.py; F_DUPFD_NR and
// F_DUPFD_CLOEXEC_NR from Python's fcntl module; NR_*, PT_REGS_R10_OFF, USER64_CS from
// tracer/syscall_abi.py (RAW_SYSCALLS only); map sizes MAX_VCPUS, MAX_VCPU_FDS, MAX_THREADS,
// MAX_PROCS, VCPU_SLOTS, VCPU_SLOT_BITS, VCPU_SLOT_MASK, PENDING_SAMPLE, MAX_GUEST_EXIT_KEYS, MAX_MID_KEYS, MAX_LOST_WINDOWS, RINGBUF_PAGES; KVM_EXIT_IO_NR and
// KVM_EXIT_HYPERV_NR (the exits whose access head the policy's sanctions look at); HAVE_GROUP_DEAD, TRACE_EXITS, RAW_SYSCALLS
// optional; STACKS (with MAX_STACKS, STACK_ERR_EXIST, USTACK_BYTES, USTACK_CHUNK,
// USER_PAGE_SIZE): the user stack
// of every reported ioctl (the kernel's frame-pointer walk, and with USER_STACK_CAPTURE, kernel
// >= 5.15 with BTF, the registers and stack bytes);
// WATCH (with MAX_WATCHED): only the processes in `watched` (`watch -- CMD`) are followed;
// without it (`run`), MAX_EXEC_PATHS. EXEC_PATH_BYTES always.

#include <uapi/linux/ptrace.h>

// Keeps clang from sinking the stores of a new window below the store that publishes it.
#define barrier() asm volatile("" ::: "memory")

enum event_type {
    EV_VIOLATION = 1,
    EV_VCPU_CREATED = 2,
    EV_VCPU_FD_DUP = 3,
    EV_VCPU_FD_CLOSED = 4,
    EV_PROCESS_EXIT = 5,
    EV_WINDOW_CLOSED = 6,
    EV_UNKNOWN_FD = 7,
    EV_QUIRKS_DISABLED = 8,
    EV_FD_RANGE_CLOSED = 9,
    EV_RUN_ENTER = 10,
    EV_USERSPACE_EXIT = 11,
    EV_STATE_IOCTL = 12,
    EV_EXEC = 13,  // the file a process exec'd (EXEC_PATH_BYTES of its name follow): WATCH at
                   // the exec of a watched process, `run` at a process's first vCPU
    EV_USER_STACK = 14,  // STACKS: struct user_stack_rec, the registers and stack of a report
    EV_TYPES = 16,
};

enum event_flag {
    EV_F_ACCESS_VALID = 1,
    EV_F_QUIRK_7E_DISABLED = 2,
    EV_F_AT_RETURN = 4,
    EV_F_IMMEDIATE_EXIT = 8,
    EV_F_HELD = 32,  // EV_VIOLATION of a read held in its window (aux: enum held_why | n << 8)
                     // or EV_PROCESS_EXIT of a process with held reads (aux: restore_gen)
    EV_F_USER_STACK = 64,   // EV_VIOLATION: an EV_USER_STACK record with its tid and seq follows
};

// Why a held read (see vcpu_state.held_cmd) was reported after all.
enum held_why { HELD_BY_SNAPSHOT = 1, HELD_BY_RESTORE = 2 };

// Indexes of the per-CPU `counters` array; tracer/probes.py names them (COUNTER_NAMES).
enum counter {
    C_LOST_BASE = 0,  // + event type: ring buffer full, event dropped
    C_VCPU_MAP_FULL = EV_TYPES,
    C_FD_MAP_FULL,
    C_THREAD_MAP_FULL,
    C_INFLIGHT_MAP_FULL,
    C_PROC_MAP_FULL,
    C_GUEST_EXIT_MAP_FULL,
    C_GUEST_ENTRY_MAP_FULL,
    C_UNKNOWN_FD_MAP_FULL,  // an LRU map evicts instead: only an allocation failure lands here
    C_ACCESS_READ_FAILED,  // kvm_run not readable when reporting: alert without the access
    C_UNTRACKED_EXITS,  // kvm_userspace_exit from a thread whose vCPU is unknown
    C_STACK_MAP_FULL,   // the stack's bucket in `stacks` was taken: reported without a stack
    C_STACK_FAILED,     // the user stack could not be read (e.g. no stack pointer to walk)
    C_WATCH_MAP_FULL,   // a fork of a watched process could not be recorded: it is not watched
    C_MID_MAP_FULL,     // a report could not be counted in mid_counts (its key was new, map full)
    C_LOST_WINDOW_MAP_FULL,  // a window that lost an event could not be kept in lost_windows
    C_INSPECTION_MAP_FULL,   // an inspection could not be counted in `inspections` (map full)
    C_USER_STACK_FAILED,    // a report's user registers or top of stack could not be read
    C_COUNTERS,
};

// CLOSED: its last fd went; the entry stays until Python has read its statistics (and deletes it)
enum vcpu_run_state { VCPU_IDLE = 0, VCPU_RUNNING = 1, VCPU_PENDING = 2, VCPU_CLOSED = 3 };

// Slots of vcpu_state.exits: one per exit reason below MAX_EXIT_REASON, then these two.
enum exit_slot {
    EXIT_SLOT_OTHER = MAX_EXIT_REASON,  // a reason this build does not know
    EXIT_SLOT_ERROR,                    // KVM_RUN returned an error (-EINTR: signal, immediate_exit)
    EXIT_SLOTS,
};

enum completion_path { PATH_REENTRY = 0, PATH_IMMEDIATE = 1, PATHS };

// ioctl_kinds values (tracer/windows.py kind_values): the kind in the low byte; for a save, its
// bit in vcpu_state.window_kinds at KIND_BIT_SHIFT, and KIND_HOLD when a lone read of it is an
// inspection (unset for every save in strict mode, inspection = "violation").
enum ioctl_kind { IOCTL_SAVE = 1, IOCTL_RESTORE = 2 };
#define KIND_MASK 0xff
#define KIND_BIT_SHIFT 8
#define KIND_HOLD (1u << 16)

enum inflight_op { OP_CREATE_VCPU = 1, OP_STATE_WHILE_RUNNING = 2, OP_DUP = 3, OP_MMAP = 4 };

// Wire format: tracer/events.py EVENT_STRUCT mirrors it field by field.
struct event {
    u32 type;
    u32 tgid;
    u32 tid;
    u32 vcpu_id;
    s32 fd;
    u32 cmd;
    u32 exit_reason;
    u32 flags;
    u64 seq;
    u64 pending_since_ns;
    u64 ts_ns;
    s64 aux;
    u64 vcpu_uid;
    u8 access[ACCESS_BYTES];
    char comm[16];
    s32 stack_id;  // key of `stacks` for EV_VIOLATION (-1: none; Python deletes it once read)
    u32 pad;
};

struct fd_key {
    u32 tgid;
    s32 fd;
};

struct fd_val {
    u64 vcpu_uid;  // key of `vcpus`; unique per KVM_CREATE_VCPU, never reused
    u32 vcpu_id;
    u32 pad;
};

struct vcpu_state {
    u64 uid;            // the vCPU's uid; 0: the slot is free (see vcpus)
    u64 seq;            // completion-needing exits so far: the current window's id
    u64 pending_since;  // ktime of the exit that opened the window
    u64 run_addr;       // the VMM's address of struct kvm_run (0: unknown)
    u32 tgid;
    u32 vcpu_id;
    u32 state;          // enum vcpu_run_state
    u32 exit_reason;    // of the last exit to userspace
    u32 run_tid;        // thread in (or last in) KVM_RUN
    u32 window_reports; // violations reported in the current window
    u32 window_saves;   // save kinds read in the window (held or reported): two make a snapshot
    u32 window_lost;    // 1 once a report of this window found the ring buffer full
    u32 completing;     // entered KVM_RUN with a completion pending; its return tells the path
    // The window's verdict, decided here (reset when a window with reads closes). A read of one
    // save kind is held, reported to nobody: if the window closes with only that kind read and
    // no restore in the process meanwhile, it was an inspection (counted in `inspections`). A
    // second kind or a restore makes the window a finding: the held read is reported then
    // (EV_F_HELD; see report_held for its stack) and every later state ioctl of the window at
    // once.
    u32 window_kinds;   // bits (ioctl_kinds) of the save kinds read in the window
    u32 window_finding; // 1: the window is a finding
    u32 held_cmd;       // the held read's ioctl; 0: none held
    u32 held_tid;
    s32 held_fd;
    u32 held_n;         // reads of that one kind held (the same kind again is still one kind)
    u32 held_flags;     // EV_F_AT_RETURN of the first
    u32 held_pad;
    u64 held_ts;
    u64 held_gen;       // proc_state.restore_gen at the held read
    // Statistics, read by Python at scrape time (metrics). Written by the thread entering or
    // leaving KVM_RUN on this vCPU; a VMM runs a vCPU from one thread at a time (KVM_RUN holds
    // the vCPU mutex), so plain increments are exact.
    u64 exits[EXIT_SLOTS];           // exits to userspace by reason
    u64 pending_hist[HIST_SLOTS];    // sampled completed windows by log2(ns pending)
    u64 pending_ns_sum;
    u64 completions[PATHS];          // by enum completion_path
    // The creating thread's comm (bpf_get_current_comm), so the VM keeps a name even when
    // its process is gone before Python read its /proc (ring-buffer loss, a stalled reader).
    char comm[16];
};

// One per process that has vCPUs or disabled quirks: only its exit, exec or close_range is
// worth an event; its bits are the quirks the VMM turned off.
struct proc_state {
    u64 quirks_disabled;  // KVM_X86_QUIRK_* bits the process disabled on a VM fd
    // Restore ioctls on any of its vCPUs so far: a held read whose window closes with another
    // value than at the read shared its window with a restore (restored what it read).
    u64 restore_gen;
    // Windows of its vCPUs holding a read: at its exit Python judges them from `vcpus` (a map
    // cannot be walked here). Two holds racing may miscount: at worst a needless walk.
    s64 held_windows;
};

struct inflight {
    u32 op;       // enum inflight_op
    s32 fd;       // vm fd (create), vCPU fd (state ioctl), old fd (dup)
    u32 cmd;
    u64 vcpu_uid;
    u64 seq;      // window id when a state ioctl entered while the vCPU ran
    u32 vcpu_id;
    u32 pad;
};

struct vcpu_key {
    u32 tgid;
    u32 vcpu_id;  // KVM's vCPU id as the kvm tracepoints report it
};

struct guest_exit_key {
    u32 tgid;
    u32 vcpu_id;
    u32 isa;  // 1 VMX, 2 SVM (kvm_exit's isa field)
    u32 reason;
};

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_HASH(vcpu_fds, struct fd_key, struct fd_val, MAX_VCPU_FDS);
// vCPU states by slot, the low VCPU_SLOT_BITS of the vCPU's uid: an array, so the per-exit
// lookups compile to an address computation (a hash lookup cost ~50 ns per exit each here). A
// slot is in use while its uid matches (vcpu_get); free slots wait in free_slots (Python fills
// it at start, takes the slots it adopts from it and puts every slot it releases back).
BPF_ARRAY(vcpus, struct vcpu_state, VCPU_SLOTS);
BPF_QUEUE(free_slots, u32, VCPU_SLOTS);
// uid -> fds referring to the vCPU in its process. Apart from vcpus so that Python, which can only
// write a whole entry, never writes a vcpu_state the probes may be updating at the same moment.
BPF_HASH(vcpu_refs, u64, u32, MAX_VCPUS);
BPF_HASH(run_threads, u32, u64, MAX_THREADS);      // tid -> vcpu_uid of its last KVM_RUN
BPF_HASH(inflight, u32, struct inflight, MAX_THREADS);  // tid -> syscall awaiting its return
// Stashes minus unstashes: whether any thread has a syscall awaiting its return, so the exit of
// every other syscall costs one array read. (Declared with the other maps: bcc 0.26 crashes on
// a map declared after functions when the kernel headers are broken.)
BPF_ARRAY(inflight_count, u64, 1);
BPF_HASH(procs, u32, struct proc_state, MAX_PROCS);
#ifndef WATCH
// `run`: the file each process last exec'd (sched_process_exec's filename, as given to
// execve), by tgid, for the most recent MAX_EXEC_PATHS execs on the host (LRU). Sent to Python
// as an EV_EXEC when the process first appears in `procs` (its first vCPU), then dropped; also
// dropped at the process's exit. So a VMM gone before Python read its /proc (a test VMM lives
// milliseconds) still has its executable known to place its stack's frames.
struct exec_path {
    char path[EXEC_PATH_BYTES];
};
BPF_TABLE("lru_hash", u32, struct exec_path, exec_paths, MAX_EXEC_PATHS);
BPF_PERCPU_ARRAY(exec_scratch, struct exec_path, 1);  // too big for the BPF stack
#endif
BPF_TABLE("lru_hash", struct fd_key, u8, unknown_fds, 1024);  // UNKNOWN_FD sent once per fd
BPF_ARRAY(pending_exits, u8, MAX_EXIT_REASON);      // policy: 1 = exit leaves a completion
BPF_HASH(ioctl_kinds, u32, u32, 128);               // policy: see KIND_MASK, by full cmd
BPF_ARRAY(next_uid, u64, 1);
// All zeros, never written: a new vCPU's entry starts as a copy (too big for the BPF stack).
BPF_ARRAY(vcpu_template, struct vcpu_state, 1);
BPF_PERCPU_ARRAY(counters, u64, C_COUNTERS);
// Per CPU: the last KVM_RUN entered here, so the next entry and exit of the same thread skip
// the vcpu_fds and run_threads lookups (the vCPU's own entry is still looked up). At an entry it stands for vcpu_fds[(tgid, fd)] and run_threads[tid] only while
// map_gen is what it was when written: every change of those two maps bumps map_gen (they
// change when vCPU fds come and go or a thread switches vCPUs, not per exit).
struct run_cache {
    u32 tid;
    u32 tgid;
    s32 fd;
    u32 pad;
    u64 uid;
    u64 gen;
};
BPF_PERCPU_ARRAY(run_cache, struct run_cache, 1);
BPF_ARRAY(map_gen, u64, 1);
BPF_HASH(guest_exits, struct guest_exit_key, u64, MAX_GUEST_EXIT_KEYS);
// Every mid-completion state ioctl the probes report, counted here before the event is
// reserved, by process, ioctl, exit reason and what the policy judges it on (the access head:
// port and direction of an IO exit, the type of a Hyper-V exit; the 0x7e quirk): what the
// violation and sanctioned counters are exact against when the ring buffer drops events (Python
// judges the reports that never reached it like the others). Python folds a process's keys into
// its own totals and deletes them at its exit.
struct mid_key {
    u32 tgid;
    u32 cmd;
    u32 exit_reason;
    u32 head;   // exit union bytes 0..3 for KVM_EXIT_IO / KVM_EXIT_HYPERV, else 0
    u32 flags;  // EV_F_ACCESS_VALID (head read) | EV_F_QUIRK_7E_DISABLED
    u32 pad;
};
BPF_HASH(mid_counts, struct mid_key, u64, MAX_MID_KEYS);
// Held reads whose window closed (completion, or the vCPU's last fd closed) with that one kind
// read and no restore: inspections, counted here and never sent. Python folds a process's keys
// into kvm_completion_inspections_total and deletes them at its exit.
struct insp_key {
    u32 tgid;
    u32 cmd;
    u32 exit_reason;
    u32 pad;
};
BPF_HASH(inspections, struct insp_key, u64, MAX_MID_KEYS);
// Windows with two or more reports one of which found the ring buffer full, kept from then on
// with the window's counts: Python counts the snapshot from here when the tracker saw too little
// of the window (or none of it), then deletes the entry. A window with a single report needs none (mid_counts has it). Not
// preallocated: it is empty but under loss, and a stalled reader can fill many entries.
struct window_key {
    u64 vcpu_uid;
    u64 seq;
};
struct lost_window {
    u32 tgid;
    u32 vcpu_id;
    u32 exit_reason;
    u32 head;     // as in mid_key
    u32 flags;    // as in mid_key
    u32 saves;    // save kinds read in the window so far (vcpu_state.window_saves)
    u32 reports;  // every report of the window so far
    u32 pad;
};
BPF_F_TABLE("hash", struct window_key, struct lost_window, lost_windows, MAX_LOST_WINDOWS,
            BPF_F_NO_PREALLOC);
#ifdef STACKS
// User stacks of reported ioctls, taken only when reporting (never on the exit path), as
// (build-id, file offset) per frame (BPF_F_STACK_BUILD_ID): resolved by the kernel while the
// VMM is surely alive, so a test process that exits at once still gets named frames. A bucket
// is freed when Python has read it; a report whose bucket is still taken goes without a stack.
BPF_STACK_TRACE_BUILDID(stacks, MAX_STACKS);
#endif
#ifdef STACKS
// STACKS: a report's user registers and the top of its user stack (USTACK_BYTES, copied in
// USTACK_CHUNK pieces up to the first page that is not present), for the CFI unwinder in user
// space.
// Layout: tracer/events.py USTACK_HEADER; regs is the x86-64 UAPI struct pt_regs (<asm/ptrace.h>,
// 21 u64: r15 r14 r13 r12 bp bx r11 r10 r9 r8 ax cx dx si di orig_ax ip cs flags sp ss; the
// offsets tracer/syscall_abi.py checks; PT_REGS_IP_IDX and PT_REGS_SP_IDX index ip and sp).
struct user_stack_rec {
    u32 type;
    u32 tgid;
    u32 tid;
    u32 size;  // bytes of stack[] copied from regs.sp up
    u64 seq;
    u64 vcpu_uid;
    u64 regs[21];
    u8 stack[USTACK_BYTES];
};
BPF_ARRAY(ustack_tokens, s64, 1);  // captures left until Python next reads the ring
// Where a window's held read was issued, by vCPU uid: its user ip and sp and the top
// HELD_STACK_BYTES of its stack (the libc ioctl wrapper's frame and its return address), taken
// at the first held read of a window so that a held read reported later names its own call
// site. LRU: only windows holding a read at once need an entry; an evicted one leaves its
// report without a stack (counted as user_stack_failed).
struct held_top {
    u64 ip;
    u64 sp;
    u32 tid;
    u32 pad;
    u8 stack[HELD_STACK_BYTES];
};
BPF_TABLE("lru_hash", u64, struct held_top, held_tops, MAX_HELD_TOPS);
BPF_PERCPU_ARRAY(held_scratch, struct held_top, 1);  // too big for the BPF stack
#endif
#ifdef WATCH
// `watch -- CMD`: CMD and every process forked from a watched one, keyed by task id (a new
// thread's id is added too, and removed when it exits, so a recycled id never stays watched).
// Python seeds it with its own pid around the fork of CMD. Only vCPU creation, adoption and
// quirk changes look here: every other path follows vcpu_fds, which then holds watched fds only.
BPF_HASH(watched, u32, u8, MAX_WATCHED);
#endif
BPF_HASH(guest_entries, struct vcpu_key, u64, MAX_VCPUS);  // kvm_entry count

static __always_inline void count(u32 idx)
{
    u64 *c = counters.lookup(&idx);
    if (c)
        (*c)++;  // per-CPU slot: no atomic needed
}

// The vCPU of a uid, or 0 when its slot was released (and maybe reused) since the uid was read.
static __always_inline struct vcpu_state *vcpu_get(u64 uid)
{
    u32 slot = (u32)uid & VCPU_SLOT_MASK;
    struct vcpu_state *st = vcpus.lookup(&slot);
    return (st && st->uid == uid && uid) ? st : 0;
}

static __always_inline int watched_tgid(u32 tgid)
{
#ifdef WATCH
    return watched.lookup(&tgid) != 0;
#else
    return 1;
#endif
}

// Called for every change of vcpu_fds or run_threads: invalidates every CPU's run_cache.
static __always_inline void maps_changed(void)
{
    u32 zero = 0;
    u64 *gen = map_gen.lookup(&zero);
    if (gen)
        __sync_fetch_and_add(gen, 1);
}

static __always_inline struct event *new_event(u32 type, u32 tgid, u32 tid)
{
    struct event *ev = events.ringbuf_reserve(sizeof(struct event));
    if (!ev) {
        count(C_LOST_BASE + type);
        return 0;
    }
    __builtin_memset(ev, 0, sizeof(*ev));
    ev->stack_id = -1;
    ev->type = type;
    ev->tgid = tgid;
    ev->tid = tid;
    ev->ts_ns = bpf_ktime_get_ns();
    bpf_get_current_comm(&ev->comm, sizeof(ev->comm));
    return ev;
}

static __always_inline void fill_vcpu(struct event *ev, u64 uid, struct vcpu_state *st)
{
    ev->vcpu_uid = uid;
    ev->vcpu_id = st->vcpu_id;
    ev->exit_reason = st->exit_reason;
    ev->seq = st->seq;
    ev->pending_since_ns = st->pending_since;
}

// The pending exit's access (port, GPA, MSR) is the exit union at kvm_run offset 32. KVM leaves
// it alone until the next KVM_RUN, so it is read only when reported, never on the exit path; the
// read runs in a thread of the VMM (vCPU ioctls must come from the VM's mm). It fails while the
// VMM has not touched the page yet (no fault-in from BPF): the alert then lacks the access.
static __always_inline void read_access(struct event *ev, struct vcpu_state *st)
{
    void *exit_union = (void *)(st->run_addr + KVM_RUN_UNION_OFF);
    if (st->run_addr && bpf_probe_read_user(ev->access, ACCESS_BYTES, exit_union) == 0)
        ev->flags |= EV_F_ACCESS_VALID;
    else
        count(C_ACCESS_READ_FAILED);
}

static __always_inline u32 quirk_flags(u32 tgid)
{
    struct proc_state *p = procs.lookup(&tgid);
    return (p && (p->quirks_disabled & QUIRK_OUT_7E_INC_RIP)) ? EV_F_QUIRK_7E_DISABLED : 0;
}

static __always_inline void held_windows_add(u32 tgid, s64 delta)
{
    struct proc_state *p = procs.lookup(&tgid);
    if (p && (delta > 0 || p->held_windows > 0))
        __sync_fetch_and_add(&p->held_windows, delta);
}

// The window's entry in lost_windows, rewritten with its counts so far. Two reports racing on
// one window may leave the smaller save count: it still says two or more once it matters.
static __always_inline void keep_lost_window(u64 uid, struct vcpu_state *st, struct mid_key *mk)
{
    struct window_key wk = {.vcpu_uid = uid, .seq = st->seq};
    struct lost_window lw = {.tgid = mk->tgid, .vcpu_id = st->vcpu_id,
                             .exit_reason = mk->exit_reason, .head = mk->head,
                             .flags = mk->flags, .saves = st->window_saves,
                             .reports = st->window_reports};
    if (lost_windows.update(&wk, &lw))
        count(C_LOST_WINDOW_MAP_FULL);
}

// n reports in the window whose event was just reserved (lost: it was not): window_reports
// and, once the window lost an event, lost_windows.
static __always_inline void count_reports(u64 uid, struct vcpu_state *st, u32 n,
                                          struct mid_key *mk, int lost)
{
    __sync_fetch_and_add(&st->window_reports, n);
    if (lost)
        st->window_lost = 1;
    if (st->window_lost && st->window_reports >= 2)
        keep_lost_window(uid, st, mk);
}

// The mid_counts key of n reports of cmd (what the policy judges them on), counted there
// before their event is reserved: what the violation and sanctioned counters are exact against.
static __always_inline void count_mid(u32 tgid, u32 cmd, struct vcpu_state *st, u32 n,
                                      struct mid_key *mk)
{
    mk->tgid = tgid;
    mk->cmd = cmd;
    mk->exit_reason = st->exit_reason;
    mk->flags = quirk_flags(tgid);
    if ((mk->exit_reason == KVM_EXIT_IO_NR || mk->exit_reason == KVM_EXIT_HYPERV_NR) &&
        st->run_addr) {
        // io: u8 direction, u8 size, u16 port; hyperv: u32 type (struct kvm_run, UAPI)
        if (bpf_probe_read_user(&mk->head, sizeof(mk->head),
                                (void *)(st->run_addr + KVM_RUN_UNION_OFF)) == 0)
            mk->flags |= EV_F_ACCESS_VALID;
        else
            mk->head = 0;
    }
    u64 add = n;
    if (mid_counts.insert(mk, &add)) {  // BPF_NOEXIST: two CPUs never both insert
        u64 *c = mid_counts.lookup(mk);
        if (c)
            __sync_fetch_and_add(c, add);
        else
            count(C_MID_MAP_FULL);
    }
}

#ifdef USER_STACK_CAPTURE
// The user registers of the current task and the top of its user stack, as an EV_USER_STACK
// record (reserved after ev, submitted before it: committed when ev is). Only at a report.
// bpf_task_pt_regs(bpf_get_current_task_btf()) (kernel >= 5.15, BTF) hands the registers the
// task saved on entering the kernel; they are copied as the UAPI struct pt_regs, no field of a
// kernel struct is read. A failed copy or a full ring is counted, and ev says no record follows.
static __always_inline void capture_user_stack(struct event *ev, struct vcpu_state *held)
{
    // A storm of reports must not crowd the reports out of the ring: at most ustack_tokens
    // captures between two reads of the ring by Python (which refills them: one per 32 KiB of
    // ring, tracer.events.stack_capture_budget); past them, none (counted as
    // user_stack_dropped; the report keeps the kernel's frame-pointer walk).
    u32 zero = 0;
    s64 *tokens = ustack_tokens.lookup(&zero);
    if (!tokens || __sync_fetch_and_add(tokens, -1) <= 0) {
        count(C_LOST_BASE + EV_USER_STACK);
        return;
    }
    struct user_stack_rec *r = events.ringbuf_reserve(sizeof(struct user_stack_rec));
    if (!r) {
        count(C_LOST_BASE + EV_USER_STACK);
        return;
    }
    r->type = EV_USER_STACK;
    r->tgid = ev->tgid;
    r->tid = ev->tid;
    r->seq = ev->seq;
    r->vcpu_uid = ev->vcpu_uid;
    r->size = 0;
    void *regs = (void *)bpf_task_pt_regs(bpf_get_current_task_btf());
    if (bpf_probe_read_kernel(r->regs, sizeof(r->regs), regs)) {
        events.ringbuf_discard(r, 0);
        count(C_USER_STACK_FAILED);
        return;
    }
    u64 sp = r->regs[PT_REGS_SP_IDX];
#pragma unroll
    for (int i = 0; i < USTACK_BYTES / USTACK_CHUNK; i++) {
        u64 at = sp + i * USTACK_CHUNK;
        if (bpf_probe_read_user(r->stack + i * USTACK_CHUNK, USTACK_CHUNK, (void *)at)) {
            // The piece runs into a page that is not present (no fault is taken here): keep
            // its part below that page. Above the main thread's auxiliary vector, exec leaves
            // a random gap of never-touched pages; the vector (where the executable is loaded,
            // for a process gone before its mappings were read) is the last thing below it.
            u64 to_page = USER_PAGE_SIZE - (at & (USER_PAGE_SIZE - 1));
            if (to_page < USTACK_CHUNK &&
                !bpf_probe_read_user(r->stack + i * USTACK_CHUNK, to_page & (USTACK_CHUNK - 1),
                                     (void *)at))
                r->size += to_page;
            break;
        }
        r->size += USTACK_CHUNK;
    }
    if (held) {
        // A held read reported now: its own ip, sp and top of stack. At the same stack depth in
        // the same thread (the usual case: one function issues both ioctls) every frame above
        // that top is the same memory, so the held top laid over this copy is the held read's
        // whole stack; otherwise the held top alone (its caller, then the copy ends).
        struct held_top *h = held_tops.lookup(&ev->vcpu_uid);
        if (!h || !h->sp) {
            events.ringbuf_discard(r, 0);
            count(C_USER_STACK_FAILED);
            return;
        }
        if (h->sp != sp || h->tid != ev->tid || r->size < HELD_STACK_BYTES)
            r->size = HELD_STACK_BYTES;
        r->regs[PT_REGS_IP_IDX] = h->ip;
        r->regs[PT_REGS_SP_IDX] = h->sp;
        bpf_probe_read_kernel(r->stack, HELD_STACK_BYTES, h->stack);
    }
    if (!r->size) {
        events.ringbuf_discard(r, 0);
        count(C_USER_STACK_FAILED);
        return;
    }
    ev->flags |= EV_F_USER_STACK;
    events.ringbuf_submit(r, 0);
}
#endif

// ctx: the syscall tracepoint's context, for the user stack of the ioctl being reported.
static __always_inline void report_violation(void *ctx, u32 tgid, u32 tid, s32 fd, u32 cmd,
                                             u64 uid, struct vcpu_state *st, u32 extra_flags)
{
    struct mid_key mk = {};
    count_mid(tgid, cmd, st, 1, &mk);
    struct event *ev = new_event(EV_VIOLATION, tgid, tid);
    count_reports(uid, st, 1, &mk, !ev);
    if (!ev)
        return;
    fill_vcpu(ev, uid, st);
    read_access(ev, st);
    ev->fd = fd;
    ev->cmd = cmd;
    ev->flags |= extra_flags | (mk.flags & EV_F_QUIRK_7E_DISABLED);
#ifdef STACKS
    // Frame-pointer walk of the VMM's stack by the kernel; a binary built without frame
    // pointers gives the frames up to the first function that does not keep them.
    int stack_id = stacks.get_stackid(ctx, BPF_F_USER_STACK);
    if (stack_id < 0)
        count(stack_id == STACK_ERR_EXIST ? C_STACK_MAP_FULL : C_STACK_FAILED);
    ev->stack_id = stack_id;
#ifdef USER_STACK_CAPTURE
    capture_user_stack(ev, 0);
#endif
#endif
    // With a stack record behind it, the report is committed after that record: wake the
    // reader for it in any case (a commit wakes it only when it is the next record to read).
    events.ringbuf_submit(ev, (ev->flags & EV_F_USER_STACK) ? BPF_RB_FORCE_WAKEUP : 0);
}

// At a window's first held read: the ioctl's user ip and sp and the top of its stack
// (bpf_task_pt_regs: the UAPI struct pt_regs the task saved entering the kernel; no kernel
// struct field is read). Zero sp when unreadable: the held read is then reported without a stack.
static __always_inline void hold_call_site(u64 uid, u32 tid)
{
#ifdef USER_STACK_CAPTURE
    u32 zero = 0;
    struct held_top *h = held_scratch.lookup(&zero);
    if (!h)
        return;
    u64 *regs = (u64 *)bpf_task_pt_regs(bpf_get_current_task_btf());
    h->tid = tid;
    if (bpf_probe_read_kernel(&h->ip, sizeof(h->ip), regs + PT_REGS_IP_IDX) ||
        bpf_probe_read_kernel(&h->sp, sizeof(h->sp), regs + PT_REGS_SP_IDX) ||
        bpf_probe_read_user(h->stack, HELD_STACK_BYTES, (void *)h->sp))
        h->sp = 0;
    held_tops.update(&uid, h);
#endif
}

// The window's held read turned out part of a finding: reported now, as the held_n reads it
// stands for (mid_counts counts them all), with the thread, fd and time of the first. Its own
// stack was not kept (taking one per peek would cost every correct VMM): ctx, when the finding
// is made by an ioctl (0 at a window's close), gives that ioctl's stack instead, flagged
// EV_F_HELD, so the report still points at the code that saved.
static __always_inline void report_held(void *ctx, u32 tgid, u64 uid, struct vcpu_state *st,
                                        u32 why)
{
    u32 cmd = st->held_cmd;
    u32 n = st->held_n;
    if (!cmd)
        return;
    st->held_cmd = 0;
    held_windows_add(tgid, -1);
    struct mid_key mk = {};
    count_mid(tgid, cmd, st, n, &mk);
    struct event *ev = new_event(EV_VIOLATION, tgid, st->held_tid);
    count_reports(uid, st, n, &mk, !ev);
    if (!ev)
        return;
    fill_vcpu(ev, uid, st);
    read_access(ev, st);
    ev->fd = st->held_fd;
    ev->cmd = cmd;
    ev->ts_ns = st->held_ts;
    ev->aux = why | ((s64)n << 8);
    ev->flags |= st->held_flags | EV_F_HELD | (mk.flags & EV_F_QUIRK_7E_DISABLED);
#ifdef STACKS
    if (ctx) {
        int stack_id = stacks.get_stackid(ctx, BPF_F_USER_STACK);
        if (stack_id < 0)
            count(stack_id == STACK_ERR_EXIST ? C_STACK_MAP_FULL : C_STACK_FAILED);
        ev->stack_id = stack_id;
#ifdef USER_STACK_CAPTURE
        capture_user_stack(ev, st);
#endif
    }
#endif
    events.ringbuf_submit(ev, (ev->flags & EV_F_USER_STACK) ? BPF_RB_FORCE_WAKEUP : 0);
}

// --trace-exits: a held read is an EV_STATE_IOCTL (EV_F_HELD), so a replay sees every ioctl.
static __always_inline void trace_held(u32 tgid, u32 tid, s32 fd, u32 cmd, u64 uid,
                                       struct vcpu_state *st, u32 extra_flags)
{
#ifdef TRACE_EXITS
    struct event *ev = new_event(EV_STATE_IOCTL, tgid, tid);
    if (ev) {
        fill_vcpu(ev, uid, st);
        ev->fd = fd;
        ev->cmd = cmd;
        ev->aux = VCPU_PENDING;
        ev->flags = EV_F_HELD | extra_flags;
        events.ringbuf_submit(ev, 0);
    }
#endif
}

// A save or restore on a vCPU with a completion pending (kv: its ioctl_kinds value). The first
// read of a holdable kind is held; the same kind again adds to it; anything else makes the
// window a finding (the held read reported first). Two threads reading one vCPU's state at the
// same instant may both see nothing held: one read is then held in place of the other.
static __always_inline void state_ioctl_mid(void *ctx, u32 tgid, u32 tid, s32 fd, u32 cmd,
                                            u32 kv, u64 uid, struct vcpu_state *st,
                                            u32 extra_flags)
{
    u32 save = (kv & KIND_MASK) == IOCTL_SAVE;
    if (save) {
        u32 bit = 1u << ((kv >> KIND_BIT_SHIFT) & 31);
        if (!(st->window_kinds & bit)) {
            st->window_kinds |= bit;
            st->window_saves++;
        }
    }
    if (!st->window_finding) {
        if (save && (kv & KIND_HOLD)) {
            if (!st->held_cmd) {
                struct proc_state *p = procs.lookup(&tgid);
                st->held_gen = p ? p->restore_gen : 0;
                st->held_tid = tid;
                st->held_fd = fd;
                st->held_n = 1;
                st->held_flags = extra_flags;
                st->held_ts = bpf_ktime_get_ns();
                hold_call_site(uid, tid);
                st->held_cmd = cmd;
                held_windows_add(tgid, 1);
                trace_held(tgid, tid, fd, cmd, uid, st, extra_flags);
                return;
            }
            if (st->held_cmd == cmd) {
                __sync_fetch_and_add(&st->held_n, 1);
                trace_held(tgid, tid, fd, cmd, uid, st, extra_flags);
                return;
            }
        }
        st->window_finding = 1;
        report_held(ctx, tgid, uid, st, save ? HELD_BY_SNAPSHOT : HELD_BY_RESTORE);
    }
    report_violation(ctx, tgid, tid, fd, cmd, uid, st, extra_flags);
}

// The window of a vCPU holding a read closes (its completion, or its last fd closed): an
// inspection unless the process restored state since the read.
static __always_inline void close_held(u32 tgid, u64 uid, struct vcpu_state *st)
{
    struct proc_state *p = procs.lookup(&tgid);
    if (p && p->restore_gen != st->held_gen) {
        st->window_finding = 1;
        report_held(0, tgid, uid, st, HELD_BY_RESTORE);
        return;
    }
    struct insp_key k = {.tgid = tgid, .cmd = st->held_cmd, .exit_reason = st->exit_reason};
    u64 add = st->held_n;
    if (inspections.insert(&k, &add)) {  // BPF_NOEXIST, as mid_counts
        u64 *c = inspections.lookup(&k);
        if (c)
            __sync_fetch_and_add(c, add);
        else
            count(C_INSPECTION_MAP_FULL);
    }
    st->held_cmd = 0;
    held_windows_add(tgid, -1);
}

static __always_inline void emit_simple(u32 type, u32 tgid, u32 tid, s32 fd, u32 vcpu_id,
                                        u64 uid, s64 aux)
{
    struct event *ev = new_event(type, tgid, tid);
    if (!ev)
        return;
    ev->fd = fd;
    ev->vcpu_id = vcpu_id;
    ev->vcpu_uid = uid;
    ev->aux = aux;
    events.ringbuf_submit(ev, 0);
}

// An EV_EXEC with its header filled; the caller writes the EXEC_PATH_BYTES of file name after
// it and submits it. NULL (counted as lost) when the ring is full.
static __always_inline struct event *new_exec_event(u32 tgid, u32 tid)
{
    struct event *ev = events.ringbuf_reserve(sizeof(struct event) + EXEC_PATH_BYTES);
    if (!ev) {
        count(C_LOST_BASE + EV_EXEC);
        return 0;
    }
    __builtin_memset(ev, 0, sizeof(*ev));
    ev->type = EV_EXEC;
    ev->tgid = tgid;
    ev->tid = tid;
    ev->stack_id = -1;
    ev->ts_ns = bpf_ktime_get_ns();
    bpf_get_current_comm(&ev->comm, sizeof(ev->comm));
    return ev;
}

#ifndef WATCH
// A process new in `procs`: the file it exec'd, if that exec was seen, as an EV_EXEC (the
// event watch sends at the exec itself), ahead of any report of the process.
static __always_inline void send_exec_path(u32 tgid)
{
    struct exec_path *known = exec_paths.lookup(&tgid);
    if (!known)
        return;
    struct event *ev = new_exec_event(tgid, (u32)bpf_get_current_pid_tgid());
    if (!ev)
        return;
    bpf_probe_read_kernel((char *)(ev + 1), EXEC_PATH_BYTES, known->path);
    events.ringbuf_submit(ev, 0);
    exec_paths.delete(&tgid);
}
#endif

static __always_inline struct proc_state *proc_get(u32 tgid)
{
    struct proc_state zero = {};
    struct proc_state *p = procs.lookup(&tgid);
    if (p)
        return p;
    if (procs.update(&tgid, &zero)) {
        count(C_PROC_MAP_FULL);
        return 0;
    }
#ifndef WATCH
    send_exec_path(tgid);
#endif
    return procs.lookup(&tgid);
}

// Drop one fd's reference to its vCPU; the vCPU's state goes with its last fd (nothing can
// reach a vCPU without an fd, so a reused fd number or a new vCPU never inherits it).
static __always_inline void forget_fd(u32 tgid, u32 tid, struct fd_key *key)
{
    struct fd_val *fv = vcpu_fds.lookup(key);
    if (!fv)
        return;
    u64 uid = fv->vcpu_uid;
    u32 vcpu_id = fv->vcpu_id;
    vcpu_fds.delete(key);
    maps_changed();
    s64 left = 0;
    u32 *refs = vcpu_refs.lookup(&uid);
    if (refs) {
        // Atomic, as two fds may close at once (then both may see 0 below: closing twice is
        // harmless). The add's old value is not usable with this kernel's BPF atomics.
        __sync_fetch_and_add(refs, -1);
        left = (s32)*refs;
    }
    if (left <= 0) {
        left = 0;
        vcpu_refs.delete(&uid);
        // Python reads its statistics then deletes it (on this event, or its sweep).
        struct vcpu_state *st = vcpu_get(uid);
        if (st) {
            if (st->state == VCPU_PENDING && st->held_cmd)
                close_held(tgid, uid, st);  // its window ends with it
            st->state = VCPU_CLOSED;
        }
    }
    emit_simple(EV_VCPU_FD_CLOSED, tgid, tid, key->fd, vcpu_id, uid, left);
}

// ---- KVM_RUN ----------------------------------------------------------------------------------

// gen: map_gen as read before uid was looked up (so a change racing the lookup shows), or
// CACHE_HIT when run_cache itself gave uid (run_threads[tid] == uid already).
#define CACHE_HIT ((u64)-1)

static __always_inline void on_run_enter(u32 tgid, u32 tid, s32 fd, u64 uid,
                                         struct vcpu_state *st, u64 gen)
{
    if (st->state == VCPU_CLOSED)
        return;  // its last fd is gone: nothing to follow any more
    u8 immediate = 0;
    if (st->state == VCPU_PENDING) {
        // KVM completes the pending operation at the top of KVM_RUN. Which path (a normal
        // re-entry, or immediate_exit: complete without running the guest) is counted when this
        // KVM_RUN returns (-EINTR for immediate_exit), not read from kvm_run here: a user-memory
        // read costs more than the rest of this program.
        st->completing = 1;
        // The pending-time histogram samples one window in PENDING_SAMPLE (by window id): a
        // clock read costs ~90 ns here, as much as the rest of this program.
        if ((st->seq & (PENDING_SAMPLE - 1)) == 0) {
            u64 pending_ns = bpf_ktime_get_ns() - st->pending_since;
            u32 slot = bpf_log2l(pending_ns);
            if (slot >= HIST_SLOTS)
                slot = HIST_SLOTS - 1;
            st->pending_hist[slot]++;
            st->pending_ns_sum += pending_ns;
        }
        // A window with a state read is judged here (every read is held or a finding; a window
        // without one costs these two loads of the line the exit path just wrote).
        if (st->held_cmd || st->window_finding) {
            if (st->held_cmd)
                close_held(tgid, uid, st);
            st->window_kinds = 0;  // the exit path resets only what every window needs
            st->window_finding = 0;
        }
#ifndef TRACE_EXITS
        if (st->window_reports) {
#endif
            // kvm_run offset 1: immediate_exit, read only when an event must carry it.
            if (st->run_addr)
                bpf_probe_read_user(&immediate, 1,
                                    (void *)(st->run_addr + KVM_RUN_IMMEDIATE_EXIT_OFF));
#ifndef TRACE_EXITS
        }
#endif
        if (st->window_reports) {
            struct event *ev = new_event(EV_WINDOW_CLOSED, tgid, tid);
            if (ev) {
                fill_vcpu(ev, uid, st);
                ev->aux = st->window_reports;
                ev->flags = immediate ? EV_F_IMMEDIATE_EXIT : 0;
                events.ringbuf_submit(ev, 0);
            }
        }
    }
    st->state = VCPU_RUNNING;
    st->run_tid = tid;
    if (gen == CACHE_HIT)
        goto traced;
    u32 zero = 0;
    u64 seen = gen;
    u64 *cur = run_threads.lookup(&tid);
    if (!cur || *cur != uid) {
        if (run_threads.update(&tid, &uid)) {
            count(C_THREAD_MAP_FULL);
            goto traced;
        }
        maps_changed();
        seen++;  // our own change; any other one still shows
    }
    struct run_cache *rc = run_cache.lookup(&zero);
    if (rc) {
        rc->tid = tid;
        rc->tgid = tgid;
        rc->fd = fd;
        rc->uid = uid;
        rc->gen = seen;
    }
traced:;
#ifdef TRACE_EXITS
    struct event *ev = new_event(EV_RUN_ENTER, tgid, tid);
    if (ev) {
        fill_vcpu(ev, uid, st);
        ev->fd = fd;
        ev->flags = immediate ? EV_F_IMMEDIATE_EXIT : 0;
        events.ringbuf_submit(ev, 0);
    }
#endif
}

RAW_TRACEPOINT_PROBE(kvm_userspace_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    u32 reason = (u32)ctx->args[0];
    int err = (int)ctx->args[1];

    // This CPU's last KVM_RUN entry is almost always this thread's: no hash lookup then. It is
    // trusted only if that vCPU is still running on this thread (else the thread migrated, or
    // ran another vCPU since), and run_threads answers.
    u32 zero = 0;
    struct run_cache *rc = run_cache.lookup(&zero);
    struct vcpu_state *st = 0;
    u64 uid = 0;
    if (rc && rc->tid == tid) {
        uid = rc->uid;
        st = vcpu_get(uid);
        if (st && (st->state != VCPU_RUNNING || st->run_tid != tid))
            st = 0;
    }
    if (!st) {
        u64 *uidp = run_threads.lookup(&tid);
        if (!uidp) {
            if (watched_tgid((u32)(id >> 32)))
                count(C_UNTRACKED_EXITS);
            return 0;
        }
        uid = *uidp;
        st = vcpu_get(uid);
        if (!st) {
            count(C_UNTRACKED_EXITS);
            return 0;
        }
    }
    if (st->completing) {
        st->completing = 0;
        st->completions[err == EINTR_ERRNO ? PATH_IMMEDIATE : PATH_REENTRY]++;
    }
    u8 *pending = 0;
    if (err == 0 && reason < MAX_EXIT_REASON) {
        u32 idx = reason;
        pending = pending_exits.lookup(&idx);
    }
    u32 slot = err ? EXIT_SLOT_ERROR : reason < MAX_EXIT_REASON ? reason : EXIT_SLOT_OTHER;
    if (slot < EXIT_SLOTS)  // always; tells the verifier the index is bounded
        st->exits[slot]++;
    if (st->state == VCPU_CLOSED)  // fd closed under a running KVM_RUN: counted, nothing more
        return 0;
    if (err == 0)
        st->exit_reason = reason;
    if (pending && *pending) {
        st->seq++;
        st->pending_since = bpf_ktime_get_ns();
        st->window_reports = 0;
        st->window_saves = 0;
        st->window_lost = 0;
        barrier();
        st->state = VCPU_PENDING;  // last: other CPUs test state before reading the rest
    } else {
        st->state = VCPU_IDLE;
    }
#ifdef TRACE_EXITS
    emit_simple(EV_USERSPACE_EXIT, (u32)(id >> 32), tid, -1, st->vcpu_id, uid,
                ((s64)err << 32) | reason);
#endif
    return 0;
}

// ---- ioctl ------------------------------------------------------------------------------------

static __always_inline void on_enable_cap(u32 tgid, u32 tid, u64 arg)
{
    // struct kvm_enable_cap { __u32 cap; __u32 flags; __u64 args[4]; __u8 pad[64]; }
    struct {
        u32 cap;
        u32 flags;
        u64 arg0;
    } cap = {};
    if (bpf_probe_read_user(&cap, sizeof(cap), (void *)arg))
        return;
    if (cap.cap != KVM_CAP_DISABLE_QUIRKS_NR && cap.cap != KVM_CAP_DISABLE_QUIRKS2_NR)
        return;
    struct proc_state *p = proc_get(tgid);
    if (p)
        p->quirks_disabled |= cap.arg0;
    emit_simple(EV_QUIRKS_DISABLED, tgid, tid, -1, 0, 0, (s64)cap.arg0);
}

static __always_inline void stash(u32 tid, struct inflight *inf)
{
    // A thread has one syscall in flight: an entry left over (its exit missed) is replaced,
    // and only a new entry is counted, so the count is exactly the map's size.
    if (inflight.insert(&tid, inf) == 0) {
        u32 zero = 0;
        u64 *n = inflight_count.lookup(&zero);
        if (n)
            __sync_fetch_and_add(n, 1);
    } else if (inflight.update(&tid, inf)) {
        count(C_INFLIGHT_MAP_FULL);
    }
}

static __always_inline void unstash(u32 tid)
{
    if (inflight.delete(&tid) == 0) {
        u32 zero = 0;
        u64 *n = inflight_count.lookup(&zero);
        if (n)
            __sync_fetch_and_add(n, -1);
    }
}

static __always_inline void ioctl_enter(void *ctx, s32 fd, u32 cmd, u64 arg)
{
    if (((cmd >> 8) & 0xff) != KVMIO_TYPE)  // every non-KVM ioctl on the host leaves here
        return;
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    struct fd_key fk = {.tgid = tgid, .fd = fd};

    if (cmd == KVM_ENABLE_CAP_NR) {
        if (watched_tgid(tgid))
            on_enable_cap(tgid, tid, arg);
        return;
    }
    u64 gen_before = 0;
    if (cmd == KVM_RUN_NR) {
        // The common case: the thread re-enters the vCPU it ran last on this CPU.
        u32 zero = 0;
        struct run_cache *rc = run_cache.lookup(&zero);
        u64 *gen = map_gen.lookup(&zero);
        if (!rc || !gen)
            return;
        gen_before = *gen;  // read before vcpu_fds below: see on_run_enter
        if (rc->gen == gen_before && rc->tid == tid && rc->tgid == tgid && rc->fd == fk.fd) {
            u64 cached_uid = rc->uid;
            struct vcpu_state *cst = vcpu_get(cached_uid);
            if (cst) {
                on_run_enter(tgid, tid, fk.fd, cached_uid, cst, CACHE_HIT);
                return;
            }
        }
    }
    struct fd_val *fv = vcpu_fds.lookup(&fk);
    if (!fv) {
        if (!watched_tgid(tgid))
            return;  // `watch`: another user's VM
        if (cmd == KVM_CREATE_VCPU_NR) {
            struct inflight inf = {.op = OP_CREATE_VCPU, .fd = fk.fd, .vcpu_id = (u32)arg};
            stash(tid, &inf);
            return;
        }
        u32 *kind = ioctl_kinds.lookup(&cmd);
        if (cmd == KVM_RUN_NR || kind) {
            if (cmd == KVM_RUN_NR && run_threads.delete(&tid) == 0)
                maps_changed();  // its exits must not land on an older vCPU
            u8 one = 1;
            if (!unknown_fds.lookup(&fk)) {
                if (unknown_fds.update(&fk, &one))
                    count(C_UNKNOWN_FD_MAP_FULL);
                proc_get(tgid);  // its close() calls are worth looking at from now on
                emit_simple(EV_UNKNOWN_FD, tgid, tid, fk.fd, 0, 0, cmd);
            }
        }
        return;
    }
    u64 uid = fv->vcpu_uid;
    struct vcpu_state *st = vcpu_get(uid);
    if (!st)
        return;
    if (cmd == KVM_RUN_NR) {
        on_run_enter(tgid, tid, fk.fd, uid, st, gen_before);
        return;
    }
    u32 *kind = ioctl_kinds.lookup(&cmd);
    if (!kind)
        return;
    u32 kv = *kind;
    if ((kv & KIND_MASK) == IOCTL_RESTORE) {
        // Any restore in the process, pending or not: a held read of another vCPU's window
        // open meanwhile was read to be restored (close_held). Restores are rare.
        struct proc_state *rp = procs.lookup(&tgid);
        if (rp)
            __sync_fetch_and_add(&rp->restore_gen, 1);
    }
    u32 state = st->state;
    if (state == VCPU_PENDING) {
        state_ioctl_mid(ctx, tgid, tid, fk.fd, cmd, kv, uid, st, 0);
        return;
    }
    if (state == VCPU_RUNNING) {
        struct inflight inf = {.op = OP_STATE_WHILE_RUNNING, .fd = fk.fd,
                               .cmd = cmd, .vcpu_uid = uid, .seq = st->seq,
                               .vcpu_id = st->vcpu_id};
        stash(tid, &inf);
    }
#ifdef TRACE_EXITS
    struct event *ev = new_event(EV_STATE_IOCTL, tgid, tid);
    if (ev) {
        fill_vcpu(ev, uid, st);
        ev->fd = fk.fd;
        ev->cmd = cmd;
        ev->aux = state;
        events.ringbuf_submit(ev, 0);
    }
#endif
}

static __always_inline void on_vcpu_created(u32 tgid, u32 tid, struct inflight *inf, s32 fd)
{
    u32 idx = 0;
    u64 *next = next_uid.lookup(&idx);
    struct vcpu_state *zero = vcpu_template.lookup(&idx);
    if (!next || !zero)
        return;
    struct fd_key fk = {.tgid = tgid, .fd = fd};
    forget_fd(tgid, tid, &fk);  // a stale entry (missed close) must not keep a vCPU alive
    u32 slot;
    if (free_slots.pop(&slot)) {  // every slot holds a vCPU
        count(C_VCPU_MAP_FULL);
        return;
    }
    slot &= VCPU_SLOT_MASK;
    // Unique even when two CPUs create vCPUs at once (the atomic add hands out distinct
    // values), never reused, and its low bits name the slot.
    u64 uid = ((__sync_fetch_and_add(next, 1) + 1) << VCPU_SLOT_BITS) | slot;
    vcpus.update(&slot, zero);  // an array slot: cannot fail
    struct vcpu_state *st = vcpus.lookup(&slot);
    if (!st)
        return;
    // Nothing reaches the entry before vcpu_fds has the fd (below), so these need no ordering.
    st->tgid = tgid;
    st->vcpu_id = inf->vcpu_id;
    bpf_get_current_comm(&st->comm, sizeof(st->comm));
    st->uid = uid;
    u32 one = 1;
    // Without its refs, or its process in procs (its close() calls are only looked at for
    // processes there), the vCPU cannot be followed: drop it, counted once under the map that
    // refused it (vcpu_refs is sized like vcpus; proc_get counts procs itself).
    int no_refs = vcpu_refs.update(&uid, &one) != 0;
    if (no_refs)
        count(C_VCPU_MAP_FULL);
    if (no_refs || !proc_get(tgid))
        goto drop;
    struct fd_val fv = {.vcpu_uid = uid, .vcpu_id = inf->vcpu_id};
    if (vcpu_fds.update(&fk, &fv)) {
        count(C_FD_MAP_FULL);
        goto drop;
    }
    maps_changed();
    emit_simple(EV_VCPU_CREATED, tgid, tid, fd, inf->vcpu_id, uid, inf->fd);
    return;
drop:
    vcpu_refs.delete(&uid);
    st->uid = 0;
    free_slots.push(&slot, 0);
}

static __always_inline void dup_done(u32 tgid, u32 tid, struct inflight *inf, long ret)
{
    if (ret < 0 || ret == inf->fd)
        return;
    struct fd_key nk = {.tgid = tgid, .fd = (s32)ret};
    forget_fd(tgid, tid, &nk);  // dup2/dup3 closed whatever the target was
    struct fd_key fk = {.tgid = tgid, .fd = inf->fd};
    struct fd_val *fv = vcpu_fds.lookup(&fk);
    if (!fv)
        return;
    struct fd_val copy = *fv;
    struct vcpu_state *st = vcpu_get(copy.vcpu_uid);
    if (!st)
        return;  // the vCPU was already dropped (and counted then): nothing more to lose
    if (vcpu_fds.update(&nk, &copy)) {
        count(C_FD_MAP_FULL);
        return;
    }
    maps_changed();
    u32 *refs = vcpu_refs.lookup(&copy.vcpu_uid);
    if (refs)
        __sync_fetch_and_add(refs, 1);
    emit_simple(EV_VCPU_FD_DUP, tgid, tid, (s32)ret, copy.vcpu_id, copy.vcpu_uid, fk.fd);
}

// The return of a syscall that stashed something at its entry (the stash says which).
static __always_inline void syscall_exit(void *ctx, long ret)
{
    u32 zero = 0;
    u64 *n = inflight_count.lookup(&zero);
    if (!n || !*n)
        return;  // no syscall anywhere awaits its return: the common case
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    struct inflight *inf = inflight.lookup(&tid);
    if (!inf)
        return;
    u32 tgid = id >> 32;
    if (inf->op == OP_CREATE_VCPU && ret >= 0) {
        on_vcpu_created(tgid, tid, inf, (s32)ret);
    } else if (inf->op == OP_STATE_WHILE_RUNNING) {
        u64 uid = inf->vcpu_uid;
        struct vcpu_state *st = vcpu_get(uid);
        // The ioctl waited for the running KVM_RUN to drop the vCPU mutex; if that run ended
        // in a completion-needing exit (a new window), the ioctl ran inside it.
        u32 cmd = inf->cmd;
        u32 *kind = ioctl_kinds.lookup(&cmd);
        if (st && kind && st->state == VCPU_PENDING && st->seq != inf->seq)
            state_ioctl_mid(ctx, tgid, tid, inf->fd, cmd, *kind, uid, st, EV_F_AT_RETURN);
    } else if (inf->op == OP_DUP) {
        dup_done(tgid, tid, inf, ret);
    } else if (inf->op == OP_MMAP && ret >= 0) {
        u64 uid = inf->vcpu_uid;
        struct vcpu_state *st = vcpu_get(uid);
        if (st)
            st->run_addr = (u64)ret;
    }
    unstash(tid);
}

// ---- fd lifecycle: dup, close, mmap of struct kvm_run -----------------------------------------

static __always_inline void dup_enter(s32 oldfd, s32 newfd)
{
    u64 id = bpf_get_current_pid_tgid();
    struct fd_key fk = {.tgid = id >> 32, .fd = oldfd};
    struct fd_key nk = {.tgid = id >> 32, .fd = newfd};
    // Only vCPU fds matter: as source, or as a dup2 target that gets closed.
    if (!vcpu_fds.lookup(&fk) && (newfd < 0 || !vcpu_fds.lookup(&nk)))
        return;
    struct inflight inf = {.op = OP_DUP, .fd = oldfd};
    stash((u32)id, &inf);
}

static __always_inline void fcntl_enter(s32 fd, u32 cmd)
{
    // F_DUPFD and F_DUPFD_CLOEXEC duplicate; every other fcntl leaves here.
    if (cmd == F_DUPFD_NR || cmd == F_DUPFD_CLOEXEC_NR)
        dup_enter(fd, -1);
}

static __always_inline void close_enter(s32 fd)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (!procs.lookup(&tgid))  // only processes with vCPUs (or unknown vCPU fds) matter
        return;
    struct fd_key fk = {.tgid = tgid, .fd = fd};
    forget_fd(tgid, (u32)id, &fk);
    unknown_fds.delete(&fk);
}

static __always_inline void close_range_enter(s32 fd, u64 max_fd)
{
    // A range cannot be walked here; Python rescans the process's fds (procs: it has vCPUs).
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (procs.lookup(&tgid))
        emit_simple(EV_FD_RANGE_CLOSED, tgid, (u32)id, fd, 0, 0, (s64)max_fd);
}

static __always_inline void mmap_enter(s32 fd, u64 off)
{
    if (fd < 0 || off != 0)  // struct kvm_run is page 0 of the vCPU fd
        return;
    u64 id = bpf_get_current_pid_tgid();
    struct fd_key fk = {.tgid = id >> 32, .fd = fd};
    struct fd_val *fv = vcpu_fds.lookup(&fk);
    if (!fv)
        return;
    struct inflight inf = {.op = OP_MMAP, .fd = fd, .vcpu_uid = fv->vcpu_uid};
    stash((u32)id, &inf);
}

#ifdef RAW_SYSCALLS
// raw_syscalls:sys_enter(struct pt_regs *regs, long id) and sys_exit(struct pt_regs *regs,
// long ret): one program run for every syscall on the host. Per KVM_RUN that is cheaper than
// the per-syscall tracepoints' perf path; every other syscall pays for it (bench: --syscall-probes
// raw is an option, not the default). The arguments are read from the saved user
// registers: x86-64 syscall ABI (di, si, dx, r10, r8, r9) at the offsets of the UAPI
// <asm/ptrace.h> struct pt_regs (PT_REGS_*_OFF, checked against the header by the tests), one
// read from r10 to cs. cs tells a 64-bit syscall (__USER_CS) from a 32-bit one, whose numbers
// mean other calls.
struct syscall_regs {
    u64 r10, r9, r8, ax, cx, dx, si, di, orig_ax, ip, cs;
};

RAW_TRACEPOINT_PROBE(sys_enter)
{
    long nr = (long)ctx->args[1];
    if (nr != NR_IOCTL && nr != NR_CLOSE && nr != NR_DUP && nr != NR_DUP2 && nr != NR_DUP3
        && nr != NR_FCNTL && nr != NR_MMAP && nr != NR_CLOSE_RANGE)
        return 0;  // every other syscall on the host leaves here
    struct syscall_regs r;
    if (bpf_probe_read_kernel(&r, sizeof(r), (void *)(ctx->args[0] + PT_REGS_R10_OFF)))
        return 0;
    if (r.cs != USER64_CS)
        return 0;
    if (nr == NR_IOCTL)
        ioctl_enter(ctx, (s32)r.di, (u32)r.si, r.dx);
    else if (nr == NR_CLOSE)
        close_enter((s32)r.di);
    else if (nr == NR_DUP)
        dup_enter((s32)r.di, -1);
    else if (nr == NR_DUP2 || nr == NR_DUP3)
        dup_enter((s32)r.di, (s32)r.si);
    else if (nr == NR_FCNTL)
        fcntl_enter((s32)r.di, (u32)r.si);
    else if (nr == NR_MMAP)
        mmap_enter((s32)r.r8, r.r9);
    else
        close_range_enter((s32)r.di, r.si);
    return 0;
}

RAW_TRACEPOINT_PROBE(sys_exit)
{
    syscall_exit(ctx, (long)ctx->args[1]);
    return 0;
}
#else
// The per-syscall classic tracepoints (their fields are the syscall's arguments): portable,
// and the comparison point for the raw programs above (--syscall-probes classic).
TRACEPOINT_PROBE(syscalls, sys_enter_ioctl)
{
    ioctl_enter(args, (s32)args->fd, (u32)args->cmd, args->arg);
    return 0;
}

// Also attached to sys_exit_{dup,dup2,dup3,fcntl,mmap} by tracer/probes.py (SHARED_SYS_EXITS):
// every syscalls:sys_exit_* tracepoint has this one layout (__syscall_nr, long ret), checked in
// their format files before attaching. One program instead of six: a sixth of the compile and
// verification time of these (each inlines syscall_exit).
TRACEPOINT_PROBE(syscalls, sys_exit_ioctl)
{
    syscall_exit(args, args->ret);
    return 0;
}

// dup, dup2 and dup3 differ only in where their fds are (their exits: sys_exit_ioctl's program).
#define DUP_PROBES(call, oldfd, newfd)                                                         \
    TRACEPOINT_PROBE(syscalls, sys_enter_##call)                                               \
    {                                                                                          \
        dup_enter(oldfd, newfd);                                                               \
        return 0;                                                                              \
    }

DUP_PROBES(dup, (s32)args->fildes, -1)
DUP_PROBES(dup2, (s32)args->oldfd, (s32)args->newfd)
DUP_PROBES(dup3, (s32)args->oldfd, (s32)args->newfd)

TRACEPOINT_PROBE(syscalls, sys_enter_fcntl)
{
    fcntl_enter((s32)args->fd, (u32)args->cmd);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_close)
{
    close_enter((s32)args->fd);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_close_range)
{
    close_range_enter((s32)args->fd, args->max_fd);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_mmap)
{
    mmap_enter((s32)args->fd, args->off);
    return 0;
}
#endif

// ---- process lifecycle ------------------------------------------------------------------------

static __always_inline void process_gone(u32 tgid, u32 tid)
{
    struct proc_state *p = procs.lookup(&tgid);
    if (!p)
        return;
    // Windows holding a read end here too: Python judges them from their vcpus entries against
    // the final restore_gen this event carries (the map cannot be walked here).
    int held = p->held_windows > 0;
    u64 gen = p->restore_gen;
    procs.delete(&tgid);
    // The fd and vCPU entries of this process are removed by Python on this event (a hash map
    // cannot be walked here); until then nothing can reach them: the fds are gone with the
    // process, and a new process reusing the pid gets new vCPU uids from KVM_CREATE_VCPU.
    struct event *ev = new_event(EV_PROCESS_EXIT, tgid, tid);
    if (!ev)
        return;
    ev->fd = -1;
    if (held) {
        ev->flags = EV_F_HELD;
        ev->aux = (s64)gen;
    }
    events.ringbuf_submit(ev, 0);
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    if (run_threads.delete(&tid) == 0)
        maps_changed();  // a new thread reusing this tid must not hit a CPU's run_cache
    unstash(tid);
#ifdef HAVE_GROUP_DEAD
    int group_dead = args->group_dead;
#else
    int group_dead = tgid == tid;
#endif
#ifdef WATCH
    // A thread's own key goes with it; the process's (its tgid) only with the whole group,
    // after process_gone below has reported it.
    if (tid != tgid)
        watched.delete(&tid);
#endif
    if (group_dead)
        process_gone(tgid, tid);
#ifdef WATCH
    if (group_dead)
        watched.delete(&tgid);
#else
    if (group_dead)
        exec_paths.delete(&tgid);
#endif
    return 0;
}

#ifdef WATCH
TRACEPOINT_PROBE(sched, sched_process_fork)
{
    // Fired in the parent; child_pid is the new task's id (a process's, or a thread's).
    u32 parent_tgid = bpf_get_current_pid_tgid() >> 32;
    if (!watched.lookup(&parent_tgid))
        return 0;
    u32 child = args->child_pid;
    u8 one = 1;
    if (watched.update(&child, &one))
        count(C_WATCH_MAP_FULL);
    return 0;
}
#endif

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    // exec closes the O_CLOEXEC vCPU fds KVM hands out: the old VM is gone for this process.
    u64 id = bpf_get_current_pid_tgid();
    process_gone(id >> 32, (u32)id);
#ifdef WATCH
    // Which binary a watched process now runs, so its stacks can be named by build-id after
    // it exited (a test VMM often lives a few milliseconds).
    u32 tgid = id >> 32;
    if (!watched.lookup(&tgid))
        return 0;
    struct event *ev = new_exec_event(tgid, (u32)id);
    if (!ev)
        return 0;
    char *path = (char *)(ev + 1);
    path[0] = 0;
    TP_DATA_LOC_READ_STR(path, filename, EXEC_PATH_BYTES);
    events.ringbuf_submit(ev, 0);
#else
    // `run` follows every process: keep the file name until the process creates a vCPU.
    u32 zero = 0;
    struct exec_path *scratch = exec_scratch.lookup(&zero);
    if (!scratch)
        return 0;
    u32 tgid = id >> 32;
    scratch->path[0] = 0;
    TP_DATA_LOC_READ_STR(scratch->path, filename, EXEC_PATH_BYTES);
    exec_paths.update(&tgid, scratch);
#endif
    return 0;
}

// ---- guest exits and entries (x86 hardware virtualization; never fire under PVM) --------------

TRACEPOINT_PROBE(kvm, kvm_exit)
{
    struct guest_exit_key k = {.tgid = bpf_get_current_pid_tgid() >> 32,
                               .vcpu_id = args->vcpu_id, .isa = args->isa,
                               .reason = args->exit_reason};
    u64 *c = guest_exits.lookup(&k);
    if (c) {
        __sync_fetch_and_add(c, 1);
    } else {
        u64 one = 1;
        if (guest_exits.update(&k, &one))
            count(C_GUEST_EXIT_MAP_FULL);
    }
    return 0;
}

TRACEPOINT_PROBE(kvm, kvm_entry)
{
    struct vcpu_key k = {.tgid = bpf_get_current_pid_tgid() >> 32, .vcpu_id = args->vcpu_id};
    u64 *c = guest_entries.lookup(&k);
    if (c) {
        __sync_fetch_and_add(c, 1);
    } else {
        u64 one = 1;
        if (guest_entries.update(&k, &one))
            count(C_GUEST_ENTRY_MAP_FULL);
    }
    return 0;
}
