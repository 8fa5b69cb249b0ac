"""Name the VM behind a KVM-using process, and find the vCPUs that already exist at start-up.

Alerts must name the VM the way the operator knows it (libvirt domain, KubeVirt VMI, Firecracker
id, ...), not as a pid.  Everything here reads procfs only, takes an injectable ``proc_root`` so
tests can use fixture trees, and never raises for a process that vanished or cannot be read:
the tracer sees processes come and go all the time.

What the kernel shows (checked on a 6.18 host): a vCPU fd reads back as
``anon_inode:kvm-vcpu:<id>`` (the id passed to KVM_CREATE_VCPU, not a counter), and the
``struct kvm_run`` mmap of that fd appears in /proc/PID/maps as
``7fa2287c9000-7fa2287cc000 rw-s 00000000 00:10 1038   anon_inode:kvm-vcpu:0``.  Every KVM anon
inode shares the same dev/inode (``00:10 1038``), so the name is the only thing that tells vCPUs
apart; other pages of the same fd (e.g. the PIO data page) show up with a non-zero offset.
"""

from __future__ import annotations

import os
import re
import unicodedata
import uuid as uuidlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

PROC: Final = Path("/proc")
MAX_NAME_LEN: Final = 128

# VmIdentity.source values: which rule produced the name.
SOURCE_KUBEVIRT: Final = "kubevirt"
SOURCE_LIBVIRT: Final = "libvirt machine scope"
SOURCE_QEMU: Final = "qemu -name guest="
SOURCE_FIRECRACKER: Final = "firecracker --id"
SOURCE_CLOUD_HYPERVISOR: Final = "cloud-hypervisor --api-socket"
SOURCE_CROSVM: Final = "crosvm --socket"
SOURCE_KVMTOOL: Final = "kvmtool --name"
SOURCE_FALLBACK: Final = "comm"
SOURCE_UNAVAILABLE: Final = "unavailable"


@dataclass(frozen=True)
class VmIdentity:
    name: str  # never empty, no control characters, at most MAX_NAME_LEN characters
    vmm: str  # "qemu", "firecracker", "cloud-hypervisor", "crosvm", "kvmtool", "other"
    uuid: str | None
    source: str  # one of the SOURCE_* values
    namespace: str | None = None  # KubeVirt only
    pod_uid: str | None = None  # KubeVirt only: the pod name is not visible from the host


@dataclass(frozen=True)
class DiscoveredVcpu:
    pid: int
    fd: int
    vcpu_id: int
    run_addr: int | None  # start of the struct kvm_run mapping; None if unmapped or ambiguous


# --- reading procfs --------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes | None:
    # OSError covers the races we expect: ENOENT (pid gone), ESRCH (gone while reading), EACCES.
    try:
        return path.read_bytes()
    except OSError:
        return None


def _decode(raw: bytes) -> str:
    # Command lines are arbitrary bytes; "replace" keeps surrogates out of log fields and labels.
    return raw.decode("utf-8", errors="replace")


def _read_argv(base: Path) -> list[str] | None:
    raw = _read_bytes(base / "cmdline")
    if raw is None:
        return None
    return [_decode(arg) for arg in raw.split(b"\0") if arg]  # empty for zombies/kthreads


def _read_comm(base: Path) -> str | None:
    raw = _read_bytes(base / "comm")
    return None if raw is None else _decode(raw.removesuffix(b"\n"))


def _read_cgroup_paths(base: Path) -> list[str]:
    # Lines are "hierarchy:controllers:path"; cgroup v1, v2 and hybrid hosts all fit this.
    raw = _read_bytes(base / "cgroup") or b""
    return [line.split(":", 2)[2] for line in _decode(raw).splitlines() if line.count(":") >= 2]


# --- names -----------------------------------------------------------------------------------

