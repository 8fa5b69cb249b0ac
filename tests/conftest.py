"""Shared test set-up: the "no silent skip on a capable host" guard, and kvm/bpf helpers.

The guard: when the host can run the real probes (root, /dev/kvm read+write, tracefs mounted or
mountable, ``import bcc`` works) or when ``CI=true``, a test skipped for a reason that says it
"needs root", "needs /dev/kvm", "needs bcc" or "needs tracefs" makes the whole run fail: such a
skip there means the test silently did not run where it should have. Under ``CI=true`` every
skip fails the run: scripts/setup-host.sh installs every tool the tests use.

Helpers for other tests (this directory is on ``sys.path`` under pytest's default import mode)::

    from conftest import requires_kvm_bpf      # a pytest.mark.skipif

    @requires_kvm_bpf
    def test_probe_loads() -> None: ...

or, with no import, the registered marker ``@pytest.mark.kvm_bpf`` (same skip, same reason), or
the ``kvm_bpf_host`` fixture (skips the same way, returns the probed :class:`HostFacts`).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# --- host facts ----------------------------------------------------------------------------------

KVM_DEVICE = Path("/dev/kvm")
TRACEFS_MOUNTPOINTS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")

# A skip whose reason contains one of these (case-insensitive) is forbidden under the guard.
FORBIDDEN_SKIP_PHRASES = ("needs root", "needs /dev/kvm", "needs bcc", "needs tracefs")


@dataclass(frozen=True)
class HostFacts:
    """What the probes need from the host; every field is True when that need is met."""

    root: bool
    kvm_rw: bool
    tracefs: bool  # mounted, or mountable (root and the kernel knows tracefs)
    bcc: bool
    bcc_error: str = field(default="", compare=False)


def missing_capabilities(facts: HostFacts) -> list[str]:
    """Human-readable list of what the host lacks to run the probes (empty: capable)."""
    missing: list[str] = []
    if not facts.root:
        missing.append("not root")
    if not facts.kvm_rw:
        missing.append(f"{KVM_DEVICE} not readable+writable")
    if not facts.tracefs:
        missing.append("tracefs neither mounted nor mountable")
    if not facts.bcc:
        missing.append(f"import bcc failed{': ' + facts.bcc_error if facts.bcc_error else ''}")
    return missing


def is_capable_host(facts: HostFacts) -> bool:
    return not missing_capabilities(facts)


def ci_enabled(environ: Mapping[str, str]) -> bool:
    return environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def guard_active(facts: HostFacts, environ: Mapping[str, str]) -> bool:
    """Whether a capability skip must fail the run: on a capable host, or in CI."""
    return is_capable_host(facts) or ci_enabled(environ)


def is_forbidden_skip_reason(reason: str) -> bool:
    lowered = reason.lower()
    return any(phrase in lowered for phrase in FORBIDDEN_SKIP_PHRASES)


def _tracefs_mounted(mounts_text: str) -> bool:
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "tracefs" and parts[1] in TRACEFS_MOUNTPOINTS:
            return True
    return False


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def probe_host() -> HostFacts:
    """Look at the real host.  Imports bcc (in this process) to see whether it works."""
    root = os.geteuid() == 0
    kvm_rw = KVM_DEVICE.exists() and os.access(KVM_DEVICE, os.R_OK | os.W_OK)
    tracefs_known = any(
        line.split()[-1] == "tracefs" for line in _read("/proc/filesystems").splitlines() if line
    )
    tracefs = _tracefs_mounted(_read("/proc/mounts")) or (root and tracefs_known)
    bcc_error = ""
    try:
        import bcc  # noqa: F401

        bcc_ok = True
    except Exception as exc:  # ImportError, or OSError from loading libbcc
        bcc_ok = False
        bcc_error = f"{type(exc).__name__}: {exc}"
    return HostFacts(root=root, kvm_rw=kvm_rw, tracefs=tracefs, bcc=bcc_ok, bcc_error=bcc_error)


HOST: HostFacts = probe_host()
KVM_BPF_SKIP_REASON = "needs root, /dev/kvm and bcc: " + "; ".join(missing_capabilities(HOST))

requires_kvm_bpf = pytest.mark.skipif(not is_capable_host(HOST), reason=KVM_BPF_SKIP_REASON)
"""Skip marker for tests that load the probes or run guests."""


def has_c_compiler() -> bool:
    return shutil.which("cc") is not None or shutil.which("gcc") is not None


@pytest.fixture
def kvm_bpf_host() -> HostFacts:
    """Skips (reason "needs root, /dev/kvm and bcc: ...") unless the host can run the probes."""
    if not is_capable_host(HOST):
        pytest.skip(KVM_BPF_SKIP_REASON)
    return HOST


# --- pytest hooks --------------------------------------------------------------------------------

_forbidden_skips: list[tuple[str, str]] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "kvm_bpf: needs root, /dev/kvm, tracefs and bcc (skipped otherwise)"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kvm_bpf") is not None and not is_capable_host(HOST):
        pytest.skip(KVM_BPF_SKIP_REASON)


def skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    """The reason text of a skipped report ("Skipped: " prefix removed)."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        reason = str(longrepr[2])
    else:
        reason = str(longrepr)
    return reason.removeprefix("Skipped: ")


