"""tracer.config: the TOML file, its validation, flag precedence, and SIGHUP reloads (the plan,
and applying it to a daemon all or nothing).

Also the single-instance lock (tracer.instance), taken here by two real processes.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog

from tracer import abi
from tracer.alerts import LogSink, configure_logging
from tracer.cli import _flag_overrides, build_parser
from tracer.config import (
    DEFAULT_METRICS_ADDR,
    DEFAULT_STATE_DIR,
    KEYS,
    ConfigError,
    FlagOverrides,
    Settings,
    diff,
    load_settings,
)
from tracer.daemon import Daemon, DaemonOptions, SystemProcView
from tracer.instance import LOCK_NAME, InstanceError, InstanceLock
from tracer.metrics import ExporterHealth
from tracer.policy import (
    CompletionPolicy,
    PolicyError,
    PolicyOverrides,
    Sanction,
    Severity,
    build_policy,
)
from tracer.reload import Reloader, plan_reload
from tracer.sdnotify import Notifier
from tracer.tracker import Tracker

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "deploy" / "config.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str) -> Settings:
    return load_settings(write(tmp_path, text), explicit=True)


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "config.toml") in message
    return message


def flags(*argv: str) -> FlagOverrides:
    return _flag_overrides(build_parser().parse_args(["run", *argv]))


# ---- the file -----------------------------------------------------------------------------------

def test_missing_default_file_gives_the_defaults(tmp_path: Path) -> None:
    settings = load_settings(tmp_path / "absent.toml", explicit=False)
    assert settings == Settings()
    assert settings.state_dir == DEFAULT_STATE_DIR
    assert settings.metrics_addr == DEFAULT_METRICS_ADDR
    assert (settings.ringbuf_pages, settings.max_vcpus, settings.snapshot_idle_s) == (64, 4096,
                                                                                       1.0)


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config file .*absent.toml: No such file"):
        load_settings(tmp_path / "absent.toml", explicit=True)


def test_every_key(tmp_path: Path) -> None:
    settings = load(tmp_path, """
