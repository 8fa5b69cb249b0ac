"""The CLI as operators meet it: real ``python -m tracer`` processes given bad input or a host
that lacks something. Every failure must be one line (``check``: a FAIL line with a fix), a
non-zero exit, and never a traceback.

Host breakage is simulated inside private mount namespaces (``unshare -m --propagation
private``): unmounting tracefs or hiding /lib/modules there never touches the host's mounts,
which :func:`host_mounts_untouched` re-checks after each such test.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import AnyUserTracer, requires_kvm_bpf

from tracer.instance import LOCK_NAME, InstanceLock

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
PREFIX = "kvm-completion-tracer: error:"
IS_ROOT = os.geteuid() == 0
TIMEOUT_S = 90  # bad input fails in well under a second; a started daemon would never exit

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (setpriv, mount namespaces)")


def needs_tool(tool: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(shutil.which(tool) is None, reason=f"{tool} (util-linux) missing")


@dataclass(frozen=True)
class Done:
    argv: Sequence[str]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (f"$ {shlex.join(self.argv)}\nexit {self.returncode}\n--- stdout ---\n"
                f"{self.stdout}--- stderr ---\n{self.stderr}")


def tracer_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "tracer", *args]


def run(argv: Sequence[str], any_user: AnyUserTracer | None = None) -> Done:
    """``any_user``: run from its world-readable copy (a user other than root)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    cwd = REPO
    if any_user is not None:
        env, cwd = dict(any_user.env), any_user.cwd
    try:
        done = subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{shlex.join(argv)} still running after {TIMEOUT_S}s (started the daemon?)"
                    f"\n{err.stdout!r}\n{err.stderr!r}")
    return Done(argv, done.returncode, done.stdout, done.stderr)


def tracer(*args: str) -> Done:
    return run(tracer_argv(*args))


def in_private_mount_ns(setup: str, *args: str) -> Done:
    """``setup`` (shell, its own stderr discarded) then ``exec python -m tracer args``."""
    script = f"{{ {setup} ; }} 2>/dev/null; exec {shlex.join(tracer_argv(*args))}"
    return run(["unshare", "-m", "--propagation", "private", "sh", "-c", script])


def assert_no_traceback(done: Done) -> None:
    assert "Traceback" not in done.stdout + done.stderr, done


def assert_one_error_line(done: Done, *needles: str, exit_code: int | None = None) -> str:
    assert_no_traceback(done)
    if exit_code is None:
        assert done.returncode != 0, done
    else:
        assert done.returncode == exit_code, done
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done
    assert lines[0].startswith(PREFIX + " "), done
    for needle in needles:
        assert needle in lines[0], done
    # stdout is the log: at most the JSON "starting" line printed before the probes load.
    logged = [json.loads(line)["event"] for line in done.stdout.splitlines()]
    assert logged in ([], ["starting"]), done
    return lines[0]


def assert_check_fails(done: Done, name: str, *needles: str) -> list[str]:
    """``check`` exited 1 with a FAIL line for ``name`` (containing needles) and its fix."""
    assert_no_traceback(done)
    assert done.returncode == 1, done
    lines = done.stdout.splitlines()
    fail = [i for i, line in enumerate(lines) if line.startswith(f"FAIL {name} ")]
    assert fail, done
    line = lines[fail[0]]
    for needle in needles:
        assert needle in line, done
    assert fail[0] + 1 < len(lines) and lines[fail[0] + 1].startswith("     fix: "), done
    assert lines[-1].endswith("failed"), done
    return lines[fail[0]: fail[0] + 2]


def fake_tracefs(root: Path, *events: str) -> Path:
    for event in events:
        (root / "events" / event).mkdir(parents=True)
    return root


WATCHED = ("/sys/kernel/tracing", "/sys/kernel/debug", "/sys/kernel/debug/tracing",
           "/lib/modules", "/usr/lib/modules")


def our_mounts() -> set[tuple[str, str]]:
    out = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        mount_point, fstype = left.split()[4], right.split()[0]
        out.add((mount_point, fstype))
    return out


