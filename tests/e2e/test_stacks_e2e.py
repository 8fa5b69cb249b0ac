"""Stacks of real VMMs under `watch`, with real KVM and the daemon's real probes: the test VMMs
built here the ways VMM projects build (C -O2 -g, -O2 stripped, -O0 -g, frame pointers, the
offending function inlined; Rust debug, release with and without debuginfo, stripped), Debian's
QEMU booting SeaBIOS, and debug info served by a local debuginfod.

Every build names save_vcpu_state (or marks it inlined into its caller) at the line of its
KVM_GET_REGS where there is DWARF; a stripped build gives module+offset, checked against the
symbol table of its unstripped twin (strip changes no code)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import requires_kvm_bpf
from test_watch_e2e import (
    REPO,
    VMMS,
    _rustc,
    _skip_tool,
    build_id,
    finish_watch,
    kill_group,
    start_watch,
    vmm_cmd,
    watch,
)


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


pytestmark = [pytest.mark.e2e, requires_kvm_bpf]

INLINE = "-DSAVE_VCPU_STATE_ATTR=static inline __attribute__((always_inline))"
C_BUILDS = {
    "c-O2-g": ["-O2", "-g"],
    "c-O2-stripped": ["-O2"],
    "c-O0-g": ["-O0", "-g"],
    "c-O2-frame-pointers": ["-O2", "-g", "-fno-omit-frame-pointer"],
    "c-O2-inlined": ["-O2", "-g", INLINE],
}
RUST_BUILDS = {
    "rust-debug": ["-C", "debuginfo=2", "-C", "opt-level=0"],  # what cargo build / test use
    "rust-release-debuginfo": ["-C", "opt-level=3", "-C", "debuginfo=2"],
    "rust-release": ["-C", "opt-level=3"],
    "rust-release-stripped": ["-C", "opt-level=3"],
}
STRIPPED = {"c-O2-stripped", "rust-release-stripped"}
NO_DWARF = STRIPPED | {"rust-release"}


def _line_of(source: Path, needle: str) -> int:
    return next(i for i, line in enumerate(source.read_text().splitlines(), 1) if needle in line)


C_LINE = _line_of(VMMS / "buggy_vmm.c", "ioctl(v->vcpu, KVM_GET_REGS")
RUST_LINE = _line_of(VMMS / "buggy_vmm.rs", "ioctl(vm.vcpu, KVM_GET_REGS")


@pytest.fixture(scope="session")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every flavour, and each stripped one's unstripped twin (``NAME.unstripped``)."""
    where = tmp_path_factory.mktemp("vmm-builds")
    out: dict[str, Path] = {}
    cc = shutil.which("gcc")
    rustc = _rustc()
    if cc is None or rustc is None:
        _skip_tool("gcc and rustc are needed (scripts/setup-host.sh test installs them)")
    assert cc is not None and rustc is not None
    for name, flags in C_BUILDS.items():
        out[name] = where / name
        subprocess.run([cc, *flags, "-Wall", "-o", str(out[name]), str(VMMS / "buggy_vmm.c")],
                       check=True, timeout=120)
    for name, flags in RUST_BUILDS.items():
        out[name] = where / name
        subprocess.run([rustc, "--edition", "2021", *flags, "-o", str(out[name]),
                        str(VMMS / "buggy_vmm.rs")], check=True, timeout=300, cwd=where)
    for name in STRIPPED:
        twin = where / f"{name}.unstripped"
        out[name].rename(twin)
        subprocess.run(["strip", "-o", str(out[name]), str(twin)], check=True, timeout=60)
        out[f"{name}.unstripped"] = twin
    return out


def _symbol_range(binary: Path, suffix: str) -> tuple[int, int]:
    """[start, end) of the function whose demangled name ends with ``suffix``, by nm."""
    text = subprocess.run(["nm", "-C", "-S", str(binary)], capture_output=True, text=True,
                          check=True).stdout
    for line in text.splitlines():
        parts = line.split(maxsplit=3)
        if len(parts) == 4 and parts[2] in "tT" and parts[3].endswith(suffix):
            return int(parts[0], 16), int(parts[0], 16) + int(parts[1], 16)
    raise AssertionError(f"{suffix} not in {binary}'s symbols")


