"""The fault campaign's short version (``bench/faults.py --short``): every row (churn, overload,
stalled reader, crash, soak, scrape storm, hostile names) against the real daemon and real KVM,
in seconds, so none regresses. One campaign run per module; one test per row asserts it passed,
naming the failed checks and the row's figures."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import requires_kvm_bpf

pytestmark = [pytest.mark.e2e, requires_kvm_bpf]

REPO = Path(__file__).resolve().parents[2]
FAULTS = REPO / "bench" / "faults.py"
ROWS = ("churn", "overload", "stall", "crash", "soak", "storm", "hostile")
CAMPAIGN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.fail("gcc not installed: `make setup` (scripts/setup-host.sh test) installs it")
    tmp = tmp_path_factory.mktemp("faults")
    out = tmp / "faults.json"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(FAULTS), "--short", "--out", str(out),
                           "--build-dir", str(tmp / "build")],
                          cwd=REPO, capture_output=True, text=True, timeout=CAMPAIGN_TIMEOUT_S)
    elapsed = time.monotonic() - t0
    if not out.exists():
        pytest.fail(f"faults.py wrote no JSON (exit {proc.returncode}): {proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    result["_exit"], result["_elapsed_s"] = proc.returncode, elapsed
    result["_stdout"], result["_stderr"] = proc.stdout, proc.stderr
    yield result


def test_campaign_ran_every_row_and_prints_one_table(campaign: dict[str, Any]) -> None:
    assert [r["row"] for r in campaign["rows"]] == list(ROWS)
    assert campaign["short"] is True
    assert campaign["kernel"] and campaign["cpu_model"]
    for row in ROWS:
        assert f"\n{row} | " in campaign["_stdout"]
    # The exit status says whether every row passed.
    assert (campaign["_exit"] == 0) == all(r["result"] == "PASS" for r in campaign["rows"])


@pytest.mark.parametrize("row", ROWS)
def test_row_passes(campaign: dict[str, Any], row: str) -> None:
    found = [r for r in campaign["rows"] if r["row"] == row]
    assert found, f"row {row} missing from the campaign: {campaign['_stderr'][-2000:]}"
    r = found[0]
    assert r["error"] is None, r["error"]
    assert r["checks"], "a row with no check passes nothing"
    assert r["result"] == "PASS", (
        f"{row}: failed checks {r['failed_checks']}; {r['summary']}; figures "
        f"{json.dumps(r['figures'], default=str)[:3000]}")
