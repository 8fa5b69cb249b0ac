"""The skip guard of tests/conftest.py: its decisions, and the hooks in a real pytest run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import (
    HOST,
    HostFacts,
    ci_enabled,
    guard_active,
    is_capable_host,
    is_forbidden_skip_reason,
    missing_capabilities,
)

CONFTEST = Path(__file__).resolve().parent.parent / "conftest.py"
CAPABLE = HostFacts(root=True, kvm_rw=True, tracefs=True, bcc=True)


def test_capable_host_needs_everything() -> None:
    assert is_capable_host(CAPABLE)
    assert missing_capabilities(CAPABLE) == []
    lacking_each = {
        "root": replace(CAPABLE, root=False),
        "kvm_rw": replace(CAPABLE, kvm_rw=False),
        "tracefs": replace(CAPABLE, tracefs=False),
        "bcc": replace(CAPABLE, bcc=False),
    }
    for lacking, facts in lacking_each.items():
        assert not is_capable_host(facts), lacking
        assert len(missing_capabilities(facts)) == 1, lacking


def test_missing_capabilities_lists_all_and_bcc_error() -> None:
    facts = HostFacts(
        root=False, kvm_rw=False, tracefs=False, bcc=False, bcc_error="ModuleNotFoundError: bcc"
    )
    missing = missing_capabilities(facts)
    assert len(missing) == 4
    assert "ModuleNotFoundError: bcc" in missing[-1]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, False),
        ({"CI": "true"}, True),
        ({"CI": "TRUE"}, True),
        ({"CI": "1"}, True),
        ({"CI": "false"}, False),
        ({"CI": ""}, False),
    ],
)
def test_ci_enabled(env: dict[str, str], expected: bool) -> None:
    assert ci_enabled(env) is expected


def test_guard_active_on_capable_host_or_ci() -> None:
    incapable = HostFacts(root=False, kvm_rw=False, tracefs=False, bcc=False)
    assert guard_active(CAPABLE, {})
    assert guard_active(CAPABLE, {"CI": "true"})
    assert guard_active(incapable, {"CI": "true"})
    assert not guard_active(incapable, {})
    assert not guard_active(incapable, {"CI": "false"})


@pytest.mark.parametrize(
    "reason",
    [
        "needs root",
        "needs root, /dev/kvm and bcc: not root",
        "Needs /dev/kvm",
        "this test needs bcc (python3-bpfcc)",
        "needs tracefs mounted",
    ],
)
def test_forbidden_reasons(reason: str) -> None:
    assert is_forbidden_skip_reason(reason)


@pytest.mark.parametrize(
    "reason",
    [
        "needs a C compiler",
        "needs qemu-system-x86_64",
        "slow; run with --e2e",
        "bcc 0.26 lacks ring buffers",  # mentions bcc but is not a "needs bcc" skip
        "",
    ],
)
def test_allowed_reasons(reason: str) -> None:
    assert not is_forbidden_skip_reason(reason)


# --- the hooks, in a child pytest run with a copy of conftest.py ------------------------------

_PROBE_TESTS = """
import pytest

def test_passes():
    pass

@pytest.mark.skip(reason="needs root, /dev/kvm and bcc: not root")
def test_capability_skip():
    pass

def test_other_skip():
    pytest.skip("needs a C compiler")

@pytest.mark.xfail(reason="needs bcc but expected to fail")
def test_xfail():
    raise AssertionError
"""


def _run_child(tmp_path: Path, test_source: str, ci: str) -> subprocess.CompletedProcess[str]:
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_probe.py").write_text(test_source)
    env = {k: v for k, v in os.environ.items() if k not in {"CI", "PYTEST_ADDOPTS"}}
    env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_hooks_fail_run_on_capability_skip_under_ci(tmp_path: Path) -> None:
    proc = _run_child(tmp_path, _PROBE_TESTS, ci="true")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "skip guard: 2 test(s) skipped" in out, out  # under CI, any skip
    assert "test_capability_skip: needs root, /dev/kvm and bcc: not root" in out, out
    assert "test_other_skip" in out.split("skip guard:")[1], out


def test_hooks_catch_module_level_skip(tmp_path: Path) -> None:
    source = 'import pytest\npytest.skip("needs tracefs", allow_module_level=True)\n'
    proc = _run_child(tmp_path, source, ci="true")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "needs tracefs" in out.split("skip guard:")[1], out


def test_hooks_leave_other_skips_alone_outside_ci(tmp_path: Path) -> None:
    source = 'import pytest\n\ndef test_a():\n    pytest.skip("needs a C compiler")\n'
    proc = _run_child(tmp_path, source, ci="false")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "skip guard" not in out, out


def test_under_ci_a_missing_tool_skip_fails_the_run(tmp_path: Path) -> None:
    source = 'import pytest\n\ndef test_a():\n    pytest.skip("needs a C compiler")\n'
    proc = _run_child(tmp_path, source, ci="true")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "test_a: needs a C compiler" in out.split("skip guard:")[1], out


def test_hooks_without_ci_follow_the_host(tmp_path: Path) -> None:
    proc = _run_child(tmp_path, _PROBE_TESTS, ci="false")
    out = proc.stdout + proc.stderr
    assert proc.returncode == (1 if is_capable_host(HOST) else 0), out