# Cc/Cf/Zl/Zp: control, format (bidi overrides) and line/paragraph separators could forge or
# split log lines; the name ends up in logs and as a Prometheus label value.
_UNSAFE_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def clean_name(text: str) -> str:
    """``text`` without control characters, trimmed and capped (may be empty)."""
    kept = "".join(ch for ch in text if unicodedata.category(ch) not in _UNSAFE_CATEGORIES)
    return kept.strip()[:MAX_NAME_LEN].strip()


def _fallback_name(comm: str | None, pid: int) -> str:
    return f"{clean_name(comm or '') or 'unknown'}[{pid}]"


def unavailable_identity(pid: int, comm_hint: str | None) -> VmIdentity:
    """A process whose /proc is gone: ``<comm>[<pid>]`` from the comm a probe saw, if any."""
    return VmIdentity(name=_fallback_name(comm_hint, pid), vmm=_vmm_kind(None, comm_hint),
                      uuid=None, source=SOURCE_UNAVAILABLE)


def _vmm_kind(argv0: str | None, comm: str | None) -> str:
    for raw in (argv0, comm):
        base = (raw or "").rsplit("/", 1)[-1]
        # Proxmox runs QEMU as /usr/bin/kvm; Firecracker release binaries are named like
        # firecracker-v1.7.0-x86_64; comm is cut to 15 bytes, hence "cloud-hyperviso".
        if base.startswith("qemu") or base == "kvm":
            return "qemu"
        if base.startswith("firecracker"):
            return "firecracker"
        if base.startswith("cloud-hyperviso"):
            return "cloud-hypervisor"
        if base.startswith("crosvm"):
            return "crosvm"
        if base.startswith("lkvm") or base == "kvmtool":
            return "kvmtool"
    return "other"


def _option(argv: Sequence[str], *names: str) -> str | None:
    """Value of the last ``NAME VALUE`` or ``NAME=VALUE`` in argv (parsers let the last win)."""
    value = None
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(name + "="):
                value = arg[len(name) + 1 :]
    return value


def _qemu_opts(value: str, implied_key: str) -> dict[str, str]:
    """Parse a QEMU ``key=val,key=val`` option; ",," is a literal comma, and the first item
    may omit its key (``-name vm1,debug-threads=on`` means guest=vm1)."""
    items: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1 : i + 2] == ",":
                current.append(",")
                i += 2
                continue
            items.append("".join(current))
            current = []
        else:
            current.append(value[i])
        i += 1
    items.append("".join(current))
    opts: dict[str, str] = {}
    for index, item in enumerate(items):
        key, sep, val = item.partition("=")
        if not sep:
            if index != 0:
                continue  # a bare flag such as "debug-threads"; not a name
            key, val = implied_key, item
        opts[key] = val
    return opts


def _qemu_guest_name(argv: Sequence[str]) -> str | None:
    value = _option(argv, "-name", "--name")
    if value is None:
        return None
    return clean_name(_qemu_opts(value, "guest").get("guest", "")) or None


def _qemu_uuid(argv: Sequence[str]) -> str | None:
    value = _option(argv, "-uuid", "--uuid")
    try:
        return str(uuidlib.UUID(value)) if value else None
    except ValueError:
        return None


# --- cgroup-based names ----------------------------------------------------------------------

# systemd's unit escaping: libvirt's machine "qemu-3-web" becomes machine-qemu\x2d3\x2dweb.scope.
_SYSTEMD_ESCAPE: Final = re.compile(rb"\\x([0-9a-fA-F]{2})")
_MACHINE_SCOPE: Final = re.compile(r"machine-(qemu\\x2d.+)\.scope")
_MACHINE_CGROUPFS: Final = re.compile(r"(qemu-.+)\.libvirt-qemu")  # libvirt without systemd
_POD_UID: Final = re.compile(
    r"pod([0-9a-f]{8}[-_]?[0-9a-f]{4}[-_]?[0-9a-f]{4}[-_]?[0-9a-f]{4}[-_]?[0-9a-f]{12})"
)
_HOSTNAME_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-"
)


