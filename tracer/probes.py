"""The BPF half: compile ``bpf/completion.c`` with bcc, attach it, read its ring buffer and maps.

This is the only module that imports bcc. Everything it hands out is plain Python: raw event
bytes (decoded by :mod:`tracer.events`) and dicts of counters.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import fcntl
import functools
import json
import mmap
import os
import re
import select
import sys
import sysconfig
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tracer import abi, bpfcache, syscall_abi, windows
from tracer.counters import HIST_SLOTS, RunState, VcpuCounters, VcpuEntry
from tracer.events import (
    EXEC_PATH_BYTES,
    MAX_EVENT_SIZE,
    USTACK_BYTES,
    USTACK_CHUNK,
    EventType,
    stack_capture_budget,
)
from tracer.handover import AdoptState
from tracer.midcounts import LostWindow, MidKey
from tracer.policy import CompletionPolicy
from tracer.syscall_abi import DEFAULT_SYSCALL_PROBES, raw_syscalls_supported
from tracer.tracefs import tracefs_root
from tracer.windows import HeldRead, InspectionKey

BPF_SOURCE_NAME: Final = "completion.c"

# enum counter in bpf/completion.c, in order after the per-event-type "lost" slots.
EVENT_TYPES: Final = 16
COUNTER_NAMES: Final = (
    "vcpu_map_full", "fd_map_full", "thread_map_full", "inflight_map_full", "proc_map_full",
    "guest_exit_map_full", "guest_entry_map_full", "unknown_fd_map_full", "access_read_failed",
    "untracked_exits", "stack_map_full", "stack_failed", "watch_map_full", "mid_map_full",
    "lost_window_map_full", "inspection_map_full", "user_stack_failed",
)
# A held read's stack top kept in the kernel (bpf/completion.c held_tops): glibc's ioctl wrapper
# keeps 0x58 bytes of frame under its return address; 256 covers it and a small caller's locals.
HELD_STACK_BYTES: Final = 256
MAX_HELD_TOPS: Final = 1024  # windows holding a read at once (LRU)
# `run`: the file names of the most recent execs on the host (LRU, 264 bytes each), kept until
# the process creates its first vCPU (a VMM does so within moments of its exec).
MAX_EXEC_PATHS: Final = 1024
# struct bpf_stack_build_id.status (<linux/bpf.h>): a frame's module resolved, or its bare ip.
BUILD_ID_VALID: Final = 1
BUILD_ID_IP: Final = 2
# Python-adopted vCPUs (found in /proc at start-up) take uids from the top half so they never
# collide with the kernel's counter. Every uid's low ProbeConfig.slot_bits name its `vcpus` slot.
ADOPTED_UID_BASE: Final = 1 << 63


@functools.cache
def _consume_holding_gil() -> Callable[[Any], int]:
    """libbcc's bpf_consume_ringbuf through a ctypes.PyDLL handle of the same library: the
    call keeps the GIL, so the Python callback it makes per record does not re-acquire it.
    It never blocks (consume, not poll)."""
    from bcc.libbcc import lib

    consume = ctypes.PyDLL(lib._name).bpf_consume_ringbuf
    consume.argtypes = [ctypes.c_void_p]
    consume.restype = ctypes.c_int
    return consume


def _mid_key(k: Any) -> MidKey:
    return MidKey(int(k.tgid), int(k.cmd), int(k.exit_reason), int(k.head), int(k.flags))


def _lost_window(k: Any, v: Any) -> LostWindow:
    return LostWindow(int(k.vcpu_uid), int(k.seq), int(v.tgid), int(v.vcpu_id),
                      int(v.exit_reason), int(v.head), int(v.flags), int(v.saves),
                      int(v.reports))


class ProbeError(RuntimeError):
    """Loading or attaching failed; the message says what and how to fix it."""


@dataclass(frozen=True)
class ProbeConfig:
    """What the operator sizes (``probes.*`` in the config); every map is bounded by it."""

    max_vcpus: int = 4096
    ringbuf_pages: int = 64  # 256 KiB: ~2300 events of 112 bytes between two polls
    trace_exits: bool = False  # one event per exit, for debugging and differential tests
    syscall_probes: str = DEFAULT_SYSCALL_PROBES  # tracer.syscall_abi: "raw" or "classic"
    guest_exits: bool = True  # kvm:kvm_exit/kvm_entry counts (one program run per guest exit)
    stacks: bool = True  # the user stack of every reported ioctl (taken only when reporting)
    max_stacks: int = 512  # stack map buckets (4 KiB each: 127 frames of build-id + offset);
    # freed as soon as Python has read them
    watch: bool = False  # follow only the processes Python puts in `watched` (and their forks)
    max_watched: int = 65536  # processes and threads of the watched tree at once
    # Where compiled probes are kept (tracer.bpfcache); None: compile at every start
    cache_dir: Path | None = None
    # The pending-time histogram times one completed window in pending_sample (a power of
    # two; 1: every window, two clock reads more per exit)
    pending_sample: int = 16

    @property
    def stack_tokens(self) -> int:
        """User stack captures allowed between two reads of the ring (tracer.events)."""
        return stack_capture_budget(self.ringbuf_pages * mmap.PAGESIZE)

    # The other maps follow max_vcpus, so one key sizes them all.
    @property
    def slot_bits(self) -> int:
        """`vcpus` is an array of 2**slot_bits slots (max_vcpus rounded up to a power of two)."""
        return max(0, (self.max_vcpus - 1).bit_length())

    @property
    def max_vcpu_fds(self) -> int:
        return 4 * self.max_vcpus  # the vCPU fd plus dups a VMM keeps (QEMU: 1, with CPR: 2)

    @property
    def max_threads(self) -> int:
        return 4 * self.max_vcpus  # vCPU threads plus threads with a vCPU ioctl in flight

    @property
    def max_mid_keys(self) -> int:
        # (process, ioctl, exit reason, access head) keys of mid_counts: a process uses a
        # handful (one per port for IO exits)
        return self.max_procs * 16

    @property
    def max_lost_windows(self) -> int:
        # windows with several reports, one lost, until Python's sweep counted them: 65536
        # (the default) holds a 30 s stalled reader under 2000 snapshots a second; allocated
        # only as used
        return 16 * self.max_vcpus

    @property
    def max_procs(self) -> int:
        return max(1024, self.max_vcpus)  # every VMM process has at least one vCPU

    @property
    def max_guest_exit_keys(self) -> int:
        return 16 * self.max_vcpus  # (vCPU, exit reason) pairs: a busy VMX guest shows ~10


def bpf_source() -> Path:
    """``bpf/completion.c`` in a source checkout, else where ``pip install`` put it."""
    here = Path(__file__).resolve().parent
    shared = Path("share") / "kvm-completion-tracer" / "bpf" / BPF_SOURCE_NAME
    # A wheel's data files land in sys.prefix, or under /usr/local for Debian's system pip.
    for candidate in (here.parent / "bpf" / BPF_SOURCE_NAME, Path(sys.prefix) / shared,
                      Path(sysconfig.get_path("data")) / shared):
        if candidate.is_file():
            return candidate
    raise ProbeError(f"BPF source {BPF_SOURCE_NAME} not found next to the package or under "
                     f"{sys.prefix}/share/kvm-completion-tracer/bpf: reinstall the package")


def _tracepoint_exists(category: str, event: str) -> bool:
    root = tracefs_root()
    return root is not None and (root / "events" / category / event).is_dir()


def user_page_size() -> int:
    """The page size of user memory (a power of two of at least USTACK_CHUNK bytes): the
    stack copy stops at the first page that is not present."""
    size = os.sysconf("SC_PAGE_SIZE")
    return size if size >= USTACK_CHUNK and not size & (size - 1) else USTACK_CHUNK


def user_stack_capture_supported(release: str | None = None,
                                 btf: Path = Path("/sys/kernel/btf/vmlinux")) -> bool:
    """bpf_task_pt_regs and bpf_get_current_task_btf: kernel >= 5.15 with BTF. Without them
    stacks come from the kernel's frame-pointer walk alone (docs/stacks.md)."""
    found = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    if found is None:
        return False
    return (int(found[1]), int(found[2])) >= (5, 15) and btf.exists()