def _vaddr_of(binary: Path, file_offset: int) -> int:
    """The address a file offset is loaded at, by readelf's program headers."""
    text = subprocess.run(["readelf", "-lW", str(binary)], capture_output=True, text=True,
                          check=True).stdout
    for line in text.splitlines():
        parts = line.split()
        if parts[:1] == ["LOAD"]:
            offset, vaddr, size = int(parts[1], 16), int(parts[2], 16), int(parts[4], 16)
            if offset <= file_offset < offset + size:
                return file_offset - offset + vaddr
    raise AssertionError(f"{file_offset:#x} is in no loadable segment of {binary}")


def _save_finding(findings: list[dict[str, Any]]) -> dict[str, Any]:
    return next(f for f in findings if f["kind"] == "save" and f["ioctl"] == "KVM_GET_REGS")


def _assert_frames_sound(stack: dict[str, Any]) -> None:
    for fr in stack["frames"]:
        assert fr["module"] and fr["file_offset"] is not None, fr
        assert fr["build_id"] == build_id(fr["module"]), fr
        assert set(fr) >= {"address", "function", "file", "line", "column", "inlined"}


@pytest.mark.parametrize("flavour", [*C_BUILDS, *RUST_BUILDS])
def test_every_build_names_the_offending_line(tmp: Path, builds: dict[str, Path],
                                              flavour: str) -> None:
    binary = builds[flavour]
    rust = flavour.startswith("rust")
    function = "buggy_vmm::save_vcpu_state" if rust else "save_vcpu_state"
    run = watch(tmp, [str(binary), "3"])
    assert run.status == 66, run.explain()
    assert run.result is not None
    assert set(run.result["stacks_missed"].values()) == {0}, run.result["stacks_missed"]
    finding = _save_finding(run.findings)
    assert finding["count"] == 3  # one finding: every occurrence has the same call site
    stack = finding["stack"]
    assert stack["method"] == "cfi" and stack["complete"] is True, stack
    _assert_frames_sound(stack)
    frames = stack["frames"]
    mine = [fr for fr in frames if os.path.samefile(fr["module"], binary)]
    site = finding["call_site"]
    assert os.path.samefile(site["module"], binary)
    block = "\n".join(next(b for b in run.blocks() if "KVM_GET_REGS while" in b[0]))
    if flavour in STRIPPED:
        start, end = _symbol_range(builds[f"{flavour}.unstripped"], function)
        # The first frame in the VMM's code is inside save_vcpu_state.
        assert site["function"] is None, site
        assert start <= _vaddr_of(binary, site["file_offset"]) < end, (site, start, end)
        assert f"  call site: {binary.name}+{site['file_offset']:#x}" in block
        assert not any(fr["function"] for fr in mine)
        return
    assert site["function"] == function, site
    named = [fr for fr in frames if fr["function"] == function]
    assert len(named) == 1, frames
    save = named[0]
    if flavour in NO_DWARF:  # function+offset, no line
        assert save["line"] is None and save["function_offset"]
        assert f"in {function}+{save['function_offset']:#x} ({binary.name}+" in block
        return
    line = RUST_LINE if rust else C_LINE
    source = "buggy_vmm.rs" if rust else "buggy_vmm.c"
    assert save["file"].endswith(source) and save["line"] == line and save["column"], save
    assert site["file"] == save["file"] and site["line"] == line
    assert f"  call site: {function} {save['file']}:{line} ({binary.name})" in block
    assert re.search(rf"#\d+ 0x[0-9a-f]+ in {re.escape(function)} {re.escape(save['file'])}:"
                     rf"{line}:\d+ \({re.escape(binary.name)}\+0x[0-9a-f]+\)", block), block
    index = frames.index(save)
    if flavour == "c-O2-inlined":
        caller = frames[index + 1]
        assert save["inlined"] is True and caller["inlined"] is False
        # gcc names a specialised copy of vmm vmm.isra.0 (gcc 14) or vmm.constprop.0
        assert caller["address"] == save["address"]
        assert caller["function"].split(".")[0] in ("vmm", "main"), caller
        assert "[inlined]" in block
    else:
        assert save["inlined"] is False
    if rust:  # demangled: no hash, no escapes
        names = [fr["function"] for fr in frames if fr["function"]]
        assert "buggy_vmm::main" in names
        assert not any(re.search(r"::h[0-9a-f]{16}$|\$u[0-9a-f]+\$|^_ZN|^_R", n) for n in names)