def _systemd_unescape(text: str) -> str:
    raw = _SYSTEMD_ESCAPE.sub(lambda m: bytes([int(m[1], 16)]), text.encode())
    return _decode(raw)


def _libvirt_machine(cgroup_paths: Iterable[str]) -> str | None:
    """libvirt's machine name ("qemu-<id>-<sanitized name>") from the domain's cgroup."""
    for path in cgroup_paths:
        for component in path.split("/"):
            if m := _MACHINE_SCOPE.fullmatch(component):
                return _systemd_unescape(m[1])
            if m := _MACHINE_CGROUPFS.fullmatch(component):
                return m[1]
    return None


def _libvirt_machine_name(prefix: str, name: str) -> str:
    """Mirror of libvirt's virDomainMachineNameAppendValid: keep hostname characters, collapse
    and drop leading '.'/'-', stop at 64 characters, trim trailing '.'/'-'."""
    out = list(prefix)
    skip = True
    for ch in name:
        if len(out) >= 64:
            break
        if ch in ".-":
            if not skip:
                out.append(ch)
                skip = True
        elif ch in _HOSTNAME_CHARS:
            out.append(ch)
            skip = False
    return "".join(out).rstrip("-.")


def _name_from_machine(machine: str, guest: str | None) -> str:
    """The domain name for a libvirt machine name, preferring QEMU's exact -name when the
    machine name is what libvirt would have derived from it (the machine name is lossy:
    it drops '_', non-ASCII, and is cut at 64 characters)."""
    body = machine.removeprefix("qemu-")
    if guest is not None and body == guest:  # libvirt < 3.x: "qemu-<name>", no id, no sanitizing
        return guest
    if m := re.fullmatch(r"(\d+)-(.*)", body):
        if guest is not None and _libvirt_machine_name(f"qemu-{m[1]}-", guest) == machine:
            return guest
        body = m[2]
    return body


def _in_kubepods(cgroup_paths: Iterable[str]) -> bool:
    return any("kubepods" in path for path in cgroup_paths)


def _pod_uid(cgroup_paths: Iterable[str]) -> str | None:
    for path in cgroup_paths:
        if m := _POD_UID.search(path):
            return m[1].replace("_", "-")  # the systemd cgroup driver writes '-' as '_'
    return None


# --- naming rules ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Proc:
    pid: int
    argv: list[str]
    comm: str | None
    cgroups: list[str]
    vmm: str


def _identity(
    proc: _Proc,
    name: str,
    source: str,
    namespace: str | None = None,
    pod_uid: str | None = None,
) -> VmIdentity | None:
    name = clean_name(name)
    if not name:
        return None  # let the next rule (ultimately the fallback) name it
    uuid = _qemu_uuid(proc.argv) if proc.vmm == "qemu" else None
    return VmIdentity(name, proc.vmm, uuid, source, namespace=namespace, pod_uid=pod_uid)


def _rule_kubevirt(proc: _Proc) -> VmIdentity | None:
    # virt-launcher's libvirt names the domain "<namespace>_<vmi>"; '_' is valid in neither
    # a namespace nor a VMI name, so the first '_' splits them unambiguously.
    guest = _qemu_guest_name(proc.argv) if proc.vmm == "qemu" else None
    if guest is None or not _in_kubepods(proc.cgroups):
        return None
    namespace, sep, vmi = guest.partition("_")
    if not (sep and namespace and vmi):
        return None
    return _identity(
        proc,
        f"{namespace}/{vmi}",
        SOURCE_KUBEVIRT,
        namespace=clean_name(namespace),
        pod_uid=_pod_uid(proc.cgroups),
    )


def _rule_libvirt(proc: _Proc) -> VmIdentity | None:
    machine = _libvirt_machine(proc.cgroups)
    if machine is None:
        return None
    guest = _qemu_guest_name(proc.argv) if proc.vmm == "qemu" else None
    return _identity(proc, _name_from_machine(machine, guest), SOURCE_LIBVIRT)