def _has_field(category: str, event: str, field_name: str) -> bool:
    root = tracefs_root()
    if root is None:
        return False
    try:
        text = (root / "events" / category / event / "format").read_text()
    except OSError:
        return False
    return f" {field_name};" in text


def cflags(config: ProbeConfig) -> list[str]:
    """Every constant the C side needs, from :mod:`tracer.abi` and the config."""
    defs: dict[str, int | str] = {
        "KVMIO_TYPE": abi.KVMIO,
        "KVM_RUN_NR": f"{abi.KVM_RUN:#x}u",
        "KVM_CREATE_VCPU_NR": f"{abi.KVM_CREATE_VCPU:#x}u",
        "KVM_ENABLE_CAP_NR": f"{abi.KVM_ENABLE_CAP:#x}u",
        "KVM_CAP_DISABLE_QUIRKS_NR": abi.KVM_CAP_DISABLE_QUIRKS,
        "KVM_CAP_DISABLE_QUIRKS2_NR": abi.KVM_CAP_DISABLE_QUIRKS2,
        "QUIRK_OUT_7E_INC_RIP": f"{abi.KVM_X86_QUIRK_OUT_7E_INC_RIP:#x}ULL",
        "KVM_RUN_IMMEDIATE_EXIT_OFF": abi.KVM_RUN_LAYOUT.immediate_exit,
        "KVM_RUN_UNION_OFF": abi.KVM_RUN_LAYOUT.exit_union,
        "F_DUPFD_NR": fcntl.F_DUPFD,
        "F_DUPFD_CLOEXEC_NR": fcntl.F_DUPFD_CLOEXEC,
        "ACCESS_BYTES": abi.ACCESS_BYTES,
        "MAX_EXIT_REASON": abi.MAX_EXIT_REASON,
        "EINTR_ERRNO": f"({abi.EINTR_ERRNO})",
        "HIST_SLOTS": HIST_SLOTS,
        "MAX_VCPUS": config.max_vcpus,
        "VCPU_SLOTS": 1 << config.slot_bits,
        "VCPU_SLOT_BITS": config.slot_bits,
        "VCPU_SLOT_MASK": f"{(1 << config.slot_bits) - 1:#x}u",
        "PENDING_SAMPLE": config.pending_sample,
        "MAX_VCPU_FDS": config.max_vcpu_fds,
        "MAX_THREADS": config.max_threads,
        "MAX_PROCS": config.max_procs,
        "MAX_MID_KEYS": config.max_mid_keys,
        "MAX_LOST_WINDOWS": config.max_lost_windows,
        "KVM_EXIT_IO_NR": abi.KVM_EXIT_IO,
        "KVM_EXIT_HYPERV_NR": abi.KVM_EXIT_HYPERV,
        "MAX_GUEST_EXIT_KEYS": config.max_guest_exit_keys,
        "RINGBUF_PAGES": config.ringbuf_pages,
    }
    if config.stacks:
        defs.update(STACKS=1, MAX_STACKS=config.max_stacks, STACK_ERR_EXIST=f"(-{errno.EEXIST})",
                    USTACK_BYTES=USTACK_BYTES, USTACK_CHUNK=USTACK_CHUNK,
                    USER_PAGE_SIZE=user_page_size())
        if user_stack_capture_supported():
            defs.update(USER_STACK_CAPTURE=1,
                        PT_REGS_IP_IDX=syscall_abi.PT_REGS_IP_SP_OFFSETS["rip"] // 8,
                        PT_REGS_SP_IDX=syscall_abi.PT_REGS_IP_SP_OFFSETS["rsp"] // 8,
                        HELD_STACK_BYTES=HELD_STACK_BYTES, MAX_HELD_TOPS=MAX_HELD_TOPS)
    defs["EXEC_PATH_BYTES"] = EXEC_PATH_BYTES
    if config.watch:
        defs.update(WATCH=1, MAX_WATCHED=config.max_watched)
    else:
        defs["MAX_EXEC_PATHS"] = MAX_EXEC_PATHS
    flags = [f"-D{k}={v}" for k, v in defs.items()]
    if _has_field("sched", "sched_process_exit", "group_dead"):
        flags.append("-DHAVE_GROUP_DEAD")
    if config.trace_exits:
        flags.append("-DTRACE_EXITS")
    if config.syscall_probes == "raw":
        if not raw_syscalls_supported():
            raise ProbeError("raw syscall probes know the x86-64 syscall ABI only: use "
                             "--syscall-probes classic on this machine")
        flags.append("-DRAW_SYSCALLS")
        flags += [f"-D{k}={v}" for k, v in syscall_abi.cflags().items()]
    return flags


