"""tracer.vmident: VM naming rules, vCPU discovery and pid identity.

Most tests read ``procfs/``, a fixture /proc: one directory per process (cmdline, comm, cgroup,
stat, status, maps, fd/* symlinks). procfs/README.md says where each comes from. Captured from
real processes (tests/capture_procfs.py): 7525 (a Python process with vCPUs 0 and 3), 15285,
15292 and 15359 (Debian's QEMU 7.2 in three ``-name`` forms) and 17758 (a libvirt 9.0 domain in
libvirt's own cgroups, no systemd). Written by hand in the kernel's formats, since this host
cannot run them: the libvirt-with-systemd, Proxmox ``-id``, KubeVirt, Firecracker,
cloud-hypervisor, crosvm and kvmtool samples, plus made-up edge cases. Variants of one rule
build a small tree under tmp_path.  The live tests at the end use the real /proc and /dev/kvm.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import subprocess
import sys
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest

from tracer.vmident import (
    MAX_NAME_LEN,
    DiscoveredVcpu,
    VmIdentity,
    discover_vcpus,
    identify_vm,
    process_alive,
    process_start_time,
    resolve_fd,
    vcpu_run_addr,
)

PROCFS = Path(__file__).resolve().parent / "procfs"

KUBEVIRT_POD_UID = "6e1c2b8a-3f1d-4c7e-9a2b-0d4e5f6a7b8c"
CONTAINERD_ID = "3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c"


def make_proc(
    root: Path,
    pid: int,
    argv: list[str],
    comm: str,
    cgroup: str = "0::/\n",
    fds: dict[int, str] | None = None,
    maps: str = "",
) -> Path:
    """A /proc/PID directory like the kernel's (cmdline NUL-terminated, comm with a newline)."""
    base = root / str(pid)
    (base / "fd").mkdir(parents=True)
    (base / "cmdline").write_bytes(b"".join(arg.encode() + b"\0" for arg in argv))
    (base / "comm").write_text(comm + "\n")
    (base / "cgroup").write_text(cgroup)
    (base / "maps").write_text(maps)
    for fd, target in (fds or {}).items():
        os.symlink(target, base / "fd" / str(fd))
    return base


def name_of(tmp_path: Path, argv: list[str], comm: str, cgroup: str = "0::/\n") -> VmIdentity:
    make_proc(tmp_path, 4242, argv, comm, cgroup)
    return identify_vm(4242, tmp_path)


# --- naming: the realistic samples in procfs/ ----------------------------------------------


def test_qemu_direct() -> None:
    assert identify_vm(1001, PROCFS) == VmIdentity(
        name="build,ci",  # -name guest=build,,ci: QEMU's ",," is a literal comma
        vmm="qemu",
        uuid="6e9b3f4a-1c2d-4e5f-8a9b-0c1d2e3f4a5b",  # normalised from upper case
        source="qemu -name guest=",
    )


def test_libvirt_cgroup_v2_prefers_qemu_name_over_lossy_scope() -> None:
    # Scope: machine-qemu\x2d3\x2dwebfrontend.prod.scope (libvirt dropped the '_').
    assert identify_vm(1002, PROCFS) == VmIdentity(
        name="web_frontend.prod",
        vmm="qemu",
        uuid="1f0e7d3c-5b4a-4c2d-9e8f-7a6b5c4d3e2f",
        source="libvirt machine scope",
    )


def test_libvirt_cgroup_v1() -> None:
    identity = identify_vm(1003, PROCFS)
    assert (identity.name, identity.source, identity.vmm) == (
        "db-primary",
        "libvirt machine scope",
        "qemu",
    )
    assert identity.uuid == "0c6f1a2b-3d4e-4f50-8a61-72b83c94d0e1"


def test_proxmox_qemu_plain_name() -> None:
    # "-name web01,debug-threads=on": the first item without a key is the guest name; Proxmox
    # passes the UUID only inside -smbios, which is not the -uuid option.
    assert identify_vm(1004, PROCFS) == VmIdentity(
        name="web01", vmm="qemu", uuid=None, source="qemu -name guest="
    )


def test_kubevirt_cgroup_v1_hybrid_crio() -> None:
    # v1 controllers plus the unified "0::" line, systemd driver ('_' in the pod UID), CRI-O.
    assert identify_vm(1011, PROCFS) == VmIdentity(
        name="kubevirt-tests/alpine-vmi",
        vmm="qemu",
        uuid="b3e1c8a4-6d2f-5e7a-9c0b-1d2e3f4a5b6c",
        source="kubevirt",
        namespace="kubevirt-tests",
        pod_uid="0b7c9d2e-4f15-4a36-8b47-5c6d7e8f9a0b",
    )