def _rule_qemu(proc: _Proc) -> VmIdentity | None:
    guest = _qemu_guest_name(proc.argv) if proc.vmm == "qemu" else None
    return None if guest is None else _identity(proc, guest, SOURCE_QEMU)


def _rule_firecracker(proc: _Proc) -> VmIdentity | None:
    vm_id = _option(proc.argv, "--id") if proc.vmm == "firecracker" else None
    return None if vm_id is None else _identity(proc, vm_id, SOURCE_FIRECRACKER)


def _socket_stem(path: str) -> str:
    p = Path(path)
    # Kata Containers names every cloud-hypervisor socket /run/vc/vm/<sandbox-id>/clh-api.sock,
    # so the directory is what tells VMs apart there.
    return p.parent.name if p.stem == "clh-api" else p.stem


def _rule_cloud_hypervisor(proc: _Proc) -> VmIdentity | None:
    if proc.vmm != "cloud-hypervisor":
        return None
    value = _option(proc.argv, "--api-socket")
    if value is None:
        return None
    # A bare path, or "path=...": "fd=N" (socket passed in) carries no name.  --serial and
    # --console are device settings, never names: those VMs get the fallback.
    path = value
    if value.startswith(("path=", "fd=")):
        params = dict(item.split("=", 1) for item in value.split(",") if "=" in item)
        path = params.get("path", "")
    return _identity(proc, _socket_stem(path), SOURCE_CLOUD_HYPERVISOR) if path else None


def _rule_crosvm(proc: _Proc) -> VmIdentity | None:
    # crosvm has no --name; its control socket (--socket/-s) is how its users address a VM.
    value = _option(proc.argv, "--socket", "-s") if proc.vmm == "crosvm" else None
    return None if not value else _identity(proc, _socket_stem(value), SOURCE_CROSVM)


def _rule_kvmtool(proc: _Proc) -> VmIdentity | None:
    value = _option(proc.argv, "--name") if proc.vmm == "kvmtool" else None
    return None if value is None else _identity(proc, value, SOURCE_KVMTOOL)


# Order matters: orchestrator names (KubeVirt, libvirt) are what operators use; the QEMU rule
# would otherwise name a KubeVirt VM "default_testvmi".
_RULES: Final[tuple[Callable[[_Proc], VmIdentity | None], ...]] = (
    _rule_kubevirt,
    _rule_libvirt,
    _rule_qemu,
    _rule_firecracker,
    _rule_cloud_hypervisor,
    _rule_crosvm,
    _rule_kvmtool,
)


def identify_vm(pid: int, proc_root: Path = PROC, *, comm_hint: str | None = None) -> VmIdentity:
    """Name the VM run by ``pid``.  Never raises; a gone or unreadable process gets
    ``<comm>[<pid>]`` with source "unavailable" (``comm_hint``, e.g. the comm carried by a
    probe event, fills in when /proc no longer has it)."""
    base = proc_root / str(pid)
    argv = _read_argv(base)
    comm = _read_comm(base)
    if argv is None and comm is None:
        return unavailable_identity(pid, comm_hint)
    argv = argv or []
    proc = _Proc(pid, argv, comm, _read_cgroup_paths(base), _vmm_kind(next(iter(argv), None), comm))
    for rule in _RULES:
        if (identity := rule(proc)) is not None:
            return identity
    name = _fallback_name(comm or comm_hint, pid)
    return VmIdentity(name=name, vmm=proc.vmm, uuid=None, source=SOURCE_FALLBACK)


# --- vCPU discovery --------------------------------------------------------------------------

_VCPU_LINK: Final = re.compile(r"anon_inode:kvm-vcpu:(\d+)")


def _vcpu_id(link: str) -> int | None:
    m = _VCPU_LINK.fullmatch(link.strip())
    return int(m[1]) if m else None


