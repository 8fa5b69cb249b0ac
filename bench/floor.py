"""The floor: EMPTY BPF programs on exactly the tracepoints the daemon attaches.

Every probe in ``tracer.probes.expected_probes(KIND)`` (raw ``kvm_userspace_exit``, the syscall
probes of that kind -- raw sys_enter/sys_exit, or the classic per-syscall tracepoints -- sched
and kvm ones) gets a program that returns 0 at once, so what remains is the
kernel's own price of having them attached (syscall tracepoints also push every syscall of every
task through the slow path).  Prints ``ready <n> probes`` once attached, then waits for
SIGINT/SIGTERM.  Usage: .venv/bin/python bench/floor.py [classic|raw] (default: classic).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tracer.probes import expected_probes

TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def tracepoint_exists(category: str, event: str) -> bool:
    return any(os.path.isdir(f"{root}/events/{category}/{event}") for root in TRACEFS)


def program(kind: str) -> tuple[str, list[str]]:
    parts, attached = [], []
    for probe in expected_probes(kind):
        category, _, event = probe.partition(":")
        if category == "raw":
            parts.append(f"RAW_TRACEPOINT_PROBE({event}) {{ return 0; }}")
        elif tracepoint_exists(category, event):
            parts.append(f"TRACEPOINT_PROBE({category}, {event}) {{ return 0; }}")
        else:
            continue
        attached.append(probe)
    return "\n".join(parts) + "\n", attached


def main() -> int:
    from bcc import BPF

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    kind = sys.argv[1] if len(sys.argv) > 1 else "classic"
    text, attached = program(kind)
    bpf = BPF(text=text.encode())
    print(f"ready {len(attached)} probes: {' '.join(attached)}", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        bpf.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
