"""Suppressions for the ``watch`` gate: races a project accepts for now, each with its reason.

The file is TOML, one ``[[suppress]]`` table per entry, like the rest of the project's files::

    [[suppress]]
    reason = "debug dump reads registers mid-exit; fixed by !123"
    rule = "save-mid-completion"        # or kind = "save" | "restore" | "snapshot"
    ioctl = "KVM_GET_SREGS"
    exit_reason = "KVM_EXIT_IO"
    function = "debug_dump*"            # the same frame, anywhere in the stack, matches
    source = "src/debug.c"              # function, module and source together
    # module = "libfoo.so*"
    # process = "vmm-test*"             # the thread's name (comm)

``reason`` is mandatory; every other key is a match key, a glob (fnmatch, case-sensitive, on
demangled names) or an array of globs (any of them), and every key given must match. The frame
keys (``function``, ``module``, ``source``) must all match one frame of the stack; ``module``
and ``source`` globs without a ``/`` match the file's name, relative ones with a ``/`` match the
end of its path (``src/*.c``), absolute ones the whole path. An entry with nothing but a reason
would hide every race and is refused.

An occurrence is suppressed by the first entry that matches it: it is counted there, and neither
reported nor failing the gate. At the end each entry says how many occurrences (and distinct
findings) it suppressed, and an entry that matched nothing is listed as stale, as valgrind does.
:func:`generate` writes, for a finding, the entry that matches exactly it (its rule, ioctl, exit
reason and call site), which is what ``--gen-suppressions`` prints.

Pure: no probes; the only I/O is reading the files :func:`load_files` is given.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Final

from tracer import abi
from tracer.alerts import SnapshotAlert, ViolationAlert
from tracer.gate import SNAPSHOT_RULE, TOOL, CallSite, Finding, call_site
from tracer.gate_location import call_site_frame, frames_of, module_name, source_line

TABLE: Final = "suppress"
KINDS: Final = ("save", "restore", "snapshot")
RULES: Final = ("save-mid-completion", "restore-mid-completion", SNAPSHOT_RULE)
MATCH_KEYS: Final = ("rule", "kind", "ioctl", "exit_reason", "function", "module", "source",
                     "process")
FRAME_KEYS: Final = ("function", "module", "source")
KNOWN_KEYS: Final = ("reason", *MATCH_KEYS)
MAX_REMEMBERED_PROCESSES: Final = 4096
GENERATED_REASON: Final = "FIXME: why this race is accepted, and when it will be fixed"
_GLOB_CHARS: Final = re.compile(r"[][*?]")
_TOML_POSITION: Final = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_HEADER: Final = re.compile(r"^\s*\[\[\s*suppress\s*\]\]")


class SuppressionError(ValueError):
    """A suppressions file the user must fix; one line naming the file, the line and the fix."""


# ---- entries ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Suppression:
    reason: str
    where: str  # "FILE:LINE" of its [[suppress]] header (or "FILE, entry N")
    patterns: Mapping[str, tuple[str, ...]]  # match key -> globs, any of which may match

    def matches(self, occurrence: Occurrence) -> bool:
        for key, globs in self.patterns.items():
            if key in FRAME_KEYS:
                continue
            if not _matches_field(key, globs, occurrence):
                return False
        frame_keys = [k for k in FRAME_KEYS if k in self.patterns]
        if not frame_keys:
            return True
        return any(all(_frame_matches(k, self.patterns[k], frame) for k in frame_keys)
                   for frame in frames_of(occurrence.stack))

    def match_json(self) -> dict[str, str | list[str]]:
        return {k: (v[0] if len(v) == 1 else list(v)) for k, v in self.patterns.items()}


@dataclass(frozen=True)
class Occurrence:
    """What an entry is matched against: one alert of the run."""

    kind: str
    rule: str
    ioctls: tuple[str, ...]  # a snapshot's save ioctls; a save or restore's one
    exit_reason: str
    process: str | None
    stack: Mapping[str, Any] | None = None

    @property
    def ioctl(self) -> str:
        """As the finding names it (tracer.gate: a snapshot's ioctls joined by " + ")."""
        return " + ".join(dict.fromkeys(self.ioctls)) or "?"

    @classmethod
    def of_violation(cls, alert: ViolationAlert) -> Occurrence:
        stack = alert.user_stack if isinstance(alert.user_stack, dict) else None
        return cls(alert.kind, alert.rule, (alert.ioctl,), alert.exit_reason, alert.comm, stack)

    @classmethod
    def of_snapshot(cls, alert: SnapshotAlert, comm: str | None = None) -> Occurrence:
        # A snapshot has no stack (its saves have theirs) and no thread name: its process is
        # the name its saves' threads had (``comm``), else the VMM's kind (qemu, ...).
        return cls("snapshot", SNAPSHOT_RULE, tuple(alert.ioctls), alert.exit_reason,
                   comm or alert.vmm, None)


def _matches_field(key: str, globs: Sequence[str], occurrence: Occurrence) -> bool:
    if key == "ioctl":
        candidates = [occurrence.ioctl, *occurrence.ioctls]
    else:
        value = {"rule": occurrence.rule, "kind": occurrence.kind,
                 "exit_reason": occurrence.exit_reason, "process": occurrence.process}[key]
        candidates = [value] if value else []
    return any(fnmatchcase(value, glob) for value in candidates for glob in globs)


def path_matches(glob: str, path: str) -> bool:
    """A glob without ``/`` matches the file's name; an absolute one the whole path; a relative
    one with ``/`` the end of the path, at a directory boundary."""
    if "/" not in glob:
        return fnmatchcase(os.path.basename(path), glob)
    if glob.startswith("/"):
        return fnmatchcase(path, glob)
    return fnmatchcase(path, glob) or fnmatchcase(path, "*/" + glob)


def _frame_matches(key: str, globs: Sequence[str], frame: Mapping[str, Any]) -> bool:
    value = frame.get({"function": "function", "module": "module", "source": "file"}[key])
    if not isinstance(value, str) or not value:
        return False
    if key == "function":
        return any(fnmatchcase(value, glob) for glob in globs)
    return any(path_matches(glob, value) for glob in globs)


# ---- reading files ------------------------------------------------------------------------------

def load_files(paths: Iterable[Path]) -> list[Suppression]:
    """Every entry of every file, in order; a file given twice is read once."""
    entries: list[Suppression] = []
    seen: set[str] = set()
    for path in paths:
        key = os.path.realpath(path)
        if key in seen:
            continue
        seen.add(key)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise SuppressionError(
                f"cannot read suppressions file {path}: {err.strerror}; fix: check the path "
                "given to --suppressions or in the config file's suppressions list") from None
        except UnicodeDecodeError as err:
            raise SuppressionError(f"suppressions file {path} is not UTF-8 text (byte "
                                   f"{err.start}); fix: save it as UTF-8") from None
        entries.extend(parse(text, str(path)))
    return entries


def parse(text: str, name: str) -> list[Suppression]:
    """The entries of one file's text; ``name`` is the file as errors name it."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        message = str(err)
        position = _TOML_POSITION.search(message)
        where = name
        if position:
            where = f"{name}:{position[1]}:{position[2]}"
            message = message[:position.start()]
        raise SuppressionError(
            f"{where}: not valid TOML: {message}; fix: the TOML syntax there (strings in "
            "double quotes, one [[suppress]] table per entry)") from None
    lines = text.splitlines()
    for key in data:
        if key != TABLE:
            raise SuppressionError(
                f"{name}:{_line_of_key(lines, key)}: unknown top-level key {key!r}; fix: put "
                "each entry in a [[suppress]] table")
    raw = data.get(TABLE, [])
    if not isinstance(raw, list):
        raise SuppressionError(f"{name}:{_line_of_key(lines, TABLE)}: {TABLE} is not an array "
                               "of tables; fix: write each entry as [[suppress]], not [suppress]")
    headers = [i + 1 for i, line in enumerate(lines) if _HEADER.match(line)]
    entries = []
    for index, item in enumerate(raw):
        where = (f"{name}:{headers[index]}" if len(headers) == len(raw)
                 else f"{name}, entry {index + 1}")
        entries.append(_entry(item, where))
    return entries


def _line_of_key(lines: Sequence[str], key: str) -> int:
    pattern = re.compile(rf"^\s*(\[+\s*)?[\"']?{re.escape(key)}[\"']?\s*[=\].]")
    return next((i + 1 for i, line in enumerate(lines) if pattern.match(line)), 1)


def _entry(item: object, where: str) -> Suppression:
    if not isinstance(item, dict):
        raise SuppressionError(f"{where}: an entry is not a table; fix: one [[suppress]] table "
                               "per entry")
    for key in item:
        if key not in KNOWN_KEYS:
            close = difflib.get_close_matches(key, KNOWN_KEYS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise SuppressionError(f"{where}: [[suppress]] has an unknown key {key!r}; fix: "
                                   f"{hint}known keys: {', '.join(KNOWN_KEYS)}")
    reason = item.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise SuppressionError(f"{where}: [[suppress]] has no reason; fix: add reason = \"why "
                               "this race is accepted\" (a suppression nobody can explain "
                               "hides a bug)")
    patterns: dict[str, tuple[str, ...]] = {}
    for key in MATCH_KEYS:
        if key in item:
            patterns[key] = _globs(item[key], key, where)
    if not patterns:
        raise SuppressionError(f"{where}: [[suppress]] matches every race (it has only a "
                               f"reason); fix: add at least one of {', '.join(MATCH_KEYS)} "
                               "(--gen-suppressions writes entries that match one finding)")
    return Suppression(reason.strip(), where, patterns)


_KNOWN_VALUES: Final[dict[str, tuple[str, ...]]] = {
    "kind": KINDS,
    "rule": RULES,
    "ioctl": tuple(sorted(name for name, i in abi.IOCTL_BY_NAME.items()
                          if i.kind in (abi.IoctlKind.SAVE, abi.IoctlKind.RESTORE))),
    "exit_reason": tuple(sorted(abi.EXIT_REASONS.values())),
}


def _globs(value: object, key: str, where: str) -> tuple[str, ...]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v for v in values):
        raise SuppressionError(f"{where}: [[suppress]] {key}: expected a glob string or an "
                               f"array of them, got {_shown(value)}; fix: {key} = \"...\"")
    globs = tuple(str(v) for v in values)
    known = _KNOWN_VALUES.get(key)
    for glob in globs:
        if known is None:
            continue
        # A literal that names nothing would only ever be stale: refuse the typo now.
        parts = [p.strip() for p in glob.split("+")] if key == "ioctl" else [glob]
        for part in parts:
            if not _GLOB_CHARS.search(part) and part not in known:
                close = difflib.get_close_matches(part, known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else \
                    f"one of {', '.join(known[:12])}{', ...' if len(known) > 12 else ''}"
                raise SuppressionError(f"{where}: [[suppress]] {key} = {_shown(glob)} names no "
                                       f"known {key.replace('_', ' ')}; fix: {hint}")
    return globs


def _shown(value: object) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


# ---- the run's account --------------------------------------------------------------------------

@dataclass
class _Used:
    occurrences: int = 0
    findings: set[tuple[str, str, str, CallSite]] = field(default_factory=set)


class Ledger:
    """The entries in force for one run, and what each suppressed."""

    def __init__(self, entries: Sequence[Suppression], files: Sequence[Path] = ()) -> None:
        self.entries = list(entries)
        self.files = [str(f) for f in files]
        self._used = [_Used() for _ in self.entries]
        self._comms: dict[int, str] = {}  # pid -> a thread name its saves had (for snapshots)

    def suppress(self, occurrence: Occurrence) -> Suppression | None:
        """The first entry matching ``occurrence`` (counted there), or None."""
        for entry, used in zip(self.entries, self._used, strict=True):
            if entry.matches(occurrence):
                used.occurrences += 1
                used.findings.add((occurrence.kind, occurrence.exit_reason, occurrence.ioctl,
                                   call_site(occurrence.stack)))
                return entry
        return None

    def violation(self, alert: ViolationAlert) -> bool:
        self._comms.pop(alert.pid, None)
        self._comms[alert.pid] = alert.comm
        while len(self._comms) > MAX_REMEMBERED_PROCESSES:
            del self._comms[next(iter(self._comms))]
        return self.suppress(Occurrence.of_violation(alert)) is not None

    def snapshot(self, alert: SnapshotAlert) -> bool:
        occurrence = Occurrence.of_snapshot(alert, self._comms.get(alert.pid))
        return self.suppress(occurrence) is not None

    @property
    def suppressed(self) -> int:
        return sum(used.occurrences for used in self._used)

    def stale(self) -> list[Suppression]:
        return [e for e, used in zip(self.entries, self._used, strict=True)
                if not used.occurrences]

    def lines(self) -> list[str]:
        """The report's account: each entry that suppressed something, then the stale ones."""
        out = []
        for entry, used in zip(self.entries, self._used, strict=True):
            if used.occurrences:
                out.append(f"{TOOL}: suppressed {_times(used.occurrences)} "
                           f"({_plural(len(used.findings), 'finding')}) by {entry.where}: "
                           f"{entry.reason}")
        for entry in self.stale():
            out.append(f"{TOOL}: stale suppression (matched nothing): {entry.where}: "
                       f"{entry.reason}")
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "suppressed": self.suppressed,
            "entries": [{"where": e.where, "reason": e.reason, "match": e.match_json(),
                         "occurrences": used.occurrences, "findings": len(used.findings),
                         "stale": not used.occurrences}
                        for e, used in zip(self.entries, self._used, strict=True)],
            "stale": [e.where for e in self.stale()],
        }


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun if n == 1 else noun + 's'}"