GUEST_EXIT_PROBES: Final = ("kvm:kvm_exit", "kvm:kvm_entry")


def _without_guest_exit_probes(source: str, wanted: bool) -> tuple[str, list[str]]:
    """kvm_exit/kvm_entry are x86-only: drop their programs where the kernel lacks them, or
    when the operator turned guest-exit counting off (``probes.guest_exits = false``)."""
    skipped = []
    for probe in GUEST_EXIT_PROBES:
        category, event = probe.split(":")
        if not wanted or not _tracepoint_exists(category, event):
            marker = f"TRACEPOINT_PROBE({category}, {event})"
            start = source.find(marker)
            end = source.find("\n}\n", start)
            if start >= 0 and end >= 0:
                source = source[:start] + source[end + 3:]
                skipped.append(probe)
    return source, skipped


CLASSIC_SYSCALL_PROBES: Final = (
    "syscalls:sys_enter_ioctl", "syscalls:sys_exit_ioctl",
    "syscalls:sys_enter_dup", "syscalls:sys_exit_dup",
    "syscalls:sys_enter_dup2", "syscalls:sys_exit_dup2",
    "syscalls:sys_enter_dup3", "syscalls:sys_exit_dup3",
    "syscalls:sys_enter_fcntl", "syscalls:sys_exit_fcntl",
    "syscalls:sys_enter_close", "syscalls:sys_enter_close_range",
    "syscalls:sys_enter_mmap", "syscalls:sys_exit_mmap",
)
RAW_SYSCALL_PROBES: Final = ("raw:sys_enter", "raw:sys_exit")
# syscalls:sys_exit_* tracepoints that run sys_exit_ioctl's program (bpf/completion.c): one
# program for six hooks, so a sixth of their compile and verification time.
SHARED_EXIT_PROGRAM: Final = b"tracepoint__syscalls__sys_exit_ioctl"
SHARED_SYS_EXITS: Final = ("dup", "dup2", "dup3", "fcntl", "mmap")


def _ret_field(call: str) -> str | None:
    """The ``ret`` field line of a syscalls:sys_exit_CALL format (offset, size, sign)."""
    root = tracefs_root()
    if root is None:
        return None
    try:
        text = (root / "events" / "syscalls" / f"sys_exit_{call}" / "format").read_text()
    except OSError:
        return None
    return next((line.strip() for line in text.splitlines() if " ret;" in line), None)


def _shared_exit_mismatch() -> str | None:
    """A sys_exit tracepoint whose ``ret`` is not where sys_exit_ioctl's is (the shared
    program would read garbage there), or None when they all agree."""
    want = _ret_field("ioctl")
    for call in SHARED_SYS_EXITS:
        got = _ret_field(call)
        if got != want:
            return f"syscalls:sys_exit_{call} has '{got}', sys_exit_ioctl '{want}'"
    return None


def expected_probes(syscall_probes: str = DEFAULT_SYSCALL_PROBES,
                    guest_exits: bool = True, watch: bool = False) -> tuple[str, ...]:
    """Every probe the programs attach, for one kind of syscall probes."""
    syscalls = RAW_SYSCALL_PROBES if syscall_probes == "raw" else CLASSIC_SYSCALL_PROBES
    return ("raw:kvm_userspace_exit", *syscalls, "sched:sched_process_exit",
            "sched:sched_process_exec", *(("sched:sched_process_fork",) if watch else ()),
            *(GUEST_EXIT_PROBES if guest_exits else ()))


BCC_FIX: Final = ("apt-get install python3-bpfcc and use /usr/bin/python3 (or a venv made "
                  "with --system-site-packages)")


def bcc_import_error() -> str | None:
    """Why bcc cannot be imported, or None when it can (imported lazily: tests and the
    preflight run without it)."""
    try:
        import bcc  # noqa: F401  (the project's one bcc import site, with Probes below)
    except ImportError as err:
        return str(err)
    return None


def bcc_version() -> str:
    try:
        import bcc

        return str(getattr(bcc, "__version__", "unknown"))
    except ImportError:
        return "unavailable"


def _c_string(raw: Any) -> str:
    return bytes(raw).split(b"\0", 1)[0].decode("utf-8", "replace")


def _release_compile_heap() -> None:
    """Give clang/LLVM's freed compile-time heap back to the kernel. glibc keeps freed memory
    for reuse, and nothing after the one compile reuses it: measured here, the probes alone
    go from ~55 to ~30 MiB of anonymous memory (the daemon's RssAnon after start: ~38 MiB).
    The ~85 MiB of LLVM's library text that the compile touched stays in RSS as shared, clean
    page cache."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to give back
        ctypes.CDLL(None).malloc_trim(0)


def _fdinfo(fd: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        name, _, value = line.partition(":")
        with contextlib.suppress(ValueError):
            out[name.strip()] = int(value.strip(), 0)
    return out


def _prog_type(name: bytes) -> int:
    from bcc import BPF

    return int(BPF.RAW_TRACEPOINT if name.startswith(b"raw_tracepoint__") else BPF.TRACEPOINT)


def _export(bpf: Any) -> bpfcache.CompiledProbes:
    """What a compile produced, for the cache: maps (kernel attributes from fdinfo, bcc's type
    descriptions), every loaded program's instructions and what each is attached to."""
    from bcc.libbcc import lib

    lib.bpf_num_tables.restype, lib.bpf_num_tables.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    maps = []
    for i in range(lib.bpf_num_tables(bpf.module)):
        name = lib.bpf_table_name(bpf.module, i)
        fd = lib.bpf_table_fd(bpf.module, name)
        info = _fdinfo(fd)
        maps.append(bpfcache.MapSpec(
            name.decode(), info["map_type"], info["key_size"], info["value_size"],
            info["max_entries"], info["map_flags"],
            (lib.bpf_table_key_desc(bpf.module, name) or b"").decode(),
            (lib.bpf_table_leaf_desc(bpf.module, name) or b"").decode(), fd))
    programs = tuple(bpfcache.ProgramSpec(name.decode(), _prog_type(name), bpf.dump_func(name))
                     for name in bpf.funcs)
    attachments = []
    for tp in bpf.tracepoint_fds:
        own = b"tracepoint__" + tp.replace(b":", b"__")
        fn = own if own in bpf.funcs else SHARED_EXIT_PROGRAM
        attachments.append(bpfcache.Attachment("tracepoint", tp.decode(), fn.decode()))
    attachments += [bpfcache.Attachment("raw_tracepoint", tp.decode(),
                                        f"raw_tracepoint__{tp.decode()}")
                    for tp in bpf.raw_tracepoint_fds]
    return bpfcache.CompiledProbes(tuple(maps), programs, tuple(attachments),
                                   lib.bpf_module_license(bpf.module).decode(),
                                   int(lib.bpf_module_kern_version(bpf.module)))


