"""Suppressions: the file format and its one-line errors, matching, the account, and
``--gen-suppressions`` entries that, fed back, silence exactly their finding."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from gate_fixtures import ROOT, frame, report_of, site_stack, snapshot, stack, violation

from tracer.alerts import SnapshotAlert, ViolationAlert
from tracer.cli import UsageError, _ci_options, build_parser
from tracer.config import load_settings
from tracer.gate import Finding
from tracer.gate_ci import account
from tracer.suppressions import (
    Ledger,
    Occurrence,
    Suppression,
    SuppressionError,
    generate,
    generate_all,
    glob_escape,
    load_files,
    parse,
)

GOOD = '''\
# accepted races
[[suppress]]
reason = "debug dump reads sregs mid-exit; fixed by !123"
ioctl = "KVM_GET_SREGS"
function = "debug_dump*"

[[suppress]]
reason = "third-party test helper"
module = ["libhelper.so*", "helper-*"]
process = "vmm-test"
'''


def entry(text: str) -> Suppression:
    [one] = parse("[[suppress]]\nreason = \"r\"\n" + text, "s.toml")
    return one


def occ(alert: ViolationAlert | SnapshotAlert) -> Occurrence:
    if isinstance(alert, SnapshotAlert):
        return Occurrence.of_snapshot(alert)
    return Occurrence.of_violation(alert)


# ---- the file -----------------------------------------------------------------------------------

def test_a_file_parses_into_entries_that_know_their_line() -> None:
    first, second = parse(GOOD, "sup.toml")
    assert (first.where, second.where) == ("sup.toml:2", "sup.toml:7")
    assert first.reason == "debug dump reads sregs mid-exit; fixed by !123"
    assert dict(first.patterns) == {"ioctl": ("KVM_GET_SREGS",), "function": ("debug_dump*",)}
    assert second.patterns["module"] == ("libhelper.so*", "helper-*")
    assert parse("# nothing yet\n", "empty.toml") == []


@pytest.mark.parametrize(("text", "needles"), [
    ('[[suppress]]\nreason = "r"\nioctl = KVM_GET_REGS\n',
     ["bad.toml:3:9: not valid TOML", "fix: the TOML syntax there"]),
    ('[[suppress]]\nioctl = "KVM_GET_REGS"\n',
     ["bad.toml:1: [[suppress]] has no reason", 'fix: add reason = "why']),
    ('[[suppress]]\nreason = "  "\nioctl = "KVM_GET_REGS"\n', ["bad.toml:1:", "no reason"]),
    ('\n[[suppress]]\nreason = "r"\nfuncton = "f"\n',
     ["bad.toml:2: [[suppress]] has an unknown key 'functon'", "did you mean 'function'?"]),
    ('[[suppress]]\nreason = "r"\n', ["bad.toml:1:", "matches every race",
                                      "fix: add at least one of rule, kind, ioctl"]),
    ('[[suppress]]\nreason = "r"\nioctl = 3\n',
     ["bad.toml:1: [[suppress]] ioctl: expected a glob string or an array of them, got 3",
      'fix: ioctl = "..."']),
    ('[[suppress]]\nreason = "r"\nioctl = []\n', ["expected a glob string", "got []"]),
    ('[[suppress]]\nreason = "r"\nioctl = "KVM_GET_SREG"\n',
     ["names no known ioctl", "did you mean 'KVM_GET_SREGS'?"]),
    ('[[suppress]]\nreason = "r"\nexit_reason = "KVM_EXIT_MMMIO"\n',
     ["names no known exit reason", "KVM_EXIT_MMIO"]),
    ('[[suppress]]\nreason = "r"\nkind = "read"\n', ["names no known kind", "one of save"]),
    ('[suppress]\nreason = "r"\n', ["bad.toml:1: suppress is not an array of tables",
                                    "write each entry as [[suppress]]"]),
    ('\n\nsupress = 1\n', ["bad.toml:3: unknown top-level key 'supress'",
                           "fix: put each entry in a [[suppress]] table"]),
])
def test_a_bad_file_is_one_line_naming_file_line_and_fix(text: str, needles: list[str]) -> None:
    with pytest.raises(SuppressionError) as caught:
        parse(text, "bad.toml")
    message = str(caught.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_globs_are_not_checked_against_known_names() -> None:
    assert entry('ioctl = "KVM_GET_*"\nexit_reason = "KVM_EXIT_X86_*"\n').patterns["ioctl"] == (
        "KVM_GET_*",)
    assert entry('ioctl = "KVM_GET_REGS + KVM_GET_SREGS"\n').patterns  # a snapshot's ioctls


def test_files_are_read_in_order_once_each_and_unreadable_ones_name_the_path(
        tmp_path: Path) -> None:
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text(GOOD)
    b.write_text('[[suppress]]\nreason = "b"\nrule = "restore-mid-completion"\n')
    entries = load_files([a, b, a])
    assert [e.where for e in entries] == [f"{a}:2", f"{a}:7", f"{b}:1"]
    with pytest.raises(SuppressionError, match=rf"cannot read suppressions file "
                       rf"{tmp_path}/missing.toml: No such file or directory; fix: check"):
        load_files([tmp_path / "missing.toml"])
    (tmp_path / "latin1.toml").write_bytes(b"# caf\xe9\n")
    with pytest.raises(SuppressionError, match="is not UTF-8 text"):
        load_files([tmp_path / "latin1.toml"])


def test_the_config_file_lists_suppressions_relative_to_itself(tmp_path: Path) -> None:
    config = tmp_path / "etc" / "config.toml"
    config.parent.mkdir()
    config.write_text('suppressions = ["sup.toml", "/abs/other.toml"]\n')
    settings = load_settings(config, explicit=True)
    assert settings.suppressions == (tmp_path / "etc" / "sup.toml", Path("/abs/other.toml"))
    config.write_text('suppressions = "sup.toml"\n')
    with pytest.raises(ValueError, match=re.escape('suppressions = "sup.toml": expected an')):
        load_settings(config, explicit=True)


def _cli(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["watch", *argv, "--", "true"])


def test_the_command_line_adds_to_the_config_files_and_refuses_bad_ones(tmp_path: Path) -> None:
    from_config, flag = tmp_path / "c.toml", tmp_path / "f.toml"
    from_config.write_text(GOOD)
    flag.write_text('[[suppress]]\nreason = "f"\nkind = "snapshot"\n')
    options = _ci_options(_cli("--suppressions", str(flag)), [from_config])
    assert [e.reason[:5] for e in options.suppressions] == ["debug", "third", "f"]
    assert options.suppression_files == (from_config, flag)
    flag.write_text('[[suppress]]\nreason = "f"\nkind = snapshot\n')
    with pytest.raises(UsageError, match=rf"^{flag}:3:8: not valid TOML"):
        _ci_options(_cli("--suppressions", str(flag)), [])


@pytest.mark.parametrize(("argv", "want"), [
    (["--annotate", "github"], (True, None)),
    (["--annotate", "gitlab=cq.json", "--annotate", "github"], (True, Path("cq.json"))),
])
def test_annotate_formats(argv: list[str], want: tuple[bool, Path | None]) -> None:
    options = _ci_options(_cli(*argv), [])
    assert (options.annotate_github, options.gitlab) == want


@pytest.mark.parametrize(("argv", "message"), [
    (["--annotate", "gitlab"], "--annotate gitlab needs a file"),
    (["--annotate", "jenkins"], "--annotate 'jenkins': expected github or gitlab=FILE"),
    (["--source-root", "/no/such/dir"], "--source-root /no/such/dir: not a directory"),
])
def test_bad_ci_flags_are_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        _ci_options(_cli(*argv), [])


def test_gen_suppressions_takes_an_optional_file() -> None:
    assert _ci_options(_cli("--gen-suppressions"), []).gen_suppressions == "-"
    assert _ci_options(_cli("--gen-suppressions", "s.toml"), []).gen_suppressions == "s.toml"
    assert _ci_options(_cli(), []).gen_suppressions is None


# ---- matching -----------------------------------------------------------------------------------

def test_every_key_given_must_match() -> None:
    alert = violation(user_stack=site_stack("debug_dump_sregs"))
    assert entry('ioctl = "KVM_GET_SREGS"\nexit_reason = "KVM_EXIT_IO"\n').matches(occ(alert))
    assert not entry('ioctl = "KVM_GET_SREGS"\nexit_reason = "KVM_EXIT_MMIO"\n').matches(
        occ(alert))
    assert entry('rule = "save-*"\nkind = "save"\nprocess = "vmm-*"\n').matches(occ(alert))
    assert not entry('process = "qemu*"\n').matches(occ(alert))
    assert entry('ioctl = ["KVM_GET_XSAVE", "KVM_GET_SREGS"]\n').matches(occ(alert))
    assert not entry('kind = "restore"\n').matches(occ(alert))


def test_frame_keys_match_one_frame_anywhere_in_the_stack() -> None:
    outer = frame("run_debug_shell", file=f"{ROOT}/src/debug/shell.rs", line=40)
    alert = violation(user_stack=site_stack("vcpu::dump", f"{ROOT}/src/vcpu.rs", 88,
                                            outer=outer))
    assert entry('function = "run_debug_shell"\n').matches(occ(alert))  # not the call site
    assert entry('function = "vcpu::*"\nsource = "src/vcpu.rs"\n').matches(occ(alert))
    assert entry('function = "run_debug_*"\nsource = "src/debug/*"\n').matches(occ(alert))
    # function of one frame and source of another: not one frame, no match
    assert not entry('function = "vcpu::dump"\nsource = "src/debug/shell.rs"\n').matches(
        occ(alert))
    assert entry('source = "shell.rs"\n').matches(occ(alert))  # no "/": the file's name
    assert entry(f'source = "{ROOT}/src/*.rs"\n').matches(occ(alert))  # absolute: whole path
    assert not entry('source = "vcpu/src/vcpu.rs"\n').matches(occ(alert))
    assert not entry('source = "rc/vcpu.rs"\n').matches(occ(alert))  # at a "/" boundary only
    assert entry('module = "libc.so*"\n').matches(occ(alert))
    assert entry('module = "target/*/vmm"\nfunction = "main"\n').matches(occ(alert))
    assert not entry('module = "vm"\n').matches(occ(alert))


def test_frame_keys_never_match_without_a_stack_but_the_others_do() -> None:
    assert not entry('function = "*"\n').matches(occ(violation(user_stack=None)))
    snap = occ(snapshot())
    assert not entry('function = "*"\n').matches(snap)
    assert entry('kind = "snapshot"\n').matches(snap)
    assert entry('rule = "snapshot-mid-completion"\nprocess = "qemu"\n').matches(snap)
    # a snapshot's ioctl: any of its saves, or all of them as its finding names them
    assert entry('ioctl = "KVM_GET_SREGS"\n').matches(snap)
    assert entry('ioctl = "KVM_GET_REGS + KVM_GET_SREGS"\n').matches(snap)
    assert not entry('ioctl = "KVM_GET_XSAVE"\n').matches(snap)


def test_a_snapshots_process_is_the_name_its_saves_threads_had() -> None:
    ledger = Ledger(parse('[[suppress]]\nreason = "r"\nkind = "snapshot"\nprocess = "vmm-t*"\n',
                          "s.toml"))
    assert not ledger.snapshot(snapshot())  # no save seen: only the VMM's kind, "qemu"
    assert not ledger.violation(violation(comm="vmm-test"))
    assert ledger.snapshot(snapshot())
    assert ledger.suppressed == 1


def test_globs_are_case_sensitive_and_escapable() -> None:
    alert = violation(user_stack=site_stack("Vec<T>::operator[]"))
    assert not entry('function = "vec<*"\n').matches(occ(alert))
    assert entry(f'function = "{glob_escape("Vec<T>::operator[]")}"\n').matches(occ(alert))
    assert glob_escape("a*b?[c]") == "a[*]b[?][[]c[]]"


# ---- the account --------------------------------------------------------------------------------

def test_the_first_matching_entry_counts_and_unmatched_ones_are_stale() -> None:
    entries = parse(GOOD + '\n[[suppress]]\nreason = "broad"\nioctl = "KVM_GET_*"\n'
                    '\n[[suppress]]\nreason = "gone"\nioctl = "KVM_GET_XSAVE"\n', "s.toml")
    ledger = Ledger(entries, [Path("s.toml")])
    dump = violation(user_stack=site_stack("debug_dump_sregs"))
    other = violation(user_stack=site_stack("checkpoint_sregs"))
    regs = violation(ioctl="KVM_GET_REGS", user_stack=site_stack("checkpoint_sregs"))
    kept = violation(ioctl="KVM_SET_REGS", kind="restore", rule="restore-mid-completion",
                     user_stack=site_stack("restore_all"))
    results = [ledger.violation(a) for a in (dump, dump, other, regs, kept)]
    assert results == [True, True, True, True, False]
    assert ledger.suppressed == 4
    assert [e.reason for e in ledger.stale()] == ["third-party test helper", "gone"]
    data = ledger.to_json()
    assert data["files"] == ["s.toml"] and data["suppressed"] == 4
    assert [(e["where"], e["occurrences"], e["findings"], e["stale"]) for e in data["entries"]] == [
        ("s.toml:2", 2, 1, False), ("s.toml:7", 0, 0, True), ("s.toml:12", 2, 2, False),
        ("s.toml:16", 0, 0, True)]
    assert data["stale"] == ["s.toml:7", "s.toml:16"]
    assert data["entries"][1]["match"] == {"module": ["libhelper.so*", "helper-*"],
                                           "process": "vmm-test"}
    assert ledger.lines() == [
        "kvm-completion-tracer: suppressed 2 occurrences (1 finding) by s.toml:2: debug dump "
        "reads sregs mid-exit; fixed by !123",
        "kvm-completion-tracer: suppressed 2 occurrences (2 findings) by s.toml:12: broad",
        "kvm-completion-tracer: stale suppression (matched nothing): s.toml:7: third-party "
        "test helper",
        "kvm-completion-tracer: stale suppression (matched nothing): s.toml:16: gone"]


def test_the_report_counts_suppressed_occurrences_apart_from_findings() -> None:
    ledger = Ledger(parse(GOOD, "s.toml"), [Path("s.toml")])
    suppressed = violation(user_stack=site_stack("debug_dump_sregs"))
    kept = violation(user_stack=site_stack("checkpoint_sregs"))
    report = report_of(*(a for a in (suppressed, kept, suppressed)
                         if not ledger.violation(a)))  # what watch's sink does
    account(report, ledger)
    assert [f.call_site.function for f in report.findings] == ["checkpoint_sregs"]
    text = report.render_text()
    assert ("; 0 sanctioned; 2 suppressed; 0 events lost" in text)
    assert "suppressed 2 occurrences (1 finding) by s.toml:2: debug dump" in text
    assert "stale suppression (matched nothing): s.toml:7: third-party test helper" in text
    assert text.splitlines()[-1] == ("kvm-completion-tracer: verdict: fail (1 finding at or "
                                     "above severity warning; 2 occurrences suppressed)")
    data = report.to_json()
    assert data["counts"]["suppressed"] == 2 and data["counts"]["findings"] == 1
    assert data["suppressions"]["stale"] == ["s.toml:7"]


def test_everything_suppressed_passes_and_says_so() -> None:
    ledger = Ledger(parse(GOOD, "s.toml"))
    alert = violation(user_stack=site_stack("debug_dump_sregs"))
    assert ledger.violation(alert)
    report = report_of()
    account(report, ledger)
    verdict = report.verdict()
    assert verdict.status == "pass" and not verdict.failed
    assert verdict.reason == "no completion race found; 1 occurrence suppressed"
    assert "0 sanctioned; 1 suppressed; 0 events lost" in report.render_text()


# ---- --gen-suppressions -------------------------------------------------------------------------

def _alerts() -> list[ViolationAlert | SnapshotAlert]:
    """Findings that differ only in one thing each: the generated entries must tell them all
    apart."""
    vcpu = f"{ROOT}/src/vcpu.rs"
    return [
        violation(user_stack=site_stack("vcpu::dump", vcpu, 88, 9)),
        violation(user_stack=site_stack("vcpu::checkpoint", vcpu, 120)),
        violation(ioctl="KVM_GET_XSAVE", user_stack=site_stack("vcpu::dump", vcpu, 90)),
        violation(exit_reason="KVM_EXIT_MMIO", user_stack=site_stack("vcpu::dump", vcpu, 88)),
        violation(ioctl="KVM_SET_SREGS", kind="restore", rule="restore-mid-completion",
                  severity="critical", user_stack=site_stack("vcpu::dump", vcpu, 88)),
        # outside the root (a crate in ~/.cargo), with a glob character in its name
        violation(user_stack=site_stack("<kvm_helper::Dump as Fn<[u8]>>::call",
                                        "/root/.cargo/registry/src/kvm-helper/src/lib.rs", 7)),
        # no line table: the module tells it apart
        violation(user_stack=site_stack("save_state", module="/usr/lib/libvmmhelper.so")),
        violation(user_stack=site_stack("save_state")),
        snapshot(),
    ]


def _findings() -> list[Finding]:
    return report_of(*_alerts()).findings


def test_each_generated_entry_silences_exactly_its_finding() -> None:
    alerts = _alerts()
    findings = report_of(*alerts).findings
    assert len(findings) == len(alerts)
    for finding in findings:
        alert = finding.first
        [generated] = parse(generate(finding, ROOT), "gen.toml")
        matched = [a for a in alerts if generated.matches(occ(a))]
        assert matched == [alert], (generate(finding, ROOT), matched)


def test_a_generated_entry_names_the_call_site_by_function_and_source() -> None:
    finding = next(f for f in _findings() if f.kind == "restore")
    assert generate(finding, ROOT) == (
        f"# KVM_SET_SREGS while KVM_EXIT_IO is pending at {finding.call_site.describe()}, "
        "seen once\n"
        "[[suppress]]\n"
        'reason = "FIXME: why this race is accepted, and when it will be fixed"\n'
        'rule = "restore-mid-completion"\n'
        'ioctl = "KVM_SET_SREGS"\n'
        'exit_reason = "KVM_EXIT_IO"\n'
        'function = "vcpu::dump"\n'
        'source = "src/vcpu.rs"\n')


def test_generated_entries_without_source_or_stack_say_how_wide_they_are() -> None:
    by_site = {f.call_site.function or f.kind: f for f in _findings()}
    no_lines = generate(next(f for f in _findings()
                             if str(f.call_site.module).endswith("libvmmhelper.so")), ROOT)
    assert 'module = "libvmmhelper.so"\n' in no_lines and "source" not in no_lines
    crate = generate(by_site["<kvm_helper::Dump as Fn<[u8]>>::call"], ROOT)
    assert 'function = "<kvm_helper::Dump as Fn<[[]u8[]]>>::call"\n' in crate
    assert 'source = "/root/.cargo/registry/src/kvm-helper/src/lib.rs"\n' in crate
    snap = generate(by_site["snapshot"], ROOT)
    assert "a snapshot has no stack of its own" in snap
    assert 'ioctl = "KVM_GET_REGS + KVM_GET_SREGS"\n' in snap


def test_the_whole_generated_file_parses_and_covers_every_finding() -> None:
    findings = _findings()
    text = generate_all(findings, ROOT)
    entries = parse(text, "gen.toml")
    assert len(entries) == len(findings)
    ledger = Ledger(entries)
    assert all(ledger.suppress(occ(a)) for a in _alerts())
    assert ledger.stale() == []
    assert generate_all([], ROOT).startswith("# kvm-completion-tracer: no finding")


def test_generated_strings_survive_quotes_and_control_characters() -> None:
    name = 'weird "fn"\\\x7f\t'
    alert = violation(user_stack=stack(frame(name, file=f"{ROOT}/a b.c", line=3)))
    [finding] = report_of(alert).findings
    [generated] = parse(generate(finding, ROOT), "gen.toml")
    assert generated.patterns["function"] == (name,)
    assert generated.matches(occ(alert))