def test_kubevirt_virt_launcher() -> None:
    assert identify_vm(1010, PROCFS) == VmIdentity(
        name="default/testvmi",
        vmm="qemu",
        uuid="5a9fc181-957e-5c32-9e5a-2de5e9673531",
        source="kubevirt",
        namespace="default",
        pod_uid=KUBEVIRT_POD_UID,  # the systemd driver's '_' turned back into '-'
    )


def test_firecracker() -> None:
    assert identify_vm(1020, PROCFS) == VmIdentity(
        name="fc-7f3a9c01", vmm="firecracker", uuid=None, source="firecracker --id"
    )


def test_cloud_hypervisor() -> None:
    # comm is "cloud-hyperviso" (15 bytes); --serial tty / --console off are not names.
    assert identify_vm(1030, PROCFS) == VmIdentity(
        name="ci-runner-42",
        vmm="cloud-hypervisor",
        uuid=None,
        source="cloud-hypervisor --api-socket",
    )


def test_crosvm() -> None:
    assert identify_vm(1040, PROCFS) == VmIdentity(
        name="termina", vmm="crosvm", uuid=None, source="crosvm --socket"
    )


def test_kvmtool() -> None:
    assert identify_vm(1050, PROCFS) == VmIdentity(
        name="guest-demo", vmm="kvmtool", uuid=None, source="kvmtool --name"
    )


def test_unknown_vmm_falls_back_to_comm_and_pid() -> None:
    assert identify_vm(1060, PROCFS) == VmIdentity(
        name="acme-vmm[1060]", vmm="other", uuid=None, source="comm"
    )


def test_comm_with_spaces_and_parens() -> None:
    assert identify_vm(1070, PROCFS).name == "vm ) (x[1070]"
    assert process_start_time(1070, PROCFS) == 5400400


def test_real_capture_falls_back() -> None:
    assert identify_vm(7525, PROCFS) == VmIdentity(
        name="python[7525]", vmm="other", uuid=None, source="comm"
    )


# Real captures (procfs/README.md), each next to the hand-written sample of its form where
# there is one: both must name the VM alike.
@pytest.mark.parametrize(
    ("captured", "written", "expected"),
    [
        # qemu-system-x86_64 -name guest=build,,ci,debug-threads=on -uuid 6E9B3F4A-...
        (15285, 1001, VmIdentity("build,ci", "qemu", "6e9b3f4a-1c2d-4e5f-8a9b-0c1d2e3f4a5b",
                                 "qemu -name guest=")),
        # /usr/bin/kvm -name web01,debug-threads=on -smbios type=1,uuid=... (comm "kvm")
        (15292, 1004, VmIdentity("web01", "qemu", None, "qemu -name guest=")),
        # qemu-system-x86_64 -name plain-vm
        (15359, None, VmIdentity("plain-vm", "qemu", None, "qemu -name guest=")),
        # libvirt without systemd: /machine/qemu-1-webfrontend.prod.libvirt-qemu/emulator; the
        # exact -name wins over the lossy machine name (no '_'), as under systemd's scope.
        (17758, 1002, VmIdentity("web_frontend.prod", "qemu",
                                 "1f0e7d3c-5b4a-4c2d-9e8f-7a6b5c4d3e2f",
                                 "libvirt machine scope")),
    ],
)
def test_real_qemu_captures(captured: int, written: int | None, expected: VmIdentity) -> None:
    assert identify_vm(captured, PROCFS) == expected
    if written is not None:
        assert identify_vm(written, PROCFS) == expected


def test_vanished_process() -> None:
    gone = VmIdentity(name="unknown[1080]", vmm="other", uuid=None, source="unavailable")
    assert identify_vm(1080, PROCFS) == gone  # directory left, files gone
    assert identify_vm(99999, PROCFS).source == "unavailable"  # no directory at all
    assert identify_vm(1, PROCFS / "no-such-proc").name == "unknown[1]"


def test_vanished_process_uses_comm_hint() -> None:
    # A probe event carries the comm, which outlives /proc/PID.
    identity = identify_vm(1080, PROCFS, comm_hint="qemu-system-x86")
    assert identity == VmIdentity(
        name="qemu-system-x86[1080]", vmm="qemu", uuid=None, source="unavailable"
    )


