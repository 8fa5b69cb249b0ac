"""CI annotations of the ``watch`` gate's findings, at their source line.

``--annotate github``: one GitHub Actions workflow command per finding,
``::error file=F,line=L,col=C,title=T::MESSAGE`` (``::warning`` for a warning, ``::notice`` for
info), which the runner turns into an annotation on that line of the diff. The runner reads
workflow commands from the step's stdout; CMD owns stdout while it runs, so the lines are
written there after CMD has exited, after everything CMD printed.

``--annotate gitlab=FILE``: GitLab's Code Quality report (a JSON array of issues:
description, check_name, fingerprint, severity, location.path, location.lines.begin), which
a job publishes with ``artifacts: reports: codequality: FILE`` and GitLab shows in the merge
request's diff.

Both need a file:line under the source root (tracer.gate_location.review_location): a
finding without one gets no annotation (it is still in the report, the JSON and the JUnit).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from tracer.gate import TOOL, Finding, GateReport
from tracer.gate_location import SourceLine, fingerprint, review_location

ANNOTATE_CHOICES: Final = ("github", "gitlab")
GITHUB_COMMANDS: Final = {"critical": "error", "error": "error", "warning": "warning",
                          "info": "notice"}
GITLAB_SEVERITIES: Final = {"critical": "critical", "error": "major", "warning": "minor",
                            "info": "info"}


def _escape_data(text: str) -> str:
    """A workflow command's message (actions/toolkit's escapeData)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    """A workflow command's property value (escapeProperty): ``:`` and ``,`` too."""
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def _message(finding: Finding) -> str:
    seen = "once" if finding.count == 1 else f"{finding.count} times"
    return (f"{finding.title()} at {finding.call_site.describe()}, seen {seen} "
            f"({finding.rule}, severity {finding.severity}).\nWhy: {finding.why()}\n"
            f"Fix: {finding.fix()}")


def _located(report: GateReport,
             source_root: str | os.PathLike[str]) -> Iterator[tuple[Finding, SourceLine]]:
    """Each finding with a file:line under ``source_root``, and that place."""
    root = os.path.abspath(source_root)
    for finding in report.findings:
        found = review_location(finding.stack, root)
        if found is not None:
            yield finding, found[0]


def github_lines(report: GateReport, source_root: str | os.PathLike[str]) -> list[str]:
    """One workflow command per finding with a file:line under ``source_root``."""
    lines = []
    for finding, where in _located(report, source_root):
        props = [f"file={_escape_property(str(where.path))}", f"line={where.line}"]
        if where.column is not None:
            props.append(f"col={where.column}")
        props.append(f"title={_escape_property(f'{TOOL}: {finding.title()}')}")
        command = GITHUB_COMMANDS.get(finding.severity, "warning")
        lines.append(f"::{command} {','.join(props)}::{_escape_data(_message(finding))}")
    return lines


def gitlab_issues(report: GateReport,
                  source_root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """GitLab Code Quality issues, one per finding with a file:line under ``source_root``."""
    root = os.path.abspath(source_root)
    issues = []
    for finding, where in _located(report, root):
        issues.append({
            "description": _message(finding).replace("\n", " "),
            "check_name": finding.rule,
            "fingerprint": fingerprint(finding.rule, finding.ioctl, finding.exit_reason,
                                       finding.stack, root),
            "severity": GITLAB_SEVERITIES.get(finding.severity, "minor"),
            "location": {"path": where.path, "lines": {"begin": where.line}},
        })
    return issues


def write_gitlab(report: GateReport, path: str | os.PathLike[str],
                 source_root: str | os.PathLike[str]) -> None:
    Path(path).write_text(json.dumps(gitlab_issues(report, source_root), indent=2) + "\n",
                          encoding="utf-8")
