"""Completion policy: which exits leave a completion pending, and how bad a save/restore is then.

Facts behind every rule: ``Documentation/virt/kvm/api.rst`` (the note after the KVM_EXIT_MMIO
struct) and the project's kvm-completion-facts.md. Every rule carries a one-line reason that the
alert quotes. Operators override through a TOML policy file or CLI flags (:func:`build_policy`).

Restores after a port exit (rule ``restore-after-pio``).
What KVM (arch/x86/kvm/x86.c) does on the next KVM_RUN with state restored while a port exit is
pending, per kind of port exit; measured on real KVM by the VMM's restore-pio* scenarios:
- OUT through the emulator (string `rep outs`, or any OUT KVM emulated: real mode without
  unrestricted guest, PVM): x86_emulate_instruction() wrote the instruction back (RIP, RSI,
  RCX) and cleared pio.count *before* the exit, and set no complete_userspace_io: nothing is
  left to do, the restored state takes effect whole.
- fast OUT (kvm_fast_pio_out, VMX/SVM `out`): complete_fast_pio_out() returns early when the
  vCPU's linear RIP is no longer pio.linear_rip (kvm_is_linear_rip), i.e. the restore moved
  RIP, and otherwise only skips the OUT at RIP (kvm_skip_emulated_instruction): the data
  already went to userspace, the restored state takes effect. (A restored state that sits at
  that very RIP *before* its own OUT would lose that OUT: no VMM restores such a state into
  a vCPU stopped at the same instruction, and the tracer cannot see RIP.)
- OUT to port 0x7e with KVM_X86_QUIRK_OUT_7E_INC_RIP: RIP was advanced before the exit and
  complete_fast_pio_out_port_0x7e() does nothing.
- fast IN (kvm_fast_pio_in): complete_fast_pio_in() is dropped only if the restore moved the
  linear RIP; with RIP unchanged it merges the port data into the restored RAX and skips.
- IN through the emulator (string `rep ins`, or an emulated `in`): complete_emulated_pio()
  -> complete_emulated_io() -> kvm_emulate_instruction(EMULTYPE_NO_DECODE) resumes the
  instruction decoded before the exit. __set_regs() set emulate_regs_need_sync_from_vcpu, so
  the emulator re-reads the restored RCX/RDI, stores the data at the destination it computed
  before the exit and then writes back the RIP it decoded then: the restored RIP is lost
  (measured on PVM: after a restore that moved RIP, RIP is back past the `in`; a single `in`
  also drops the port data, a `rep ins` stores it at the old RDI and ends with the restored
  RDI advanced).
So a restore after any OUT is safe (rule restore-after-pio) and after an IN it is not: the
tracer cannot see which path an IN took nor the exit's RIP (KVM reports neither), and only a
fast IN whose restore moved RIP (a reset) would have been dropped.
"""

from __future__ import annotations

import enum
import platform
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from tracer import abi
from tracer.events import HypervAccess, MmioAccess, MsrAccess, PendingAccess, PioAccess

# Exits whose operation KVM finishes only when userspace re-enters KVM_RUN, per architecture.
_DOC_LIST: Final = ("KVM_EXIT_IO", "KVM_EXIT_MMIO", "KVM_EXIT_OSI", "KVM_EXIT_PAPR_HCALL",
                    "KVM_EXIT_XEN", "KVM_EXIT_EPR", "KVM_EXIT_HYPERCALL", "KVM_EXIT_TDX",
                    "KVM_EXIT_X86_RDMSR", "KVM_EXIT_X86_WRMSR")