snapshot_idle_seconds = 0.5
state_dir = "/srv/kct"
[log]
level = "debug"
format = "json"
[policy]
ignored_exits = ["XEN"]
disabled_sanctions = ["port-0x7e"]
severity = { "save:MMIO" = "critical" }
[probes]
ringbuf_pages = 128
max_vcpus = 512
trace_exits = true
pending_time_sample = 4
[metrics]
addr = "[::1]:9150"
per_vcpu = true
max_vcpu_series = 64
retain_gone_seconds = 60
[labels]
site = "fra1"
cluster = "blue"
""")
    assert (settings.log_level, settings.log_format) == ("debug", "json")
    assert (settings.ringbuf_pages, settings.max_vcpus, settings.trace_exits) == (128, 512, True)
    assert (settings.metrics_addr, settings.metrics_per_vcpu) == ("[::1]:9150", True)
    assert (settings.max_vcpu_series, settings.retain_gone_s) == (64, 60.0)
    assert settings.labels == {"site": "fra1", "cluster": "blue"}
    assert settings.snapshot_idle_s == 0.5
    assert settings.state_dir == Path("/srv/kct")
    policy = settings.completion_policy()
    assert Sanction.PORT_7E not in policy.sanctions
    options = settings.daemon_options()
    assert options.probe_config.ringbuf_pages == 128
    assert options.probe_config.max_vcpus == 512 and options.probe_config.trace_exits
    assert options.probe_config.pending_sample == 4 and options.probe_config.slot_bits == 9
    assert options.metrics.addr == "[::1]:9150" and options.metrics.per_vcpu
    assert options.metrics.max_vcpu_series == 64 and options.metrics.retain_gone_s == 60.0
    assert options.labels == {"site": "fra1", "cluster": "blue"}
    assert options.snapshot_idle_s == 0.5


def test_the_shipped_example_is_valid_and_sets_every_key() -> None:
    settings = load_settings(EXAMPLE, explicit=True)
    assert settings.metrics_addr == DEFAULT_METRICS_ADDR
    # It says its values are the defaults: `make install` ships it as the live config.
    from tracer.config import KEYS, Settings

    shipped, default = settings.flat(), Settings().flat()
    assert {k: shipped[k] for k in KEYS} == {k: default[k] for k in KEYS}
    text = EXAMPLE.read_text()
    from tracer.config import KEYS

    for key in (*(k.rpartition(".")[2] for k in KEYS), "[labels]", "[policy]",
                "extra_pending_exits", "ignored_exits", "disabled_sanctions", "severity"):
        assert f"{key} =" in text or key.startswith("["), key
        assert key in text, key


@pytest.mark.parametrize("value", ['""', "false"])
def test_metrics_can_be_disabled_in_the_file(tmp_path: Path, value: str) -> None:
    assert load(tmp_path, f"[metrics]\naddr = {value}\n").metrics_addr is None


@pytest.mark.parametrize(("text", "needles"), [
    ("[log]\nlevel = \"loud\"\n", ["log.level = \"loud\"", "one of"]),
    ("[log]\ncolour = true\n", ["unknown key 'log.colour'", "format, level"]),
    ("[loggin]\nlevel = \"info\"\n", ["unknown key 'loggin'", "labels, lock_wait_seconds, log"]),
    ("snapshot_idle = 1\n", ["unknown key 'snapshot_idle'", "snapshot_idle_seconds"]),
    ("log = \"info\"\n", ["log: expected a table [log], got a string"]),
    ("[probes]\nringbuf_pages = \"64\"\n", ["probes.ringbuf_pages", "expected an integer",
                                           "a string"]),
    ("[probes]\nringbuf_pages = 48\n", ["probes.ringbuf_pages = 48", "power of two"]),
    ("[probes]\nmax_vcpus = 0\n", ["probes.max_vcpus = 0", "between 1 and 65536"]),
    ("[probes]\npending_time_sample = 12\n", ["probes.pending_time_sample = 12",
                                             "power of two from 1 to 1024"]),
    ("[probes]\npending_time_sample = 0\n", ["probes.pending_time_sample = 0", "power of two"]),
    ("[probes]\ntrace_exits = 1\n", ["probes.trace_exits", "expected true or false"]),
    ("[metrics]\naddr = 9110\n", ["metrics.addr = 9110", "HOST:PORT"]),
    ("[metrics]\naddr = true\n", ["metrics.addr = true"]),
    ("[metrics]\naddr = \"localhost\"\n", ["metrics.addr", "expected HOST:PORT"]),
    ("[metrics]\naddr = \"::1:9110\"\n", ["metrics.addr", "brackets"]),
    ("[metrics]\naddr = \"[::1]:70000\"\n", ["metrics.addr", "1 to 65535"]),
    ("[metrics]\naddr = \"[nope]:9110\"\n", ["metrics.addr", "not an IPv6 address"]),
    ("[metrics]\nper_vcpu = \"yes\"\n", ["metrics.per_vcpu", "true or false"]),
    ("[metrics]\nmax_vcpu_series = 0\n", ["metrics.max_vcpu_series = 0"]),
    ("[metrics]\nretain_gone_seconds = -1\n", ["metrics.retain_gone_seconds = -1",
                                               "negative"]),
    ("[metrics]\nretain_gone_seconds = nan\n", ["metrics.retain_gone_seconds", "finite"]),
    ("snapshot_idle_seconds = 0\n", ["snapshot_idle_seconds = 0", "positive"]),
    ("state_dir = \"relative\"\n", ["state_dir", "absolute"]),
    ("[labels]\nvm = \"x\"\n", ["labels.vm", "clashes"]),
    ("[labels]\nseverity = \"x\"\n", ["labels.severity", "clashes"]),
    ("[labels]\n\"bad-name\" = \"x\"\n", ["labels.bad-name", "Prometheus label name"]),
    ("[labels]\n__meta = \"x\"\n", ["labels.__meta"]),
    ("[labels]\nsite = 3\n", ["labels.site", "string value"]),
    ("labels = [\"a\"]\n", ["labels: expected a table"]),
    ("[policy]\nignore_exits = []\n", ["policy", "unknown key 'ignore_exits'"]),
    ("[policy]\nextra_pending_exits = \"MMIO\"\n", ["extra_pending_exits", "list of strings"]),
    ("[policy]\nextra_pending_exits = [\"BOGUS\"]\n", ["policy", "unknown exit reason 'BOGUS'"]),
    ("[policy]\ndisabled_sanctions = [\"nope\"]\n", ["policy", "unknown sanction 'nope'"]),
    ("[policy]\nseverity = { save = \"loud\" }\n", ["policy", "unknown severity 'loud'"]),
    ("[log\nlevel=1\n", ["not valid TOML"]),
])
def test_bad_values_are_refused_naming_the_key(tmp_path: Path, text: str,
                                                needles: list[str]) -> None:
    message = error(tmp_path, text)
    for needle in needles:
        assert needle in message, message


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b"[log]\nlevel = \"\xff\"\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings(path, explicit=True)


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Is a directory"):
        load_settings(tmp_path, explicit=True)


# ---- flags over the file ------------------------------------------------------------------------

FILE = """
snapshot_idle_seconds = 2
[log]
level = "warning"
[policy]
ignored_exits = ["XEN"]
[probes]
ringbuf_pages = 128
[metrics]
addr = "127.0.0.1:9999"
[labels]
site = "fra1"
dc = "a"
"""


def test_only_passed_flags_override_the_file(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, FILE), True, flags())
    assert settings.log_level == "warning" and settings.ringbuf_pages == 128
    assert settings.snapshot_idle_s == 2.0 and settings.metrics_addr == "127.0.0.1:9999"
    assert settings.log_format == "auto" and not settings.trace_exits


def test_flags_win(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, FILE), True, flags(
        "--log-level", "debug", "--ringbuf-pages", "256", "--snapshot-idle", "0.25",
        "--metrics-addr", "[::1]:9200", "--label", "site=ams2", "--label", "rack=r7",
        "--ignore-exit", "HYPERV", "--state-dir", "/tmp/x", "--trace-exits",
        "--metrics-per-vcpu", "--log-format", "console", "--max-vcpus", "8"))
    assert (settings.log_level, settings.log_format) == ("debug", "console")
    assert (settings.ringbuf_pages, settings.max_vcpus, settings.trace_exits) == (256, 8, True)
    assert settings.snapshot_idle_s == 0.25
    assert (settings.metrics_addr, settings.metrics_per_vcpu) == ("[::1]:9200", True)
    assert settings.labels == {"site": "ams2", "dc": "a", "rack": "r7"}
    assert settings.policy.ignored_exits == ["XEN", "HYPERV"]  # lists add up, as with --policy
    assert settings.state_dir == Path("/tmp/x")


def test_no_metrics_flag(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, FILE), True, flags("--no-metrics")).metrics_addr is None


def test_policy_file_flag_sits_between_the_config_and_the_flags(tmp_path: Path) -> None:
    extra = tmp_path / "policy.toml"
    extra.write_text("[policy]\nignored_exits = [\"TDX\"]\nseverity = { save = \"warning\" }\n")
    settings = load_settings(write(tmp_path, FILE), True,
                             flags("--policy", str(extra), "--severity", "save=critical"))
    assert settings.policy.ignored_exits == ["XEN", "TDX"]
    assert settings.policy.severities == {"save": "critical"}


@pytest.mark.parametrize(("argv", "needle"), [
    (["--metrics-addr", "nohost"], "--metrics-addr nohost: expected HOST:PORT"),
    (["--metrics-addr", "h:0"], "--metrics-addr h:0: port '0'"),
    (["--metrics-addr", ""], "--no-metrics"),
    (["--label", "site"], "--label 'site': expected KEY=VALUE"),
    (["--label", "vm=x"], "clashes"),
    (["--label", "9x=y"], "Prometheus label name"),
    (["--ringbuf-pages", "3"], "--ringbuf-pages 3: must be a power of two"),
    (["--max-vcpus", "0"], "--max-vcpus 0"),
    (["--snapshot-idle", "-1"], "--snapshot-idle -1.0: must be positive"),
    (["--state-dir", "var/lib"], "--state-dir var/lib: must be an absolute path"),
])
def test_bad_flags(argv: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        flags(*argv)
    assert needle in str(info.value)


@pytest.mark.parametrize("addr", ["127.0.0.1:9110", "[::1]:1", "[::]:65535", "0.0.0.0:80",
                                  "metrics.example.org:9110"])
def test_good_metrics_addresses(addr: str) -> None:
    assert flags("--metrics-addr", addr).values["metrics.addr"] == addr


# ---- reload -------------------------------------------------------------------------------------

def test_diff_names_each_changed_key_old_to_new() -> None:
    old = Settings(labels={"site": "fra1", "dc": "a"})
    new = Settings(log_level="debug", labels={"site": "ams2", "rack": "r7"},
                   policy=PolicyOverrides(ignored_exits=["XEN"]), snapshot_idle_s=0.5)
    assert diff(old, new) == {
        "labels.dc": "a -> (unset)",
        "labels.rack": "(unset) -> r7",
        "labels.site": "fra1 -> ams2",
        "log.level": "info -> debug",
        "policy.ignored_exits": '[] -> ["XEN"]',
        "snapshot_idle_seconds": "1.0 -> 0.5",
    }
    assert diff(old, old) == {}


def test_reload_plan_keeps_restart_only_keys_at_their_running_value() -> None:
    running = Settings()
    loaded = Settings(log_level="error", ringbuf_pages=256, trace_exits=True,
                      metrics_addr=None, metrics_per_vcpu=True, state_dir=Path("/srv"),
                      labels={"site": "x"})
    plan = plan_reload(running, loaded)
    assert plan.applied == {"log.level": "info -> error", "labels.site": "(unset) -> x"}
    assert plan.restart_required == {
        "metrics.addr": f"{DEFAULT_METRICS_ADDR} -> null",
        "metrics.per_vcpu": "false -> true",
        "probes.ringbuf_pages": "64 -> 256",
        "probes.trace_exits": "false -> true",
        "state_dir": f"{DEFAULT_STATE_DIR} -> /srv",
        # the compiled probes' cache lives under the state directory
        "probes.cache_dir": f"{DEFAULT_STATE_DIR}/probe-cache -> /srv/probe-cache",
    }
    after = plan.settings
    assert (after.ringbuf_pages, after.trace_exits, after.metrics_addr) == (64, False,
                                                                           DEFAULT_METRICS_ADDR)
    assert after.state_dir == DEFAULT_STATE_DIR
    assert (after.log_level, after.labels) == ("error", {"site": "x"})
    # still different from the file: named again on the next reload
    assert plan_reload(after, loaded).restart_required == plan.restart_required


def test_reload_rereads_the_file_under_the_same_flags(tmp_path: Path) -> None:
    path = write(tmp_path, FILE)
    cli = flags("--log-level", "debug")
    running = load_settings(path, True, cli)
    path.write_text(FILE.replace('"warning"', '"error"').replace('"fra1"', '"fra2"'))
    plan = plan_reload(running, load_settings(path, True, cli))
    assert plan.applied == {"labels.site": "fra1 -> fra2"}  # log.level stays the flag's


def test_a_bad_policy_file_names_the_file_and_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "policy.toml"
    bad.write_text("[policy]\nignored_exits = [\"BOGUS\"]\n")
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, FILE), True, flags("--policy", str(bad)))
    assert str(info.value).startswith(f"{bad}: policy.ignored_exits: unknown exit reason "
                                      "'BOGUS'"), info.value


@pytest.mark.parametrize(("text", "needle"), [
    ("extra_pending_exits = [\"BOGUS\"]", "policy.extra_pending_exits: unknown exit reason"),
    ("disabled_sanctions = [\"nope\"]", "policy.disabled_sanctions: unknown sanction 'nope'"),
    ("severity = { \"save:NOPE\" = \"error\" }", "policy.severity: unknown exit reason 'NOPE'"),
    ("severity = { often = \"error\" }", "policy.severity: key 'often' must start with"),
    ("severity = { save = \"loud\" }", "policy.severity.save: unknown severity 'loud'"),
])
def test_a_bad_policy_table_names_the_file_and_the_key(tmp_path: Path, text: str,
                                                       needle: str) -> None:
    assert error(tmp_path, f"[policy]\n{text}\n").startswith(
        f"{tmp_path / 'config.toml'}: {needle}")


@pytest.mark.parametrize(("argv", "needle"), [
    (["--ignore-exit", "NOPE"], "--ignore-exit NOPE: ignored_exits: unknown exit reason"),
    (["--extra-pending-exit", "X"], "--extra-pending-exit X: extra_pending_exits: unknown exit"),
    (["--no-sanction", "x"], "--no-sanction x: disabled_sanctions: unknown sanction 'x'"),
    (["--severity", "save=loud"], "--severity save=loud: severity.save: unknown severity"),
])
def test_a_bad_policy_flag_is_named(argv: list[str], needle: str) -> None:
    with pytest.raises(PolicyError) as info:
        flags(*argv)
    assert str(info.value).startswith(needle), info.value


# A Daemon as the reload sees it, without bcc: the real lock, options, tracker, LogSink,
# ExporterHealth and Daemon.set_labels; only the BPF map behind Probes.set_policy is a dict.

class PolicyMap:
    """Probes.set_policy's writes, one entry per exit reason as in the pending_exits map;
    ``fail_at``: the write numbers (0-based, counted over every call) that raise, as bcc does
    when the kernel refuses an update."""

    def __init__(self, policy: CompletionPolicy) -> None:
        self.pending: dict[int, int] = {}
        self.writes = 0
        self.fail_at: set[int] = set()
        self.set_policy(policy)

    def set_policy(self, policy: CompletionPolicy) -> None:
        for reason in range(abi.MAX_EXIT_REASON):
            if self.writes in self.fail_at:
                self.writes += 1
                raise OSError(errno.E2BIG, "Argument list too long")
            self.writes += 1
            self.pending[reason] = int(policy.leaves_pending(reason))

    def pending_names(self) -> set[str]:
        return {abi.exit_reason_name(r) for r, on in self.pending.items() if on}


class OfflineDaemon(Daemon):
    def __init__(self, options: DaemonOptions) -> None:  # no super(): it would load the probes
        self.options = options
        self.sink = LogSink()
        self.sink.labels = dict(options.labels)
        self.lock = threading.Lock()
        self.probes = PolicyMap(options.policy)  # type: ignore[assignment]
        self.tracker = Tracker(options.policy, self.sink, SystemProcView(), None,
                               snapshot_idle_s=options.snapshot_idle_s)
        self.health = ExporterHealth(labels=dict(options.labels))


RUNNING = """
snapshot_idle_seconds = 1.0
[log]
level = "info"
format = "json"
[labels]
site = "fra1"
"""


@dataclass
class Live:
    """A daemon running on RUNNING (and an empty --policy file), its Reloader, its log."""

    config: Path
    policy_file: Path
    daemon: OfflineDaemon
    reloader: Reloader
    capsys: pytest.CaptureFixture[str]

    def log(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.capsys.readouterr().out.splitlines()]

    def reload(self, config: str, policy: str = "") -> list[dict[str, Any]]:
        """Rewrite both files, reload, and return what was logged meanwhile, ended by a debug
        and an info line, each with the labels the sink puts on every line."""
        self.config.write_text(config)
        self.policy_file.write_text(policy)
        self.log()
        self.reloader.reload(self.daemon)
        self.daemon.sink.notice("probe_debug", "debug")
        self.daemon.sink.notice("probe_info", "info")
        return self.log()

    def map_and_tracker_agree(self) -> set[str]:
        names = self.daemon.probes.pending_names()  # type: ignore[attr-defined]
        policy = self.daemon.tracker.policy
        assert self.daemon.options.policy is policy
        assert names == {abi.exit_reason_name(r) for r in policy.pending_exits}
        return set(names)


class Stdout:
    """Whatever sys.stdout is when written to: capsys swaps it between a fixture's set-up and
    the test, while a reload's configure_logging writes to the one current then."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()

    def isatty(self) -> bool:
        return False