@pytest.fixture
def host_mounts_untouched(tmp_path: Path) -> Iterator[None]:
    before = {m for m in our_mounts() if m[0] in WATCHED}
    yield
    after = our_mounts()
    assert before <= after, f"host mounts lost: {before - after}"
    assert not [m for m in after if m[0] in WATCHED and m not in before], "new host mounts"
    assert not [m for m in after if m[0].startswith(str(tmp_path))]


# ---- bad flags and policy files ----------------------------------------------------------------

def test_unknown_extra_pending_exit() -> None:
    assert_one_error_line(tracer("run", "--extra-pending-exit", "BOGUS"), "'BOGUS'",
                          "unknown exit reason", exit_code=2)


def test_unknown_ignored_exit() -> None:
    assert_one_error_line(tracer("run", "--ignore-exit", "NOPE"), "'NOPE'", exit_code=2)


def test_unknown_sanction() -> None:
    assert_one_error_line(tracer("run", "--no-sanction", "nope"), "unknown sanction 'nope'",
                          "port-0x7e", exit_code=2)


def test_unknown_severity() -> None:
    assert_one_error_line(tracer("run", "--severity", "save=loud"), "'loud'",
                          "unknown severity", exit_code=2)


@pytest.mark.parametrize(("flag", "needle"), [("save", "KIND[:EXIT]=LEVEL"),
                                              ("sometimes=error", "'sometimes'"),
                                              ("save:BOGUS=error", "'BOGUS'")])
def test_malformed_severity_flag(flag: str, needle: str) -> None:
    assert_one_error_line(tracer("run", "--severity", flag), needle, exit_code=2)


def test_missing_policy_file() -> None:
    assert_one_error_line(tracer("run", "--policy", "/nonexistent.toml"),
                          "/nonexistent.toml", "No such file", exit_code=2)


