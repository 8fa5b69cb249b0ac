"""gdb's backtrace as data, the reference the stacks are measured against: every frame (inlined
ones too, past main and entry) as module, file offset, function, line and whether it is
inlined. Used by tests/unit/test_unwind.py and bench/stacks_vs_gdb.py."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

GDB_PY = r"""
import gdb, json
maps = []
for line in gdb.execute("info proc mappings", to_string=True).splitlines():
    p = line.split()
    if len(p) >= 5 and p[0].startswith("0x") and p[-1].startswith("/"):
        maps.append((int(p[0], 16), int(p[1], 16), int(p[3], 16), p[-1]))
out = []
f = gdb.newest_frame()
while f is not None:
    pc = f.pc()
    m = next((m for m in maps if m[0] <= pc < m[1]), None)
    sal = f.find_sal()
    out.append({"module": m[3] if m else None, "file_offset": pc - m[0] + m[2] if m else None,
                "function": f.name(), "line": sal.line or None,
                "inlined": f.type() == gdb.INLINE_FRAME})
    f = f.older()
print("GDBJSON " + json.dumps(out))
"""
SETTINGS = ["set pagination off", "set backtrace past-main on", "set backtrace past-entry on"]


def gdb_path() -> str | None:
    return shutil.which("gdb")


def frames(args: list[str], tmp: Path, timeout_s: float = 120) -> list[dict[str, Any]]:
    """Run gdb with ``args`` (e.g. ``["-p", PID]`` or ``--args`` and a stop command), then the
    backtrace script; the frames, innermost first."""
    gdb = gdb_path()
    assert gdb is not None, "gdb is not installed (scripts/setup-host.sh test installs it)"
    script = tmp / "gdb_frames.py"
    script.write_text(GDB_PY)
    before = [a for s in SETTINGS for a in ("-ex", s)]
    if "--args" in args:
        cut = args.index("--args")
        cmd = [gdb, "-batch", "-nx", *before, *args[:cut], "-ex", f"source {script}",
               "-ex", "kill", *args[cut:]]
    else:
        cmd = [gdb, "-batch", "-nx", *before, *args, "-ex", f"source {script}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                         check=False).stdout
    line = next((x for x in out.splitlines() if x.startswith("GDBJSON ")), None)
    assert line is not None, f"gdb printed no backtrace:\n{out[-2000:]}"
    found: list[dict[str, Any]] = json.loads(line.removeprefix("GDBJSON "))
    return found
