"""Smoke test of the benchmark harness (bench/): the KVM driver runs real exits, and the
harness's shortest path (baseline and daemon, per-exit row, --quick) finishes and writes JSON."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import requires_kvm_bpf

pytestmark = [pytest.mark.e2e, requires_kvm_bpf]

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"


def _gcc() -> str:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.fail("gcc not installed: `make setup` (scripts/setup-host.sh test) installs it")
    return gcc


def test_kvmloop_runs_real_exits(tmp_path: Path) -> None:
    exe = tmp_path / "kvmloop"
    subprocess.run([_gcc(), "-O2", "-Wall", "-Werror", "-pthread", "-o", str(exe),
                    str(BENCH / "kvmloop.c")], check=True)
    out = subprocess.run([str(exe), "--seconds", "0.2", "--vcpus", "4"], capture_output=True,
                         text=True, timeout=30, check=True)
    result = json.loads(out.stdout)
    assert result["exits"] > 0
    assert result["ns_per_exit"] > 0
    assert result["vcpus"] == 4 and result["busy"] == 1


def test_harness_quick_per_exit(tmp_path: Path) -> None:
    _gcc()
    out_json = tmp_path / "results.json"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--quick", "--only", "per_exit",
         "--configs", "baseline,daemon", "--out", str(out_json),
         "--build-dir", str(tmp_path / "build")],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert elapsed < 60, f"quick per-exit path took {elapsed:.0f} s"
    result = json.loads(out_json.read_text())
    samples = result["samples"]["per_exit"]
    assert samples["baseline"][0]["exits"] > 0
    assert samples["daemon"][0]["exits"] > 0
    assert "1 per-exit" in proc.stdout and "daemon" in proc.stdout
