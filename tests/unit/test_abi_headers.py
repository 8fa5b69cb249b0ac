"""tracer/abi.py against the system's <linux/kvm.h>, through the C compiler.

One C program prints every ioctl number, exit reason, constant, kvm_run field offset and field
size the tracer uses; each test compares one group and reports all of its mismatches at once.

Names the installed header (Debian 12: linux-libc-dev 6.1) may lack are guarded with ``#ifdef``
and must be in :data:`ABSENT_FROM_OLD_HEADERS`; any other name the header lacks is a failure, so a
typo in abi.py cannot hide behind the ``#ifdef``.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

from tracer import abi

# Newer than the 6.1 UAPI header: compared when the header has them, reported when it does not.
ABSENT_FROM_OLD_HEADERS: frozenset[str] = frozenset(
    {
        "KVM_EXIT_LOONGARCH_IOCSR",  # 6.7
        "KVM_EXIT_MEMORY_FAULT",  # 6.8
        "KVM_EXIT_TDX",  # 6.16
    }
)

# Constants checked besides the tables (module attributes of tracer.abi named like the header).
EXTRA_CONSTANTS = (
    "KVMIO",
    "KVM_CAP_DISABLE_QUIRKS",
    "KVM_CAP_DISABLE_QUIRKS2",
    "KVM_X86_QUIRK_OUT_7E_INC_RIP",
    "KVM_EXIT_IO_IN",
    "KVM_EXIT_IO_OUT",
    "KVM_EXIT_HYPERV_HCALL",
)

# KvmRunLayout field -> member designator in struct kvm_run.  Fields named "<member>_<field>"
# for a union member below map automatically ("io_data_offset" -> "io.data_offset").
EXIT_UNION_MEMBERS = ("io", "mmio", "msr", "hypercall", "hyperv")
LAYOUT_SPECIAL = {
    "immediate_exit": "immediate_exit",
    "exit_reason": "exit_reason",
    "flags": "flags",
    "exit_union": "hw",  # first member of the anonymous exit union
}

_NAME_RE = re.compile(r"^KVM[A-Z0-9_]*$")


def layout_member(field_name: str) -> str:
    if field_name in LAYOUT_SPECIAL:
        return LAYOUT_SPECIAL[field_name]
    for member in EXIT_UNION_MEMBERS:
        prefix = member + "_"
        if field_name.startswith(prefix):
            return f"{member}.{field_name[len(prefix) :]}"
    raise KeyError(f"KvmRunLayout.{field_name}: map it to a struct kvm_run member in this test")


def ioctl_names() -> dict[str, int]:
    return {i.name: i.number for i in abi.IOCTLS.values()}


def exit_reason_names() -> dict[str, int]:
    return {name: num for num, name in abi.EXIT_REASONS.items()}


def module_constants() -> dict[str, int]:
    """Every int attribute of tracer.abi named like a header macro (KVM*), plus EXTRA_CONSTANTS."""
    found = {
        name: value
        for name, value in vars(abi).items()
        if _NAME_RE.match(name) and isinstance(value, int) and not isinstance(value, bool)
    }
    for name in EXTRA_CONSTANTS:
        found[name] = getattr(abi, name)  # AttributeError: abi.py lost a constant the code uses
    return found


def layout_fields() -> dict[str, tuple[str, int]]:
    """KvmRunLayout field -> (C member designator, offset in abi.KVM_RUN_LAYOUT)."""
    return {
        f.name: (layout_member(f.name), getattr(abi.KVM_RUN_LAYOUT, f.name))
        for f in dataclasses.fields(abi.KVM_RUN_LAYOUT)
    }


def _c_program() -> str:
    names = sorted({*ioctl_names(), *exit_reason_names(), *module_constants()})
    out = [
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <linux/kvm.h>",
        "",
        "int main(void)",
        "{",
    ]
    for name in names:
        out += [
            f"#ifdef {name}",
            f'\tprintf("value %s %lu\\n", "{name}", (unsigned long)({name}));',
            "#else",
            f'\tprintf("absent %s\\n", "{name}");',
            "#endif",
        ]
    for field_name, (member, _) in layout_fields().items():
        out.append(
            f'\tprintf("layout %s %lu %lu\\n", "{field_name}", '
            f"(unsigned long)offsetof(struct kvm_run, {member}), "
            f"(unsigned long)sizeof(((struct kvm_run *)0)->{member}));"
        )
    out += ["\treturn 0;", "}", ""]
    return "\n".join(out)


@dataclasses.dataclass
class HeaderValues:
    values: dict[str, int]
    absent: set[str]
    layout: dict[str, tuple[int, int]]  # field -> (offset, size)


def _compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc")


@pytest.fixture(scope="module")
def header(tmp_path_factory: pytest.TempPathFactory) -> HeaderValues:
    cc = _compiler()
    if cc is None:
        pytest.skip("needs a C compiler (cc or gcc) and linux-libc-dev")
    work: Path = tmp_path_factory.mktemp("abi")
    src, exe = work / "abi_check.c", work / "abi_check"
    src.write_text(_c_program())
    build = subprocess.run(
        [cc, "-std=gnu11", "-Wall", "-o", str(exe), str(src)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, f"compiling {src} failed:\n{build.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, check=True)
    result = HeaderValues(values={}, absent=set(), layout={})
    for line in run.stdout.splitlines():
        kind, name, *rest = line.split()
        if kind == "value":
            result.values[name] = int(rest[0])
        elif kind == "absent":
            result.absent.add(name)
        else:
            result.layout[name] = (int(rest[0]), int(rest[1]))
    skipped = sorted(result.absent & ABSENT_FROM_OLD_HEADERS)
    if skipped:
        warnings.warn(
            f"not in the installed <linux/kvm.h>, not compared: {', '.join(skipped)}",
            UserWarning,
            stacklevel=1,
        )
    return result


def _compare(group: str, expected: dict[str, int], header: HeaderValues) -> None:
    problems: list[str] = []
    for name, value in sorted(expected.items()):
        if name in header.absent:
            if name not in ABSENT_FROM_OLD_HEADERS:
                problems.append(
                    f"{name}: not in <linux/kvm.h> (typo? or add it to ABSENT_FROM_OLD_HEADERS)"
                )
        elif header.values[name] != value:
            problems.append(
                f"{name}: abi.py has {value:#x} ({value}), "
                f"header has {header.values[name]:#x} ({header.values[name]})"
            )
    assert not problems, f"{group}: {len(problems)} mismatch(es):\n  " + "\n  ".join(problems)


def test_ioctl_numbers_match_header(header: HeaderValues) -> None:
    _compare("IOCTLS", ioctl_names(), header)


def test_exit_reasons_match_header(header: HeaderValues) -> None:
    _compare("EXIT_REASONS", exit_reason_names(), header)


def test_constants_match_header(header: HeaderValues) -> None:
    _compare("constants", module_constants(), header)


def test_table_names_are_unique() -> None:
    # IOCTLS is keyed by number: two names sharing a number would silently drop one.
    names = [name for name, _, _ in abi._IOCTL_TABLE]
    assert len(abi.IOCTLS) == len(names), "two ioctls in _IOCTL_TABLE share a number"
    assert len(set(abi.EXIT_REASONS.values())) == len(abi.EXIT_REASONS)


def test_allow_list_is_not_stale() -> None:
    checked = {*ioctl_names(), *exit_reason_names(), *module_constants()}
    stale = sorted(ABSENT_FROM_OLD_HEADERS - checked)
    assert not stale, f"ABSENT_FROM_OLD_HEADERS names abi.py does not use: {stale}"


def test_kvm_run_layout_matches_header(header: HeaderValues) -> None:
    problems = [
        f"{field_name} ({member}): abi.py has {offset}, header has {header.layout[field_name][0]}"
        for field_name, (member, offset) in layout_fields().items()
        if header.layout[field_name][0] != offset
    ]
    assert not problems, f"KVM_RUN_LAYOUT: {len(problems)} mismatch(es):\n  " + "\n  ".join(
        problems
    )


def test_exit_union_reads_fit_in_access_bytes(header: HeaderValues) -> None:
    """Every exit-union field the code reads lies within the ACCESS_BYTES the probes copy."""
    start = abi.KVM_RUN_LAYOUT.exit_union
    end = start + abi.ACCESS_BYTES
    problems: list[str] = []
    for field_name, (member, _) in layout_fields().items():
        if field_name == "exit_union" or "." not in member:
            continue
        offset, size = header.layout[field_name]
        if offset < start or offset + size > end:
            problems.append(f"{member}: bytes [{offset}, {offset + size}) outside [{start}, {end})")
    assert not problems, f"ACCESS_BYTES={abi.ACCESS_BYTES}: " + "; ".join(problems)
