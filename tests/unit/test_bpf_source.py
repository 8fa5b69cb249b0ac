"""Shape rules for bpf/completion.c that the compiler does not enforce."""

from __future__ import annotations

import re
from pathlib import Path

SOURCE = (Path(__file__).resolve().parents[2] / "bpf" / "completion.c").read_text()


def test_every_map_is_declared_before_the_first_function() -> None:
    """bcc 0.26 segfaults (instead of reporting the compile error) on a map declared after a
    function when the kernel headers are broken: keep all maps in the block at the top."""
    first_function = SOURCE.index("static __always_inline")
    maps = [m.start() for m in re.finditer(r"^BPF_[A-Z_]+\(", SOURCE, re.MULTILINE)]
    assert maps and max(maps) < first_function


def test_every_map_has_an_explicit_size() -> None:
    for decl in re.findall(r"^BPF_(?:HASH|ARRAY|PERCPU_ARRAY|TABLE)\((.*)\);", SOURCE, re.M):
        assert len(decl.split(",")) >= (3 if not decl.startswith('"') else 4), decl
