"""The configuration file (TOML) and command-line overrides (SIGHUP reloads: tracer.reload).

Precedence: built-in defaults < the config file < ``--policy FILE`` (policy only) < flags the
operator actually passed. Every key is validated here; a bad one is refused with one line naming
the file and the key. A SIGHUP re-reads the file (and ``--policy FILE``) and applies what can
change without re-attaching the probes (log level and format, the policy, the snapshot idle time,
static labels); keys that need a restart are named in a notice and keep their running value.
A reload is all or nothing: everything is read, validated and built first (the merged policy
included), and a reload refused at any step leaves the running configuration untouched.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tracer.alerts import LEVELS, SnapshotAlert, ViolationAlert
from tracer.daemon import DaemonOptions
from tracer.instance import DEFAULT_LOCK_WAIT_S
from tracer.metrics import DEFAULT_METRICS_PORT, MetricsConfigError, parse_addr
from tracer.policy import (
    CompletionPolicy,
    PolicyError,
    PolicyOverrides,
    build_policy,
    load_policy_file,
    overrides_from_mapping,
)
from tracer.syscall_abi import DEFAULT_SYSCALL_PROBES, SYSCALL_PROBE_KINDS

DEFAULT_CONFIG_PATH: Final = Path("/etc/kvm-completion-tracer/config.toml")
DEFAULT_STATE_DIR: Final = Path("/var/lib/kvm-completion-tracer")
# Compiled probes (tracer.bpfcache): a start with the same source, flags, bcc and kernel loads
# them instead of compiling again. Relative: under state_dir (writable wherever the daemon runs:
# systemd's StateDirectory=, the container's state volume).
DEFAULT_CACHE_DIR: Final = Path("probe-cache")
DEFAULT_METRICS_ADDR: Final = f"127.0.0.1:{DEFAULT_METRICS_PORT}"
LOG_FORMATS: Final = ("auto", "json", "console")
# KVM allows 4096 vCPUs per VM on x86; 65536 is 16 such VMs on one host, and keeps the maps
# sized from it (tracer.probes.ProbeConfig) near 250 MiB of kernel memory (~3.8 KiB a vCPU).
MAX_VCPUS_LIMIT: Final = 1 << 16

# Keys whose new value only takes effect on a restart (the probes, the exporter's socket, the
# lock): a reload names them and keeps the running value.
RESTART_PREFIXES: Final = ("probes.", "metrics.", "state_dir")

_LABEL_NAME: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
# Names our alerts and metrics already use (plus Prometheus' own): a static label must not
# overwrite them.
RESERVED_LABELS: Final = frozenset(
    set(ViolationAlert.__dataclass_fields__) | set(SnapshotAlert.__dataclass_fields__)
    | {"event", "level", "timestamp", "vm", "vmm", "vcpu", "vcpu_id", "pid", "exit_reason",
       "ioctl", "kind", "severity", "rule", "closed_by", "path", "type", "probe", "reason",
       "version", "arch", "job", "instance", "le", "quantile"})


class ConfigError(ValueError):
    """A config file or flag the operator must fix; the message names the file and key."""


class _Invalid(ValueError):
    """A value's problem, without saying where it came from (the caller adds that)."""


# ---- values --------------------------------------------------------------------------------------

def _type_name(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"expected an integer, got {_type_name(value)}")
    return value


def _float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(f"expected a number, got {_type_name(value)}")
    if not math.isfinite(value):
        raise _Invalid("must be a finite number")
    return float(value)


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_type_name(value)}")
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_type_name(value)}")
    return value


def _choice(choices: tuple[str, ...]) -> Callable[[object], str]:
    def check(value: object) -> str:
        text = _str(value)
        if text not in choices:
            raise _Invalid(f"must be one of {', '.join(choices)}")
        return text
    return check


def ringbuf_pages(value: object) -> int:
    pages = _int(value)
    if pages < 1 or pages & (pages - 1):
        raise _Invalid("must be a power of two")
    return pages


def pending_sample(value: object) -> int:
    n = _int(value)
    if n < 1 or n > 1024 or n & (n - 1):
        raise _Invalid("must be a power of two from 1 to 1024")
    return n


def max_vcpus(value: object) -> int:
    count = _int(value)
    if not 1 <= count <= MAX_VCPUS_LIMIT:
        raise _Invalid(f"must be between 1 and {MAX_VCPUS_LIMIT}")
    return count


