"""What the tracker reports, and the structlog sink that prints it.

Sinks receive typed alerts; this module renders them as structured log events (JSON lines on
stdout, or the console renderer on a TTY). Metrics (a later sink) take the same objects.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Protocol, TextIO

import structlog

from tracer.symbolize import stack_lines


@dataclass(frozen=True)
class ViolationAlert:
    """One save/restore ioctl issued while a completion was pending."""

    pid: int
    tid: int
    comm: str
    vm: str
    vmm: str
    vcpu_id: int
    vcpu_fd: int
    exit_reason: str
    access: dict[str, object]
    ioctl: str
    kind: str  # "save" | "restore"
    pending_ns: int
    rule: str
    severity: str
    reason: str
    detected_at: str  # "ioctl_entry" | "ioctl_return"
    window: int  # per-vCPU id of the pending window (count of completion-needing exits)
    sanctioned: bool = False
    # What decided the verdict: "ioctl" (the ioctl alone: alerted at once), or for a read the
    # kernel held in its window (tracer.windows) until the window showed what it was part of:
    # "snapshot" (another kind of state read in the window), "restore" (state restored in the
    # window, or elsewhere in the process while it was open). A held read has no stack.
    judged_on: str = "ioctl"
    # The offending ioctl's user-space stack, symbolized (tracer.symbolize.UserStack.to_dict()).
    # Not named ``stack``: structlog's renderers reserve that key for a traceback string.
    user_stack: dict[str, Any] | None = None


@dataclass(frozen=True)
class SnapshotAlert:
    """Several save ioctls inside one pending window: a snapshot taken mid-completion."""

    pid: int
    vm: str
    vmm: str
    vcpu_id: int
    exit_reason: str
    access: dict[str, object]
    ioctls: list[str]
    tids: list[int]
    window: int
    pending_ns: int  # from the exit to the last save of the window
    closed_by: str  # "reentry" | "immediate_exit" | "vcpu_closed" | "process_exit" | "idle"
    # | "events_lost" (known from the kernel's lost_windows only)
    severity: str = "critical"
    events_lost: bool = False  # the ring buffer dropped some of the window's events
    reason: str = field(default="")


class AlertSink(Protocol):
    def violation(self, alert: ViolationAlert) -> None: ...

    def sanctioned(self, alert: ViolationAlert) -> None: ...

    def snapshot(self, alert: SnapshotAlert) -> None: ...


    def notice(self, event: str, level: str, **fields: Any) -> None: ...


@dataclass
class MemorySink:
    """Keeps everything in memory: selftest and tests."""

    violations: list[ViolationAlert] = field(default_factory=list)
    sanctions: list[ViolationAlert] = field(default_factory=list)
    snapshots: list[SnapshotAlert] = field(default_factory=list)
    notices: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def violation(self, alert: ViolationAlert) -> None:
        self.violations.append(alert)

    def sanctioned(self, alert: ViolationAlert) -> None:
        self.sanctions.append(alert)

    def snapshot(self, alert: SnapshotAlert) -> None:
        self.snapshots.append(alert)


    def notice(self, event: str, level: str, **fields: Any) -> None:
        self.notices.append((event, fields))


LEVELS = ("debug", "info", "warning", "error", "critical")
_SEVERITY_LEVEL = {"info": "info", "warning": "warning", "error": "error", "critical": "critical"}


# Keys structlog's renderers take for themselves (the console renderer pops ``stack`` and
# ``exception`` as traceback text, and leads with the first four): no event field may use them.
RENDERER_RESERVED_KEYS: Final = frozenset({"event", "level", "timestamp", "logger", "logger_name",
                                           "stack", "exception", "exc_info", "stack_info"})


def configure_logging(log_format: str = "auto", level: str = "info",
                      stream: TextIO | None = None) -> None:
    """JSON lines (or the console renderer on a TTY) on ``stream``, filtered at ``level``."""
    out = stream or sys.stdout
    use_console = log_format == "console" or (log_format == "auto" and out.isatty())
    renderer: Any = (ConsoleLines(colors=out.isatty()) if use_console
                     else structlog.processors.JSONRenderer(sort_keys=False))
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _event_first,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


def _event_first(_logger: Any, _method: str, event_dict: Any) -> Any:
    """``event``, ``level`` and ``timestamp`` lead each JSON line: easier to scan and to grep."""
    head = {k: event_dict.pop(k) for k in ("event", "level", "timestamp") if k in event_dict}
    return {**head, **event_dict}


class ConsoleLines:
    """structlog's console renderer, for a person at a terminal: the alert's user stack printed
    under its line as the gate's report prints it, and an event the renderer cannot format
    printed as a JSON line instead of lost (an alert is never dropped for its looks)."""

    def __init__(self, colors: bool) -> None:
        self._console = structlog.dev.ConsoleRenderer(colors=colors)
        self._json = structlog.processors.JSONRenderer(sort_keys=False)

    def __call__(self, logger: Any, method: str, event_dict: Any) -> str:
        fallback = dict(event_dict)
        try:
            user_stack = event_dict.pop("user_stack", None)
            line = str(self._console(logger, method, event_dict))
            if isinstance(user_stack, dict):
                line += "\n" + "\n".join(stack_lines(user_stack))
            return line
        except Exception as err:  # any renderer failure: print the event as JSON
            fallback["render_error"] = f"{type(err).__name__}: {err}"
            return str(self._json(logger, method, fallback))


class LogSink:
    """Alerts as structlog events: ``completion_violation``, ``completion_snapshot``, ..."""

    def __init__(self) -> None:
        self.log = structlog.get_logger("kvm-completion-tracer")
        self.labels: dict[str, str] = {}  # static labels from the config, on every line

    def _emit(self, level: str, event: str, **fields: Any) -> None:
        if self.labels:
            fields["labels"] = self.labels
        getattr(self.log, level)(event, **fields)

    def violation(self, alert: ViolationAlert) -> None:
        fields = asdict(alert)
        fields.pop("sanctioned")
        if fields["user_stack"] is None:
            fields.pop("user_stack")
        self._emit(_level_for(alert.severity), "completion_violation", **fields)

    def sanctioned(self, alert: ViolationAlert) -> None:
        fields = asdict(alert)
        fields.pop("sanctioned")
        fields.pop("user_stack")
        self._emit("debug", "completion_sanctioned", **fields)

    def snapshot(self, alert: SnapshotAlert) -> None:
        self._emit(_level_for(alert.severity), "completion_snapshot", **asdict(alert))

    def notice(self, event: str, level: str, **fields: Any) -> None:
        self._emit(level, event, **fields)


def _level_for(severity: str) -> str:
    # Violations are never below warning: an operator filtering at warning must still see them.
    level = _SEVERITY_LEVEL.get(severity, "warning")
    return "warning" if level in ("debug", "info") else level
