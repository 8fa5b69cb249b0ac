"""tracer.guest_exits against the system's <asm/vmx.h> and <asm/svm.h>, through the C compiler."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tracer.guest_exits import (
    SVM_EXIT_EXCP_BASE,
    SVM_EXIT_REASONS,
    VMX_EXIT_REASONS,
    guest_exit_name,
)

CC = shutil.which("cc") or shutil.which("gcc")


def _header_values(tmp_path: Path, header: str, prefix: str, names: list[str]) -> dict[str, int]:
    lines = ["#include <stdio.h>", f"#include <{header}>", "int main(void) {"]
    lines += [f'    printf("%s %lld\\n", "{n}", (long long)({prefix}{n}));' for n in names]
    lines += ["    return 0;", "}"]
    src = tmp_path / "prog.c"
    src.write_text("\n".join(lines) + "\n")
    assert CC is not None
    build = subprocess.run([CC, "-o", str(tmp_path / "prog"), str(src)], capture_output=True,
                           text=True, check=False)
    assert build.returncode == 0, build.stderr  # a name missing from the header fails here
    out = subprocess.run([str(tmp_path / "prog")], capture_output=True, text=True, check=True)
    return {name: int(value) for name, value in (ln.split() for ln in out.stdout.splitlines())}


@pytest.mark.skipif(CC is None, reason="no C compiler (cc) on this host")
def test_vmx_exit_reasons_match_the_header(tmp_path: Path) -> None:
    ours = {name: number for number, name in VMX_EXIT_REASONS.items()}
    assert _header_values(tmp_path, "asm/vmx.h", "EXIT_REASON_", list(ours)) == ours


@pytest.mark.skipif(CC is None, reason="no C compiler (cc) on this host")
def test_svm_exit_codes_match_the_header(tmp_path: Path) -> None:
    ours = {name: number for number, name in SVM_EXIT_REASONS.items()}
    theirs = _header_values(tmp_path, "asm/svm.h", "SVM_EXIT_", [*ours, "EXCP_BASE"])
    assert theirs.pop("EXCP_BASE") == SVM_EXIT_EXCP_BASE
    assert theirs == ours


def test_names_as_exported() -> None:
    assert guest_exit_name(1, 30) == ("vmx", "IO_INSTRUCTION")
    assert guest_exit_name(1, 0x80000021) == ("vmx", "INVALID_STATE")  # entry-failure flag
    assert guest_exit_name(2, 0x07B) == ("svm", "IOIO")
    assert guest_exit_name(2, 0x04E) == ("svm", "EXCP_14")  # #PF intercept
    assert guest_exit_name(2, 0x7777) == ("svm", "0x7777")
    assert guest_exit_name(9, 3) == ("9", "3")