@pytest.fixture
def live(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Live]:
    config, policy_file = write(tmp_path, RUNNING), tmp_path / "policy.toml"
    policy_file.write_text("")
    cli = flags("--policy", str(policy_file), "--label", "rack=r7")
    settings = load_settings(config, True, cli)
    configure_logging(settings.log_format, settings.log_level, Stdout())  # as cmd_run does
    daemon = OfflineDaemon(settings.daemon_options())
    yield Live(config, policy_file, daemon, Reloader(config, True, cli, settings), capsys)
    structlog.reset_defaults()


def events(lines: list[dict[str, Any]]) -> list[str]:
    return [line["event"] for line in lines]


def test_reload_applies_level_policy_labels_and_idle_time(live: Live) -> None:
    old_running = live.reloader.running
    assert "KVM_EXIT_IO" in live.map_and_tracker_agree()
    lines = live.reload(RUNNING.replace('"info"', '"debug"').replace('"fra1"', '"fra2"')
                        .replace("1.0", "0.25"),
                        '[policy]\nignored_exits = ["KVM_EXIT_IO"]\n'
                        'severity = { "save:KVM_EXIT_MMIO" = "critical" }\n')
    assert events(lines) == ["config_reloaded", "probe_debug", "probe_info"]
    assert lines[0]["changed"] == {
        "labels.site": "fra1 -> fra2", "log.level": "info -> debug",
        "policy.ignored_exits": '[] -> ["KVM_EXIT_IO"]',
        "policy.severity": '{} -> {"save:KVM_EXIT_MMIO": "critical"}',
        "snapshot_idle_seconds": "1.0 -> 0.25"}
    assert {line["labels"]["site"] for line in lines} == {"fra2"}
    assert lines[0]["labels"] == {"site": "fra2", "rack": "r7"}  # the flag's label stays
    daemon = live.daemon
    assert daemon.health.labels == daemon.options.labels == {"site": "fra2", "rack": "r7"}
    assert "KVM_EXIT_IO" not in live.map_and_tracker_agree()
    assert daemon.tracker.policy.severities == {("save", "KVM_EXIT_MMIO"): Severity.CRITICAL}
    assert daemon.tracker.snapshot_idle_s == daemon.options.snapshot_idle_s == 0.25
    assert live.reloader.running is not old_running
    assert live.reloader.running.log_level == "debug"


