"""Where tracefs is mounted; the probes, the preflight check and the set-up script agree on it."""

from __future__ import annotations

from pathlib import Path
from typing import Final

TRACEFS_CANDIDATES: Final = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))


def tracefs_root(candidates: tuple[Path, ...] = TRACEFS_CANDIDATES) -> Path | None:
    """The first mounted tracefs (it has an ``events`` directory), or None."""
    for root in candidates:
        try:
            if (root / "events").is_dir():
                return root
        except OSError:
            continue
    return None