PENDING_EXITS_BY_ARCH: Final[dict[str, tuple[str, ...]]] = {
    # x86 also sets a completion callback for Hyper-V hypercall exits (not in the doc).
    "x86_64": ("KVM_EXIT_IO", "KVM_EXIT_MMIO", "KVM_EXIT_HYPERCALL", "KVM_EXIT_X86_RDMSR",
               "KVM_EXIT_X86_WRMSR", "KVM_EXIT_XEN", "KVM_EXIT_HYPERV", "KVM_EXIT_TDX"),
    # arm64 completes only MMIO on re-entry; an SMCCC hypercall exits with PC already advanced.
    "aarch64": ("KVM_EXIT_MMIO",),
    "ppc64le": ("KVM_EXIT_IO", "KVM_EXIT_MMIO", "KVM_EXIT_OSI", "KVM_EXIT_PAPR_HCALL",
                "KVM_EXIT_EPR"),
    "generic": _DOC_LIST,
}
ARCH_ALIASES: Final = {"amd64": "x86_64", "arm64": "aarch64", "ppc64": "ppc64le"}

PORT_7E: Final = 0x7E


class Kind(enum.Enum):
    SAVE = "save"
    RESTORE = "restore"


class Verdict(enum.Enum):
    VIOLATION = "violation"
    SANCTIONED = "sanctioned"  # mid-completion, but the ABI makes it safe: count, don't alert
    NOT_PENDING = "not_pending"  # this exit turned out to need no completion (Hyper-V SynIC)