# --- naming: rule variants -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name_args", "expected"),
    [
        (["-name", "vm1"], "vm1"),  # the guest= key is implied for the first item
        (["-name", "vm1,debug-threads=on"], "vm1"),
        (["-name", "guest=a,,b,,c,debug-threads=on"], "a,b,c"),
        (["-name", "process=qemu-vm7,guest=vm7"], "vm7"),
        (["--name", "guest=dash-dash"], "dash-dash"),
        (["-name", "guest=first", "-name", "guest=second"], "second"),  # QEMU: last wins
        (["-name", "guest=with space"], "with space"),
    ],
)
def test_qemu_name_forms(tmp_path: Path, name_args: list[str], expected: str) -> None:
    argv = ["/usr/bin/qemu-system-x86_64", "-enable-kvm", *name_args, "-m", "512"]
    identity = name_of(tmp_path, argv, "qemu-system-x86")
    assert (identity.name, identity.source) == (expected, "qemu -name guest=")


@pytest.mark.parametrize(
    "name_args",
    [[], ["-name", "process=only-process"], ["-name", "guest="], ["-name"], ["-name", ",,"]],
)
def test_qemu_without_usable_name_falls_back(tmp_path: Path, name_args: list[str]) -> None:
    identity = name_of(tmp_path, ["qemu-system-x86_64", *name_args], "qemu-system-x86")
    if name_args == ["-name", ",,"]:
        # ",," is a legitimate one-character name: a comma.
        assert (identity.name, identity.source) == (",", "qemu -name guest=")
    else:
        assert (identity.name, identity.source) == ("qemu-system-x86[4242]", "comm")


def test_qemu_bad_uuid_is_dropped(tmp_path: Path) -> None:
    argv = ["qemu-system-x86_64", "-name", "vm", "-uuid", "not-a-uuid"]
    assert name_of(tmp_path, argv, "qemu-system-x86").uuid is None


def test_proxmox_kvm_binary_is_qemu(tmp_path: Path) -> None:
    argv = ["/usr/bin/kvm", "-id", "100", "-name", "web01,debug-threads=on", "-smp", "2"]
    identity = name_of(tmp_path, argv, "kvm", "0::/qemu.slice/100.scope\n")
    assert (identity.name, identity.vmm) == ("web01", "qemu")


LONG_GUEST = "analytics-warehouse-" + "x" * 60  # 80 characters


@pytest.mark.parametrize(
    ("scope", "guest", "expected"),
    [
        # No -name at all (or not a QEMU binary name): the scope's name is all there is.
        (r"machine-qemu\x2d4\x2dlegacy\x2dbox.scope", None, "legacy-box"),
        # -name disagrees with the scope: trust the cgroup, which libvirt set up.
        (r"machine-qemu\x2d4\x2dother.scope", "mine", "other"),
        # libvirt cut the machine name at 64 characters: "qemu-7-" + 57 of the name.
        (
            r"machine-qemu\x2d7\x2danalytics\x2dwarehouse\x2d" + "x" * 37 + ".scope",
            LONG_GUEST,
            LONG_GUEST,
        ),
        # libvirt drops non-hostname characters ('\u00e9', '_').
        (r"machine-qemu\x2d5\x2dcaf01.scope", "caf\u00e9_01", "caf\u00e9_01"),
        # ... and collapses/strips '.' and '-'.
        (r"machine-qemu\x2d6\x2da.b\x2dc.scope", "..a..b--c--", "..a..b--c--"),
        # libvirt before 3.x: "qemu-<name>", unsanitised, systemd-escaped byte by byte.
        (r"machine-qemu\x2dold\x2dvm.scope", "old-vm", "old-vm"),
        (r"machine-qemu\x2dcaf\xc3\xa9.scope", None, "caf\u00e9"),
        (r"machine-qemu\x2d2019\x2dvm.scope", "2019-vm", "2019-vm"),
    ],
)
def test_libvirt_scope_variants(
    tmp_path: Path, scope: str, guest: str | None, expected: str
) -> None:
    argv = ["/usr/bin/qemu-system-x86_64", "-S"]
    if guest is not None:
        argv += ["-name", f"guest={guest},debug-threads=on"]
    cgroup = f"0::/machine.slice/{scope}/libvirt/emulator\n"
    identity = name_of(tmp_path, argv, "qemu-system-x86", cgroup)
    assert (identity.name, identity.source) == (expected, "libvirt machine scope")