def _table(bpf: Any, map_id: int, spec: bpfcache.MapSpec, fd: int) -> Any:
    """bcc's table object for a map made from the cache (bcc asks its module, which a cached
    load has none of, for type, flags and size: set from the spec)."""
    from bcc import BPF
    from bcc import table as t

    leaf = BPF._decode_table_type(json.loads(spec.leaf_desc))
    if spec.map_type == t.BPF_MAP_TYPE_QUEUE:
        table = t.QueueStack(bpf, map_id, fd, leaf)
    else:
        classes = {t.BPF_MAP_TYPE_HASH: t.HashTable, t.BPF_MAP_TYPE_ARRAY: t.Array,
                   t.BPF_MAP_TYPE_PERCPU_ARRAY: t.PerCpuArray,
                   t.BPF_MAP_TYPE_LRU_HASH: t.LruHash, t.BPF_MAP_TYPE_STACK_TRACE: t.StackTrace,
                   t.BPF_MAP_TYPE_RINGBUF: t.RingBuf}
        if spec.map_type not in classes:
            raise bpfcache.CacheError(f"map {spec.name}: type {spec.map_type} not supported")
        key = BPF._decode_table_type(json.loads(spec.key_desc))
        table = classes[spec.map_type](bpf, map_id, fd, key, leaf, spec.name.encode())
    table.ttype, table.flags, table.max_entries = spec.map_type, spec.flags, spec.max_entries
    return table


def _load_cached(compiled: bpfcache.CompiledProbes) -> Any:
    """A bcc BPF object over maps and programs made from the cache, attached like a compile
    attaches them: the rest of this module cannot tell the two apart."""
    from bcc import BPF

    bpf = BPF.__new__(BPF)
    # What BPF.__init__ sets up before it compiles (bcc 0.26); no module.
    for name in ("kprobe_fds", "uprobe_fds", "tracepoint_fds", "raw_tracepoint_fds",
                 "kfunc_entry_fds", "kfunc_exit_fds", "lsm_fds", "perf_buffers",
                 "open_perf_events", "funcs", "tables"):
        setattr(bpf, name, {})
    bpf._ringbuf_manager, bpf.tracefile, bpf.debug, bpf.module = None, None, 0, None
    bpf.cached_map_fds = []
    try:
        fds: dict[int, int] = {}
        for map_id, spec in enumerate(compiled.maps):
            fd = bpfcache.create_map(spec)
            bpf.cached_map_fds.append(fd)
            fds[spec.compiled_fd] = fd
            bpf.tables[spec.name.encode()] = _table(bpf, map_id, spec, fd)
        for prog in compiled.programs:
            fd = bpfcache.load_program(prog, bpfcache.relocate(prog.insns, fds),
                                       compiled.license, compiled.kern_version)
            bpf.funcs[prog.name.encode()] = BPF.Function(bpf, prog.name.encode(), fd)
        for a in compiled.attachments:
            if a.kind == "tracepoint":
                bpf.attach_tracepoint(tp=a.target.encode(), fn_name=a.program.encode())
            else:
                bpf.attach_raw_tracepoint(tp=a.target.encode(), fn_name=a.program.encode())
    except BaseException:
        _close_bpf(bpf)
        raise
    atexit.register(bpf.cleanup)
    return bpf


def _close_bpf(bpf: Any) -> None:
    bpf.cleanup()
    for fd in getattr(bpf, "cached_map_fds", []):
        with contextlib.suppress(OSError):
            os.close(fd)
    bpf.cached_map_fds = []


def _tracepoint_formats(probes: Iterable[str]) -> dict[str, str]:
    """The format files of the (classic) tracepoints the programs read fields of."""
    root = tracefs_root()
    out = {}
    for probe in probes:
        if probe.startswith("raw:"):
            continue
        category, event = probe.split(":")
        try:
            out[probe] = (root / "events" / category / event / "format").read_text() \
                if root is not None else ""
        except OSError:
            out[probe] = ""
    return out