def positive_seconds(value: object) -> float:
    seconds = _float(value)
    if seconds <= 0:
        raise _Invalid("must be positive")
    return seconds


def non_negative_seconds(value: object) -> float:
    seconds = _float(value)
    if seconds < 0:
        raise _Invalid("must not be negative")
    return seconds


def vcpu_series(value: object) -> int:
    count = _int(value)
    if not 1 <= count <= 1_000_000:
        raise _Invalid("must be between 1 and 1000000")
    return count


def host_port(text: str) -> str:
    """``HOST:PORT`` or ``[IPv6]:PORT``, port 1-65535 (tracer.metrics.parse_addr's rules);
    returned unchanged when valid."""
    try:
        parse_addr(text)
    except MetricsConfigError as err:
        raise _Invalid(str(err)) from None
    return text


def metrics_addr(value: object) -> str | None:
    """A ``host:port`` string; ``""`` or ``false`` disable the exporter."""
    if value is False or value == "":
        return None
    if not isinstance(value, str):
        raise _Invalid(f'expected "HOST:PORT", "" or false, got {_type_name(value)}')
    return host_port(value)


def state_dir(value: object) -> Path:
    text = _str(value)
    if not text.startswith("/"):
        raise _Invalid("must be an absolute path")
    return Path(text)


def cache_dir(value: object) -> Path | None:
    if value is False or value == "":
        return None
    return state_dir(value)


def path_list(value: object) -> tuple[Path, ...]:
    """``suppressions = ["a.toml", ...]``: files, relative ones to the config file's directory
    (resolved by load_settings)."""
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _Invalid("expected an array of file names")
    return tuple(Path(v) for v in value)


def label(name: object, value: object) -> tuple[str, str]:
    key = _str(name)
    if not _LABEL_NAME.match(key) or key.startswith("__"):
        raise _Invalid(f"label name {key!r} is not a valid Prometheus label name "
                       "([a-zA-Z_][a-zA-Z0-9_]*, not starting with __)")
    if key in RESERVED_LABELS:
        raise _Invalid(f"label name {key!r} clashes with a built-in field or label")
    if not isinstance(value, str):
        raise _Invalid(f"label {key!r}: expected a string value, got {_type_name(value)}")
    return key, value


@dataclass(frozen=True)
class _Key:
    attr: str  # Settings field
    parse: Callable[[object], Any]


# Flat key ("section.name") -> Settings field and validator.  [policy] and [labels] are tables
# with their own parsing.
KEYS: Final[dict[str, _Key]] = {
    "log.level": _Key("log_level", _choice(LEVELS)),
    "log.format": _Key("log_format", _choice(LOG_FORMATS)),
    "probes.ringbuf_pages": _Key("ringbuf_pages", ringbuf_pages),
    "probes.max_vcpus": _Key("max_vcpus", max_vcpus),
    "probes.trace_exits": _Key("trace_exits", _bool),
    "probes.syscall_probes": _Key("syscall_probes", _choice(SYSCALL_PROBE_KINDS)),
    "probes.guest_exits": _Key("guest_exits", _bool),
    "probes.stacks": _Key("stacks", _bool),
    "probes.pending_time_sample": _Key("pending_sample", pending_sample),
    "probes.cache_dir": _Key("cache_dir", cache_dir),
    "metrics.addr": _Key("metrics_addr", metrics_addr),
    "metrics.per_vcpu": _Key("metrics_per_vcpu", _bool),
    "metrics.max_vcpu_series": _Key("max_vcpu_series", vcpu_series),
    "metrics.retain_gone_seconds": _Key("retain_gone_s", non_negative_seconds),
    "snapshot_idle_seconds": _Key("snapshot_idle_s", positive_seconds),
    "state_dir": _Key("state_dir", state_dir),
    "lock_wait_seconds": _Key("lock_wait_s", non_negative_seconds),
    # watch only (tracer.suppressions); --suppressions FILE adds to these
    "suppressions": _Key("suppressions", path_list),
}
SECTIONS: Final = ("log", "policy", "probes", "metrics", "labels")


# ---- settings -----------------------------------------------------------------------------------

