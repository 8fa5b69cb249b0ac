"""tracer.bpfcache's bpf(2) ABI (commands, the map-fd ld_imm64, union bpf_attr's layout and the
syscall number) against the system's <linux/bpf.h> and <asm/unistd.h>, through the C compiler."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest
from cprog import CC, run_c

from tracer import bpfcache

pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler (cc) on this host")


def run_bpf_c(tmp_path: Path, body: list[str]) -> dict[str, int]:
    return run_c(tmp_path, body, ["linux/bpf.h", "asm/unistd.h"])


def printf(name: str, expr: str) -> str:
    return f'    printf("{name} %lld\\n", (long long)({expr}));'


def test_commands_and_instruction_encoding_match_bpf_h(tmp_path: Path) -> None:
    got = run_bpf_c(tmp_path, [printf("map_create", "BPF_MAP_CREATE"),
                           printf("prog_load", "BPF_PROG_LOAD"),
                           printf("ld_imm64", "BPF_LD | BPF_IMM | BPF_DW"),
                           printf("pseudo_map_fd", "BPF_PSEUDO_MAP_FD"),
                           printf("obj_name_len", "BPF_OBJ_NAME_LEN"),
                           printf("insn", "sizeof(struct bpf_insn)"),
                           printf("nr_bpf", "__NR_bpf")])
    assert got == {"map_create": bpfcache.BPF_MAP_CREATE, "prog_load": bpfcache.BPF_PROG_LOAD,
                   "ld_imm64": bpfcache.BPF_LD_IMM64,
                   "pseudo_map_fd": bpfcache.BPF_PSEUDO_MAP_FD,
                   "obj_name_len": bpfcache.OBJ_NAME_LEN, "insn": bpfcache.INSN_BYTES,
                   "nr_bpf": bpfcache.SYS_BPF[os.uname().machine]}


@pytest.mark.parametrize(("struct", "ours"), [
    ("map", bpfcache._MapCreateAttr), ("prog", bpfcache._ProgLoadAttr)])
def test_attr_layouts_match_union_bpf_attr(tmp_path: Path, struct: str,
                                           ours: type[ctypes.Structure]) -> None:
    fields = [name for name, *_ in ours._fields_]
    got = run_bpf_c(tmp_path, [printf(f, f"offsetof(union bpf_attr, {f})") for f in fields])
    assert got == {f: getattr(ours, f).offset for f in fields}