class Probes:
    """Loaded and attached BPF programs; :meth:`close` detaches them."""

    def __init__(self, policy: CompletionPolicy, config: ProbeConfig | None = None) -> None:
        self.config = config or ProbeConfig()
        missing = bcc_import_error()
        if missing is not None:
            raise ProbeError(f"cannot import bcc ({missing}): {BCC_FIX}")
        from bcc import BPF
        source, self.skipped = _without_guest_exit_probes(
            bpf_source().read_text(), self.config.guest_exits)
        mismatch = (_shared_exit_mismatch() if self.config.syscall_probes != "raw"
                    else None)
        if mismatch is not None:
            raise ProbeError(f"the syscall exit tracepoints differ on this kernel ({mismatch}): "
                             "use --syscall-probes raw")
        flags = cflags(self.config)
        # How the programs came: "loaded from the cache", "compiled" (and cached, or why not),
        # "compiled (no cache)"; for the ready line.
        self.origin = "compiled (no cache)"
        self._cache_unused = False
        cache = self._cache_file(source, flags)
        self._bpf: Any = self._from_cache(cache) if cache is not None else None
        if self._bpf is None:
            with _captured_stderr() as diagnostics:
                try:
                    # bcc attaches every TRACEPOINT_PROBE/RAW_TRACEPOINT_PROBE while loading.
                    self._bpf = BPF(text=source.encode(), cflags=flags)
                    if self.config.syscall_probes != "raw":
                        self._attach_shared_exits()
                except Exception as err:  # bcc raises bare Exception for compile/load/attach
                    failure: Exception | None = err
                else:
                    failure = None
            if failure is not None:
                raise ProbeError(_explain_load_failure(failure, diagnostics.text())) from None
            if cache is not None:
                self._save_cache(cache)
            _release_compile_heap()
        self._ring_poller: select.poll | None = None  # set by on_event
        # (ustack_tokens, key 0, the refill leaf), with capture
        self._stack_tokens: tuple[Any, Any, Any] | None = None
        self._closed = False
        self._adopted = 0  # vCPUs adopted so far: the counter in their uids
        self._slot_mask = (1 << self.config.slot_bits) - 1
        self._vcpu_read_lock = threading.Lock()
        self._vcpu_buf: tuple[Any, Any] | None = None
        self._fill_free_slots()
        self.python_map_full: Counter[str] = Counter()  # inserts from Python that failed
        self.set_policy(policy)

    # ---- the compile cache (tracer.bpfcache) ---------------------------------------------------
    def _cache_file(self, source: str, flags: list[str]) -> Path | None:
        if self.config.cache_dir is None:
            return None
        probes = expected_probes(self.config.syscall_probes, self.config.guest_exits,
                                 self.config.watch)
        key = bpfcache.cache_key(source, flags, bcc_version(), _tracepoint_formats(probes))
        return bpfcache.cache_path(self.config.cache_dir, key)

    def _from_cache(self, path: Path) -> Any:
        try:
            compiled = bpfcache.load(path)
            if compiled is None:
                return None
            with _captured_stderr():  # libbcc's attach complaints: the compile says it again
                bpf = _load_cached(compiled)
        except Exception as err:  # bcc's attach raises bare Exception; OSError, CacheError
            self.origin = f"compiled (cache {path} not used: {err})"
            self._cache_unused = True
            return None
        self.origin = "loaded from the cache"
        return bpf

    def _save_cache(self, path: Path) -> None:
        try:
            bpfcache.save(path, _export(self._bpf))
        except (OSError, KeyError, ValueError) as err:
            self.origin = f"compiled (not cached: {err})"
        else:
            self.origin = (self.origin[:-1] + "; replaced)" if self._cache_unused
                           else "compiled")

    def _attach_shared_exits(self) -> None:
        for call in SHARED_SYS_EXITS:
            self._bpf.attach_tracepoint(tp=f"syscalls:sys_exit_{call}", fn_name=SHARED_EXIT_PROGRAM)

    # ---- policy into maps ----------------------------------------------------------------------
    def set_policy(self, policy: CompletionPolicy) -> None:
        pending = self._bpf[b"pending_exits"]
        for reason in range(abi.MAX_EXIT_REASON):
            pending[ctypes.c_int(reason)] = ctypes.c_uint8(1 if policy.leaves_pending(reason)
                                                           else 0)
        kinds = self._bpf[b"ioctl_kinds"]
        for number, value in windows.kind_values(policy).items():
            kinds[ctypes.c_uint32(number)] = ctypes.c_uint32(value)

    # ---- attach state --------------------------------------------------------------------------
    def attached(self) -> list[str]:
        """What bcc actually holds open, as ``category:event`` (``raw:`` for raw tracepoints)."""
        raw = [f"raw:{name.decode()}" for name in self._bpf.raw_tracepoint_fds]
        return raw + sorted(name.decode() for name in self._bpf.tracepoint_fds)

    def missing(self) -> list[str]:
        """Expected probes that are not attached (besides those the kernel lacks)."""
        have = set(self.attached())
        return [p for p in self.expected() if p not in have]

    def expected(self) -> list[str]:
        """The probes these programs need on this kernel."""
        return [p for p in expected_probes(self.config.syscall_probes,
                                           watch=self.config.watch)
                if p not in self.skipped]

    # ---- events --------------------------------------------------------------------------------
    def on_event(self, handler: Callable[[bytes], None]) -> None:
        def _callback(_ctx: Any, data: Any, size: int) -> None:
            handler(ctypes.string_at(data, min(size, MAX_EVENT_SIZE)))

        ring = self._bpf[b"events"]
        ring.open_ring_buffer(_callback)
        self._ring_poller = select.poll()
        if self.config.stacks:
            try:
                tokens = self._bpf[b"ustack_tokens"]
            except KeyError:  # no capture on this kernel (user_stack_capture_supported)
                tokens = None
            if tokens is not None:
                self._stack_tokens = (tokens, tokens.Key(0),
                                      tokens.Leaf(self.config.stack_tokens))
                self._refill_stack_tokens()
        self._ring_poller.register(ring.map_fd, select.POLLIN)

    def poll(self, timeout_ms: int) -> None:
        """Wait (GIL released) until the ring buffer has records, then hand them all to the
        handler under one hold of the GIL. bcc's ring_buffer_poll releases the GIL for the
        wait and so makes every record's ctypes callback take it again: with another thread
        busy (a scrape formatting the exposition) each record then waited up to a switch
        interval, and a flood fell seconds behind. The ring's map fd is pollable (readable
        while records are unconsumed, <linux/bpf.h> ring buffer maps), so the wait needs no
        libbpf call."""
        if self._ring_poller is not None and self._ring_poller.poll(timeout_ms):
            _consume_holding_gil()(self._bpf._ringbuf_manager)
        self._refill_stack_tokens()

    def _refill_stack_tokens(self) -> None:
        """The ring was read: ``config.stack_tokens`` more user stack captures may go in."""
        if self._stack_tokens is None:
            return
        table, key, leaf = self._stack_tokens
        table[key] = leaf

    # ---- map maintenance from Python -----------------------------------------------------------
    def adopt_vcpu(self, pid: int, fd: int, vcpu_id: int, run_addr: int | None,
                   uid: int | None = None, start: AdoptState | None = None) -> int | None:
        """Track a vCPU fd created before the probes attached; returns its uid, None if known.
        ``start``: its run state as re-learned from /proc (tracer.handover); default idle.
        A vcpu_state is written once, before its fd makes it reachable: the probes own it from
        then on (Python changes only vcpu_refs)."""
        fds = self._bpf[b"vcpu_fds"]
        key = fds.Key(pid, fd)
        if key in fds:
            return None
        refs = self._bpf[b"vcpu_refs"]
        new = uid is None
        if uid is None:
            slot = self._take_slot()
            if slot is None:
                return None
            self._adopted += 1
            uid = ADOPTED_UID_BASE | (self._adopted << self.config.slot_bits) | slot
            vcpus = self._bpf[b"vcpus"]
            leaf = vcpus.Leaf()
            leaf.uid, leaf.tgid, leaf.vcpu_id = uid, pid, vcpu_id
            leaf.run_addr = run_addr or 0
            if start is not None and start.state:
                leaf.state, leaf.exit_reason, leaf.run_tid = (start.state, start.exit_reason,
                                                              start.run_tid)
                leaf.pending_since = start.pending_since_ns
                leaf.seq = 1 if start.state == RunState.PENDING else 0
            vcpus[ctypes.c_int(slot)] = leaf  # an array slot: cannot fail
            if not self._put("vcpu", refs, ctypes.c_uint64(uid), ctypes.c_uint32(1)):
                self.release_vcpus({uid})
                return None
            # The thread's next exit (RUNNING) must land on this vCPU.
            if start is not None and start.run_tid and not self._put(
                    "thread", self._bpf[b"run_threads"], ctypes.c_uint32(start.run_tid),
                    ctypes.c_uint64(uid)):
                self.release_vcpus({uid})
                return None
        else:
            self._add_ref(uid, +1)
        if not self._put("fd", fds, key, fds.Leaf(uid, vcpu_id, 0)):
            self.release_vcpus({uid}) if new else self._add_ref(uid, -1)
            return None
        self._maps_changed()
        procs = self._bpf[b"procs"]
        pkey = procs.Key(pid)
        # Its exit must be reported so its entries get dropped, and the probes look at close()
        # only for processes there: without it the vCPU cannot be followed.
        if procs.get(pkey) is None and not self._put("proc", procs, pkey, procs.Leaf()):
            fds.pop(key, None)
            self.release_vcpus({uid}) if new else self._add_ref(uid, -1)
            return None
        return uid

    def _maps_changed(self) -> None:
        """vcpu_fds or run_threads changed from here: invalidate the CPUs' run_cache (see
        bpf/completion.c, map_gen). Python cannot add atomically: a step far larger than the
        kernel's +1 makes the new value differ from every generation a cache holds, even if a
        kernel increment is lost in between."""
        gen = self._bpf[b"map_gen"]
        key = ctypes.c_int(0)
        gen[key] = ctypes.c_uint64((gen[key].value + (1 << 32)) & ((1 << 64) - 1))

    def _add_ref(self, uid: int, delta: int) -> int:
        """Change a vCPU's fd count; returns the new count (0: no entry)."""
        refs = self._bpf[b"vcpu_refs"]
        key = ctypes.c_uint64(uid)
        leaf = refs.get(key)
        if leaf is None:
            return 0
        count = max(0, int(leaf.value) + delta)
        refs[key] = ctypes.c_uint32(count)
        return count

    def _put(self, which: str, table: Any, key: Any, leaf: Any) -> bool:
        """A map insert from Python; a full map is counted (``<which>_map_full``) like the
        kernel's own failed inserts: it costs tracking that vCPU, not the daemon."""
        try:
            table[key] = leaf
        except Exception:  # bcc raises a bare Exception ("Could not update table: ...")
            self.python_map_full[which] += 1
            return False
        return True

    def forget_process(self, pid: int, uids: set[int]) -> dict[int, VcpuCounters]:
        """Drop the map entries of an exited process: only its own vCPUs (``uids``), since a
        new process may already have reused the pid. Returns the statistics of those that
        were still in the map."""
        fds = self._bpf[b"vcpu_fds"]
        for key in [k for k, v in fds.items() if k.tgid == pid and v.vcpu_uid in uids]:
            fds.pop(key, None)
        self._maps_changed()
        for name in (b"unknown_fds", b"guest_exits", b"guest_entries"):
            table = self._bpf[name]
            for key in [k for k in table if k.tgid == pid]:
                table.pop(key, None)
        # The kernel drops the process's entry at its exit; one adopted after that (its
        # UNKNOWN_FD handled once it had exited, e.g. a forked child holding inherited vCPU
        # fds) would stay. Kept when the pid already runs a new VMM with vCPUs or quirks.
        procs, pkey = self._bpf[b"procs"], self._bpf[b"procs"].Key(pid)
        leaf = procs.get(pkey)
        if (leaf is not None and not leaf.quirks_disabled
                and not any(k.tgid == pid for k in fds)):
            procs.pop(pkey, None)
        return self.release_vcpus(uids)

    def release_vcpus(self, uids: set[int]) -> dict[int, VcpuCounters]:
        """Read the statistics of these vCPUs and free their slots (closed or gone)."""
        vcpus, refs = self._bpf[b"vcpus"], self._bpf[b"vcpu_refs"]
        out = {}
        for uid in uids:
            slot = ctypes.c_int(uid & self._slot_mask)
            leaf = vcpus[slot]
            if uid and leaf.uid == uid:  # else already released (and maybe reused)
                out[uid] = _counters_of(leaf)
                vcpus[slot] = vcpus.Leaf()
                self._bpf[b"free_slots"].push(ctypes.c_uint32(slot.value))
            refs.pop(ctypes.c_uint64(uid), None)
        return out

    def _fill_free_slots(self) -> None:
        queue = self._bpf[b"free_slots"]
        for slot in range(1 << self.config.slot_bits):
            queue.push(ctypes.c_uint32(slot))

    def _take_slot(self) -> int | None:
        try:
            return int(self._bpf[b"free_slots"].pop().value)
        except KeyError:  # empty: every slot holds a vCPU
            self.python_map_full["vcpu"] += 1
            return None

    def _live_vcpus(self) -> list[tuple[int, Any]]:
        """(uid, state) of every slot in use: the whole array in one BPF_MAP_LOOKUP_BATCH
        into buffers kept for it, the used slots found by their uid without a Python object per
        slot, and only those copied out. A scrape holds the tracker's lock, and the GIL that
        every ring-buffer callback needs: allocating ~4 MB per read, or an object per slot,
        delayed alerts by 100-200 ms under a scrape storm."""
        from bcc.libbcc import lib

        vcpus = self._bpf[b"vcpus"]
        n = 1 << self.config.slot_bits
        with self._vcpu_read_lock:  # a scrape and the sweep may read at once
            if self._vcpu_buf is None:
                self._vcpu_buf = ((ctypes.c_uint32 * n)(), (vcpus.Leaf * n)())
            keys, values = self._vcpu_buf
            count, out_batch = ctypes.c_uint32(n), ctypes.c_uint32(0)
            res = lib.bpf_lookup_batch(vcpus.map_fd, None, ctypes.byref(out_batch),
                                       ctypes.byref(keys), ctypes.byref(values),
                                       ctypes.byref(count))
            if (res != 0 and ctypes.get_errno() != errno.ENOENT) or count.value != n:
                return [(int(st.uid), st) for _key, st in vcpus.items() if st.uid]  # no batch
            # uid is the first u64 of struct vcpu_state
            uids = memoryview(values).cast("B").cast("Q")[::ctypes.sizeof(vcpus.Leaf) // 8]
            return [(uid, vcpus.Leaf.from_buffer_copy(values[i]))
                    for i, uid in enumerate(uids) if uid]

    def forget_fd(self, pid: int, fd: int) -> VcpuCounters | None:
        """An fd closed behind the probes' back (close_range): drop it like close() would.
        When it was the vCPU's last fd, the vCPU goes too and its statistics are returned."""
        fds = self._bpf[b"vcpu_fds"]
        key = fds.Key(pid, fd)
        leaf = fds.get(key)
        if leaf is None:
            return None
        fds.pop(key, None)
        self._maps_changed()
        if self._add_ref(leaf.vcpu_uid, -1) > 0:
            return None
        return self.release_vcpus({leaf.vcpu_uid}).get(leaf.vcpu_uid)

    def tracked_fds(self, pid: int) -> dict[int, int]:
        """fd -> vcpu uid for one process, as the probes see it."""
        return {k.fd: v.vcpu_uid for k, v in self._bpf[b"vcpu_fds"].items() if k.tgid == pid}

    def vcpu_states(self) -> list[dict[str, int]]:
        out = []
        for uid, st in self._live_vcpus():
            out.append({"uid": uid, "pid": st.tgid, "vcpu_id": st.vcpu_id,
                        "state": st.state, "exit_reason": st.exit_reason, "seq": st.seq,
                        "pending_since_ns": st.pending_since, "run_tid": st.run_tid,
                        "run_addr": st.run_addr})
        return out

    def mid_counts(self) -> dict[MidKey, int]:
        """Every mid-completion state ioctl the kernel reported, by tracer.midcounts.MidKey."""
        return {_mid_key(k): int(v.value) for k, v in self._bpf[b"mid_counts"].items()}

    def take_mid_counts(self, pid: int) -> dict[MidKey, int]:
        """A gone process's mid_counts, deleted from the map."""
        table = self._bpf[b"mid_counts"]
        out = {}
        for key in [k for k in table if k.tgid == pid]:
            value = table.get(key)
            if value is not None:
                out[_mid_key(key)] = int(value.value)
            table.pop(key, None)
        return out

    def inspections(self) -> dict[InspectionKey, int]:
        """Inspections the kernel counted (tracer.windows), by (pid, ioctl, exit reason)."""
        return {InspectionKey(int(k.tgid), int(k.cmd), int(k.exit_reason)): int(v.value)
                for k, v in self._bpf[b"inspections"].items()}

    def take_inspections(self, pid: int) -> dict[InspectionKey, int]:
        """A gone process's inspections, deleted from the map."""
        table = self._bpf[b"inspections"]
        out = {}
        for key in [k for k in table if k.tgid == pid]:
            value = table.get(key)
            if value is not None:
                out[InspectionKey(pid, int(key.cmd), int(key.exit_reason))] = int(value.value)
            table.pop(key, None)
        return out

    def held_reads(self, pid: int) -> list[HeldRead]:
        """The windows of ``pid``'s vCPUs still holding a read (read before they are released
        at its exit)."""
        return [HeldRead(uid, int(st.tgid), int(st.vcpu_id), int(st.held_tid), int(st.held_fd),
                         int(st.held_cmd), int(st.held_n), int(st.exit_reason), int(st.seq),
                         int(st.pending_since), int(st.held_ts), int(st.held_gen))
                for uid, st in self._live_vcpus()
                if st.tgid == pid and st.held_cmd and st.state == RunState.PENDING]

    def lost_windows(self) -> list[LostWindow]:
        """The windows that lost a report to a full ring buffer, not yet taken."""
        return [_lost_window(k, v) for k, v in self._bpf[b"lost_windows"].items()]

    def take_lost_window(self, vcpu_uid: int, seq: int) -> LostWindow | None:
        """One window's lost_windows entry, deleted from the map (None: it lost nothing)."""
        table = self._bpf[b"lost_windows"]
        key = table.Key(vcpu_uid, seq)
        value = table.get(key)
        if value is None:
            return None
        table.pop(key, None)
        return _lost_window(key, value)

    def vcpu_comms(self) -> dict[int, str]:
        """pid -> the comm the kernel kept at vCPU creation (for VMs gone before Python named
        them)."""
        out = {}
        for _uid, st in self._live_vcpus():
            comm = _c_string(st.comm)
            if comm:
                out[st.tgid] = comm
        return out

    def vcpu_entries(self) -> list[VcpuEntry]:
        """Every vCPU entry with its statistics (what a scrape reads)."""
        return [VcpuEntry(uid, st.tgid, st.vcpu_id, st.state, _counters_of(st),
                          int(st.pending_since), _c_string(st.comm))
                for uid, st in self._live_vcpus()]

    # ---- stacks and the watched tree -----------------------------------------------------------
    def take_stack(self, stack_id: int) -> list[tuple[str | None, int]] | None:
        """The user stack of a reported ioctl, innermost first, and free its bucket: per frame
        (build-id, file offset) as the kernel resolved it, or (None, address) where it could
        not; None when stacks are off or the id is unknown."""
        if not self.config.stacks or stack_id < 0:
            return None
        table = self._bpf[b"stacks"]
        key = table.Key(stack_id)
        try:
            leaf = table[key]
        except KeyError:
            return None
        frames: list[tuple[str | None, int]] = []
        for entry in leaf.trace:  # struct bpf_stack_build_id
            if entry.status == BUILD_ID_VALID:
                frames.append((bytes(entry.build_id).hex(), int(entry.offset)))
            elif entry.status == BUILD_ID_IP and entry.ip:
                frames.append((None, int(entry.ip)))
            else:
                break
        with contextlib.suppress(KeyError):
            del table[key]
        return frames

    def watch(self, pid: int, on: bool) -> None:
        """Put ``pid`` into (or take it out of) the watched tree; its forks follow it."""
        table = self._bpf[b"watched"]
        key = table.Key(pid)
        if on:
            if not self._put("watch", table, key, table.Leaf(1)):
                raise ProbeError("the watched-process map is full (probes.max_watched)")
        else:
            table.pop(key, None)

    # ---- counters ------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        table = self._bpf[b"counters"]
        totals = [int(table.sum(table.Key(i)).value)
                  for i in range(EVENT_TYPES + len(COUNTER_NAMES))]
        out = {name: totals[EVENT_TYPES + i] for i, name in enumerate(COUNTER_NAMES)}
        for which, n in self.python_map_full.items():
            out[f"{which}_map_full"] += n
        for etype in EventType:
            if etype is not EventType.USER_STACK:
                out[f"lost_{etype.name.lower()}"] = totals[int(etype)]
        # A USER_STACK record not sent (ring full, or no capture left until the next read)
        # loses a report's stack, not an event: watch's stacks_missed, not events_lost.
        out["user_stack_dropped"] = totals[int(EventType.USER_STACK)]
        out["events_lost"] = sum(totals[:EVENT_TYPES]) - totals[int(EventType.USER_STACK)]
        return out

    def guest_exit_counts(self) -> dict[tuple[int, int, int, int], int]:
        return {(k.tgid, k.vcpu_id, k.isa, k.reason): int(v.value)
                for k, v in self._bpf[b"guest_exits"].items()}

    def guest_entry_counts(self) -> dict[tuple[int, int], int]:
        """kvm_entry per (pid, vcpu_id): a vCPU that entered the guest at least once."""
        return {(k.tgid, k.vcpu_id): int(v.value)
                for k, v in self._bpf[b"guest_entries"].items()}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._ring_poller = None  # the map fd is closed (and reusable)
            _close_bpf(self._bpf)


def _counters_of(leaf: Any) -> VcpuCounters:
    return VcpuCounters(exits=list(leaf.exits), pending_hist=list(leaf.pending_hist),
                        pending_ns_sum=int(leaf.pending_ns_sum),
                        completions=list(leaf.completions))


@dataclass
class _Captured:
    data: bytes = b""

    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


# Watches a compile from another process: LLVM's fatal errors (the BPF stack limit, for one) call
# exit(1) from inside the compile, and no Python code of ours runs after that. The watcher holds
# a pipe to us; EOF without "done" means we died mid-compile, and it prints the one-line error
# from the captured diagnostics.
_WATCHER = r"""
import os, sys
path = sys.argv[1]
data = sys.stdin.buffer.read()
if data != b"done":
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        text = ""
    first = next((ln.strip() for ln in text.splitlines() if "error" in ln.lower()),
                 "the process died in the compiler")
    sys.stderr.write("kvm-completion-tracer: error: compiling the BPF programs failed (%s); "
                     "run 'kvm-completion-tracer check'\n" % first)
try:
    os.unlink(path)
except OSError:
    pass
"""


@contextlib.contextmanager
def _captured_stderr() -> Iterator[_Captured]:
    """clang and libbcc print diagnostics straight to fd 2: keep them out of the operator's
    terminal and the JSON log, and quote the first error in the one-line failure instead (also
    when LLVM kills the process: see _WATCHER)."""
    import subprocess

    captured = _Captured()
    sys.stderr.flush()
    fd, path = tempfile.mkstemp(prefix="kct-bpf-compile-", suffix=".log")
    read_end, write_end = os.pipe()
    saved = os.dup(2)
    try:
        watcher: subprocess.Popen[bytes] | None = subprocess.Popen(
            [sys.executable, "-c", _WATCHER, path], stdin=read_end, stderr=saved,
            stdout=subprocess.DEVNULL, close_fds=True)
    except OSError:
        watcher = None
    os.close(read_end)
    try:
        os.dup2(fd, 2)
        yield captured
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        with contextlib.suppress(OSError):
            os.write(write_end, b"done")
        os.close(write_end)
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        captured.data = b"".join(chunks)
        os.close(fd)
        if watcher is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                watcher.wait(timeout=10)  # it removes the file
        with contextlib.suppress(OSError):
            os.unlink(path)


def _first_error(diagnostics: str) -> str:
    for line in diagnostics.splitlines():
        if "error" in line.lower():
            return line.strip()
    return ""


def _explain_load_failure(err: Exception, diagnostics: str = "") -> str:
    text = str(err).strip().splitlines()
    first = _first_error(diagnostics) or (text[-1] if text else type(err).__name__)
    if os.geteuid() != 0:
        return "loading the BPF programs needs root (or CAP_BPF+CAP_PERFMON): run with sudo"
    # EPERM from bpf(2) or perf_event_open(2) (a header bcc cannot read is a compile error).
    kernel_lines = [line for line in f"{err}\n{diagnostics}".splitlines()
                    if re.search(r"bpf|perf_event|attach", line, re.IGNORECASE)
                    and "fatal error" not in line]
    if any("Permission denied" in line or "Operation not permitted" in line
           for line in kernel_lines):
        return (f"the kernel refused the BPF programs ({first}): check lockdown mode, "
                "kernel.unprivileged_bpf_disabled, CAP_BPF and CAP_PERFMON, and any seccomp "
                "filter (systemd's SystemCallFilter= must allow bpf and perf_event_open)")
    if "tracepoint" in str(err).lower() or "attach" in str(err).lower():
        return (f"attaching a tracepoint failed ({first}): mount tracefs "
                "(mount -t tracefs tracefs /sys/kernel/tracing) and run "
                "'kvm-completion-tracer check'")
    return (f"compiling or loading the BPF programs failed ({first}): kernel headers must be "
            "installed at /lib/modules/$(uname -r)/build; run 'kvm-completion-tracer check'")