def test_a_burst_of_twenty_reports_keeps_every_stack(tmp: Path) -> None:
    """The Python test VMM reads 10 kinds of state in one burst, twice: 20 reports, faster
    than the reader takes them. Under watch's ring the probes may send 256 stacks between two
    reads (one per 32 KiB), so each finding has its own; with 8 (run's default ring) 12 of
    them went without, their call site unknown."""
    run = watch(tmp, vmm_cmd("buggy-io-out", tmp / "vmm.json", 2))
    assert run.status == 66, run.explain()
    assert run.result is not None
    assert set(run.result["stacks_missed"].values()) == {0}, run.result["stacks_missed"]
    saves = [f for f in run.findings if f["kind"] == "save"]
    assert len(saves) == 10 and all(f["count"] == 2 for f in saves), saves
    for f in saves:
        assert f["stack"] and f["stack"]["frames"], f
    assert "unknown call site" not in run.stderr


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _gone_before_read(tmp: Path, cmd: list[str]) -> Any:
    """``watch -- cmd`` with watch stopped (SIGSTOP) from before cmd starts until it has
    exited: every event of the VMM, its exec and first vCPU included, is read after it is gone,
    so its mappings are never read from /proc and its stacks are placed from the captures
    alone (the auxiliary vector in the stack copy, the kernel's walk)."""
    go = tmp / "go"
    go.unlink(missing_ok=True)
    script = f'while [ ! -e "{go}" ]; do sleep 0.01; done; exec "$@"'
    started = time.monotonic()
    proc = start_watch(tmp, ["sh", "-c", script, "sh", *cmd])
    try:
        deadline = time.monotonic() + 60
        child = None
        while child is None:  # watch forks CMD once its probes are attached
            assert proc.poll() is None and time.monotonic() < deadline, "CMD did not start"
            kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            child = next((int(k) for k in kids if _cmdline(int(k))[:2] == ["sh", "-c"]), None)
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            go.touch()
            while Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                assert time.monotonic() < deadline, "the VMM did not exit"
                time.sleep(0.02)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
    except BaseException:
        kill_group(proc)
        raise
    return finish_watch(proc, tmp, started)


@pytest.mark.parametrize("flavour", ["c-O2-g", "rust-release"])
def test_a_vmm_gone_before_its_mappings_were_read_gets_its_whole_stack(
        tmp: Path, builds: dict[str, Path], flavour: str) -> None:
    """A test VMM lives milliseconds: gone before the reader reads its first event (forced
    here, by stopping watch), its stack still reaches _start with the right call site."""
    function = "buggy_vmm::save_vcpu_state" if flavour.startswith("rust") else "save_vcpu_state"
    for _attempt in range(3):  # the stack's top pages are laid out anew by each exec
        run = _gone_before_read(tmp, [str(builds[flavour]), "3"])
        assert run.status == 66, run.explain()
        assert run.result is not None
        assert set(run.result["stacks_missed"].values()) == {0}, run.result["stacks_missed"]
        finding = _save_finding(run.findings)
        stack = finding["stack"]
        assert stack["method"] == "cfi" and stack["complete"] is True, (
            stack["why_partial"], stack["copied_bytes"], [fr["function"] for fr in stack["frames"]])
        assert finding["call_site"]["function"] == function, finding["call_site"]