@dataclass
class Settings:
    """The effective configuration: defaults, then the file, then the flags."""

    log_level: str = "info"
    log_format: str = "auto"
    policy: PolicyOverrides = field(default_factory=PolicyOverrides)
    ringbuf_pages: int = 64
    max_vcpus: int = 4096
    trace_exits: bool = False
    syscall_probes: str = DEFAULT_SYSCALL_PROBES
    guest_exits: bool = True
    stacks: bool = True
    pending_sample: int = 16
    cache_dir: Path | None = DEFAULT_CACHE_DIR
    metrics_addr: str | None = DEFAULT_METRICS_ADDR
    metrics_per_vcpu: bool = False
    max_vcpu_series: int = 256
    retain_gone_s: float = 900.0
    labels: dict[str, str] = field(default_factory=dict)
    snapshot_idle_s: float = 1.0
    state_dir: Path = DEFAULT_STATE_DIR
    lock_wait_s: float = DEFAULT_LOCK_WAIT_S  # at start-up, for a dying previous instance
    suppressions: tuple[Path, ...] = ()  # watch's suppressions files

    def flat(self) -> dict[str, object]:
        """``section.key`` -> value, for diffs (labels one key each, ``labels.NAME``)."""
        out: dict[str, object] = {key: getattr(self, spec.attr) for key, spec in KEYS.items()}
        out["state_dir"] = str(self.state_dir)
        out["suppressions"] = [str(p) for p in self.suppressions]
        cache = self.probe_cache_dir()
        out["probes.cache_dir"] = str(cache) if cache else ""
        out["policy.arch"] = self.policy.arch
        out["policy.extra_pending_exits"] = list(self.policy.extra_pending_exits)
        out["policy.ignored_exits"] = list(self.policy.ignored_exits)
        out["policy.disabled_sanctions"] = list(self.policy.disabled_sanctions)
        out["policy.severity"] = dict(self.policy.severities)
        out["policy.inspection"] = self.policy.inspection
        out["policy.peek_ioctls"] = (None if self.policy.peek_ioctls is None
                                     else list(self.policy.peek_ioctls))
        out.update({f"labels.{k}": v for k, v in self.labels.items()})
        return out

    def probe_cache_dir(self) -> Path | None:
        if self.cache_dir is None or self.cache_dir.is_absolute():
            return self.cache_dir
        return self.state_dir / self.cache_dir

    def completion_policy(self) -> CompletionPolicy:
        return build_policy(self.policy)

    def daemon_options(self) -> DaemonOptions:
        from tracer.metrics import MetricsOptions
        from tracer.probes import ProbeConfig

        return DaemonOptions(
            policy=self.completion_policy(),
            probe_config=ProbeConfig(max_vcpus=self.max_vcpus, ringbuf_pages=self.ringbuf_pages,
                                     trace_exits=self.trace_exits,
                                     syscall_probes=self.syscall_probes,
                                     guest_exits=self.guest_exits, stacks=self.stacks,
                                     pending_sample=self.pending_sample,
                                     cache_dir=self.probe_cache_dir()),
            snapshot_idle_s=self.snapshot_idle_s,
            metrics=MetricsOptions(addr=self.metrics_addr, per_vcpu=self.metrics_per_vcpu,
                                   max_vcpu_series=self.max_vcpu_series,
                                   retain_gone_s=self.retain_gone_s),
            labels=dict(self.labels),
            state_dir=self.state_dir,
        )


@dataclass
class FlagOverrides:
    """What the operator passed on the command line (already validated), re-applied on reload."""

    values: dict[str, object] = field(default_factory=dict)  # flat key -> value
    labels: dict[str, str] = field(default_factory=dict)
    policy_file: Path | None = None
    policy: PolicyOverrides = field(default_factory=PolicyOverrides)


def flag_value(flag: str, raw: object, key: str) -> object:
    """Validate a flag's value with the config key's rules; errors name the flag."""
    try:
        return KEYS[key].parse(raw)
    except _Invalid as err:
        raise ConfigError(f"{flag} {raw}: {err}") from None


