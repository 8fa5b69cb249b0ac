"""JUnit XML for the ``watch`` gate: the shape GitLab, Jenkins and GitHub test reporters read.

This module knows XML, not findings: :mod:`tracer.gate` turns its report into
:class:`JunitCase` rows and hands them here.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal

Outcome = Literal["passed", "failure", "error"]

# XML 1.0 has no escape for most control characters: a process name or a path holding one
# would make the whole file unreadable to the reporter, so they are replaced.
_NOT_XML_CHAR: Final = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass(frozen=True)
class JunitCase:
    classname: str
    name: str
    outcome: Outcome
    message: str = ""  # the <failure>/<error> message attribute
    type: str = ""  # the <failure>/<error> type attribute
    text: str = ""  # the <failure>/<error> body, or <system-out> of a passed case


def xml_safe(text: str) -> str:
    return _NOT_XML_CHAR.sub("\ufffd", text)


def junit_tree(suite_name: str, cases: Sequence[JunitCase], properties: Mapping[str, str],
               time_seconds: float, started_unix: float | None) -> ET.ElementTree[ET.Element]:
    """One ``<testsuite>`` inside ``<testsuites>`` (every reporter accepts this shape)."""
    failures = sum(case.outcome == "failure" for case in cases)
    errors = sum(case.outcome == "error" for case in cases)
    counts = {"tests": str(len(cases)), "failures": str(failures), "errors": str(errors),
              "skipped": "0", "time": f"{max(time_seconds, 0.0):.3f}"}
    root = ET.Element("testsuites", {"name": xml_safe(suite_name), **counts})
    suite = ET.SubElement(root, "testsuite", {"name": xml_safe(suite_name), **counts})
    if started_unix is not None:
        # JUnit's timestamp is an xs:dateTime without a zone; it is UTC here.
        when = datetime.fromtimestamp(started_unix, UTC).replace(tzinfo=None)
        suite.set("timestamp", when.isoformat(timespec="seconds"))
    if properties:
        props = ET.SubElement(suite, "properties")
        for key, value in properties.items():
            ET.SubElement(props, "property", {"name": xml_safe(key), "value": xml_safe(value)})
    for case in cases:
        element = ET.SubElement(suite, "testcase", {
            "classname": xml_safe(case.classname), "name": xml_safe(case.name), "time": "0"})
        if case.outcome == "passed":
            if case.text:
                ET.SubElement(element, "system-out").text = xml_safe(case.text)
            continue
        outcome = ET.SubElement(element, case.outcome,
                                {"message": xml_safe(case.message), "type": xml_safe(case.type)})
        outcome.text = xml_safe(case.text)
    ET.indent(root)
    return ET.ElementTree(root)


def write_junit_file(path: str | os.PathLike[str], tree: ET.ElementTree[ET.Element]) -> None:
    tree.write(path, encoding="utf-8", xml_declaration=True)