@pytest.mark.parametrize(
    "cgroup",
    [
        # A custom <resource><partition>: the scope sits below another slice.
        "0::/machine.slice/machine-tenant1.slice/machine-qemu\\x2d2\\x2dvm2.scope/libvirt/vcpu0\n",
        # No systemd (OpenRC hosts): libvirt's own cgroupfs layout.
        "10:memory:/machine/qemu-2-vm2.libvirt-qemu/emulator\n1:name=openrc:/libvirtd\n",
    ],
)
def test_libvirt_other_layouts(tmp_path: Path, cgroup: str) -> None:
    identity = name_of(tmp_path, ["qemu-system-x86_64", "-S"], "qemu-system-x86", cgroup)
    assert (identity.name, identity.source) == ("vm2", "libvirt machine scope")


CONTAINER_POD = "kubepods-burstable-pod1a2b3c4d_5e6f_4a7b_8c9d_0e1f2a3b4c5d.slice"


@pytest.mark.parametrize(
    ("cgroup", "argv", "expected"),
    [
        # The tracer in a container (image or DaemonSet) with a private cgroup namespace, the
        # default on cgroup v2: the kernel shows other processes' cgroups relative to the
        # tracer's own, climbing out with "..".
        (
            "0::/../../../machine.slice/machine-qemu\\x2d3\\x2dweb01.scope/libvirt/emulator\n",
            ["/usr/bin/qemu-system-x86_64", "-name", "guest=web01,debug-threads=on"],
            ("web01", "libvirt machine scope", None),
        ),
        (
            f"0::/../../{CONTAINER_POD}/cri-containerd-{CONTAINERD_ID}.scope\n",
            ["/usr/libexec/qemu-kvm", "-name", "guest=prod_db-0,debug-threads=on"],
            ("prod/db-0", "kubevirt", "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d"),
        ),
    ],
)
def test_cgroup_paths_seen_from_a_cgroup_namespace(
    tmp_path: Path, cgroup: str, argv: list[str], expected: tuple[str, str, str | None]
) -> None:
    identity = name_of(tmp_path, argv, "qemu-system-x86", cgroup)
    assert (identity.name, identity.source, identity.pod_uid) == expected


def test_nspawn_machine_scope_is_not_libvirt(tmp_path: Path) -> None:
    cgroup = "0::/machine.slice/machine-webcontainer.scope/payload\n"
    identity = name_of(tmp_path, ["/opt/vmm/run"], "run", cgroup)
    assert identity.source == "comm"


def test_kubevirt_cgroup_v1_cgroupfs_driver(tmp_path: Path) -> None:
    pod = f"/kubepods/burstable/pod{KUBEVIRT_POD_UID}/{CONTAINERD_ID}"
    cgroup = f"12:memory:{pod}\n3:cpu,cpuacct:{pod}\n1:name=systemd:{pod}\n"
    argv = ["/usr/libexec/qemu-kvm", "-name", "guest=tenant-a_win2022,debug-threads=on"]
    identity = name_of(tmp_path, argv, "qemu-kvm", cgroup)
    assert identity == VmIdentity(
        name="tenant-a/win2022",
        vmm="qemu",
        uuid=None,
        source="kubevirt",
        namespace="tenant-a",
        pod_uid=KUBEVIRT_POD_UID,
    )


def test_qemu_in_a_pod_without_kubevirt_name(tmp_path: Path) -> None:
    # Kata Containers' QEMU also runs under kubepods, but names itself "sandbox-<id>".
    cgroup = "0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-abc.scope\n"
    argv = ["/opt/kata/bin/qemu-system-x86_64", "-name", f"sandbox-{CONTAINERD_ID[:12]}"]
    identity = name_of(tmp_path, argv, "qemu-system-x86", cgroup)
    assert (identity.name, identity.source) == (
        f"sandbox-{CONTAINERD_ID[:12]}",
        "qemu -name guest=",
    )


