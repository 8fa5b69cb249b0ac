"""The stacks of `watch` against gdb's backtrace at the same KVM_GET_REGS, per build flavour of
tests/vmms/buggy_vmm.c and buggy_vmm.rs (docs/stacks.md has the table).

For each build: gdb runs the VMM to its first KVM_GET_REGS (catch syscall ioctl, condition on
the request) and lists every frame (inlined ones too) as module+file offset, function and line;
`watch --json` runs it under the tracer. A frame of the report is right when gdb has a frame
with the same module and file offset (and, where both name it, the same function). Run as root:

    .venv/bin/python bench/stacks_vs_gdb.py [--tracer 'CMD ...'] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from gdb_frames import frames as gdb_frames_of  # noqa: E402 (the tests' helper)

VMMS = REPO / "tests" / "vmms"
KVM_GET_REGS = 0x8090AE81
INLINE = "-DSAVE_VCPU_STATE_ATTR=static inline __attribute__((always_inline))"

BUILDS: dict[str, list[str]] = {
    "C -O2 -g": ["gcc", "-O2", "-g"],
    "C -O2 stripped": ["gcc", "-O2", "-s"],
    "C -O0 -g": ["gcc", "-O0", "-g"],
    "C -O2 -g -fno-omit-frame-pointer": ["gcc", "-O2", "-g", "-fno-omit-frame-pointer"],
    "C -O2 -g inlined": ["gcc", "-O2", "-g", INLINE],
    "Rust debug (cargo build)": ["rustc", "-C", "debuginfo=2", "-C", "opt-level=0"],
    "Rust release + debuginfo": ["rustc", "-C", "opt-level=3", "-C", "debuginfo=2"],
    "Rust release": ["rustc", "-C", "opt-level=3"],
    "Rust release stripped": ["rustc", "-C", "opt-level=3", "-C", "strip=symbols"],
}

def build(name: str, cmd: list[str], out: Path) -> Path:
    binary = out / name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "p")
    if cmd[0] == "gcc":
        subprocess.run([*cmd, "-o", str(binary), str(VMMS / "buggy_vmm.c")], check=True)
    else:
        rustc = shutil.which("rustc") or str(Path.home() / ".cargo/bin/rustc")
        subprocess.run([rustc, "--edition", "2021", *cmd[1:], "-o", str(binary),
                        str(VMMS / "buggy_vmm.rs")], check=True, cwd=out)
    return binary


def gdb_frames(binary: Path, tmp: Path) -> list[dict[str, Any]]:
    return gdb_frames_of(["-ex", "catch syscall ioctl",
                          "-ex", f"condition 1 $rsi == {KVM_GET_REGS:#x}", "-ex", "run",
                          "--args", str(binary), "1"], tmp)


def tracer_frames(tracer: list[str], binary: Path, tmp: Path) -> dict[str, Any]:
    report = tmp / "report.json"
    subprocess.run([*tracer, "watch", "--json", str(report), "--", str(binary), "1"],
                   capture_output=True, text=True, timeout=180, check=False)
    result = json.loads(report.read_text())
    finding = next(f for f in result["findings"] if f.get("ioctl") == "KVM_GET_REGS")
    stack: dict[str, Any] = finding["stack"] or {"frames": []}
    stack["call_site"] = finding.get("call_site")
    return stack


def same(ours: dict[str, Any], theirs: dict[str, Any]) -> bool:
    if not ours.get("module") or not theirs.get("module"):
        return False
    if os.path.basename(ours["module"]) != os.path.basename(theirs["module"]):
        return False
    return bool(ours.get("file_offset") == theirs.get("file_offset"))


def compare(name: str, ours: dict[str, Any], gdb: list[dict[str, Any]]) -> dict[str, Any]:
    frames = ours.get("frames") or []
    right = sum(1 for g in gdb if any(same(o, g) and bool(o.get("inlined")) == g["inlined"]
                                      for o in frames))
    wrong = sum(1 for o in frames if not any(same(o, g) for g in gdb))
    save = [o for o in frames if (o.get("function") or "").endswith("save_vcpu_state")]
    gdb_save = [g for g in gdb if (g.get("function") or "").endswith("save_vcpu_state")]
    return {"build": name, "frames_right": right, "frames_gdb": len(gdb), "frames_wrong": wrong,
            "save_vcpu_state_named": bool(save),
            "file_line": bool(save and save[0].get("line")),
            "line_matches_gdb": bool(save and gdb_save
                                     and save[0].get("line") == gdb_save[0].get("line")),
            "call_site": (ours.get("call_site") or {}).get("text"),
            "method": ours.get("method"), "complete": ours.get("complete",
                                                              not ours.get("partial", True))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracer", default=f"{REPO}/.venv/bin/kvm-completion-tracer",
                        help="the tracer command (default: this checkout's)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    tracer = shlex.split(args.tracer)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kct-stacks-") as d:
        tmp = Path(d)
        for name, cmd in BUILDS.items():
            binary = build(name, cmd, tmp)
            row = compare(name, tracer_frames(tracer, binary, tmp), gdb_frames(binary, tmp))
            rows.append(row)
            print(f"{name:36} {row['frames_right']:2}/{row['frames_gdb']:<2} right, "
                  f"{row['frames_wrong']} wrong, save_vcpu_state "
                  f"{'named' if row['save_vcpu_state_named'] else 'NOT named'}, file:line "
                  f"{'yes' if row['file_line'] else 'no'}"
                  f"{' (= gdb)' if row['line_matches_gdb'] else ''}; call site "
                  f"{row['call_site']}", flush=True)
    total_right = sum(r["frames_right"] for r in rows)
    total = sum(r["frames_gdb"] for r in rows)
    print(f"total: {total_right}/{total} frames right, "
          f"{sum(r['frames_wrong'] for r in rows)} wrong")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
