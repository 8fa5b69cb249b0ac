"""``--annotate github``: GitHub workflow commands at the call site's line; ``--annotate
gitlab=FILE``: GitLab Code Quality issues; and the end-of-run outputs written together."""

from __future__ import annotations

import io
import json
from pathlib import Path

from gate_fixtures import ROOT, report_of, site_stack, snapshot, violation

from tracer.gate_annotate import github_lines, gitlab_issues
from tracer.gate_ci import CiOptions, write_outputs
from tracer.suppressions import parse

VCPU = f"{ROOT}/src/vcpu.rs"


def test_one_workflow_command_per_finding_with_a_line() -> None:
    report = report_of(
        violation(user_stack=site_stack("vcpu::dump", VCPU, 88, 9)),
        violation(severity="warning", user_stack=site_stack("vcpu::peek", VCPU, 90)),
        violation(severity="info", user_stack=site_stack("vcpu::info", VCPU, 95)),
        violation(user_stack=site_stack("no_lines")),  # no file:line: no annotation
        violation(user_stack=None),
        snapshot())
    lines = github_lines(report, ROOT)
    assert len(lines) == 3
    dump, peek, info = lines
    site = next(f for f in report.findings if f.call_site.function == "vcpu::dump").call_site
    assert dump.startswith("::error file=src/vcpu.rs,line=88,col=9,title=kvm-completion-tracer"
                           "%3A KVM_GET_SREGS while KVM_EXIT_IO is pending::KVM_GET_SREGS "
                           f"while KVM_EXIT_IO is pending at {site.describe()}, seen once "
                           "(save-mid-completion, severity error).%0AWhy: ")
    assert "%0AFix: complete the exit first" in dump
    assert peek.startswith("::warning file=src/vcpu.rs,line=90,title=")  # no column known
    assert info.startswith("::notice file=src/vcpu.rs,line=95,title=")
    assert all("\n" not in line for line in lines)


def test_workflow_command_escaping() -> None:
    name = "a%b,c:d"
    report = report_of(violation(user_stack=site_stack(name, f"{ROOT}/src/we,ird:%.rs", 3)))
    [line] = github_lines(report, ROOT)
    assert line.startswith("::error file=src/we%2Cird%3A%25.rs,line=3,title=")
    message = line.split("::", 2)[2]
    [finding] = report.findings
    # data: only %, CR and LF escaped
    assert f"at {finding.call_site.describe().replace('%', '%25')}, seen" in message
    assert message.startswith("KVM_GET_SREGS while KVM_EXIT_IO is pending at a%25b,c:d")


def test_gitlab_code_quality_issues() -> None:
    report = report_of(
        violation(severity="critical", user_stack=site_stack("vcpu::dump", VCPU, 88, 9)),
        violation(severity="warning", ioctl="KVM_GET_XSAVE",
                  user_stack=site_stack("vcpu::x", VCPU, 90)),
        violation(user_stack=None))
    issues = gitlab_issues(report, ROOT)
    assert [(i["check_name"], i["severity"], i["location"]) for i in issues] == [
        ("save-mid-completion", "critical", {"path": "src/vcpu.rs", "lines": {"begin": 88}}),
        ("save-mid-completion", "minor", {"path": "src/vcpu.rs", "lines": {"begin": 90}})]
    assert len({i["fingerprint"] for i in issues}) == 2
    assert all("\n" not in i["description"] and "Fix:" in i["description"] for i in issues)


def test_outputs_after_the_run(tmp_path: Path) -> None:
    report = report_of(violation(user_stack=site_stack("vcpu::dump", VCPU, 88, 9)))
    out, err = io.StringIO(), io.StringIO()
    options = CiOptions(gen_suppressions="-", sarif=tmp_path / "r.sarif",
                        source_root=Path(ROOT), annotate_github=True,
                        gitlab=tmp_path / "cq.json")
    assert write_outputs(report, options, out, err)
    assert out.getvalue().startswith("::error file=src/vcpu.rs,line=88,col=9,")
    assert len(parse(err.getvalue(), "stderr")) == 1
    assert json.loads((tmp_path / "r.sarif").read_text())["version"] == "2.1.0"
    assert json.loads((tmp_path / "cq.json").read_text())[0]["location"]["path"] == "src/vcpu.rs"

    gen = tmp_path / "gen.toml"
    out, err = io.StringIO(), io.StringIO()
    assert write_outputs(report, CiOptions(gen_suppressions=str(gen), source_root=Path(ROOT)),
                         out, err)
    assert (out.getvalue(), err.getvalue()) == ("", "")
    assert 'source = "src/vcpu.rs"' in gen.read_text()


def test_an_unwritable_output_is_one_line_and_the_others_still_come(tmp_path: Path) -> None:
    report = report_of(violation(user_stack=site_stack("vcpu::dump", VCPU, 88, 9)))
    out, err = io.StringIO(), io.StringIO()
    missing = tmp_path / "no" / "r.sarif"
    ok = write_outputs(report, CiOptions(sarif=missing, annotate_github=True,
                                         source_root=Path(ROOT)), out, err)
    assert not ok
    assert err.getvalue() == (f"kvm-completion-tracer: error: --sarif {missing}: No such file "
                              "or directory\n")
    assert out.getvalue().startswith("::error ")