def test_run_places_the_stack_of_a_vmm_gone_before_its_first_event_was_read(
        builds: dict[str, Path]) -> None:
    """`run` (every process on the host, no exec events of its own): the daemon stopped while a
    test VMM execs, races and exits, so all its events are read after it is gone. The file it
    exec'd, kept in the kernel until its first vCPU, still places its frames."""
    from daemon_proc import DaemonProcess

    binary = builds["rust-release"]
    daemon = DaemonProcess()
    try:
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        try:
            vmm = subprocess.run([str(binary), "3"], capture_output=True, text=True, timeout=60,
                                 check=True)
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
        pid = int(re.search(r"pid (\d+)", vmm.stdout)[1])  # type: ignore[index]
        daemon.settle()
        saves = [a for a in daemon.for_pid(pid, "completion_violation")
                 if a["ioctl"] == "KVM_GET_REGS"]
        assert len(saves) == 3, daemon.for_pid(pid, "completion_violation")
        for alert in saves:
            stack = alert["user_stack"]
            assert stack["method"] == "cfi" and stack["complete"] is True, (
                stack["why_partial"], [fr["function"] for fr in stack["frames"]])
            assert "buggy_vmm::save_vcpu_state" in [fr["function"] for fr in stack["frames"]]
    finally:
        daemon.stop()
        daemon.cleanup()


SHORT_STACK_BYTES = int(re.search(r"#define SHORT_STACK_BYTES (\d+)",
                                  (VMMS / "buggy_vmm.c").read_text())[1])


def test_the_stack_copy_reaches_the_first_page_not_present(tmp: Path,
                                                           builds: dict[str, Path]) -> None:
    """The copy of the stack's top stops at the first page that is not present, to the byte:
    a main thread's auxiliary vector (where its executable is loaded) lies just below such a
    page, and a copy rounded down to whole 512-byte pieces lost it. Here the save is issued on
    a stack that ends SHORT_STACK_BYTES below a page never touched."""
    run = watch(tmp, [str(builds["c-O2-g"]), "--short-stack", "2"])
    assert run.status == 66, run.explain()
    assert run.result is not None
    assert set(run.result["stacks_missed"].values()) == {0}, run.result["stacks_missed"]
    finding = next(f for f in run.findings if f["kind"] == "save" and f["ioctl"] == "KVM_GET_SREGS")
    stack = finding["stack"]
    assert stack["method"] == "cfi" and stack["copied_bytes"] == SHORT_STACK_BYTES, stack
    assert stack["frames"][0]["function"] == "ioctl_on_short_stack", stack


# ---- QEMU ----------------------------------------------------------------------------------------

QEMU_SCRIPT = """\
import sys, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from qemu_vm import QemuGuest

tmp = Path(tempfile.mkdtemp(prefix="kct-stacks-qemu-"))
guest = QemuGuest(tmp)
try:
    qmp = guest.connect()
    qmp.command("cont")
    guest.wait_for_firmware()
    qmp.command("system_reset")
    guest.wait_for_firmware()
    print(f"qemu pid {guest.pid} exit {guest.quit()}", flush=True)
except BaseException:
    guest.kill()
    raise
"""