def unchanged(live: Live, lines: list[dict[str, Any]], running: Settings) -> None:
    """Nothing of the refused reload took effect: the state RUNNING set up is all there."""
    assert events(lines) == ["config_reload_failed", "probe_info"]  # still at info: no debug
    assert {line["labels"]["site"] for line in lines} == {"fra1"}
    daemon = live.daemon
    assert daemon.health.labels == daemon.options.labels == {"site": "fra1", "rack": "r7"}
    assert "KVM_EXIT_IO" in live.map_and_tracker_agree()
    assert daemon.tracker.policy == build_policy()
    assert daemon.tracker.snapshot_idle_s == daemon.options.snapshot_idle_s == 1.0
    assert live.reloader.running is running


CHANGED = RUNNING.replace('"info"', '"debug"').replace('"fra1"', '"fra2"').replace("1.0", "0.25")


@pytest.mark.parametrize(("policy", "needles"), [
    ('[policy]\nignored_exits = ["BOGUS"]\n', ["policy.ignored_exits", "'BOGUS'"]),
    ('[policy]\nseverity = { save = "loud" }\n', ["policy.severity.save", "'loud'"]),
    ("[policy]\nignore_exits = []\n", ["unknown key 'ignore_exits'"]),
    ("[policy\n", ["not valid TOML"]),
])
def test_a_bad_policy_file_on_reload_changes_nothing(live: Live, policy: str,
                                                     needles: list[str]) -> None:
    running, writes = live.reloader.running, live.daemon.probes.writes  # type: ignore[attr-defined]
    lines = live.reload(CHANGED, policy)
    failed = lines[0]
    assert failed["level"] == "error" and failed["kept"] == "the running configuration"
    assert str(live.policy_file) in failed["reason"], failed
    for needle in needles:
        assert needle in failed["reason"], failed
    unchanged(live, lines, running)
    assert live.daemon.probes.writes == writes  # type: ignore[attr-defined]


