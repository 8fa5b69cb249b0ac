"""vCPU discovery when other processes' /proc/PID/fd or /maps may not be read (an AppArmor profile,
missing CAP_SYS_PTRACE / CAP_DAC_READ_SEARCH): counted and explained, never silently skipped.

The permission errors are real: file modes on a fixture tree, read by a child process that
lacks CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (setpriv drops them when the tests run as root,
who would otherwise read anything).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from test_vmident import make_proc

from tracer.alerts import MemorySink
from tracer.daemon import Daemon
from tracer.vmident import (
    CAP_DAC_READ_SEARCH,
    CAP_SYS_PTRACE,
    VcpuScan,
    explain_denied,
    lsm_label,
)

ROOT = Path(__file__).resolve().parents[2]
ALL_CAPS = (1 << 41) - 1
VCPU0 = "anon_inode:kvm-vcpu:0"
MAPS = "7f0000000000-7f0000003000 rw-s 00000000 00:10 1038    anon_inode:kvm-vcpu:0\n"
SCAN = (
    "import json, sys\n"
    "from pathlib import Path\n"
    "from tracer.vmident import scan_vcpus\n"
    "scan = scan_vcpus(Path(sys.argv[1]))\n"
    "print(json.dumps({'vcpus': [[v.pid, v.fd, v.vcpu_id, v.run_addr] for v in scan.vcpus],\n"
    "                  'unreadable': scan.unreadable}))\n"
)


def _scan_unprivileged(proc_root: Path) -> dict[str, object]:
    argv = [sys.executable, "-c", SCAN, str(proc_root)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is needed to drop root's DAC override"
        drop = "-dac_override,-dac_read_search"
        argv = [setpriv, f"--inh-caps={drop}", f"--bounding-set={drop}", "--", *argv]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True,
                            timeout=60)
    scan: dict[str, object] = json.loads(result.stdout)
    return scan


def test_unreadable_processes_are_counted_with_their_vmm(tmp_path: Path) -> None:
    make_proc(tmp_path, 10, ["qemu-system-x86_64", "-name", "guest=ok"], "qemu-system-x86",
              fds={5: VCPU0}, maps=MAPS)
    # fd/ not listable (mode 0500 of another user, without CAP_DAC_READ_SEARCH).
    denied_list = make_proc(tmp_path, 20, ["/usr/bin/qemu-system-x86_64"], "qemu-system-x86",
                            fds={5: VCPU0}, maps=MAPS) / "fd"
    # fd/ listable but its links not resolvable: what a ptrace-read denial (AppArmor) leaves.
    denied_links = make_proc(tmp_path, 30, ["firecracker", "--id", "fc1"], "firecracker",
                             fds={5: VCPU0}, maps=MAPS) / "fd"
    # The fds read, the maps not.
    denied_maps = make_proc(tmp_path, 40, ["/opt/myvmm"], "myvmm", fds={5: VCPU0},
                            maps=MAPS) / "maps"
    gone = make_proc(tmp_path, 50, ["qemu-system-x86_64"], "qemu-system-x86", fds={5: VCPU0})
    shutil.rmtree(gone / "fd")  # vanished mid-scan: not a permission problem
    make_proc(tmp_path, 60, ["bash"], "bash", fds={0: "/dev/null"})
    modes = {denied_list: 0o000, denied_links: 0o400, denied_maps: 0o000}
    try:
        for path, mode in modes.items():
            path.chmod(mode)
        scan = _scan_unprivileged(tmp_path)
    finally:
        for path in modes:
            path.chmod(0o700)
    assert scan == {
        "vcpus": [[10, 5, 0, 0x7F0000000000]],
        "unreadable": {"20": "qemu", "30": "firecracker", "40": "other"},
    }


def test_an_apparmor_profile_is_named_with_the_fix() -> None:
    cause, fix = explain_denied(ALL_CAPS, "docker-default (enforce)")
    assert "'docker-default (enforce)'" in cause and "ptrace" in cause
    assert "--security-opt apparmor=unconfined" in fix and "appArmorProfile" in fix
    cause, _ = explain_denied(ALL_CAPS, "system_u:system_r:container_t:s0:c1,c2")  # SELinux
    assert "container_t" in cause


def test_missing_capabilities_are_named() -> None:
    cause, fix = explain_denied(ALL_CAPS & ~(1 << CAP_SYS_PTRACE), None)
    assert cause == "no CAP_SYS_PTRACE"
    assert fix.startswith("grant SYS_PTRACE (docker run --cap-add")
    both = ALL_CAPS & ~(1 << CAP_SYS_PTRACE) & ~(1 << CAP_DAC_READ_SEARCH)
    cause, fix = explain_denied(both, "unconfined")
    assert cause == "no CAP_SYS_PTRACE or CAP_DAC_READ_SEARCH"
    assert "SYS_PTRACE, DAC_READ_SEARCH" in fix and "apparmor" not in fix
    cause, fix = explain_denied(both, "docker-default (enforce)")
    assert "CAP_SYS_PTRACE" in cause and "docker-default" in cause


def test_an_unknown_cause_still_says_what_to_look_at() -> None:
    for label in (None, "unconfined", "docker-default (complain)"):  # complain mode denies nothing
        cause, fix = explain_denied(ALL_CAPS, label)
        assert "AppArmor, SELinux" in cause and fix


def test_lsm_label(tmp_path: Path) -> None:
    assert lsm_label(tmp_path) is None
    attr = tmp_path / "self" / "attr"
    attr.mkdir(parents=True)
    (attr / "current").write_bytes(b"\n")
    assert lsm_label(tmp_path) is None
    (attr / "current").write_bytes(b"system_u:system_r:spc_t:s0\0")
    assert lsm_label(tmp_path) == "system_u:system_r:spc_t:s0"
    (attr / "apparmor").mkdir()
    (attr / "apparmor" / "current").write_bytes(b"cri-containerd.apparmor.d (enforce)\n")
    assert lsm_label(tmp_path) == "cri-containerd.apparmor.d (enforce)"


def test_the_daemon_warns_once_naming_the_vmms() -> None:
    sink = MemorySink()
    scan = VcpuScan([], {20: "qemu", 30: "firecracker", 40: "other"})
    Daemon._warn_unreadable(SimpleNamespace(sink=sink), scan)  # type: ignore[arg-type]
    ((event, fields),) = sink.notices
    assert event == "vcpu_discovery_incomplete"
    assert fields["processes_unreadable"] == 3
    assert fields["vmm_pids"] == {"20": "qemu", "30": "firecracker"}
    assert fields["likely_cause"] and fields["fix"]


def test_only_processes_named_as_vmms_count_as_unreadable_vmms() -> None:
    # The daemon warns on these only (tests/e2e/test_health_endpoints.py: a sandbox's
    # unreadable init is counted in the ready line, without a warning).
    assert VcpuScan([], {1: "other", 40: "other"}).unreadable_vmms == {}
    assert VcpuScan([], {1: "other", 7: "qemu"}).unreadable_vmms == {7: "qemu"}