def test_underscore_name_outside_kubernetes_is_plain_qemu(tmp_path: Path) -> None:
    argv = ["qemu-system-x86_64", "-name", "guest=default_testvmi"]
    identity = name_of(tmp_path, argv, "qemu-system-x86")
    assert (identity.name, identity.source) == ("default_testvmi", "qemu -name guest=")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["firecracker", "--id=fc-eq-form", "--api-sock", "/tmp/fc.sock"], "fc-eq-form"),
        (["firecracker-v1.7.0-x86_64", "--id", "vm-17"], "vm-17"),
        (["firecracker", "--api-sock", "/tmp/fc.sock"], "firecracker[4242]"),
    ],
)
def test_firecracker_variants(tmp_path: Path, argv: list[str], expected: str) -> None:
    identity = name_of(tmp_path, argv, "firecracker")
    assert (identity.name, identity.vmm) == (expected, "firecracker")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--api-socket", "/run/ch/vm3.sock"], "vm3"),
        (["--api-socket=/run/ch/vm4.socket"], "vm4"),
        (["--api-socket", "path=/run/ch/vm5.sock,fd=7"], "vm5"),
        # Kata: every VM's socket is clh-api.sock; the sandbox directory tells them apart.
        ([f"--api-socket=/run/vc/vm/{CONTAINERD_ID}/clh-api.sock"], CONTAINERD_ID),
        (["--api-socket", "fd=3"], "cloud-hyperviso[4242]"),
        (["--serial", "tty", "--console", "off"], "cloud-hyperviso[4242]"),
    ],
)
def test_cloud_hypervisor_variants(tmp_path: Path, args: list[str], expected: str) -> None:
    identity = name_of(tmp_path, ["cloud-hypervisor", *args], "cloud-hyperviso")
    assert (identity.name, identity.vmm) == (expected, "cloud-hypervisor")


@pytest.mark.parametrize(
    ("argv", "comm", "expected"),
    [
        (["crosvm", "run", "-s", "/run/crosvm/arcvm.sock", "bzImage"], "crosvm", "arcvm"),
        (["crosvm", "run", "--cpus", "2", "bzImage"], "crosvm", "crosvm[4242]"),
        (["lkvm-static", "run", "--name=kt1"], "lkvm-static", "kt1"),
        (["lkvm", "run", "-k", "bzImage"], "lkvm", "lkvm[4242]"),
    ],
)
def test_crosvm_and_kvmtool_variants(
    tmp_path: Path, argv: list[str], comm: str, expected: str
) -> None:
    assert name_of(tmp_path, argv, comm).name == expected


def test_zombie_has_empty_cmdline(tmp_path: Path) -> None:
    identity = name_of(tmp_path, [], "qemu-system-x86")
    assert identity == VmIdentity(
        name="qemu-system-x86[4242]", vmm="qemu", uuid=None, source="comm"
    )


def test_unreadable_files_never_raise(tmp_path: Path) -> None:
    base = tmp_path / "4242"
    for name in ("cmdline", "comm", "cgroup"):
        (base / name).mkdir(parents=True)  # reading a directory: IsADirectoryError
    assert identify_vm(4242, tmp_path).source == "unavailable"


# --- naming: what reaches logs and Prometheus labels ----------------------------------------


def _assert_label_safe(name: str) -> None:
    assert name
    assert len(name) <= MAX_NAME_LEN
    assert name == name.strip()
    for ch in name:
        assert unicodedata.category(ch) not in {"Cc", "Cf", "Cs", "Zl", "Zp"}, repr(name)
    name.encode("utf-8")  # no surrogates


@pytest.mark.parametrize(
    ("guest", "expected"),
    [
        ("evil\nvm\x1b[31m", "evilvm[31m"),
        ("rtl\u202eexe.vm", "rtlexe.vm"),  # bidi override: forges what a reader sees
        ("line\u2028sep", "linesep"),
        ("  padded\t", "padded"),
    ],
)
def test_control_characters_are_stripped(tmp_path: Path, guest: str, expected: str) -> None:
    identity = name_of(tmp_path, ["qemu-system-x86_64", "-name", f"guest={guest}"], "qemu")
    assert identity.name == expected
    _assert_label_safe(identity.name)


def test_names_are_capped(tmp_path: Path) -> None:
    identity = name_of(tmp_path, ["qemu-system-x86_64", "-name", "v" * 500], "qemu")
    assert identity.name == "v" * MAX_NAME_LEN


def test_control_only_name_falls_back(tmp_path: Path) -> None:
    identity = name_of(tmp_path, ["qemu-system-x86_64", "-name", "\x07\x1b"], "qemu\x1bx")
    assert (identity.name, identity.source) == ("qemux[4242]", "comm")


def test_invalid_utf8_in_cmdline(tmp_path: Path) -> None:
    make_proc(tmp_path, 4242, [], "firecracker")
    (tmp_path / "4242" / "cmdline").write_bytes(b"firecracker\0--id\0vm-\xff\xfe\0")
    identity = identify_vm(4242, tmp_path)
    assert identity.name == "vm-\ufffd\ufffd"
    _assert_label_safe(identity.name)