def test_a_bad_config_file_on_reload_changes_nothing(live: Live) -> None:
    running = live.reloader.running
    lines = live.reload(CHANGED + "[metrics]\nper_vcpu = \"yes\"\n",
                        '[policy]\nignored_exits = ["KVM_EXIT_IO"]\n')
    assert str(live.config) in lines[0]["reason"] and "metrics.per_vcpu" in lines[0]["reason"]
    unchanged(live, lines, running)


def test_an_unexpected_error_while_applying_is_logged_not_raised(
        live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    # A bug past the validated steps (here: labels) must not end the daemon's loop.
    def broken(labels: dict[str, str]) -> None:
        raise KeyError("boom")

    monkeypatch.setattr(live.daemon, "set_labels", broken)
    running = live.reloader.running
    lines = live.reload(CHANGED)
    failed = lines[0]
    assert failed["event"] == "config_reload_failed" and failed["level"] == "error"
    assert failed["reason"] == "internal error: KeyError: 'boom'"
    assert "restart" in failed["kept"]
    assert live.reloader.running is running


def test_a_refused_map_update_is_undone_and_changes_nothing(live: Live) -> None:
    probes = live.daemon.probes
    probes.fail_at = {probes.writes + 3}  # type: ignore[attr-defined]  # mid-way through
    running = live.reloader.running
    lines = live.reload(CHANGED, '[policy]\nignored_exits = ["KVM_EXIT_IO"]\n')
    failed = lines[0]
    assert "writing the policy into the probes' map failed: OSError" in failed["reason"]
    assert failed["kept"] == "the running configuration"
    unchanged(live, lines, running)
    # the next reload, with the map working again, applies in full
    lines = live.reload(CHANGED, '[policy]\nignored_exits = ["KVM_EXIT_IO"]\n')
    assert events(lines) == ["config_reloaded", "probe_debug", "probe_info"]
    assert "KVM_EXIT_IO" not in live.map_and_tracker_agree()


def test_a_map_that_cannot_be_restored_says_so(live: Live) -> None:
    probes = live.daemon.probes
    first = probes.writes  # type: ignore[attr-defined]
    probes.fail_at = {first + 3, first + 4}  # type: ignore[attr-defined]  # update and undo
    lines = live.reload(CHANGED, '[policy]\nignored_exits = ["KVM_EXIT_IO"]\n')
    failed = lines[0]
    assert failed["event"] == "config_reload_failed"
    assert "and so did restoring the old one" in failed["reason"], failed
    assert "restart the daemon" in failed["kept"], failed


def test_reload_runs_only_when_requested_between_reloading_and_ready(
        live: Live, tmp_path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(2)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
        live.config.write_text(CHANGED)
        live.reloader.poll(live.daemon, notifier)  # no SIGHUP yet: nothing
        assert live.reloader.running.log_level == "info" and live.log() == []
        live.reloader.request()
        live.reloader.poll(live.daemon, notifier)
        assert events(live.log()) == ["config_reloaded"]
        assert sock.recv(4096).decode().startswith("RELOADING=1\n")
        assert sock.recv(4096).decode().startswith("READY=1\n")
        live.reloader.poll(live.daemon, notifier)  # one request, one reload
        assert live.log() == []
    finally:
        sock.close()


# ---- state directory and the single-instance lock -----------------------------------------------

def test_lock_creates_the_state_dir_and_writes_our_pid(tmp_path: Path) -> None:
    state = tmp_path / "a" / "state"
    lock = InstanceLock.acquire(state)
    try:
        assert (state / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        assert state.stat().st_mode & 0o777 == 0o700
    finally:
        lock.release()
    InstanceLock.acquire(state).release()  # free again once released


def test_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from tracer.instance import InstanceLock; "
         "InstanceLock.acquire(Path(sys.argv[1])); print('locked', flush=True); "
         "time.sleep(60)", str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(InstanceError) as info:
            InstanceLock.acquire(tmp_path)
        assert str(info.value) == (f"another kvm-completion-tracer is already running "
                                   f"(pid {holder.pid}, holding {tmp_path / LOCK_NAME})")
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 5
    while True:  # the kernel dropped the dead holder's lock
        try:
            InstanceLock.acquire(tmp_path).release()
            break
        except InstanceError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def _holder_process(state: Path, hold_s: float) -> subprocess.Popen[str]:
    """A real process holding the lock for ``hold_s`` seconds, then exiting."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from tracer.instance import InstanceLock; "
         "InstanceLock.acquire(Path(sys.argv[1])); print('locked', flush=True); "
         "time.sleep(float(sys.argv[2]))", str(state), str(hold_s)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
    return proc


def test_start_waits_for_a_holder_that_goes_and_says_so_once(tmp_path: Path) -> None:
    holder = _holder_process(tmp_path, 1.0)
    waits: list[tuple[str, Path, float]] = []
    try:
        t0 = time.monotonic()
        lock = InstanceLock.acquire(tmp_path, 5.0, lambda *a: waits.append(a))
        took = time.monotonic() - t0
        lock.release()
    finally:
        holder.kill()
        holder.wait()
    assert waits == [(str(holder.pid), tmp_path / LOCK_NAME, 5.0)]
    assert 0.5 < took < 4.0, took


def test_start_gives_up_after_the_wait_with_the_same_clear_line(tmp_path: Path) -> None:
    holder = _holder_process(tmp_path, 60)
    waits: list[object] = []
    try:
        t0 = time.monotonic()
        with pytest.raises(InstanceError) as info:
            InstanceLock.acquire(tmp_path, 0.5, lambda *a: waits.append(a))
        took = time.monotonic() - t0
    finally:
        holder.kill()
        holder.wait()
    assert str(info.value) == (f"another kvm-completion-tracer is already running (pid "
                               f"{holder.pid}, holding {tmp_path / LOCK_NAME}; waited 0.5 s "
                               "for it to exit)")
    assert len(waits) == 1 and 0.5 <= took < 2.0


def test_lock_wait_is_a_config_key_and_a_flag() -> None:
    assert Settings().lock_wait_s == 5.0
    assert KEYS["lock_wait_seconds"].parse(0) == 0.0
    with pytest.raises(ValueError):
        KEYS["lock_wait_seconds"].parse(-1)


def test_state_dir_that_is_a_file(tmp_path: Path) -> None:
    afile = tmp_path / "file"
    afile.write_text("")
    with pytest.raises(InstanceError, match="is not a directory"):
        InstanceLock.acquire(afile)
    with pytest.raises(InstanceError, match="cannot be created: Not a directory"):
        InstanceLock.acquire(afile / "sub")


def test_the_probe_cache_lives_under_the_state_dir_unless_set(tmp_path: Path) -> None:
    assert Settings(state_dir=Path("/srv")).daemon_options().probe_config.cache_dir == Path(
        "/srv/probe-cache")
    off = load_settings(write(tmp_path, '[probes]\ncache_dir = ""\n'), flags())
    assert off.daemon_options().probe_config.cache_dir is None
    there = load_settings(write(tmp_path, '[probes]\ncache_dir = "/var/tmp/c"\n'), flags())
    assert there.daemon_options().probe_config.cache_dir == Path("/var/tmp/c")
    assert "probes.cache_dir" in error(tmp_path, '[probes]\ncache_dir = "rel"\n')