def label_flag(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep:
        raise ConfigError(f"--label {text!r}: expected KEY=VALUE")
    try:
        return label(name, value)
    except _Invalid as err:
        raise ConfigError(f"--label {text!r}: {err}") from None


# ---- the file ------------------------------------------------------------------------------------

def _shown(value: object) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def read_config_file(path: Path, explicit: bool) -> dict[str, Any]:
    """The parsed TOML; ``{}`` for a missing default file, an error for a missing given one."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if not explicit:
            return {}
        raise ConfigError(f"cannot read config file {path}: No such file or directory") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text: {err.reason} at byte "
                          f"{err.start}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None


# The keys of a [policy] table, as build_policy's messages start with them.
_POLICY_KEY: Final = re.compile(r"(extra_pending_exits|ignored_exits|disabled_sanctions|"
                                r"severity)\b")


def checked_policy(overrides: PolicyOverrides, where: str) -> CompletionPolicy:
    """``build_policy``, its error one line naming ``where`` (the file) and the key."""
    try:
        return build_policy(overrides)
    except PolicyError as err:
        text = str(err)
        sep = "." if _POLICY_KEY.match(text) else ": "
        raise ConfigError(f"{where}: policy{sep}{text}") from None


def parse_config(data: Mapping[str, Any], where: str) -> tuple[dict[str, object],
                                                                  dict[str, str],
                                                                  PolicyOverrides]:
    """Validate a parsed file: (flat key -> value, labels, policy overrides)."""
    values: dict[str, object] = {}
    labels: dict[str, str] = {}
    policy = PolicyOverrides()
    top_known = sorted({*SECTIONS, *(k for k in KEYS if "." not in k)})
    for name, value in data.items():
        if name in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {name}: expected a table [{name}], got "
                                  f"{_type_name(value)}")
            if name == "policy":
                try:
                    policy = overrides_from_mapping(value, f"{where}: policy")
                except PolicyError as err:
                    raise ConfigError(str(err)) from None
                checked_policy(policy, where)  # exit names, sanctions, severities
            elif name == "labels":
                for key, text in value.items():
                    try:
                        k, v = label(key, text)
                    except _Invalid as err:
                        raise ConfigError(f"{where}: labels.{key}: {err}") from None
                    labels[k] = v
            else:
                known = sorted(k.partition(".")[2] for k in KEYS if k.startswith(name + "."))
                for key, item in value.items():
                    flat = f"{name}.{key}"
                    if flat not in KEYS:
                        raise ConfigError(f"{where}: unknown key {flat!r} (known in [{name}]: "
                                          f"{', '.join(known)})")
                    values[flat] = _parse(flat, item, where)
        elif name in KEYS and "." not in name:
            values[name] = _parse(name, value, where)
        else:
            raise ConfigError(f"{where}: unknown key {name!r} (known: {', '.join(top_known)})")
    return values, labels, policy


def _parse(key: str, value: object, where: str) -> object:
    try:
        return KEYS[key].parse(value)
    except _Invalid as err:
        raise ConfigError(f"{where}: {key} = {_shown(value)}: {err}") from None


def load_settings(path: Path, explicit: bool, flags: FlagOverrides | None = None) -> Settings:
    """Defaults < the file at ``path`` < ``flags`` (policy: file < --policy FILE < flags).

    Each source's policy is built on its own, so that an error names the file it is in; the
    flags' policy was built when they were parsed (tracer.cli)."""
    flags = flags or FlagOverrides()
    values, labels, policy = parse_config(read_config_file(path, explicit), str(path))
    if flags.policy_file is not None:
        from_file = load_policy_file(flags.policy_file)
        checked_policy(from_file, str(flags.policy_file))
        policy = policy.merged(from_file)
    policy = policy.merged(flags.policy)
    settings = Settings(policy=policy, labels={**labels, **flags.labels})
    for key, value in {**values, **flags.values}.items():
        setattr(settings, KEYS[key].attr, value)
    settings.suppressions = tuple(p if p.is_absolute() else path.parent / p
                                  for p in settings.suppressions)
    return settings


# ---- reload --------------------------------------------------------------------------------------

UNSET: Final = "(unset)"


def _display(value: object) -> str:
    if value is None:
        return "null"
    return value if isinstance(value, str) else _shown(value)


def diff(old: Settings, new: Settings) -> dict[str, str]:
    """``key -> "old -> new"`` for every key whose effective value changed."""
    before, after = old.flat(), new.flat()
    out = {}
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key, UNSET), after.get(key, UNSET)
        if a != b:
            out[key] = f"{_display(a)} -> {_display(b)}"
    return out


def needs_restart(key: str) -> bool:
    return key.startswith(RESTART_PREFIXES)