def test_every_fixture_name_is_label_safe() -> None:
    for entry in PROCFS.iterdir():
        if entry.name.isdigit():
            _assert_label_safe(identify_vm(int(entry.name), PROCFS).name)


# --- vCPU discovery -------------------------------------------------------------------------

RUN0, RUN1, RUN2 = 0x7F3A2C000000, 0x7F3A2C003000, 0x7F3A2C006000  # synthetic maps layout
REAL_RUN0, REAL_RUN3 = 0x7FA2287C9000, 0x7FA2287C6000  # from the real capture, pid 7525
# From the QEMU captures: each vCPU's kvm_run is one 3-page mapping at offset 0 (kvm_run, the
# PIO data page, the coalesced MMIO ring), vCPU 1's just below vCPU 0's.
QEMU_RUNS = {
    15285: (0x7F5A8241E000, 0x7F5A8241B000),
    15292: (0x7FF149566000, 0x7FF149563000),
    15359: (0x7F70AC437000,),
    17758: (0x7FDB233D9000, 0x7FDB233D6000),
}


def test_discover_fixture_tree() -> None:
    D = DiscoveredVcpu
    assert discover_vcpus(PROCFS) == [
        D(1001, 11, 0, RUN0),
        D(1001, 12, 1, RUN1),  # not the 0x1000-offset page of the same fd
        D(1002, 25, 0, RUN0),
        D(1002, 26, 1, RUN1),
        D(1002, 40, 0, RUN0),  # dup of fd 25: one entry per fd
        D(1003, 22, 0, RUN0),
        D(1004, 31, 0, RUN0),  # Proxmox
        D(1004, 32, 1, RUN1),
        D(1010, 23, 0, RUN0),
        D(1011, 24, 0, RUN0),  # not the 0x3000-offset page (PIO data) of the same fd
        D(1020, 13, 0, RUN0),
        D(1020, 14, 1, RUN1),
        D(1030, 10, 0, RUN0),
        D(1030, 11, 1, RUN1),
        D(1040, 9, 0, RUN0),
        D(1050, 7, 0, RUN0),
        D(1060, 5, 0, None),  # two VMs, two vCPU 0s: which run is whose is unknowable
        D(1060, 7, 0, None),
        D(1060, 8, 2, RUN2),
        # 1070 has no vCPUs; 1080 vanished; 1090 exited before its maps were read.
        D(7525, 5, 0, REAL_RUN0),
        D(7525, 6, 3, REAL_RUN3),
        D(7525, 7, 0, REAL_RUN0),  # mmap.mmap()'s own dup
        D(7525, 8, 3, REAL_RUN3),
        D(7525, 9, 3, REAL_RUN3),
        D(7525, 11, 3, REAL_RUN3),
        D(15285, 9, 0, QEMU_RUNS[15285][0]),  # fd 8 is the VM, fd 3 /dev/kvm
        D(15285, 10, 1, QEMU_RUNS[15285][1]),
        D(15292, 9, 0, QEMU_RUNS[15292][0]),
        D(15292, 10, 1, QEMU_RUNS[15292][1]),
        D(15359, 9, 0, QEMU_RUNS[15359][0]),
        D(17758, 13, 0, QEMU_RUNS[17758][0]),  # libvirt's QEMU: its monitor socket comes first
        D(17758, 14, 1, QEMU_RUNS[17758][1]),
    ]


@pytest.mark.parametrize(
    ("pid", "fd", "expected"),
    [
        (1002, 25, 0),
        (1002, 40, 0),
        (7525, 6, 3),
        (17758, 14, 1),
        (17758, 9, None),  # a real VM fd: anon_inode:kvm-vm
        (17758, 11, None),  # a real anon_inode:[eventfd]
        (1002, 20, None),  # /dev/kvm
        (1002, 21, None),  # the VM fd
        (1001, 13, None),  # anon_inode:[eventfd]
        (1002, 999, None),  # no such fd
        (99999, 3, None),  # no such pid
    ],
)
def test_resolve_fd(pid: int, fd: int, expected: int | None) -> None:
    assert resolve_fd(pid, fd, PROCFS) == expected


@pytest.mark.parametrize(
    ("pid", "vcpu", "expected"),
    [
        (1001, 1, RUN1),
        (7525, 3, REAL_RUN3),
        (7525, 0, REAL_RUN0),
        (15285, 1, QEMU_RUNS[15285][1]),
        (15359, 1, None),  # a one-vCPU QEMU
        (1060, 0, None),  # ambiguous
        (1060, 2, RUN2),
        (1001, 5, None),  # no such vCPU
        (1090, 0, None),  # no maps
        (99999, 0, None),
    ],
)
def test_vcpu_run_addr(pid: int, vcpu: int, expected: int | None) -> None:
    assert vcpu_run_addr(pid, vcpu, PROCFS) == expected