def _run_addrs(maps: str) -> dict[int, int | None]:
    """vcpu id -> start of its offset-0 mapping (the kvm_run page) in a maps file.

    A process running two VMs can have two vCPUs with the same id, and nothing in maps
    (same dev/inode for all KVM anon inodes) says which mapping belongs to which fd: such
    ids map to None rather than to a guess, since a wrong address means reading the wrong run.
    """
    starts: dict[int, set[int]] = {}
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or (vcpu := _vcpu_id(fields[5])) is None:
            continue
        try:
            if int(fields[2], 16) != 0:
                continue  # another page of the vCPU fd (PIO data, coalesced MMIO ring)
            starts.setdefault(vcpu, set()).add(int(fields[0].partition("-")[0], 16))
        except ValueError:
            continue
    return {vcpu: (next(iter(s)) if len(s) == 1 else None) for vcpu, s in starts.items()}


def resolve_fd(pid: int, fd: int, proc_root: Path = PROC) -> int | None:
    """The vCPU id if ``fd`` of ``pid`` is a vCPU fd, else None (also when gone/unreadable)."""
    try:
        return _vcpu_id(os.readlink(proc_root / str(pid) / "fd" / str(fd)))
    except OSError:
        return None


def vcpu_run_addr(pid: int, vcpu_id: int, proc_root: Path = PROC) -> int | None:
    """Address of vCPU ``vcpu_id``'s kvm_run mapping in ``pid``, or None."""
    raw = _read_bytes(proc_root / str(pid) / "maps")
    return None if raw is None else _run_addrs(_decode(raw)).get(vcpu_id)


def _scan_pid(base: Path, pid: int) -> list[DiscoveredVcpu]:
    fds: list[tuple[int, int]] = []
    for entry in os.listdir(base / "fd"):
        try:
            vcpu = _vcpu_id(os.readlink(base / "fd" / entry))
        except FileNotFoundError:
            continue  # that fd was closed since listdir
        if vcpu is not None:
            fds.append((int(entry), vcpu))
    if not fds:
        return []
    # Raises if the process exited since listing its fds: its vCPUs are gone too.
    run = _run_addrs(_decode((base / "maps").read_bytes()))
    return [DiscoveredVcpu(pid, fd, vcpu, run.get(vcpu)) for fd, vcpu in sorted(fds)]


@dataclass(frozen=True)
class VcpuScan:
    vcpus: list[DiscoveredVcpu]  # by pid and fd
    # Processes whose /proc/PID/fd or /maps this process may not read (EACCES/EPERM), with the
    # VMM their command line names ("other" for non-VMMs, or VMMs not known by name).
    unreadable: dict[int, str]

    @property
    def unreadable_vmms(self) -> dict[int, str]:
        return {pid: vmm for pid, vmm in self.unreadable.items() if vmm != "other"}


def scan_vcpus(proc_root: Path = PROC) -> VcpuScan:
    """Every vCPU fd of every process (dup'ed fds included), and which processes could not be
    inspected: a permission error is not a vanished process, and means VMs go unadopted."""
    try:
        pids = sorted(int(entry) for entry in os.listdir(proc_root) if entry.isdigit())
    except OSError:
        return VcpuScan([], {})
    found: list[DiscoveredVcpu] = []
    unreadable: dict[int, str] = {}
    for pid in pids:
        base = proc_root / str(pid)
        try:
            found.extend(_scan_pid(base, pid))
        except PermissionError:
            # Reading another process's fd links and maps is a ptrace read check: missing
            # CAP_SYS_PTRACE / CAP_DAC_READ_SEARCH, or an LSM profile (explain_denied). The
            # command line and comm stay world-readable, so the VMM can still be named.
            unreadable[pid] = _vmm_kind(next(iter(_read_argv(base) or []), None),
                                        _read_comm(base))
        except OSError:
            continue  # vanished (ENOENT/ESRCH) mid-scan: its vCPUs are gone too
    return VcpuScan(found, unreadable)


