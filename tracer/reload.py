"""SIGHUP reloads: what a re-read configuration changes in the running daemon.

A reload is all or nothing: everything is read, validated and built first (the merged policy
included, tracer.config), and a reload refused at any step leaves the running configuration
untouched. What changes live: log level and format, the policy, the snapshot idle time, static
labels; keys that need a restart are named in a notice and keep their running value.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from tracer.alerts import configure_logging
from tracer.config import (
    KEYS,
    ConfigError,
    FlagOverrides,
    Settings,
    diff,
    load_settings,
    needs_restart,
)
from tracer.daemon import Daemon
from tracer.policy import CompletionPolicy, PolicyError
from tracer.sdnotify import Notifier


@dataclass(frozen=True)
class ReloadPlan:
    applied: dict[str, str]  # key -> "old -> new", taking effect now
    restart_required: dict[str, str]  # key -> "running -> file", kept at the running value
    settings: Settings  # what runs after the reload
    policy: CompletionPolicy  # settings.policy, built: nothing is left to validate when applying


def plan_reload(running: Settings, loaded: Settings) -> ReloadPlan:
    """What a reload would change, its policy built (PolicyError if it cannot be)."""
    changes = diff(running, loaded)
    kept = {k: v for k, v in changes.items() if needs_restart(k)}
    # Every restart-only key keeps its running value (derived from KEYS: a new key cannot be
    # forgotten here).
    restart_only = {spec.attr for key, spec in KEYS.items() if needs_restart(key)}
    settings = replace(loaded, **{attr: getattr(running, attr) for attr in restart_only})
    # Built here, before anything changes, so that applying the plan has nothing left to
    # refuse (load_settings built each source's part, so this cannot fail for its Settings).
    policy = settings.completion_policy()
    return ReloadPlan({k: v for k, v in changes.items() if k not in kept}, kept, settings,
                      policy)


class ApplyError(RuntimeError):
    """A validated reload that the running daemon could not take (a BPF map update refused)."""

    def __init__(self, reason: str, partly_applied: bool) -> None:
        super().__init__(reason)
        self.partly_applied = partly_applied


class Reloader:
    """SIGHUP: the handler calls :meth:`request`; the daemon loop calls :meth:`poll`."""

    def __init__(self, path: Path, explicit: bool, flags: FlagOverrides,
                 running: Settings) -> None:
        self.path = path
        self.explicit = explicit
        self.flags = flags
        self.running = running
        self._requested = False

    def request(self) -> None:
        """Async-signal-safe enough for Python: one attribute store, nothing else."""
        self._requested = True

    def poll(self, daemon: Daemon, notifier: Notifier) -> None:
        if not self._requested:
            return
        self._requested = False
        notifier.reloading()
        try:
            self.reload(daemon)
        finally:
            notifier.ready(status=f"watching; config {self.path}")

    def prepare(self) -> ReloadPlan:
        """Read and validate everything a reload needs, changing nothing (ConfigError or
        PolicyError, naming the file and the key, if anything is wrong)."""
        return plan_reload(self.running, load_settings(self.path, self.explicit, self.flags))

    def reload(self, daemon: Daemon) -> ReloadPlan | None:
        """All or nothing: the plan applies whole, or the running configuration stays."""
        try:
            plan = self.prepare()
        except (ConfigError, PolicyError) as err:
            daemon.sink.notice("config_reload_failed", "error", path=str(self.path),
                               reason=str(err), kept="the running configuration")
            return None
        try:
            apply_settings(daemon, self.running, plan)
        except ApplyError as err:
            kept = ("the running configuration, but the probes' policy map may be a mix of old "
                    "and new: restart the daemon" if err.partly_applied
                    else "the running configuration")
            daemon.sink.notice("config_reload_failed", "error", path=str(self.path),
                               reason=str(err), kept=kept)
            return None
        except Exception as err:  # a bug: never let a reload end the daemon
            daemon.sink.notice("config_reload_failed", "error", path=str(self.path),
                               reason=f"internal error: {_what(err)}",
                               kept="the running configuration, possibly in part: restart the "
                                    "daemon (and report this)")
            return None
        self.running = plan.settings
        daemon.sink.notice("config_reloaded", "info", path=str(self.path),
                           changed=plan.applied)
        if plan.restart_required:
            daemon.sink.notice("config_restart_required", "warning",
                               keys=plan.restart_required,
                               hint="restart the daemon for these keys to take effect")
        return plan


def _what(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def apply_settings(daemon: Daemon, old: Settings, plan: ReloadPlan) -> None:
    """What changes live: the policy (BPF map and tracker), idle time, labels, logging.

    Only the BPF map write can fail (everything was validated and built into ``plan``), so it
    goes first and is undone if it fails: an ApplyError then means nothing changed, unless
    ``partly_applied`` says the undo failed too."""
    new = plan.settings
    # The daemon's lock keeps a metrics scrape and the event loop from seeing half a policy.
    with daemon.lock:
        if old.policy != new.policy:
            previous = daemon.tracker.policy
            try:
                daemon.probes.set_policy(plan.policy)
            except Exception as err:  # e.g. bcc refusing a map update
                try:
                    daemon.probes.set_policy(previous)
                except Exception as again:
                    raise ApplyError(f"writing the policy into the probes' map failed "
                                     f"({_what(err)}), and so did restoring the old one "
                                     f"({_what(again)})", partly_applied=True) from None
                raise ApplyError(f"writing the policy into the probes' map failed: "
                                 f"{_what(err)}", partly_applied=False) from None
            daemon.tracker.policy = plan.policy
            daemon.options.policy = plan.policy
        if old.snapshot_idle_s != new.snapshot_idle_s:
            daemon.tracker.snapshot_idle_s = new.snapshot_idle_s
            daemon.options.snapshot_idle_s = new.snapshot_idle_s
    if old.labels != new.labels:  # set_labels takes the lock itself
        daemon.set_labels(dict(new.labels))
    # Last, so that the config_reloaded line is already at the new level.
    if (old.log_format, old.log_level) != (new.log_format, new.log_level):
        configure_logging(new.log_format, new.log_level)
