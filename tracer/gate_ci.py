"""What ``watch`` adds for adopting the gate in CI: suppressions (tracer.suppressions),
``--gen-suppressions``, ``--sarif`` (tracer.gate_sarif) and ``--annotate`` (tracer.gate_annotate).

:class:`CiOptions` is what the command line asked for; :func:`account` puts the suppressions'
account into the report before it is rendered; :func:`write_outputs` writes the rest once the
report is final.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tracer.gate import TOOL, GateReport
from tracer.gate_annotate import github_lines, write_gitlab
from tracer.gate_sarif import write_sarif
from tracer.suppressions import Ledger, Suppression, generate_all

GEN_TO_STDERR = "-"


@dataclass(frozen=True)
class CiOptions:
    suppressions: tuple[Suppression, ...] = ()
    suppression_files: tuple[Path, ...] = ()
    gen_suppressions: str | None = None  # a file, or "-": stderr, after the report
    sarif: Path | None = None
    source_root: Path | None = None  # default: the working directory
    annotate_github: bool = False
    gitlab: Path | None = None  # GitLab Code Quality JSON

    def ledger(self) -> Ledger | None:
        if not self.suppressions and not self.suppression_files:
            return None
        return Ledger(self.suppressions, self.suppression_files)

    def root(self) -> str:
        return os.path.abspath(self.source_root or os.getcwd())


def account(report: GateReport, ledger: Ledger | None) -> None:
    """The suppressions' account, into the report's text and JSON."""
    if ledger is None:
        return
    report.suppressed = ledger.suppressed
    report.suppression_lines = ledger.lines()
    report.suppressions_json = ledger.to_json()


def write_outputs(report: GateReport, options: CiOptions, stdout: TextIO | None = None,
                  stderr: TextIO | None = None) -> bool:
    """``--gen-suppressions``, ``--sarif``, ``--annotate``; False if a file could not be
    written (said on stderr in one line, the other outputs still written)."""
    out, err = stdout or sys.stdout, stderr or sys.stderr
    root = options.root()
    ok = True

    def _write(flag: str, path: Path | str, write: Callable[[], object]) -> None:
        nonlocal ok
        try:
            write()
        except OSError as error:
            ok = False
            err.write(f"{TOOL}: error: {flag} {path}: {error.strerror}\n")

    if options.gen_suppressions is not None:
        text = generate_all(report.findings, root)
        if options.gen_suppressions == GEN_TO_STDERR:
            err.write(text)
            err.flush()
        else:
            target = Path(options.gen_suppressions)
            _write("--gen-suppressions", target,
                   lambda: target.write_text(text, encoding="utf-8"))
    if options.sarif is not None:
        sarif = options.sarif
        _write("--sarif", sarif, lambda: write_sarif(report, sarif, root))
    if options.gitlab is not None:
        gitlab = options.gitlab
        _write("--annotate gitlab=", gitlab, lambda: write_gitlab(report, gitlab, root))
    if options.annotate_github:
        lines = github_lines(report, root)
        if lines:
            out.write("\n".join(lines) + "\n")
            out.flush()
    return ok
