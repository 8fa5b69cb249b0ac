"""Compile and run a small C program against the system's headers; its ``name value`` lines as a
dict (how the ABI tables are checked against the headers, through the C compiler)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

CC = shutil.which("cc") or shutil.which("gcc")


def run_c(tmp_path: Path, body: list[str], includes: list[str]) -> dict[str, int]:
    src = tmp_path / "prog.c"
    src.write_text("\n".join(["#include <stdio.h>", "#include <stddef.h>",
                              *[f"#include <{h}>" for h in includes], "int main(void) {",
                              *body, "    return 0;", "}"]) + "\n")
    assert CC is not None
    build = subprocess.run([CC, "-o", str(tmp_path / "prog"), str(src)], capture_output=True,
                           text=True, check=False)
    assert build.returncode == 0, build.stderr
    out = subprocess.run([str(tmp_path / "prog")], capture_output=True, text=True, check=True)
    return {k: int(v) for k, v in (line.split() for line in out.stdout.splitlines())}
