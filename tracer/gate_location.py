"""Where a ``watch`` finding is in the VMM's source: its call-site frame, that frame's file:line
relative to the source root, and a fingerprint that stays the same across runs and builds.

Shared by the suppressions (tracer.suppressions), SARIF (tracer.gate_sarif) and the CI
annotations (tracer.gate_annotate). Pure but for one look-up: a relative path in a line table
is under the source root only if that file is there.

A stack frame is a dict (tracer.symbolize): ``address``, ``module``, ``build_id``,
``file_offset``, ``function``, ``function_offset``, ``inferred``, and, when the module has
DWARF line information, ``file`` (as in the line table, usually absolute), ``line``, ``column``
and ``inlined``. Every key is optional here: absent means unknown.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Final

from tracer.gate import is_ioctl_wrapper

# Frames that are never the VMM's own code, besides the ioctl wrappers tracer.gate knows: the
# dynamic loader and the vDSO.
_SYSTEM_MODULE_PREFIXES: Final = ("ld-linux", "ld-musl", "linux-vdso", "linux-gate", "[vdso]")
FINGERPRINT_KEY: Final = "kvmCompletionTracer/v1"


Frame = Mapping[str, Any]


def frames_of(stack: Mapping[str, Any] | None) -> list[Frame]:
    frames = (stack or {}).get("frames") or []
    return [f for f in frames if isinstance(f, Mapping)]


def is_system_frame(frame: Frame) -> bool:
    """An ioctl wrapper (libc, the rust-vmm crates, QEMU's kvm_vcpu_ioctl), ld.so or the vDSO."""
    module = frame.get("module")
    if module and os.path.basename(str(module)).startswith(_SYSTEM_MODULE_PREFIXES):
        return True
    return is_ioctl_wrapper(frame)


def call_site_frame(stack: Mapping[str, Any] | None) -> Frame | None:
    """The first frame past the ioctl wrapper: the VMM's own code that issued the ioctl
    (tracer.gate.call_site's frame)."""
    for frame in frames_of(stack):
        if not is_system_frame(frame):
            return frame
    return None


@dataclass(frozen=True)
class SourceLine:
    """A frame's place in the source: ``path`` relative to the source root (POSIX), or None
    when the file is outside it; ``file`` as the line table has it."""

    file: str
    line: int
    column: int | None
    path: str | None


def relative_path(file: str, source_root: str) -> str | None:
    """``file`` relative to ``source_root``, or None when it is outside. A relative ``file``
    (a line table of a build run from the root, but also glibc's ``./misc/../sysdeps/...``,
    relative to a build directory elsewhere) is under the root only if the root holds it."""
    if not file:
        return None
    path = PurePosixPath(os.path.normpath(file))
    if not path.is_absolute():
        if path.parts[:1] == ("..",) or not os.path.isfile(os.path.join(source_root, path)):
            return None
        return path.as_posix()
    root = PurePosixPath(os.path.normpath(source_root))
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return None


def source_line(frame: Frame | None, source_root: str) -> SourceLine | None:
    """The frame's file:line (with its column if known), or None without both."""
    if frame is None:
        return None
    file, line, column = frame.get("file"), frame.get("line"), frame.get("column")
    if not isinstance(file, str) or not file or not isinstance(line, int) or line < 1:
        return None
    col = column if isinstance(column, int) and column >= 1 else None
    # libc, ld.so and the vDSO are never the project's own source, whatever their paths
    path = None if is_system_frame(frame) else relative_path(file, source_root)
    return SourceLine(file, line, col, path)


def review_location(stack: Mapping[str, Any] | None,
                    source_root: str) -> tuple[SourceLine, Frame] | None:
    """Where a reviewer sees the finding: the call site's file:line when it is under the source
    root, else the first outer frame that is (the project's line that led into a third-party
    crate or library), else None."""
    frames = frames_of(stack)
    site = call_site_frame(stack)
    if site is None:
        return None
    for frame in frames[frames.index(site):]:
        where = source_line(frame, source_root)
        if where is not None and where.path is not None:
            return where, frame
    return None


def module_name(frame: Frame | None) -> str | None:
    module = frame.get("module") if frame is not None else None
    return os.path.basename(str(module)) if module else None


def fingerprint(rule: str, ioctl: str, exit_reason: str, stack: Mapping[str, Any] | None,
                source_root: str) -> str:
    """Stable across runs and rebuilds: the rule, the ioctl, the exit reason, the call site's
    function and its file relative to the source root (its module's name without one); no
    address, offset or line number, which move with every edit."""
    site = call_site_frame(stack)
    function = str(site.get("function") or "") if site is not None else ""
    where = source_line(site, source_root)
    place = (where.path or os.path.basename(where.file)) if where is not None else ""
    if not place:
        place = module_name(site) or ""
    text = "\0".join((rule, ioctl, exit_reason, function, place))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def describe_frames(frames: Sequence[Frame]) -> str:
    return " <- ".join(str(f.get("function") or module_name(f) or "??") for f in frames)