def _note_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = skip_reason(report)
    # Under CI every tool the tests use is installed by scripts/setup-host.sh, so any skip
    # there (a missing compiler, promtool, systemd-analyze, ...) is a missing install step.
    if is_forbidden_skip_reason(reason) or ci_enabled(os.environ):
        _forbidden_skips.append((report.nodeid, reason))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _note_skip(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    # Module-level pytest.skip(..., allow_module_level=True) shows up here, not as a test report.
    _note_skip(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _forbidden_skips or not guard_active(HOST, os.environ):
        return
    why = (
        "CI=true"
        if ci_enabled(os.environ) and not is_capable_host(HOST)
        else "this host can run them"
    )
    lines = [
        f"skip guard: {len(_forbidden_skips)} test(s) skipped, but {why} (under CI=true no "
        "test may skip: a missing tool is a missing step in scripts/setup-host.sh): "
        "failing the run",
        *(f"  {nodeid}: {reason}" for nodeid, reason in _forbidden_skips),
    ]
    if not is_capable_host(HOST):
        lines.append("  host lacks: " + "; ".join(missing_capabilities(HOST)))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        print("\n".join(lines))
    else:
        reporter.write_line("")
        reporter.write_sep("=", "skip guard", red=True, bold=True)
        for line in lines:
            reporter.write_line(line, red=True)
    if session.exitstatus == 0 or session.exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# --- daemons started by tests --------------------------------------------------------------------

def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def isolated_daemon_args() -> tuple[list[str], str]:
    """``run`` flags that let a test's daemon start next to any other one (the host's, another
    test's): a private state dir (the single-instance lock) and its own metrics port. Returns
    (flags, metrics URL)."""
    import tempfile

    port = free_port()
    state = tempfile.mkdtemp(prefix="kct-state-")
    return (["--state-dir", state, "--metrics-addr", f"127.0.0.1:{port}"],
            f"http://127.0.0.1:{port}/metrics")


# --- the tracer as another user ------------------------------------------------------------------

@dataclass(frozen=True)
class AnyUserTracer:
    """``python -m tracer`` that any user can run, wherever the checkout and its venv live (a
    checkout under /root is mode 0700: an unprivileged user can neither exec the venv's python
    nor import the package from there)."""

    argv: tuple[str, ...]  # the interpreter and ``-m tracer``
    cwd: Path
    env: Mapping[str, str]


@pytest.fixture(scope="session")
def tracer_for_any_user() -> Iterator[AnyUserTracer]:
    """A world-readable copy (mode 0755 temporary directory) of the ``tracer`` package and of the
    runtime dependencies the venv installed (Debian's are already readable by everyone), run by
    the venv's base interpreter with the copy on PYTHONPATH."""
    import importlib.metadata as metadata
    import re
    import tempfile

    repo = Path(__file__).resolve().parents[1]
    top = Path(tempfile.mkdtemp(prefix="kct-any-user-"))
    try:
        shutil.copytree(repo / "tracer", top / "tracer",
                        ignore=shutil.ignore_patterns("__pycache__"))
        for requirement in metadata.requires("kvm-completion-tracer") or []:
            if "extra ==" in requirement:
                continue
            dist = metadata.distribution(re.split(r"[ ;<>=!~\[]", requirement, maxsplit=1)[0])
            for file in dist.files or []:
                source = Path(str(dist.locate_file(file)))
                if file.parts[0].endswith(".dist-info") or "__pycache__" in file.parts:
                    continue
                if not source.is_relative_to(sys.prefix) or not source.is_file():
                    continue  # outside the venv (Debian's): readable by everyone already
                (top / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, top / file)
        for path in [top, *top.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
        env.update(PYTHONPATH=str(top), PYTHONDONTWRITEBYTECODE="1")
        yield AnyUserTracer((os.path.realpath(sys.executable), "-m", "tracer"), top, env)
    finally:
        shutil.rmtree(top, ignore_errors=True)
