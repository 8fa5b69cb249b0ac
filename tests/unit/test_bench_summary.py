"""bench/run.py's summary: ratios are paired per round, and the targets decide PASS/FAIL from
them (pure arithmetic on synthetic samples; the harness itself runs in tests/e2e)."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

BENCH_RUN = Path(__file__).resolve().parents[2] / "bench" / "run.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", BENCH_RUN)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


run = _load()


def rows_for(samples: dict[str, Any], configs: list[str]) -> dict[tuple[str, str], Any]:
    rows = run.summarize(samples, configs)
    return {(r["row"], r["config"]): r for r in rows}


def exits(*ns: float) -> list[dict[str, float]]:
    return [{"ns_per_exit": x, "exits": 1000} for x in ns]


def test_per_exit_ratio_is_the_median_of_per_round_ratios() -> None:
    # The host slows down from round 2's daemon run on: paired, that is one bad round of three;
    # unpaired, the medians (5000 vs 6120) would say x1.22.
    base, daemon = [5000.0, 5000.0, 6000.0], [5100.0, 6120.0, 6120.0]
    rows = rows_for({"per_exit": {"baseline": exits(*base), "daemon": exits(*daemon)}},
                    ["baseline", "daemon"])
    got = rows[("1 per-exit", "daemon")]
    assert abs(got["ratio"] - 1.02) < 1e-9  # the median of 1.02, 1.224, 1.02
    assert "added +120 ns" in got["note"]  # the median of 100, 1120, 120
    assert got["result"] == ""  # no floor in the run: nothing to judge the target on


def test_per_exit_is_judged_over_the_floor_of_the_same_round() -> None:
    # Round 2 ran on a slow stretch of the host (+1000 ns for both): paired per round the daemon
    # adds 90, 80 and 95 ns over the floor (median 90); the medians alone would say +1010.
    base = [5000.0, 5000.0, 5000.0]
    floor, daemon = [5300.0, 6300.0, 5300.0], [5390.0, 6380.0, 6310.0 - 915.0]
    samples = {"baseline": exits(*base), "floor": exits(*floor), "daemon": exits(*daemon)}
    got = rows_for({"per_exit": samples}, ["baseline", "daemon", "floor"])[
        ("1 per-exit", "daemon")]
    assert "+90 over floor" in got["note"] and got["result"] == "PASS"
    samples["daemon"] = exits(5420, 6420, 5410)  # +120, +120, +110 over the floor
    got = rows_for({"per_exit": samples}, ["baseline", "daemon", "floor"])[
        ("1 per-exit", "daemon")]
    assert "+120 over floor" in got["note"] and got["result"] == "FAIL"


def test_bpf_body_over_the_floor_is_paired() -> None:
    samples = {c: [{"ns_per_exit": 5000.0 + i, "exits": 1000, "bpf_ns_per_exit": b}
                   for i, b in enumerate(v)]
               for c, v in {"baseline": [0, 0], "daemon": [380, 400], "floor": [200, 230]}.items()}
    got = rows_for({"per_exit": samples}, ["baseline", "daemon", "floor"])[
        ("1 BPF run time", "daemon - floor")]
    assert got["median"] == statistics.median([180, 170])


def test_getppid_is_judged_against_the_floor_of_the_same_round() -> None:
    calls = {c: [{"ns_per_call": x} for x in v] for c, v in
             {"baseline": [200, 240], "daemon": [300, 360], "floor": [290, 350]}.items()}
    rows = rows_for({"getppid": calls}, ["baseline", "daemon", "floor"])
    got = rows[("2 getppid", "daemon")]
    assert got["ratio"] == statistics.median([300 / 290, 360 / 350])
    assert got["result"] == "PASS"
    calls["daemon"] = [{"ns_per_call": 320}, {"ns_per_call": 380}]  # x1.10, x1.09
    assert rows_for({"getppid": calls}, ["baseline", "daemon", "floor"])[
        ("2 getppid", "daemon")]["result"] == "FAIL"


def test_scale_growth_is_on_the_paired_ratio() -> None:
    def scale(ratios: list[float]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for n, r in zip(run.SCALE_VCPUS, ratios, strict=True):
            base = 5000.0 + n  # the baseline itself varies with the size: that is not the tracer
            out[f"baseline_{n}"] = exits(base)
            out[f"daemon_{n}"] = exits(base * r)
        return out

    flat = rows_for({"scale": scale([1.10, 1.12, 1.11])}, [])
    growth = flat[("6 scale", "daemon ratio growth 1..1024")]
    assert abs(growth["median"] - 0.02) < 1e-9 and growth["result"] == "PASS"
    # Cheaper with more vCPUs tracked is no growth (noise between runs of one size is ~0.05).
    falling = rows_for({"scale": scale([1.16, 1.07, 1.06])}, [])
    assert falling[("6 scale", "daemon ratio growth 1..1024")]["result"] == "PASS"
    growing = rows_for({"scale": scale([1.05, 1.08, 1.15])}, [])
    assert growing[("6 scale", "daemon ratio growth 1..1024")]["result"] == "FAIL"


def test_summarize_rewrites_a_saved_table(tmp_path: Path, capsys: Any) -> None:
    samples = {"per_exit": {"baseline": exits(5000), "floor": exits(5300),
                            "daemon": exits(5500)}}
    saved = tmp_path / "results.json"
    saved.write_text(json.dumps({"configs": ["baseline", "daemon", "floor"], "samples": samples,
                                 "table": [], "table_text": "old", "date": "kept"}))
    assert run.main(["--summarize", str(saved)]) == 0
    result = json.loads(saved.read_text())
    daemon = {r["config"]: r for r in result["table"]}["daemon"]
    assert daemon["result"] == "FAIL" and "+200 over floor" in daemon["note"]
    assert result["date"] == "kept" and "daemon" in result["table_text"]
    assert "daemon" in capsys.readouterr().out


def test_summarize_refuses_a_malformed_file_in_one_line(tmp_path: Path, capsys: Any) -> None:
    for text in ("{", '{"configs": []}', '{"samples": [], "configs": []}'):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        assert run.main(["--summarize", str(bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"bench: error: cannot summarize {bad}")
        assert bad.read_text() == text  # nothing rewritten
    assert run.main(["--summarize", str(tmp_path / "missing.json")]) == 2