def _times(n: int) -> str:
    return "1 occurrence" if n == 1 else f"{n} occurrences"


# ---- --gen-suppressions -------------------------------------------------------------------------

def glob_escape(text: str) -> str:
    """``text`` as a glob that matches only itself (``*``, ``?`` and ``[`` in brackets)."""
    return _GLOB_CHARS.sub(lambda m: f"[{m[0]}]", text)


def _toml_string(text: str) -> str:
    # JSON's escapes are TOML basic-string escapes; DEL must be escaped in TOML too.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


_CONTROL: Final = re.compile("[\x00-\x1f\x7f]")


def _comment(text: str) -> str:
    """A TOML comment line's text: no control character (a newline would end it)."""
    return _CONTROL.sub("\ufffd", text)


def generate(finding: Finding, source_root: str) -> str:
    """The ``[[suppress]]`` entry that matches exactly ``finding``: its rule, ioctl and exit
    reason, and its call site's function with its source file (relative to ``source_root``
    when under it), or its module when the frame has no file."""
    site = call_site_frame(finding.stack)
    keys: dict[str, str] = {"rule": finding.rule, "ioctl": glob_escape(finding.ioctl),
                            "exit_reason": finding.exit_reason}
    note = ""
    if site is not None:
        function = site.get("function")
        where = source_line(site, source_root)
        module = module_name(site)
        if function:
            keys["function"] = glob_escape(str(function))
        if where is not None:
            keys["source"] = glob_escape(where.path or where.file)
        elif module:
            keys["module"] = glob_escape(module)
        if not function:
            note = _comment("# no symbol at the call site: this entry matches every such "
                            f"race in {module or 'this module'}") + "\n"
    elif finding.kind == "snapshot":
        note = ("# a snapshot has no stack of its own: this entry matches every such snapshot "
                "(its saves are findings of their own)\n")
    else:
        note = "# no stack was captured: this entry matches every such race of the run\n"
    header = _comment(f"# {finding.title()} at {finding.call_site.describe()}, seen "
                      f"{'once' if finding.count == 1 else f'{finding.count} times'}") + "\n"
    body = "".join(f"{key} = {_toml_string(value)}\n" for key, value in keys.items())
    return (f"{header}{note}[[{TABLE}]]\nreason = {_toml_string(GENERATED_REASON)}\n{body}")


def generate_all(findings: Sequence[Finding], source_root: str) -> str:
    if not findings:
        return f"# {TOOL}: no finding, nothing to suppress\n"
    head = (f"# {TOOL} --gen-suppressions: one entry per finding of this run. Say in each "
            "reason why\n# the race is accepted, then pass this file with --suppressions.\n")
    return head + "\n" + "\n".join(generate(f, source_root) for f in findings)