def discover_vcpus(proc_root: Path = PROC) -> list[DiscoveredVcpu]:
    """Every vCPU fd of every process, one entry per fd (dup'ed fds included), by pid and fd."""
    return scan_vcpus(proc_root).vcpus


# Capability bits (linux/capability.h) that reading other users' /proc/PID/fd and maps needs.
CAP_DAC_READ_SEARCH: Final = 2
CAP_SYS_PTRACE: Final = 19


def lsm_label(proc_root: Path = PROC) -> str | None:
    """This process's LSM confinement (AppArmor: ``docker-default (enforce)``, SELinux: a
    context), or None when there is no LSM that labels processes."""
    # attr/apparmor/current where LSMs stack (Linux >= 5.8), else the shared attr/current.
    for rel in ("self/attr/apparmor/current", "self/attr/current"):
        raw = _read_bytes(proc_root / rel)
        if raw and (label := _decode(raw).strip("\0\n ")):
            return label
    return None


def explain_denied(caps: int, label: str | None) -> tuple[str, str]:
    """(likely cause, fix) for other processes' /proc/PID/fd and maps being unreadable, from
    this process's effective capabilities and LSM label (see lsm_label)."""
    causes: list[str] = []
    fixes: list[str] = []
    missing = [name for bit, name in ((CAP_SYS_PTRACE, "SYS_PTRACE"),
                                      (CAP_DAC_READ_SEARCH, "DAC_READ_SEARCH"))
               if not caps & (1 << bit)]
    if missing:
        causes.append(f"no CAP_{' or CAP_'.join(missing)}")
        fixes.append(f"grant {', '.join(missing)} (docker run --cap-add; Kubernetes "
                     "securityContext.capabilities.add; systemd AmbientCapabilities=)")
    confined = label is not None and "unconfined" not in label and "(complain)" not in label
    if confined:
        # docker-default and containerd's profile allow ptrace reads only of their own peers.
        causes.append(f"this process runs confined by the LSM profile {label!r}, which denies "
                      "ptrace reads of processes outside it")
        fixes.append("run it unconfined: docker run --security-opt apparmor=unconfined "
                     "(SELinux: label=disable); Kubernetes securityContext.appArmorProfile "
                     "type Unconfined")
    if not causes:
        causes.append("a security policy (AppArmor, SELinux, seccomp, a user namespace) denies "
                      "ptrace reads of other processes")
        fixes.append("run the daemon in the host's user namespace and unconfined by any LSM")
    return "; ".join(causes), "; ".join(fixes)


# --- process identity over time --------------------------------------------------------------


def stat_field(stat_path: Path, field_no: int) -> int | None:
    """Numeric field ``field_no`` (1-based, as in proc(5)) of a /proc/PID[/task/TID]/stat file,
    or None if it is gone or unreadable."""
    raw = _read_bytes(stat_path)
    if raw is None:
        return None
    # comm (field 2) is in parentheses and may itself hold spaces and ')': split after the last.
    close = raw.rfind(b")")
    if close < 0:
        return None
    fields = raw[close + 1 :].split()  # fields[0] is field 3 (state)
    try:
        return int(fields[field_no - 3])
    except (IndexError, ValueError):
        return None


def process_start_time(pid: int, proc_root: Path = PROC) -> int | None:
    """Start time (clock ticks after boot, field 22 of /proc/PID/stat), or None if gone."""
    return stat_field(proc_root / str(pid) / "stat", 22)


def process_alive(pid: int, start_time: int, proc_root: Path = PROC) -> bool:
    """Whether ``pid`` is still the process that had ``start_time`` (not a reused pid).

    A zombie thread-group leader still counts: its vCPU threads may well be running.
    """
    current = process_start_time(pid, proc_root)
    return current is not None and current == start_time
