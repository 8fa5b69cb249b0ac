"""tracer.preflight and tracer.tracefs on fake /proc, tracefs and /lib/modules trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from tracer import preflight
from tracer.preflight import (
    CAP_BPF,
    CAP_PERFMON,
    CAP_SYS_ADMIN,
    CheckResult,
    check_headers,
    check_kvm_device,
    check_privileges,
    check_tracefs,
    check_tracepoints,
    effective_caps,
    failures,
    trial_load,
)
from tracer.tracefs import TRACEFS_CANDIDATES, tracefs_root

ROOT_CAPS = 0x000001FFFFFFFFFF  # CapEff of root on a 6.x kernel (41 capabilities)


def bit(n: int) -> int:
    return 1 << n


# ---- privileges ---------------------------------------------------------------------------------

def test_capability_numbers_are_the_kernels() -> None:
    # include/uapi/linux/capability.h
    assert (CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF) == (21, 38, 39)


@pytest.mark.parametrize("caps", [
    ROOT_CAPS,
    0x000001FFFEFFFFFF,  # root lacking CAP_SYS_RESOURCE (seen in containers)
    bit(CAP_SYS_ADMIN),
    bit(CAP_BPF) | bit(CAP_PERFMON),
    bit(CAP_BPF) | bit(CAP_PERFMON) | bit(2),  # + CAP_DAC_READ_SEARCH
])
def test_privileges_ok(caps: int) -> None:
    result = check_privileges(caps)
    assert result.ok
    assert result.name == "privileges"
    assert not failures([result])


@pytest.mark.parametrize("caps", [
    0,
    bit(CAP_BPF),
    bit(CAP_PERFMON),
    ROOT_CAPS & ~bit(CAP_SYS_ADMIN) & ~bit(CAP_BPF),
    ROOT_CAPS & ~bit(CAP_SYS_ADMIN) & ~bit(CAP_PERFMON),
])
def test_privileges_missing(caps: int) -> None:
    result = check_privileges(caps)
    assert not result.ok and result.required
    assert "CAP_BPF" in result.detail
    assert "root" in result.fix and "CAP_BPF" in result.fix and "CAP_PERFMON" in result.fix
    assert failures([result]) == [result]


def test_privileges_default_reads_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight, "effective_caps", lambda: 0)
    assert not check_privileges().ok
    monkeypatch.setattr(preflight, "effective_caps", lambda: bit(CAP_SYS_ADMIN))
    assert check_privileges().ok


def test_effective_caps_parses_capeff(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tpython3\nCapInh:\t0000000000000000\nCapPrm:\t000001fffeffffff\n"
                      "CapEff:\t000000c000200000\nCapBnd:\t000001ffffffffff\n")
    assert effective_caps(status) == bit(CAP_SYS_ADMIN) | bit(CAP_PERFMON) | bit(CAP_BPF)


@pytest.mark.parametrize("text", ["Name:\tx\n", "CapEff:\tnot-hex\n", ""])
def test_effective_caps_unparsable_is_none(tmp_path: Path, text: str) -> None:
    status = tmp_path / "status"
    status.write_text(text)
    assert effective_caps(status) == 0


def test_effective_caps_unreadable_is_none(tmp_path: Path) -> None:
    assert effective_caps(tmp_path / "absent") == 0


def test_effective_caps_of_this_process_agree_with_proc() -> None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            assert effective_caps() == int(line.split()[1], 16)
            break
    else:  # pragma: no cover - every Linux has CapEff
        pytest.fail("no CapEff in /proc/self/status")


# ---- tracefs ------------------------------------------------------------------------------------

def test_tracefs_missing_says_how_to_mount_it() -> None:
    result = check_tracefs(None)
    assert not result.ok and result.required
    assert "mount -t tracefs" in result.fix
    assert "/sys/kernel/tracing" in result.fix
    assert "mount -t tracefs" in result.line()


def test_tracefs_present(tmp_path: Path) -> None:
    result = check_tracefs(tmp_path)
    assert result.ok
    assert str(tmp_path) in result.detail


def make_tracefs(root: Path, *events: str) -> Path:
    for event in events:
        (root / "events" / event).mkdir(parents=True)
    (root / "events").mkdir(parents=True, exist_ok=True)
    return root


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


def test_tracepoints_all_present(tmp_path: Path) -> None:
    root = make_tracefs(tmp_path, "kvm/kvm_userspace_exit", "kvm/kvm_exit", "kvm/kvm_entry",
                        "syscalls/sys_enter_ioctl")
    results = check_tracepoints(root)
    assert all(r.ok for r in results)
    assert failures(results) == []
    assert set(by_name(results)) == {"kvm tracepoints", "guest tracepoints",
                                     "syscall tracepoints"}


def test_tracepoints_without_kvm(tmp_path: Path) -> None:
    results = by_name(check_tracepoints(make_tracefs(tmp_path, "syscalls/sys_enter_ioctl")))
    kvm = results["kvm tracepoints"]
    assert not kvm.ok and kvm.required
    assert kvm.detail == "kvm:kvm_userspace_exit missing"
    assert "modprobe kvm" in kvm.fix
    assert results["syscall tracepoints"].ok
    assert failures(list(results.values())) == [kvm]


def test_tracepoints_without_syscalls(tmp_path: Path) -> None:
    root = make_tracefs(tmp_path, "kvm/kvm_userspace_exit", "kvm/kvm_exit", "kvm/kvm_entry")
    results = by_name(check_tracepoints(root))
    sys_tp = results["syscall tracepoints"]
    assert not sys_tp.ok and sys_tp.required
    assert "sys_enter_ioctl" in sys_tp.detail
    assert "CONFIG_FTRACE_SYSCALLS" in sys_tp.fix
    assert failures(list(results.values())) == [sys_tp]


@pytest.mark.parametrize(("present", "shown"), [
    ((), "none"),
    (("kvm/kvm_exit",), "kvm_exit"),
    (("kvm/kvm_entry",), "kvm_entry"),
])
def test_guest_tracepoints_are_optional(tmp_path: Path, present: tuple[str, ...],
                                        shown: str) -> None:
    root = make_tracefs(tmp_path, "kvm/kvm_userspace_exit", "syscalls/sys_enter_ioctl",
                        *present)
    results = check_tracepoints(root)
    guest = by_name(results)["guest tracepoints"]
    assert not guest.ok and not guest.required
    assert f"present: {shown}" in guest.detail
    assert failures(results) == []
    assert guest.line().startswith("warn ")


def test_tracepoint_file_instead_of_directory_does_not_count(tmp_path: Path) -> None:
    root = make_tracefs(tmp_path, "syscalls/sys_enter_ioctl")
    (root / "events" / "kvm").mkdir()
    (root / "events" / "kvm" / "kvm_userspace_exit").write_text("")
    assert not by_name(check_tracepoints(root))["kvm tracepoints"].ok


def test_no_tracefs_no_tracepoint_checks() -> None:
    assert check_tracepoints(None) == []


# ---- tracefs_root -------------------------------------------------------------------------------

def test_tracefs_candidates_are_the_kernel_mount_points() -> None:
    assert [str(p) for p in TRACEFS_CANDIDATES] == ["/sys/kernel/tracing",
                                                    "/sys/kernel/debug/tracing"]


def test_tracefs_root_first_with_events(tmp_path: Path) -> None:
    first, second = tmp_path / "tracing", tmp_path / "debug" / "tracing"
    make_tracefs(first)
    make_tracefs(second)
    assert tracefs_root((first, second)) == first


def test_tracefs_root_skips_an_unmounted_mount_point(tmp_path: Path) -> None:
    first, second = tmp_path / "tracing", tmp_path / "debug" / "tracing"
    first.mkdir()  # the empty sysfs directory of an unmounted tracefs
    make_tracefs(second)
    assert tracefs_root((first, second)) == second
    assert tracefs_root((tmp_path / "absent", second)) == second


def test_tracefs_root_none(tmp_path: Path) -> None:
    (tmp_path / "tracing").mkdir()
    assert tracefs_root((tmp_path / "tracing", tmp_path / "absent")) is None
    assert tracefs_root(()) is None


def test_tracefs_root_skips_an_unreadable_candidate(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # what a non-root user meets on /sys/kernel/debug (mode 0700); root bypasses modes
    denied, good = tmp_path / "denied", make_tracefs(tmp_path / "good")
    real_is_dir = Path.is_dir

    def is_dir(self: Path) -> bool:
        if self.is_relative_to(denied):
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_dir(self)

    monkeypatch.setattr(Path, "is_dir", is_dir)
    assert tracefs_root((denied, good)) == good
    assert tracefs_root((denied,)) is None


# ---- kernel headers -----------------------------------------------------------------------------

RELEASE = "6.1.0-99-amd64"


def _headers(tree: Path, *, generated: bool = True, kconfig: bool = True) -> None:
    if generated:
        (tree / "include" / "generated").mkdir(parents=True, exist_ok=True)
        (tree / "include" / "generated" / "autoconf.h").write_text("")
    if kconfig:
        (tree / "include" / "linux").mkdir(parents=True, exist_ok=True)
        (tree / "include" / "linux" / "kconfig.h").write_text("")


def test_headers_present_in_one_tree(tmp_path: Path) -> None:
    _headers(tmp_path / RELEASE / "build")
    result = check_headers(RELEASE, tmp_path)
    assert result.ok
    assert str(tmp_path / RELEASE / "build") in result.detail


def test_headers_present_through_a_symlink(tmp_path: Path) -> None:
    headers = tmp_path / "usr-src" / f"linux-headers-{RELEASE}"
    _headers(headers)
    (tmp_path / "modules" / RELEASE).mkdir(parents=True)
    (tmp_path / "modules" / RELEASE / "build").symlink_to(headers)
    result = check_headers(RELEASE, tmp_path / "modules")
    assert result.ok
    assert str(headers) in result.detail  # shows where the link points


def test_headers_split_like_debian(tmp_path: Path) -> None:
    """linux-headers-*-amd64 has the generated config, -common has kconfig.h (via source/)."""
    _headers(tmp_path / RELEASE / "build", kconfig=False)
    assert not check_headers(RELEASE, tmp_path).ok
    _headers(tmp_path / RELEASE / "source", generated=False)
    assert check_headers(RELEASE, tmp_path).ok


def test_headers_with_an_empty_include_dir_are_incomplete(tmp_path: Path) -> None:
    (tmp_path / RELEASE / "build" / "include").mkdir(parents=True)
    result = check_headers(RELEASE, tmp_path)
    assert not result.ok and "incomplete" in result.detail


@pytest.mark.parametrize("layout", ["nothing", "release-only", "empty-build", "dangling-link",
                                    "other-release"])
def test_headers_absent(tmp_path: Path, layout: str) -> None:
    if layout == "release-only":
        (tmp_path / RELEASE).mkdir()
    elif layout == "empty-build":
        (tmp_path / RELEASE / "build").mkdir(parents=True)
    elif layout == "dangling-link":
        (tmp_path / RELEASE).mkdir()
        (tmp_path / RELEASE / "build").symlink_to(tmp_path / "gone")
    elif layout == "other-release":
        (tmp_path / "6.1.0-98-amd64" / "build" / "include").mkdir(parents=True)
    result = check_headers(RELEASE, tmp_path)
    assert not result.ok and result.required
    assert f"{tmp_path / RELEASE / 'build'} " in result.detail
    assert "missing" in result.detail or "incomplete" in result.detail
    assert f"linux-headers-{RELEASE}" in result.fix
    assert "setup-host.sh" in result.fix


def test_headers_default_release_is_the_running_kernel(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("platform.release", lambda: RELEASE)
    assert not check_headers(modules=tmp_path).ok
    _headers(tmp_path / RELEASE / "build")
    assert check_headers(modules=tmp_path).ok


# ---- /dev/kvm and trial load --------------------------------------------------------------------

def test_kvm_device_is_optional(tmp_path: Path) -> None:
    absent = check_kvm_device(tmp_path / "kvm")
    assert not absent.ok and not absent.required
    assert failures([absent]) == []
    (tmp_path / "kvm").write_text("")
    assert check_kvm_device(tmp_path / "kvm").ok


def test_trial_load_reports_the_exception() -> None:
    def boom() -> None:
        raise RuntimeError("verifier said no")

    result = trial_load(boom)
    assert not result.ok and result.required
    assert result.detail == "verifier said no"
    assert trial_load(lambda: None).ok


# ---- CheckResult.line() and failures() ----------------------------------------------------------

def test_line_ok_hides_the_fix() -> None:
    line = CheckResult("tracefs", True, "mounted at /x", "never shown").line()
    assert line == "ok   tracefs            mounted at /x"


def test_line_failed_with_fix() -> None:
    line = CheckResult("tracefs", False, "not mounted", "mount it").line()
    assert line == "FAIL tracefs            not mounted\n     fix: mount it"


def test_line_failed_without_fix_is_one_line() -> None:
    assert CheckResult("x", False, "broken").line() == "FAIL x" + " " * 17 + " broken"


def test_line_optional_failure_is_a_warning() -> None:
    line = CheckResult("/dev/kvm", False, "absent", "modprobe", required=False).line()
    assert line == "warn /dev/kvm           absent\n     fix: modprobe"


def test_line_long_name_is_not_cut() -> None:
    line = CheckResult("syscall tracepoints", True, "present").line()
    assert line == "ok   syscall tracepoints present"


def test_failures_keeps_required_failures_in_order() -> None:
    a = CheckResult("a", False, "x")
    b = CheckResult("b", True, "x")
    c = CheckResult("c", False, "x", required=False)
    d = CheckResult("d", False, "x")
    assert failures([a, b, c, d]) == [a, d]
    assert failures([b, c]) == []
    assert failures([]) == []