def test_qemu_stack_reaches_the_vcpu_threads_start(tmp: Path) -> None:
    from qemu_vm import qemu_or_skip

    qemu = qemu_or_skip()
    script = tmp / "qemu_guest.py"
    script.write_text(QEMU_SCRIPT)
    run = watch(tmp, [sys.executable, str(script),
                      str(REPO / "tests")], "--no-sanction", "port-0x7e", timeout_s=120)
    assert run.status == 66, run.explain()
    finding = _save_finding(run.findings)
    stack = finding["stack"]
    assert stack["method"] == "cfi" and stack["complete"] is True, stack
    _assert_frames_sound(stack)
    frames = stack["frames"]
    modules = [os.path.basename(fr["module"]) for fr in frames]
    names = [fr["function"] for fr in frames]
    assert modules[0].startswith("libc.so") and names[0] in ("ioctl", "__GI___ioctl", "__ioctl")
    # QEMU's own frames: named from its dynamic symbols where it exports them
    assert os.path.samefile(frames[1]["module"], os.path.realpath(qemu))
    assert names[1] == "kvm_vcpu_ioctl" and "kvm_cpu_exec" in names
    assert finding["call_site"]["function"] == "kvm_arch_get_registers"
    # ... up to the thread's start in libc: start_thread and clone3, named where libc's symbols
    # are installed (Debian 12 here), module+offset elsewhere (Debian 13's stripped libc)
    assert modules[-1].startswith("libc.so"), modules
    assert names[-2:] in (["start_thread", "__GI___clone3"], [None, None]) or \
        names[-1] in ("clone3", "clone"), names
    assert not any("glib" in m for m in modules), modules  # g_free is not on a vCPU's stack
    assert len(frames) >= 12


# ---- debuginfod ----------------------------------------------------------------------------------

DEBUGINFOD_RUN = r"""
set -eu
ip link set lo up
debuginfod -F "$DEBUG_DIR" -p "$PORT" -d "$WORK/db.sqlite" >"$WORK/debuginfod.log" 2>&1 &
server=$!
trap 'kill $server; wait $server || true' EXIT
for _ in $(seq 300); do
    if DEBUGINFOD_URLS="http://127.0.0.1:$PORT" DEBUGINFOD_CACHE_PATH="$WORK/probe-cache" \
        debuginfod-find debuginfo "$BUILD_ID" >/dev/null 2>&1; then
        break
    fi
    sleep 0.1
done
DEBUGINFOD_URLS="http://127.0.0.1:$PORT" DEBUGINFOD_CACHE_PATH="$WORK/cache" "$@"
"""


def test_debug_info_from_a_local_debuginfod(tmp: Path, builds: dict[str, Path]) -> None:
    """A binary without DWARF, its debug file only on a debuginfod server (Debian's, over a
    directory, in a network namespace of the test's own: it is reachable on 127.0.0.1 only)."""
    for tool in ("debuginfod", "debuginfod-find", "unshare", "ip", "objcopy"):
        if shutil.which(tool) is None:
            _skip_tool(f"{tool} is not installed (scripts/setup-host.sh test installs it)")
    binary = tmp / "vmm-nodebug"
    shutil.copy(builds["c-O2-g"], binary)
    debug_dir = tmp / "served"
    debug_dir.mkdir()
    subprocess.run(["objcopy", "--only-keep-debug", str(binary), str(debug_dir / "vmm.debug")],
                   check=True)
    subprocess.run(["objcopy", "--strip-debug", str(binary)], check=True)
    script = tmp / "with_debuginfod.sh"
    script.write_text(DEBUGINFOD_RUN)
    env = dict(os.environ, DEBUG_DIR=str(debug_dir), PORT="18002", WORK=str(tmp),
               BUILD_ID=build_id(str(binary)))
    env.pop("DEBUGINFOD_URLS", None)
    # watch() runs `python -m tracer watch ...`; here inside the namespace, after the server.
    argv = ["unshare", "--net", "bash", str(script)]
    run = _watch_in(tmp, argv, env, [str(binary), "3"])
    assert run.status == 66, run.explain()
    save = next(fr for fr in _save_finding(run.findings)["stack"]["frames"]
                if fr["function"] == "save_vcpu_state")
    assert save["file"].endswith("buggy_vmm.c") and save["line"] == C_LINE, save
    assert (tmp / "cache").is_dir()  # fetched through the client's cache


def _watch_in(tmp: Path, prefix: list[str], env: dict[str, str], cmd: list[str]) -> Any:
    import test_watch_e2e as w

    argv = [*prefix, *w._watch_argv(tmp, [], cmd)]
    started = w.time.monotonic()
    proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    return w.finish_watch(proc, tmp, started, None, 120)
