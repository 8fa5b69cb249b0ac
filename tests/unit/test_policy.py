"""tracer.policy: default pending exits per arch, judge() rulings, overrides and their errors.

Expected values come from kvm-completion-facts.md (Documentation/virt/kvm/api.rst), written out
here by hand: nothing is copied from the module under test.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tracer import abi
from tracer.events import (
    HypercallAccess,
    HypervAccess,
    MmioAccess,
    MsrAccess,
    PendingAccess,
    PioAccess,
)
from tracer.policy import (
    CompletionPolicy,
    Kind,
    PolicyError,
    PolicyOverrides,
    Sanction,
    Severity,
    Verdict,
    build_policy,
    describe,
    load_policy_file,
    overrides_from_mapping,
)

N = abi.EXIT_REASON_BY_NAME
IO, MMIO, HYPERCALL = N["KVM_EXIT_IO"], N["KVM_EXIT_MMIO"], N["KVM_EXIT_HYPERCALL"]
RDMSR, WRMSR = N["KVM_EXIT_X86_RDMSR"], N["KVM_EXIT_X86_WRMSR"]
HYPERV, XEN, TDX = N["KVM_EXIT_HYPERV"], N["KVM_EXIT_XEN"], N["KVM_EXIT_TDX"]

# The note after the KVM_EXIT_MMIO struct in api.rst (Linux 6.16).
DOC_LIST = {
    "KVM_EXIT_IO", "KVM_EXIT_MMIO", "KVM_EXIT_OSI", "KVM_EXIT_PAPR_HCALL", "KVM_EXIT_XEN",
    "KVM_EXIT_EPR", "KVM_EXIT_HYPERCALL", "KVM_EXIT_TDX", "KVM_EXIT_X86_RDMSR",
    "KVM_EXIT_X86_WRMSR",
}
X86_ONLY = {"KVM_EXIT_X86_RDMSR", "KVM_EXIT_X86_WRMSR", "KVM_EXIT_XEN", "KVM_EXIT_HYPERV",
            "KVM_EXIT_TDX"}


def names(policy: CompletionPolicy) -> set[str]:
    return {abi.exit_reason_name(n) for n in policy.pending_exits}


def policy_for(arch: str, **kw: Any) -> CompletionPolicy:
    return build_policy(PolicyOverrides(arch=arch, **kw))


@pytest.fixture
def x86() -> CompletionPolicy:
    return policy_for("x86_64")


# ---- default pending exits ----------------------------------------------------------------------

def test_x86_64_pending_exits_are_the_x86_doc_list_plus_hyperv() -> None:
    assert names(policy_for("x86_64")) == {
        "KVM_EXIT_IO", "KVM_EXIT_MMIO", "KVM_EXIT_HYPERCALL", "KVM_EXIT_X86_RDMSR",
        "KVM_EXIT_X86_WRMSR", "KVM_EXIT_XEN", "KVM_EXIT_HYPERV", "KVM_EXIT_TDX",
    }


@pytest.mark.parametrize("exit_name", ["KVM_EXIT_HLT", "KVM_EXIT_INTR", "KVM_EXIT_SHUTDOWN",
                                       "KVM_EXIT_SYSTEM_EVENT", "KVM_EXIT_MEMORY_FAULT"])
def test_x86_64_exits_without_completion_are_not_pending(exit_name: str) -> None:
    policy = policy_for("x86_64")
    assert not policy.leaves_pending(N[exit_name])


def test_aarch64_only_mmio_is_pending() -> None:
    policy = policy_for("aarch64")
    assert names(policy) == {"KVM_EXIT_MMIO"}
    # an SMCCC hypercall exits with PC already advanced
    assert not policy.leaves_pending(HYPERCALL)


def test_ppc64le_pending_exits() -> None:
    got = names(policy_for("ppc64le"))
    assert {"KVM_EXIT_IO", "KVM_EXIT_MMIO", "KVM_EXIT_OSI", "KVM_EXIT_PAPR_HCALL",
            "KVM_EXIT_EPR"} <= got
    assert not got & X86_ONLY
    assert got <= DOC_LIST


@pytest.mark.parametrize("arch", ["riscv64", "s390x", "loongarch64"])
def test_unknown_arch_gets_the_generic_doc_list(arch: str) -> None:
    policy = policy_for(arch)
    assert policy.arch == "generic"
    assert names(policy) == DOC_LIST


@pytest.mark.parametrize(("alias", "arch"), [("amd64", "x86_64"), ("arm64", "aarch64"),
                                              ("ppc64", "ppc64le")])
def test_arch_aliases(alias: str, arch: str) -> None:
    assert policy_for(alias).arch == arch
    assert names(policy_for(alias)) == names(policy_for(arch))


@pytest.mark.parametrize(("machine", "arch"), [("x86_64", "x86_64"), ("arm64", "aarch64"),
                                                ("mips", "generic")])
def test_default_arch_is_the_hosts(monkeypatch: pytest.MonkeyPatch, machine: str,
                                   arch: str) -> None:
    monkeypatch.setattr("platform.machine", lambda: machine)
    assert build_policy().arch == arch
    assert build_policy(PolicyOverrides()).arch == arch


def test_every_pending_exit_fits_the_bpf_policy_array() -> None:
    for arch in ("x86_64", "aarch64", "ppc64le", "generic"):
        assert all(0 <= n < abi.MAX_EXIT_REASON for n in policy_for(arch).pending_exits)


def test_default_policy_has_every_sanction_and_describe_reports_it(
        x86: CompletionPolicy) -> None:
    assert x86.sanctions == {Sanction.PORT_7E, Sanction.RESTORE_AFTER_PIO}
    d = describe(x86)
    assert d["arch"] == "x86_64"
    assert d["sanctions"] == ["port-0x7e", "restore-after-pio"]
    assert "KVM_EXIT_HYPERV" in d["pending_exits"]
    assert "KVM_EXIT_HLT" not in d["pending_exits"]


# ---- judge(): saves ----------------------------------------------------------------------------

SAVE_CASES: list[tuple[int, PendingAccess | None, list[str]]] = [
    (IO, PioAccess(0x3F8, "out", 1, 1), ["port 0x3f8 OUT", "replays"]),
    (IO, PioAccess(0x60, "in", 1, 1), ["port 0x60 IN", "loses"]),
    (MMIO, MmioAccess(0xFEE00000, 4, True), ["MMIO write of 0xfee00000", "replays"]),
    (MMIO, MmioAccess(0xD0001000, 8, False), ["MMIO read of 0xd0001000", "loses"]),
    (RDMSR, MsrAccess(0x4B564D00, False), ["RDMSR 0x4b564d00", "loses"]),
    (WRMSR, MsrAccess(0x1B, True), ["WRMSR 0x1b", "replays"]),
    (HYPERCALL, HypercallAccess(12), ["replays the operation or loses its result"]),
    (XEN, None, ["replays the operation or loses its result"]),
    (TDX, None, ["replays the operation or loses its result"]),
    (HYPERV, HypervAccess(abi.KVM_EXIT_HYPERV_HCALL),
     ["replays the operation or loses its result"]),
    (MMIO, None, ["replays the operation or loses its result"]),  # access read failed
]


@pytest.mark.parametrize(("reason", "access", "phrases"), SAVE_CASES)
def test_x86_save_mid_completion_is_an_error_naming_the_access_and_the_fix(
        x86: CompletionPolicy, reason: int, access: PendingAccess | None,
        phrases: list[str]) -> None:
    ruling = x86.judge(Kind.SAVE, reason, access, False, "KVM_GET_REGS")
    assert ruling.verdict is Verdict.VIOLATION
    assert ruling.rule == "save-mid-completion"
    assert ruling.severity is Severity.ERROR
    assert "KVM_GET_REGS" in ruling.reason
    assert abi.exit_reason_name(reason) in ruling.reason
    assert "immediate_exit=1" in ruling.reason
    for phrase in phrases:
        assert phrase in ruling.reason


def test_aarch64_save_is_a_warning_the_access_replays(x86: CompletionPolicy) -> None:
    arm = policy_for("aarch64")
    ruling = arm.judge(Kind.SAVE, MMIO, MmioAccess(0x9000000, 4, False), False,
                       "KVM_GET_ONE_REG")
    assert ruling.verdict is Verdict.VIOLATION
    assert ruling.severity is Severity.WARNING
    assert "consistent" in ruling.reason and "replayed" in ruling.reason
    assert "KVM_GET_ONE_REG" in ruling.reason and "immediate_exit=1" in ruling.reason
    # the same save on x86 is worse
    assert x86.judge(Kind.SAVE, MMIO, MmioAccess(0x9000000, 4, False), False,
                     "KVM_GET_REGS").severity is Severity.ERROR


def test_generic_arch_save_is_an_error() -> None:
    ruling = policy_for("riscv64").judge(Kind.SAVE, MMIO, None, False, "KVM_GET_ONE_REG")
    assert (ruling.verdict, ruling.severity) == (Verdict.VIOLATION, Severity.ERROR)


# ---- judge(): restores -------------------------------------------------------------------------

@pytest.mark.parametrize(("reason", "access"), [
    (MMIO, MmioAccess(0xFEE00000, 4, True)),
    (MMIO, MmioAccess(0xFEE00000, 4, False)),
    (RDMSR, MsrAccess(0x10, False)),
    (WRMSR, MsrAccess(0x10, True)),
    (HYPERCALL, HypercallAccess(12)),
    (HYPERV, HypervAccess(abi.KVM_EXIT_HYPERV_HCALL)),
    (XEN, None),
    (TDX, None),
])
def test_restore_after_non_pio_exit_is_critical(x86: CompletionPolicy, reason: int,
                                                access: PendingAccess | None) -> None:
    ruling = x86.judge(Kind.RESTORE, reason, access, False, "KVM_SET_REGS")
    assert ruling.verdict is Verdict.VIOLATION
    assert ruling.rule == "restore-mid-completion"
    assert ruling.severity is Severity.CRITICAL
    assert "KVM_SET_REGS" in ruling.reason
    assert abi.exit_reason_name(reason) in ruling.reason
    assert "immediate_exit=1" in ruling.reason


@pytest.mark.parametrize("access", [PioAccess(0x3F8, "out", 1, 1), PioAccess(0x3F8, "out", 1, 4),
                                    PioAccess(0x60, "out", 4, 1)])
def test_restore_after_an_out_is_sanctioned(x86: CompletionPolicy, access: PioAccess) -> None:
    ruling = x86.judge(Kind.RESTORE, IO, access, False, "KVM_SET_REGS")
    assert ruling.verdict is Verdict.SANCTIONED
    assert ruling.rule == "restore-after-pio"
    assert ruling.severity is Severity.INFO
    assert "complete_fast_pio_out" in ruling.reason and "takes effect" in ruling.reason


@pytest.mark.parametrize(("access", "says"), [
    (PioAccess(0x60, "in", 1, 1), ["complete_fast_pio_in", "complete_emulated_pio", "RAX"]),
    (PioAccess(0x7E, "in", 2, 1), ["port 0x7e IN", "complete_fast_pio_in"]),
    (PioAccess(0x3F8, "in", 1, 4), ["string port 0x3f8 IN (4 elements)", "restored RCX/RDI",
                                    "complete_emulated_pio"]),
    (None, ["for an IN"]),
])
def test_restore_after_an_in_is_a_critical_violation(x86: CompletionPolicy,
                                                     access: PioAccess | None,
                                                     says: list[str]) -> None:
    """KVM completes a pending IN into the restored state (tracer.policy's docstring): the
    restore does not take effect whole. Unknown direction: not provably an OUT."""
    ruling = x86.judge(Kind.RESTORE, IO, access, False, "KVM_SET_REGS")
    assert (ruling.verdict, ruling.rule) == (Verdict.VIOLATION, "restore-mid-completion")
    assert ruling.severity is Severity.CRITICAL
    for text in says:
        assert text in ruling.reason
    assert "immediate_exit=1" in ruling.reason


def test_the_policy_docstring_cites_kvm_for_every_port_exit_kind() -> None:
    from tracer import policy

    doc = policy.__doc__ or ""
    for function in ("complete_fast_pio_out", "complete_fast_pio_in", "complete_emulated_pio",
                     "complete_fast_pio_out_port_0x7e", "kvm_is_linear_rip",
                     "EMULTYPE_NO_DECODE", "emulate_regs_need_sync_from_vcpu"):
        assert function in doc, function


def test_restore_after_pio_sanction_applies_to_restores_only(x86: CompletionPolicy) -> None:
    ruling = x86.judge(Kind.SAVE, IO, PioAccess(0x3F8, "out", 1, 1), False, "KVM_GET_REGS")
    assert ruling.verdict is Verdict.VIOLATION


def test_restore_after_pio_is_critical_when_the_sanction_is_disabled() -> None:
    policy = policy_for("x86_64", disabled_sanctions=["restore-after-pio"])
    ruling = policy.judge(Kind.RESTORE, IO, PioAccess(0x3F8, "out", 1, 1), False, "KVM_SET_REGS")
    assert ruling.verdict is Verdict.VIOLATION
    assert ruling.rule == "restore-mid-completion"
    assert ruling.severity is Severity.CRITICAL


def test_restore_after_mmio_is_critical_on_aarch64_too() -> None:
    ruling = policy_for("aarch64").judge(Kind.RESTORE, MMIO, None, False, "KVM_SET_ONE_REG")
    assert (ruling.verdict, ruling.severity) == (Verdict.VIOLATION, Severity.CRITICAL)


# ---- judge(): port 0x7e -------------------------------------------------------------------------

OUT_7E = PioAccess(0x7E, "out", 2, 1)


@pytest.mark.parametrize("kind", [Kind.SAVE, Kind.RESTORE])
def test_out_to_port_7e_is_sanctioned(x86: CompletionPolicy, kind: Kind) -> None:
    ruling = x86.judge(kind, IO, OUT_7E, False, "KVM_GET_REGS")
    assert ruling.verdict is Verdict.SANCTIONED
    assert ruling.rule == "port-0x7e"
    assert ruling.severity is Severity.INFO
    assert "0x7e" in ruling.reason


def test_port_7e_save_is_a_violation_when_the_quirk_is_disabled(x86: CompletionPolicy) -> None:
    ruling = x86.judge(Kind.SAVE, IO, OUT_7E, True, "KVM_GET_REGS")
    assert ruling.verdict is Verdict.VIOLATION
    assert "port 0x7e OUT" in ruling.reason


def test_port_7e_restore_with_quirk_disabled_falls_back_to_the_pio_rule(
        x86: CompletionPolicy) -> None:
    ruling = x86.judge(Kind.RESTORE, IO, OUT_7E, True, "KVM_SET_REGS")
    assert ruling.rule == "restore-after-pio"
    both_off = policy_for("x86_64", disabled_sanctions=["restore-after-pio"])
    ruling = both_off.judge(Kind.RESTORE, IO, OUT_7E, True, "KVM_SET_REGS")
    assert ruling.verdict is Verdict.VIOLATION


def test_in_from_port_7e_is_not_sanctioned(x86: CompletionPolicy) -> None:
    ruling = x86.judge(Kind.SAVE, IO, PioAccess(0x7E, "in", 2, 1), False, "KVM_GET_REGS")
    assert ruling.verdict is Verdict.VIOLATION
    assert "port 0x7e IN" in ruling.reason


@pytest.mark.parametrize("port", [0x7D, 0x7F, 0x17E])
def test_other_ports_are_not_sanctioned(x86: CompletionPolicy, port: int) -> None:
    ruling = x86.judge(Kind.SAVE, IO, PioAccess(port, "out", 2, 1), False, "KVM_GET_REGS")
    assert ruling.verdict is Verdict.VIOLATION


def test_port_7e_is_a_violation_when_the_sanction_is_disabled() -> None:
    policy = policy_for("x86_64", disabled_sanctions=["port-0x7e"])
    assert Sanction.PORT_7E not in policy.sanctions
    ruling = policy.judge(Kind.SAVE, IO, OUT_7E, False, "KVM_GET_REGS")
    assert ruling.verdict is Verdict.VIOLATION
    assert ruling.severity is Severity.ERROR


# ---- judge(): Hyper-V --------------------------------------------------------------------------

@pytest.mark.parametrize("hv_type", [1, 3])  # SYNIC, SYNDBG
@pytest.mark.parametrize("kind", [Kind.SAVE, Kind.RESTORE])
def test_hyperv_non_hcall_exits_are_not_pending(x86: CompletionPolicy, hv_type: int,
                                                kind: Kind) -> None:
    ruling = x86.judge(kind, HYPERV, HypervAccess(hv_type), False, "KVM_GET_REGS")
    assert ruling.verdict is Verdict.NOT_PENDING
    assert ruling.severity is Severity.INFO


# ---- severity overrides ------------------------------------------------------------------------

def test_severity_override_for_a_whole_kind() -> None:
    policy = policy_for("x86_64", severities={"save": "critical"})
    ruling = policy.judge(Kind.SAVE, MMIO, None, False, "KVM_GET_REGS")
    assert ruling.severity is Severity.CRITICAL
    # restores keep their default
    assert policy.judge(Kind.RESTORE, MMIO, None, False, "X").severity is Severity.CRITICAL
    assert policy_for("aarch64", severities={"save": "critical"}).judge(
        Kind.SAVE, MMIO, None, False, "X").severity is Severity.CRITICAL


def test_severity_override_for_one_exit() -> None:
    policy = policy_for("x86_64", severities={"restore:KVM_EXIT_MMIO": "warning"})
    assert policy.judge(Kind.RESTORE, MMIO, None, False, "X").severity is Severity.WARNING
    assert policy.judge(Kind.RESTORE, RDMSR, None, False, "X").severity is Severity.CRITICAL
    assert policy.judge(Kind.SAVE, MMIO, None, False, "X").severity is Severity.ERROR


@pytest.mark.parametrize("key", ["save:MMIO", "save:mmio", "save:KVM_EXIT_MMIO"])
def test_most_specific_severity_wins(key: str) -> None:
    policy = policy_for("x86_64", severities={"save": "critical", key: "info"})
    assert policy.judge(Kind.SAVE, MMIO, None, False, "X").severity is Severity.INFO
    assert policy.judge(Kind.SAVE, IO, None, False, "X").severity is Severity.CRITICAL


def test_severity_overrides_do_not_touch_sanctioned_rulings() -> None:
    policy = policy_for("x86_64", severities={"save": "critical", "restore": "critical"})
    assert policy.judge(Kind.SAVE, IO, OUT_7E, False, "X").severity is Severity.INFO
    restore_after_out = policy.judge(Kind.RESTORE, IO, PioAccess(0x3F8, "out", 1, 1), False, "X")
    assert restore_after_out.severity is Severity.INFO


# ---- build_policy overrides --------------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["KVM_EXIT_HLT", "HLT", "hlt", " kvm_exit_hlt "])
def test_extra_pending_exit_in_any_spelling(spelling: str) -> None:
    policy = policy_for("x86_64", extra_pending_exits=[spelling])
    assert policy.leaves_pending(N["KVM_EXIT_HLT"])
    assert policy.leaves_pending(IO)  # the defaults stay


@pytest.mark.parametrize("spelling", ["KVM_EXIT_HYPERV", "HYPERV", "hyperv"])
def test_ignored_exit_in_any_spelling(spelling: str) -> None:
    policy = policy_for("x86_64", ignored_exits=[spelling])
    assert not policy.leaves_pending(HYPERV)
    assert names(policy) == names(policy_for("x86_64")) - {"KVM_EXIT_HYPERV"}


def test_extra_pending_exit_on_aarch64() -> None:
    policy = policy_for("aarch64", extra_pending_exits=["KVM_EXIT_HYPERCALL"])
    assert names(policy) == {"KVM_EXIT_MMIO", "KVM_EXIT_HYPERCALL"}


def test_disabling_both_sanctions() -> None:
    policy = policy_for("x86_64", disabled_sanctions=["port-0x7e", "restore-after-pio"])
    assert policy.sanctions == frozenset()
    assert describe(policy)["sanctions"] == []


# ---- build_policy errors -----------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "needles"), [
    (PolicyOverrides(extra_pending_exits=["BOGUS"]), ["extra_pending_exits", "'BOGUS'"]),
    (PolicyOverrides(ignored_exits=["KVM_EXIT_NOPE"]), ["ignored_exits", "'KVM_EXIT_NOPE'"]),
    (PolicyOverrides(extra_pending_exits=[""]), ["unknown exit reason"]),
    (PolicyOverrides(disabled_sanctions=["nope"]),
     ["unknown sanction 'nope'", "port-0x7e", "restore-after-pio"]),
    (PolicyOverrides(severities={"save": "loud"}),
     ["severity.save", "unknown severity 'loud'", "critical"]),
    (PolicyOverrides(severities={"save:KVM_EXIT_MMIO": "Error"}), ["'Error'"]),
    (PolicyOverrides(severities={"bogus": "error"}), ["'bogus'", "save", "restore"]),
    (PolicyOverrides(severities={"bogus:KVM_EXIT_MMIO": "error"}), ["'bogus:KVM_EXIT_MMIO'"]),
    (PolicyOverrides(severities={"save:BOGUS": "error"}), ["severity", "'BOGUS'"]),
])
def test_build_policy_errors_name_the_bad_value(overrides: PolicyOverrides,
                                                needles: list[str]) -> None:
    overrides.arch = "x86_64"
    with pytest.raises(PolicyError) as info:
        build_policy(overrides)
    for needle in needles:
        assert needle in str(info.value)


# ---- policy files ------------------------------------------------------------------------------

def write(tmp_path: Path, text: str, name: str = "policy.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


FULL_POLICY = """\
arch = "aarch64"
extra_pending_exits = ["KVM_EXIT_HYPERCALL"]
ignored_exits = ["HYPERV"]
disabled_sanctions = ["port-0x7e"]

[severity]
save = "critical"
"restore:KVM_EXIT_MMIO" = "warning"
"""


def test_policy_file_with_a_policy_table(tmp_path: Path) -> None:
    text = "[daemon]\nsomething = 1\n\n[policy]\n" + FULL_POLICY.replace("[severity]",
                                                                          "[policy.severity]")
    ov = load_policy_file(write(tmp_path, text))
    assert ov == PolicyOverrides(
        arch="aarch64", extra_pending_exits=["KVM_EXIT_HYPERCALL"], ignored_exits=["HYPERV"],
        disabled_sanctions=["port-0x7e"],
        severities={"save": "critical", "restore:KVM_EXIT_MMIO": "warning"})


def test_policy_file_without_a_policy_table(tmp_path: Path) -> None:
    ov = load_policy_file(write(tmp_path, FULL_POLICY))
    assert ov.arch == "aarch64"
    assert ov.severities == {"save": "critical", "restore:KVM_EXIT_MMIO": "warning"}
    policy = build_policy(ov)
    assert names(policy) == {"KVM_EXIT_MMIO", "KVM_EXIT_HYPERCALL"}
    assert policy.sanctions == {Sanction.RESTORE_AFTER_PIO}
    assert policy.judge(Kind.RESTORE, MMIO, None, False, "X").severity is Severity.WARNING
    assert policy.judge(Kind.SAVE, MMIO, None, False, "X").severity is Severity.CRITICAL


def test_empty_policy_file_changes_nothing(tmp_path: Path) -> None:
    assert load_policy_file(write(tmp_path, "")) == PolicyOverrides()
    assert load_policy_file(write(tmp_path, "[policy]\n")) == PolicyOverrides()


@pytest.mark.parametrize(("text", "needles"), [
    ("bogus = 1\n", ["unknown key 'bogus'", "extra_pending_exits"]),
    ("[policy]\nignore_exits = []\n", ["unknown key 'ignore_exits'"]),
    ("[policy]\nextra_pending_exits = \"HYPERV\"\n",
     ["policy.extra_pending_exits", "expected a list of strings", "'HYPERV'"]),
    ("ignored_exits = \"HYPERV\"\n", ["policy.ignored_exits", "expected a list of strings"]),
    ("disabled_sanctions = \"port-0x7e\"\n", ["policy.disabled_sanctions", "list of strings"]),
    ("extra_pending_exits = [2]\n", ["policy.extra_pending_exits", "list of strings", "[2]"]),
    ("arch = 64\n", ["policy.arch", "expected a string", "64"]),
    ("severity = \"error\"\n", ["policy.severity", "expected a table"]),
    ("policy = 3\n", ["[policy] must be a table"]),
])
def test_policy_file_structure_errors(tmp_path: Path, text: str, needles: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        load_policy_file(path)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message


@pytest.mark.parametrize(("text", "needles"), [
    ("extra_pending_exits = [\"BOGUS\"]\n", ["'BOGUS'", "unknown exit reason"]),
    ("disabled_sanctions = [\"nope\"]\n", ["unknown sanction 'nope'"]),
    ("[severity]\nsave = \"loud\"\n", ["unknown severity 'loud'"]),
    ("[severity]\nsave = 3\n", ["unknown severity '3'"]),
    ("[severity]\nsometimes = \"error\"\n", ["'sometimes'", "'save' or 'restore'"]),
])
def test_policy_file_value_errors_surface_when_built(tmp_path: Path, text: str,
                                                     needles: list[str]) -> None:
    ov = load_policy_file(write(tmp_path, text))
    with pytest.raises(PolicyError) as info:
        build_policy(ov)
    for needle in needles:
        assert needle in str(info.value)


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "extra_pending_exits = [\n")
    with pytest.raises(PolicyError, match="not valid TOML") as info:
        load_policy_file(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(PolicyError, match="No such file or directory") as info:
        load_policy_file(path)
    assert f"cannot read policy file {path}" in str(info.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policy_file(tmp_path)


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # root reads mode-000 files, so the EACCES is injected
    path = write(tmp_path, "arch = \"x86_64\"\n")

    def denied(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(PolicyError, match="Permission denied") as info:
        load_policy_file(path)
    assert str(path) in str(info.value)


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"extra_pending_exits = [\"\xff\"]\n")
    with pytest.raises(PolicyError, match="not UTF-8") as info:
        load_policy_file(path)
    assert str(path) in str(info.value)


def test_overrides_from_mapping_names_where() -> None:
    with pytest.raises(PolicyError, match=r"^cli: unknown key 'x'"):
        overrides_from_mapping({"x": 1}, "cli")


# ---- merging file and CLI ----------------------------------------------------------------------

def test_merged_cli_over_file() -> None:
    file = PolicyOverrides(arch="aarch64", extra_pending_exits=["HLT"], ignored_exits=["XEN"],
                           disabled_sanctions=["port-0x7e"],
                           severities={"save": "warning", "restore": "error"})
    cli = PolicyOverrides(arch="x86_64", extra_pending_exits=["INTR"], ignored_exits=["TDX"],
                          disabled_sanctions=["restore-after-pio"],
                          severities={"save": "critical"})
    merged = file.merged(cli)
    assert merged.arch == "x86_64"
    assert merged.extra_pending_exits == ["HLT", "INTR"]
    assert merged.ignored_exits == ["XEN", "TDX"]
    assert merged.disabled_sanctions == ["port-0x7e", "restore-after-pio"]
    assert merged.severities == {"save": "critical", "restore": "error"}
    # inputs untouched
    assert file.extra_pending_exits == ["HLT"] and cli.severities == {"save": "critical"}


def test_merged_keeps_the_file_arch_without_a_cli_arch() -> None:
    merged = PolicyOverrides(arch="aarch64").merged(PolicyOverrides())
    assert merged.arch == "aarch64"
    assert build_policy(merged).arch == "aarch64"


def test_merged_file_and_cli_build_one_policy(tmp_path: Path) -> None:
    path = write(tmp_path, "arch = \"x86_64\"\nignored_exits = [\"HYPERV\"]\n"
                           "[severity]\nsave = \"warning\"\n")
    cli = PolicyOverrides(extra_pending_exits=["HLT"], severities={"save": "critical"})
    policy = build_policy(load_policy_file(path).merged(cli))
    assert not policy.leaves_pending(HYPERV)
    assert policy.leaves_pending(N["KVM_EXIT_HLT"])
    assert policy.judge(Kind.SAVE, MMIO, None, False, "X").severity is Severity.CRITICAL


def test_shipped_example_policy_loads_and_matches_the_defaults() -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "policy.example.toml"
    policy = build_policy(load_policy_file(example))
    default = build_policy(PolicyOverrides(arch=policy.arch))
    assert policy.pending_exits == default.pending_exits
    assert policy.sanctions == default.sanctions


# ---- register peeks ----------------------------------------------------------------------------
def test_a_lone_read_of_any_save_kind_is_a_peek_by_default() -> None:
    from tracer.policy import DEFAULT_PEEK_IOCTLS, Inspection

    policy = build_policy(PolicyOverrides(arch="x86_64"))
    assert policy.inspection is Inspection.BENIGN
    assert policy.peek_ioctls == frozenset(DEFAULT_PEEK_IOCTLS)
    saves = {abi.IOCTLS[n].name for n in abi.SAVE_IOCTLS}
    assert all(policy.is_peek(name) for name in saves)
    assert not policy.is_peek("KVM_SET_REGS")
    assert describe(policy)["inspection"] == "benign"


def test_strict_inspection_makes_no_ioctl_a_peek() -> None:
    policy = build_policy(PolicyOverrides(arch="x86_64", inspection="violation"))
    assert not policy.is_peek("KVM_GET_REGS")


def test_inspection_and_peek_ioctls_from_a_policy_table() -> None:
    ov = overrides_from_mapping({"inspection": "violation", "peek_ioctls": ["get_sregs"]}, "t")
    policy = build_policy(ov)
    assert policy.inspection.value == "violation"
    assert policy.peek_ioctls == frozenset({"KVM_GET_SREGS"})
    merged = ov.merged(PolicyOverrides(inspection="benign"))
    assert build_policy(merged).is_peek("KVM_GET_SREGS")


@pytest.mark.parametrize(("table", "message"), [
    ({"inspection": "lenient"}, "inspection: unknown value 'lenient' (known: benign, violation)"),
    ({"inspection": 1}, "inspection: expected \"benign\" or \"violation\""),
    ({"peek_ioctls": ["KVM_SET_REGS"]}, "'KVM_SET_REGS' is not a vCPU state save ioctl"),
    ({"peek_ioctls": "KVM_GET_REGS"}, "peek_ioctls: expected a list of strings"),
])
def test_bad_inspection_settings_say_what_is_wrong(table: dict[str, object],
                                                   message: str) -> None:
    with pytest.raises(PolicyError, match=re.escape(message)):
        build_policy(overrides_from_mapping(table, "t"))