def test_maps_parsing_edge_cases(tmp_path: Path) -> None:
    maps = "\n".join(
        [
            "7f0000000000-7f0000003000 rw-s 00000000 00:10 1038    anon_inode:kvm-vcpu:12",
            "7f0000010000-7f0000011000 rw-s 00000000 00:10 1038    anon_inode:kvm-vcpu-stats:4",
            "7f0000020000-7f0000023000 rw-s 00000000 00:10 1038    anon_inode:kvm-vcpu:4 ",
            "7f0000030000-7f0000031000 rw-s 00002000 00:10 1038    anon_inode:kvm-vcpu:5",
            "7f0000040000-7f0000043000 rw-s 00000000 00:10 1038    anon_inode:kvm-vm",
            "7f0000050000-7f0000051000 rw-p 00000000 00:00 0 ",
            "garbage",
            "zzzz-yyyy rw-s 00000000 00:10 1038    anon_inode:kvm-vcpu:6",
            "7f0000060000-7f0000061000 rw-s 00000000 00:10 1038 /tmp/anon_inode:kvm-vcpu:7",
        ]
    )
    make_proc(tmp_path, 4242, ["x"], "x", maps=maps)
    assert vcpu_run_addr(4242, 12, tmp_path) == 0x7F0000000000
    assert vcpu_run_addr(4242, 4, tmp_path) == 0x7F0000020000  # not the stats fd's mapping
    assert vcpu_run_addr(4242, 5, tmp_path) is None  # only a non-zero offset
    assert vcpu_run_addr(4242, 6, tmp_path) is None
    assert vcpu_run_addr(4242, 7, tmp_path) is None  # a file whose name merely ends alike


def test_stats_fd_is_not_a_vcpu_fd(tmp_path: Path) -> None:
    # KVM_GET_STATS_FD on a vCPU gives "anon_inode:kvm-vcpu-stats:<id>" (seen on the real host).
    fds = {
        3: "anon_inode:kvm-vcpu-stats:0",
        4: "anon_inode:kvm-vm-stats",
        5: "anon_inode:kvm-vcpu:0",
    }
    make_proc(tmp_path, 4242, ["x"], "x", fds=fds)
    assert [(v.fd, v.vcpu_id) for v in discover_vcpus(tmp_path)] == [(5, 0)]
    assert resolve_fd(4242, 3, tmp_path) is None


def test_fd_closed_mid_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_proc(
        tmp_path, 4242, ["x"], "x", fds={3: "anon_inode:kvm-vcpu:0", 4: "anon_inode:kvm-vcpu:1"}
    )
    real_readlink = os.readlink

    def readlink(path: str | os.PathLike[str]) -> str:
        if str(path).endswith("/fd/3"):
            raise FileNotFoundError(path)
        return real_readlink(path)

    monkeypatch.setattr(os, "readlink", readlink)  # vmident looks it up at call time
    assert discover_vcpus(tmp_path) == [DiscoveredVcpu(4242, 4, 1, None)]


@pytest.mark.parametrize("error", [FileNotFoundError, ProcessLookupError, PermissionError])
def test_pid_failing_mid_scan_is_skipped_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: type[OSError]
) -> None:
    make_proc(tmp_path, 10, ["a"], "a", fds={3: "anon_inode:kvm-vcpu:0"})
    make_proc(tmp_path, 20, ["b"], "b", fds={3: "anon_inode:kvm-vcpu:0"})
    make_proc(tmp_path, 30, ["c"], "c", fds={3: "anon_inode:kvm-vcpu:0"})
    real_read_bytes = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self == tmp_path / "20" / "maps":
            raise error("gone")  # ESRCH: reading maps of a process that just exited
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert [v.pid for v in discover_vcpus(tmp_path)] == [10, 30]


def test_discover_without_proc(tmp_path: Path) -> None:
    assert discover_vcpus(tmp_path / "missing") == []


