"""The compile cache (tracer.bpfcache) against the real kernel: the first start compiles and
saves, the next loads from the cache and detects exactly as a compiled start does, and a cache
file that is damaged or not root's own is not used (the start compiles and replaces it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import requires_kvm_bpf
from daemon_proc import DaemonProcess, run_vmm

from tracer.selftest import compare

pytestmark = [pytest.mark.e2e, requires_kvm_bpf]


def start(tmp_path: Path, cache: Path) -> DaemonProcess:
    config = tmp_path / "config.toml"
    config.write_text(f'[probes]\ncache_dir = "{cache}"\n')
    return DaemonProcess("--config", str(config))


def ready_origin(d: DaemonProcess) -> str:
    ready = [line for line in d.lines() if line.get("event") == "ready"]
    assert ready, d.lines()
    return str(ready[0]["probes_origin"])


def detects_exactly(d: DaemonProcess) -> None:
    for scenario in ("buggy-mmio-write", "dup2-fd", "restore-pio-in"):
        report = run_vmm(scenario)
        d.settle()
        assert compare(report, d.for_pid(report.pid, "completion_violation"),
                       d.for_pid(report.pid, "completion_sanctioned"),
                       len(d.for_pid(report.pid, "completion_snapshot"))) == []


def stop(d: DaemonProcess) -> None:
    assert d.stop() == 0
    d.cleanup()


def test_first_start_compiles_and_the_next_loads_the_same_probes(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = start(tmp_path, cache)
    try:
        assert ready_origin(first) == "compiled"
        attached = next(line for line in first.lines() if line.get("event") == "ready")["probes"]
    finally:
        stop(first)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].stat().st_mode & 0o777 == 0o600
    assert cache.stat().st_mode & 0o777 == 0o700
    second = start(tmp_path, cache)
    try:
        assert ready_origin(second) == "loaded from the cache"
        assert next(line for line in second.lines()
                if line.get("event") == "ready")["probes"] == attached
        detects_exactly(second)
    finally:
        stop(second)


@pytest.mark.parametrize("damage", ["truncated", "group-writable", "bad-instruction"])
def test_a_cache_file_that_cannot_be_trusted_is_not_used(tmp_path: Path, damage: str) -> None:
    cache = tmp_path / "cache"
    stop(start(tmp_path, cache))
    (path,) = cache.iterdir()
    if damage == "truncated":
        path.write_text(path.read_text()[:100])
    elif damage == "group-writable":
        os.chmod(path, 0o620)
    else:  # a map fd no map of the cache has: the relocation refuses it
        doc = json.loads(path.read_text())
        doc["maps"] = doc["maps"][1:]
        path.write_text(json.dumps(doc))
    d = start(tmp_path, cache)
    try:
        origin = ready_origin(d)
        assert origin.startswith(f"compiled (cache {path} not used: "), origin
        assert origin.endswith("; replaced)"), origin
        detects_exactly(d)
    finally:
        stop(d)
    assert path.stat().st_mode & 0o777 == 0o600
    again = start(tmp_path, cache)  # the compile replaced it with its own
    try:
        assert ready_origin(again) == "loaded from the cache"
    finally:
        stop(again)
