"""LLVM's fatal errors call exit() from inside the compile: still one line on stderr."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STACK_ERROR = ("/virtual/main.c:559:9: error: Looks like the BPF stack limit of 512 bytes is "
               "exceeded. Please move large on stack variables into BPF per-cpu array map.")


def run(code: str, tmp: Path | None = None) -> subprocess.CompletedProcess[str]:
    # A private TMPDIR when the test looks at what is left there: a daemon starting elsewhere
    # on the host has its own kct-bpf-compile-* file in the shared /tmp meanwhile.
    env = {**os.environ, "TMPDIR": str(tmp)} if tmp is not None else None
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False, env=env)


def test_exit_inside_the_compile_prints_the_first_error() -> None:
    done = run("import ctypes, os\n"
               "from tracer.probes import _captured_stderr\n"
               "with _captured_stderr():\n"
               "    os.write(2, b'warning: macro redefined\\n" + STACK_ERROR + "\\n')\n"
               "    ctypes.CDLL(None).exit(1)\n")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"kvm-completion-tracer: error: compiling the BPF programs failed ({STACK_ERROR}); "
        "run 'kvm-completion-tracer check'"]


@pytest.mark.parametrize("ending", ["", "ctypes.CDLL(None).exit(0)\n", "raise SystemExit(3)\n"])
def test_an_exit_after_the_compile_prints_nothing_and_leaves_nothing(ending: str,
                                                                      tmp_path: Path) -> None:
    done = run("import ctypes, glob, os, tempfile\n"
               "from tracer.probes import _captured_stderr\n"
               "with _captured_stderr() as got:\n"
               "    os.write(2, b'noise\\n')\n"
               "assert got.text() == 'noise\\n'\n"
               f"assert tempfile.gettempdir() == {str(tmp_path)!r}\n"
               "assert not glob.glob(tempfile.gettempdir() + '/kct-bpf-compile-*')\n" + ending,
               tmp_path)
    assert (done.returncode, done.stderr) == (3 if "3" in ending else 0, "")