class Severity(enum.Enum):
    """Ordered: ``warning`` < ``error`` < ``critical``."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


class Inspection(enum.Enum):
    """What a register peek that is then completed counts as (policy key ``inspection``)."""

    BENIGN = "benign"  # counted as an inspection, not alerted (the default)
    VIOLATION = "violation"  # strict: every save mid-completion is a violation at once


# Save ioctls whose lone read in a window (that one kind, no restore) is an inspection
# (tracer.windows): every one. One kind of state alone cannot be restored into a VM; a VMM that
# saves to restore reads several kinds (KVM_GET_REGS to decode a request, KVM_GET_LAPIC before
# injecting an NMI are each one kind). ``peek_ioctls`` narrows it.
DEFAULT_PEEK_IOCTLS: Final = tuple(sorted(abi.IOCTLS[n].name for n in abi.SAVE_IOCTLS))


class Sanction(enum.Enum):
    """Named exceptions an operator can switch off (``--no-sanction NAME``)."""

    PORT_7E = "port-0x7e"
    RESTORE_AFTER_PIO = "restore-after-pio"


@dataclass(frozen=True)
class Ruling:
    rule: str
    verdict: Verdict
    severity: Severity
    reason: str


@dataclass(frozen=True)
class CompletionPolicy:
    arch: str
    pending_exits: frozenset[int]
    sanctions: frozenset[Sanction] = frozenset(Sanction)
    # Overrides keyed by (kind, exit reason name) or (kind, "*").
    severities: Mapping[tuple[str, str], Severity] = field(default_factory=dict)
    inspection: Inspection = Inspection.BENIGN
    peek_ioctls: frozenset[str] = frozenset(DEFAULT_PEEK_IOCTLS)

    def is_peek(self, ioctl: str) -> bool:
        """Whether a lone read through ``ioctl`` mid-completion is held by the kernel until the
        window shows what it was (an inspection if that kind alone was read and nothing
        restored) instead of being a violation at once."""
        return self.inspection is Inspection.BENIGN and ioctl in self.peek_ioctls

    def leaves_pending(self, exit_reason: int) -> bool:
        return exit_reason in self.pending_exits

    def judge(self, kind: Kind, exit_reason: int, access: PendingAccess | None,
              quirk_7e_disabled: bool, ioctl: str) -> Ruling:
        """Rule on a ``kind`` ioctl issued while the exit ``exit_reason`` is pending."""
        exit_name = abi.exit_reason_name(exit_reason)
        if isinstance(access, HypervAccess) and access.type != abi.KVM_EXIT_HYPERV_HCALL:
            return Ruling("hyperv-synic", Verdict.NOT_PENDING, Severity.INFO,
                          "Hyper-V SynIC exits set no completion callback")
        if (Sanction.PORT_7E in self.sanctions and isinstance(access, PioAccess)
                and access.port == PORT_7E and access.direction == "out"
                and not quirk_7e_disabled):
            return Ruling(Sanction.PORT_7E.value, Verdict.SANCTIONED, Severity.INFO,
                          "OUT to port 0x7e: KVM_X86_QUIRK_OUT_7E_INC_RIP advanced RIP before "
                          "the exit and the completion does nothing else")
        if (kind is Kind.RESTORE and Sanction.RESTORE_AFTER_PIO in self.sanctions
                and isinstance(access, PioAccess) and access.direction == "out"):
            return Ruling(Sanction.RESTORE_AFTER_PIO.value, Verdict.SANCTIONED, Severity.INFO,
                          RESTORE_AFTER_OUT_REASON)
        severity = self._severity(kind, exit_name)
        if kind is Kind.RESTORE:
            return Ruling("restore-mid-completion", Verdict.VIOLATION, severity,
                          f"{ioctl} wrote vCPU state while {exit_name} was pending: "
                          f"{_restore_consequence(exit_name, access)}; complete it (KVM_RUN "
                          "with immediate_exit=1) before restoring")
        return Ruling("save-mid-completion", Verdict.VIOLATION, severity,
                      f"{ioctl} read vCPU state while {exit_name} was pending: "
                      f"{_consequence(self.arch, exit_reason, access)}; re-enter KVM_RUN with "
                      "immediate_exit=1 before saving")

    def _severity(self, kind: Kind, exit_name: str) -> Severity:
        for key in ((kind.value, exit_name), (kind.value, "*")):
            if key in self.severities:
                return self.severities[key]
        if kind is Kind.RESTORE:
            return Severity.CRITICAL  # the restored state is silently overwritten
        if self.arch == "aarch64":
            return Severity.WARNING  # consistent state, the access replays on restore
        return Severity.ERROR


RESTORE_AFTER_OUT_REASON: Final = (
    "a port OUT has nothing left to write into the restored state: an emulated or string OUT "
    "was written back before the exit, a fast OUT's completion is dropped when the restore "
    "moved RIP and otherwise only steps past the OUT (complete_fast_pio_out), so the restore "
    "takes effect")


def _restore_consequence(exit_name: str, access: PendingAccess | None) -> str:
    if isinstance(access, PioAccess) and access.direction == "in":
        what = f"port 0x{access.port:x} IN"
        if access.count > 1:
            return (f"KVM's emulator finishes the string {what} ({access.count} elements) into "
                    "the restored state: it takes the restored RCX/RDI, stores at the address "
                    "decoded before the exit and writes back its own RIP over the restored one "
                    "(complete_emulated_pio)")
        return (f"KVM finishes the {what} into the restored state: an emulated IN writes back "
                "the RIP decoded before the exit over the restored one (complete_emulated_pio), "
                "a fast IN merges the port data into the restored RAX and skips the instruction "
                "unless the restore moved RIP (complete_fast_pio_in)")
    if isinstance(access, PioAccess):
        return f"KVM finishes the port 0x{access.port:x} OUT on the next KVM_RUN"
    if exit_name == "KVM_EXIT_IO":
        return ("KVM finishes the port access on the next KVM_RUN and, for an IN, writes its "
                "result and RIP over the restored state")
    return ("KVM finishes the exit on the next KVM_RUN and writes its result over the restored "
            "state")


def _consequence(arch: str, exit_reason: int, access: PendingAccess | None) -> str:
    if arch == "aarch64":
        return "the state is consistent but the access is replayed when it is restored"
    if isinstance(access, PioAccess):
        what = f"port 0x{access.port:x} {access.direction.upper()}"
        return (f"restoring it replays the {what}" if access.direction == "out"
                else f"restoring it loses the {what} result")
    if isinstance(access, MmioAccess):
        what = f"MMIO {'write' if access.is_write else 'read'} of 0x{access.gpa:x}"
        return (f"restoring it replays the {what}" if access.is_write
                else f"restoring it loses the {what} result")
    if isinstance(access, MsrAccess):
        return (f"restoring it replays the WRMSR 0x{access.index:x}" if access.is_write
                else f"restoring it loses the RDMSR 0x{access.index:x} result")
    return "restoring it replays the operation or loses its result"


# ---- building and overriding -------------------------------------------------------------------

class PolicyError(ValueError):
    """A policy file or flag the operator must fix; the message says what and how."""


def host_arch() -> str:
    machine = platform.machine()
    return ARCH_ALIASES.get(machine, machine)


def _exit_number(name: str, where: str) -> int:
    key = name.strip().upper()
    if not key.startswith("KVM_EXIT_"):
        key = "KVM_EXIT_" + key
    if key not in abi.EXIT_REASON_BY_NAME:
        raise PolicyError(f"{where}: unknown exit reason {name!r} (expected a name from "
                          "<linux/kvm.h> such as KVM_EXIT_MMIO or MMIO)")
    return abi.EXIT_REASON_BY_NAME[key]


def _sanction(name: str, where: str) -> Sanction:
    try:
        return Sanction(name.strip())
    except ValueError:
        known = ", ".join(s.value for s in Sanction)
        raise PolicyError(f"{where}: unknown sanction {name!r} (known: {known})") from None


def _severity(value: object, where: str) -> Severity:
    try:
        return Severity(str(value))
    except ValueError:
        known = ", ".join(s.value for s in Severity)
        raise PolicyError(f"{where}: unknown severity {value!r} (known: {known})") from None


def _str_list(value: object, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"{where}: expected a list of strings, got {value!r}")
    return list(value)


@dataclass
class PolicyOverrides:
    """What an operator changes; both the TOML file and CLI flags fill one of these."""

    arch: str | None = None
    extra_pending_exits: list[str] = field(default_factory=list)
    ignored_exits: list[str] = field(default_factory=list)
    disabled_sanctions: list[str] = field(default_factory=list)
    severities: dict[str, str] = field(default_factory=dict)  # "save:KVM_EXIT_MMIO" -> "error"
    inspection: str | None = None  # "benign" | "violation"
    peek_ioctls: list[str] | None = None  # replaces DEFAULT_PEEK_IOCTLS

    def merged(self, other: PolicyOverrides) -> PolicyOverrides:
        """``other`` (CLI flags) on top of ``self`` (file)."""
        return PolicyOverrides(
            arch=other.arch or self.arch,
            extra_pending_exits=self.extra_pending_exits + other.extra_pending_exits,
            ignored_exits=self.ignored_exits + other.ignored_exits,
            disabled_sanctions=self.disabled_sanctions + other.disabled_sanctions,
            severities={**self.severities, **other.severities},
            inspection=other.inspection or self.inspection,
            peek_ioctls=other.peek_ioctls if other.peek_ioctls is not None else self.peek_ioctls,
        )


_POLICY_KEYS: Final = {"arch", "extra_pending_exits", "ignored_exits", "disabled_sanctions",
                       "severity", "inspection", "peek_ioctls"}


def overrides_from_mapping(data: Mapping[str, object], where: str) -> PolicyOverrides:
    unknown = sorted(set(data) - _POLICY_KEYS)
    if unknown:
        raise PolicyError(f"{where}: unknown key {unknown[0]!r} (known: "
                          f"{', '.join(sorted(_POLICY_KEYS))})")
    arch = data.get("arch")
    if arch is not None and not isinstance(arch, str):
        raise PolicyError(f"{where}.arch: expected a string, got {arch!r}")
    severity = data.get("severity", {})
    if not isinstance(severity, dict):
        raise PolicyError(f"{where}.severity: expected a table like {{save = \"error\"}}")
    inspection = data.get("inspection")
    if inspection is not None and not isinstance(inspection, str):
        raise PolicyError(f"{where}.inspection: expected \"benign\" or \"violation\", got "
                          f"{inspection!r}")
    peeks = data.get("peek_ioctls")
    return PolicyOverrides(
        arch=arch,
        extra_pending_exits=_str_list(data.get("extra_pending_exits", []),
                                      f"{where}.extra_pending_exits"),
        ignored_exits=_str_list(data.get("ignored_exits", []), f"{where}.ignored_exits"),
        disabled_sanctions=_str_list(data.get("disabled_sanctions", []),
                                     f"{where}.disabled_sanctions"),
        severities={str(k): str(v) for k, v in severity.items()},
        inspection=inspection,
        peek_ioctls=None if peeks is None else _str_list(peeks, f"{where}.peek_ioctls"),
    )


def _inspection(value: str) -> Inspection:
    try:
        return Inspection(value.strip())
    except ValueError:
        known = ", ".join(i.value for i in Inspection)
        raise PolicyError(f"inspection: unknown value {value!r} (known: {known})") from None


def _peek_ioctl(name: str) -> str:
    key = name.strip().upper()
    if not key.startswith("KVM_"):
        key = "KVM_" + key
    info = abi.IOCTL_BY_NAME.get(key)
    if info is None or info.kind is not abi.IoctlKind.SAVE:
        saves = ", ".join(sorted(abi.IOCTLS[n].name for n in abi.SAVE_IOCTLS))
        raise PolicyError(f"peek_ioctls: {name!r} is not a vCPU state save ioctl (known: "
                          f"{saves})")
    return key


def load_policy_file(path: Path) -> PolicyOverrides:
    """Read ``[policy]`` from a TOML file (the whole file may also be just the policy table)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise PolicyError(f"cannot read policy file {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise PolicyError(f"policy file {path} is not UTF-8 text: {err.reason} at byte "
                          f"{err.start}") from None
    except tomllib.TOMLDecodeError as err:
        raise PolicyError(f"policy file {path} is not valid TOML: {err}") from None
    table = data.get("policy", data)
    if not isinstance(table, dict):
        raise PolicyError(f"{path}: [policy] must be a table")
    return overrides_from_mapping(table, f"{path}: policy")