# --- pid identity ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stat", "expected"),
    [
        ("77 (a b) (c)) R 1 77 77 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 31337 0 0", 31337),
        ("77 (x) S 1 2 3", None),  # truncated
        ("77 x S 1 77 77 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 31337 0 0", None),  # no parens
        ("", None),
    ],
)
def test_process_start_time_parsing(tmp_path: Path, stat: str, expected: int | None) -> None:
    (tmp_path / "77").mkdir()
    (tmp_path / "77" / "stat").write_text(stat)
    assert process_start_time(77, tmp_path) == expected


def test_process_start_time_of_fixtures() -> None:
    assert process_start_time(1001, PROCFS) == 1180342
    assert process_start_time(7525, PROCFS) == 649474  # the real capture
    assert process_start_time(15285, PROCFS) == 196876  # real QEMU
    assert process_start_time(17758, PROCFS) == 211185  # real QEMU under libvirt
    assert process_start_time(1080, PROCFS) is None
    assert process_start_time(99999, PROCFS) is None


def test_process_alive_tells_reused_pid_apart() -> None:
    assert process_alive(1070, 5400400, PROCFS)
    assert not process_alive(1070, 5400401, PROCFS)  # same pid, another process
    assert not process_alive(1080, 5400400, PROCFS)  # gone


# --- live: the real /proc and /dev/kvm ------------------------------------------------------

KVM_CREATE_VM = 0xAE01
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41

needs_kvm = pytest.mark.skipif(
    not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm (read+write)"
)


@pytest.fixture
def live_vcpus() -> Iterator[tuple[int, int, int, int, int]]:
    """(vm fd, vCPU 0 fd, vCPU 5 fd, a dup of vCPU 5's fd, vCPU 5's kvm_run address)."""
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    fds = [kvm]
    try:
        vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
        fds.append(vm)
        vcpu0 = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
        fds.append(vcpu0)
        vcpu5 = fcntl.ioctl(vm, KVM_CREATE_VCPU, 5)
        fds.append(vcpu5)
        dup5 = os.dup(vcpu5)
        fds.append(dup5)
        size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0)
        run = mmap.mmap(vcpu5, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        view = ctypes.c_char.from_buffer(run)
        addr = ctypes.addressof(view)
        del view  # release the buffer export so the mapping can be closed
        try:
            yield vm, vcpu0, vcpu5, dup5, addr
        finally:
            run.close()
    finally:
        for fd in fds:
            os.close(fd)


@needs_kvm
def test_live_vcpu_fds(live_vcpus: tuple[int, int, int, int, int]) -> None:
    vm, vcpu0, vcpu5, dup5, addr = live_vcpus
    pid = os.getpid()
    assert resolve_fd(pid, vcpu0) == 0
    assert resolve_fd(pid, vcpu5) == 5  # the id given to KVM_CREATE_VCPU, not a counter
    assert resolve_fd(pid, dup5) == 5
    assert resolve_fd(pid, vm) is None
    assert vcpu_run_addr(pid, 5) == addr
    assert vcpu_run_addr(pid, 0) is None  # never mmapped
    mine = {(v.fd, v.vcpu_id, v.run_addr) for v in discover_vcpus() if v.pid == pid}
    assert {(vcpu0, 0, None), (vcpu5, 5, addr), (dup5, 5, addr)} <= mine


def test_live_self() -> None:
    pid = os.getpid()
    comm = Path("/proc/self/comm").read_text().rstrip("\n")
    assert identify_vm(pid) == VmIdentity(
        name=f"{comm}[{pid}]", vmm="other", uuid=None, source="comm"
    )
    start = process_start_time(pid)
    assert start is not None
    assert process_alive(pid, start)
    assert not process_alive(pid, start + 1)


def _wait_for_state(pid: int, state: bytes) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
        if raw[raw.rfind(b")") + 2 :].startswith(state):
            return
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} never reached state {state!r}")


def test_live_exit_zombie_and_reap() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        start = process_start_time(child.pid)
        assert start is not None
        assert identify_vm(child.pid).source == "comm"
        assert child.stdin is not None
        child.stdin.close()  # the child exits ...
        _wait_for_state(child.pid, b"Z")  # ... and stays a zombie until reaped
        # A zombie leader still counts as alive (its threads may run); its cmdline is empty.
        assert process_alive(child.pid, start)
        assert identify_vm(child.pid).source == "comm"
    finally:
        child.kill()
        child.wait()
    assert not process_alive(child.pid, start)
    assert identify_vm(child.pid).source == "unavailable"


def test_live_pid_beyond_pid_max() -> None:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    assert identify_vm(pid_max + 1).source == "unavailable"
    assert resolve_fd(pid_max + 1, 0) is None
    assert process_start_time(pid_max + 1) is None