def test_policy_file_with_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[policy\nextra_pending_exits = [\n")
    assert_one_error_line(tracer("run", "--policy", str(path)), str(path), "not valid TOML",
                          exit_code=2)


def test_policy_file_with_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text("[policy]\nignore_exits = [\"HYPERV\"]\n")
    assert_one_error_line(tracer("run", "--policy", str(path)), str(path),
                          "unknown key 'ignore_exits'", exit_code=2)


def test_policy_file_with_a_string_instead_of_a_list(tmp_path: Path) -> None:
    path = tmp_path / "str.toml"
    path.write_text("[policy]\nextra_pending_exits = \"HYPERV\"\n")
    assert_one_error_line(tracer("run", "--policy", str(path)), "extra_pending_exits",
                          "list of strings", exit_code=2)


def test_policy_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"extra_pending_exits = [\"\xff\"]\n")
    line = assert_one_error_line(tracer("run", "--policy", str(path)), str(path), "not UTF-8",
                                 exit_code=2)
    assert "unexpected" not in line


@pytest.mark.parametrize(("args", "needle"), [
    (["--ringbuf-pages", "3"], "--ringbuf-pages 3"),
    (["--ringbuf-pages", "0"], "--ringbuf-pages 0"),
    (["--max-vcpus", "0"], "--max-vcpus 0"),
    (["--max-vcpus", str((1 << 20) + 1)], "--max-vcpus"),
    (["--snapshot-idle", "0"], "--snapshot-idle"),
])
def test_bad_run_sizes(args: list[str], needle: str) -> None:
    assert_one_error_line(tracer("run", *args), needle)


@pytest.mark.parametrize(("addr", "needle"), [("not-an-address", "expected HOST:PORT"),
                                              ("[::1]:0", "port '0'"),
                                              ("", "--no-metrics")])
def test_selftest_names_a_malformed_metrics_addr(addr: str, needle: str) -> None:
    # Refused before any host check: no root, KVM or bcc needed to see it.
    line = assert_one_error_line(tracer("selftest", "--metrics-addr", addr), needle,
                                 exit_code=2)
    assert line.startswith(f"{PREFIX} --metrics-addr {addr}" if addr else
                           f"{PREFIX} --metrics-addr ''"), line


# ---- the exporter's port is taken ----------------------------------------------------------------

@requires_kvm_bpf
def test_run_with_the_metrics_port_taken_fails_before_loading_anything(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        addr = f"127.0.0.1:{holder.getsockname()[1]}"
        state = tmp_path / "state"
        done = tracer("run", "--log-format", "json", "--state-dir", str(state),
                      "--metrics-addr", addr)
        assert_one_error_line(done, f"cannot serve metrics on {addr}", "Address already in use",
                              "--metrics-addr", exit_code=1)
        # The exporter binds before the probes compile: nothing was attached, nothing handed
        # over, and the instance lock is free again.
        assert [json.loads(line)["event"] for line in done.stdout.splitlines()] == ["starting"]
        assert {p.name for p in state.iterdir()} <= {LOCK_NAME}, list(state.iterdir())
        InstanceLock.acquire(state).release()
        # and the port is still ours
        with socket.create_connection(holder.getsockname(), timeout=5):
            pass


# ---- not root -----------------------------------------------------------------------------------

AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@needs_root
@needs_tool("setpriv")
def test_run_as_nobody(tracer_for_any_user: AnyUserTracer) -> None:
    done = run([*AS_NOBODY, *tracer_for_any_user.argv, "run"], tracer_for_any_user)
    assert_one_error_line(done, "privileges:", "CAP_BPF", "fix: run as root", exit_code=1)


@needs_root
@needs_tool("setpriv")
def test_check_as_nobody(tracer_for_any_user: AnyUserTracer) -> None:
    done = run([*AS_NOBODY, *tracer_for_any_user.argv, "check"], tracer_for_any_user)
    fail = assert_check_fails(done, "privileges", "CAP_BPF+CAP_PERFMON")
    assert "run as root" in fail[1]


# ---- capabilities dropped: the kernel would refuse the BPF load ---------------------------------

NO_CAPS = ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--"]


@needs_root
@needs_tool("setpriv")
def test_run_as_root_without_capabilities() -> None:
    assert_one_error_line(run([*NO_CAPS, *tracer_argv("run")]), "privileges:", "CAP_BPF",
                          exit_code=1)


@needs_root
@needs_tool("setpriv")
def test_check_as_root_without_capabilities() -> None:
    done = run([*NO_CAPS, *tracer_argv("check")])
    assert_check_fails(done, "privileges")
    assert "trial BPF load" not in done.stdout  # nothing is loaded once a check failed


# ---- no tracefs ---------------------------------------------------------------------------------

UNMOUNT_TRACEFS = "umount -l /sys/kernel/tracing; umount -l /sys/kernel/debug"


@needs_root
@needs_tool("unshare")
@pytest.mark.usefixtures("host_mounts_untouched")
def test_check_fails_with_a_helpful_message_when_tracefs_is_unmounted() -> None:
    done = in_private_mount_ns(UNMOUNT_TRACEFS, "check")
    fail = assert_check_fails(done, "tracefs", "not mounted")
    assert "mount -t tracefs" in fail[1]


@needs_root
@needs_tool("unshare")
@pytest.mark.usefixtures("host_mounts_untouched")
def test_run_fails_in_one_line_when_tracefs_is_unmounted() -> None:
    assert_one_error_line(in_private_mount_ns(UNMOUNT_TRACEFS, "run"), "tracefs:",
                          "mount -t tracefs", exit_code=1)


# ---- kvm tracepoints missing --------------------------------------------------------------------

@needs_root
@needs_tool("unshare")
@pytest.mark.usefixtures("host_mounts_untouched")
def test_check_reports_missing_kvm_tracepoints(tmp_path: Path) -> None:
    fake = fake_tracefs(tmp_path / "tracing", "syscalls/sys_enter_ioctl")
    setup = f"{UNMOUNT_TRACEFS}; mount --bind {shlex.quote(str(fake))} /sys/kernel/tracing"
    done = in_private_mount_ns(setup, "check")
    fail = assert_check_fails(done, "kvm tracepoints", "kvm:kvm_userspace_exit missing")
    assert "modprobe" in fail[1]
    assert "mounted at /sys/kernel/tracing" in done.stdout  # the fake tree was used
    assert "ok   syscall tracepoints" in done.stdout

    done = in_private_mount_ns(setup, "run")
    assert_one_error_line(done, "kvm:kvm_userspace_exit missing", exit_code=1)


# ---- no kernel headers --------------------------------------------------------------------------

@needs_root
@needs_tool("unshare")
@pytest.mark.usefixtures("host_mounts_untouched")
def test_check_fails_naming_kernel_headers(tmp_path: Path) -> None:
    empty = tmp_path / "modules"
    empty.mkdir()
    done = in_private_mount_ns(f"mount --bind {shlex.quote(str(empty))} /lib/modules", "check")
    fail = assert_check_fails(done, "kernel headers", "missing")
    assert f"linux-headers-{platform.release()}" in fail[1]


@needs_root
@needs_tool("unshare")
@pytest.mark.usefixtures("host_mounts_untouched")
def test_run_fails_in_one_line_without_kernel_headers(tmp_path: Path) -> None:
    empty = tmp_path / "modules"
    empty.mkdir()
    # a complete fake tracefs, so that the headers are the first thing missing on any host
    fake = fake_tracefs(tmp_path / "tracing", "kvm/kvm_userspace_exit", "kvm/kvm_exit",
                        "kvm/kvm_entry", "syscalls/sys_enter_ioctl")
    setup = (f"{UNMOUNT_TRACEFS}; mount --bind {shlex.quote(str(fake))} /sys/kernel/tracing; "
             f"mount --bind {shlex.quote(str(empty))} /lib/modules")
    assert_one_error_line(in_private_mount_ns(setup, "run"), "kernel headers:",
                          "linux-headers", exit_code=1)


def unusable_headers(tmp_path: Path) -> str:
    """Headers that satisfy the preflight (generated config, kconfig.h) but lack everything
    else, so the compile itself fails."""
    modules = tmp_path / "modules"
    include = modules / platform.release() / "build" / "include"
    for header in ("generated/autoconf.h", "linux/kconfig.h"):
        (include / header).parent.mkdir(parents=True, exist_ok=True)
        (include / header).write_text("")
    return f"mount --bind {shlex.quote(str(modules))} /lib/modules"


@requires_kvm_bpf
@needs_tool("unshare")
@pytest.mark.usefixtures("host_mounts_untouched")
def test_bpf_compile_failure_is_reported_without_a_traceback(tmp_path: Path) -> None:
    setup = unusable_headers(tmp_path)
    done = in_private_mount_ns(setup, "check")
    fail = assert_check_fails(done, "trial BPF load", "kernel headers")
    assert "fix:" in fail[1]

    # the compile cache off: a cached start needs no compile, and so no headers beyond the
    # preflight's
    done = in_private_mount_ns(setup, "run", "--probe-cache", "")
    assert_no_traceback(done)
    assert done.returncode == 1, done
    ours = [line for line in done.stderr.splitlines() if line.startswith(PREFIX)]
    assert len(ours) == 1, done
    assert "kernel headers" in ours[0], done


@requires_kvm_bpf
@needs_tool("unshare")
@pytest.mark.usefixtures("host_mounts_untouched")
def test_bpf_compile_failure_is_one_line(tmp_path: Path) -> None:
    done = in_private_mount_ns(unusable_headers(tmp_path), "run", "--probe-cache", "")
    assert_one_error_line(done, "kernel headers", exit_code=1)


# ---- a capable host -----------------------------------------------------------------------------

@requires_kvm_bpf
def test_check_passes_on_this_host() -> None:
    done = tracer("check")
    assert_no_traceback(done)
    assert done.returncode == 0, done
    lines = done.stdout.splitlines()
    assert lines[-1] == "all checks passed", done
    assert not [line for line in lines if line.startswith("FAIL")], done
    assert any(line.startswith("ok   trial BPF load") for line in lines), done
    assert done.stderr == "", done


@requires_kvm_bpf
def test_check_no_load_passes_on_this_host() -> None:
    done = tracer("check", "--no-load")
    assert done.returncode == 0, done
    assert done.stdout.splitlines()[-1] == "all checks passed", done
    assert "trial BPF load" not in done.stdout, done