def build_policy(overrides: PolicyOverrides | None = None) -> CompletionPolicy:
    """The default policy for the host (or ``overrides.arch``) with the overrides applied."""
    ov = overrides or PolicyOverrides()
    arch = ARCH_ALIASES.get(ov.arch, ov.arch) if ov.arch else host_arch()
    if arch not in PENDING_EXITS_BY_ARCH:
        arch = "generic"
    pending = {abi.EXIT_REASON_BY_NAME[n] for n in PENDING_EXITS_BY_ARCH[arch]}
    pending |= {_exit_number(n, "extra_pending_exits") for n in ov.extra_pending_exits}
    pending -= {_exit_number(n, "ignored_exits") for n in ov.ignored_exits}
    if any(n >= abi.MAX_EXIT_REASON for n in pending):
        raise PolicyError(f"exit reasons must be below {abi.MAX_EXIT_REASON}")
    disabled = {_sanction(n, "disabled_sanctions") for n in ov.disabled_sanctions}
    severities: dict[tuple[str, str], Severity] = {}
    for key, value in ov.severities.items():
        kind, _, exit_name = key.partition(":")
        if kind not in (k.value for k in Kind):
            raise PolicyError(f"severity: key {key!r} must start with 'save' or 'restore'")
        name = "*" if not exit_name else abi.exit_reason_name(_exit_number(exit_name, "severity"))
        severities[(kind, name)] = _severity(value, f"severity.{key}")
    inspection = _inspection(ov.inspection) if ov.inspection else Inspection.BENIGN
    peeks = (frozenset(DEFAULT_PEEK_IOCTLS) if ov.peek_ioctls is None
             else frozenset(_peek_ioctl(n) for n in ov.peek_ioctls))
    return CompletionPolicy(arch=arch, pending_exits=frozenset(pending),
                            sanctions=frozenset(Sanction) - disabled, severities=severities,
                            inspection=inspection, peek_ioctls=peeks)


def describe(policy: CompletionPolicy) -> dict[str, object]:
    """For the ``ready`` line and ``check``: what the probes will treat as pending."""
    return {
        "arch": policy.arch,
        "pending_exits": sorted(abi.exit_reason_name(n) for n in policy.pending_exits),
        "sanctions": sorted(s.value for s in policy.sanctions),
        "inspection": policy.inspection.value,
        "peek_ioctls": sorted(policy.peek_ioctls),
    }
