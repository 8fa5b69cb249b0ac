"""Command line: ``run``, ``check``, ``selftest``. Every failure is one line and a non-zero exit."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tracer import __version__
from tracer.alerts import LEVELS, configure_logging
from tracer.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    FlagOverrides,
    flag_value,
    label_flag,
    load_settings,
)
from tracer.instance import InstanceError, InstanceLock
from tracer.metrics import DEFAULT_METRICS_PORT, MetricsConfigError
from tracer.policy import PolicyError, PolicyOverrides, build_policy
from tracer.preflight import basic_checks, failures, trial_load
from tracer.syscall_abi import SYSCALL_PROBE_KINDS

if TYPE_CHECKING:
    from tracer.gate_ci import CiOptions

PROG = "kvm-completion-tracer"
EXIT_FAILURE = 1
EXIT_USAGE = 2
# watch's exit statuses (also in docs/ci.md); a sanitizer-like code apart from test failures
EXIT_FINDINGS = 66
EXIT_INCONCLUSIVE = 65
EXIT_CANNOT_RUN = 127


class CliError(Exception):
    """A problem the operator must fix; printed as one line."""


class UsageError(CliError):
    """A malformed command line (exit 2)."""


def _policy_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("policy")
    group.add_argument("--policy", type=Path, metavar="FILE",
                       help="TOML file with a [policy] table (see docs/policy.md)")
    group.add_argument("--extra-pending-exit", action="append", default=[], metavar="EXIT",
                       help="also treat this exit reason as leaving a completion pending")
    group.add_argument("--ignore-exit", action="append", default=[], metavar="EXIT",
                       help="never treat this exit reason as pending")
    group.add_argument("--no-sanction", action="append", default=[], metavar="RULE",
                       help="report a sanctioned case anyway: port-0x7e, restore-after-pio")
    group.add_argument("--severity", action="append", default=[], metavar="KIND[:EXIT]=LEVEL",
                       help="override a severity, e.g. save:KVM_EXIT_MMIO=critical")
    group.add_argument("--arch", help="policy architecture (default: this host's)")
    group.add_argument("--inspection", choices=("benign", "violation"), default=None,
                       help="a register peek (KVM_GET_REGS) whose exit is then completed with "
                            "nothing else read or written: benign (default: counted, not "
                            "alerted) or violation (strict: alerted at once)")


def _pipeline_args(parser: argparse.ArgumentParser) -> None:
    """What ``run`` and ``watch`` share: the config file, logging, policy, probes."""
    # Defaults of None: only the flags actually passed override the config file.
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help=f"TOML config file (default {DEFAULT_CONFIG_PATH}, if it exists)")
    _log_args(parser, from_config=True)
    _policy_args(parser)
    parser.add_argument("--snapshot-idle", type=float, default=None, metavar="SECONDS",
                        help="judge a window after it stays idle this long (default 1)")
    parser.add_argument("--trace-exits", action="store_true", default=None,
                        help="debug: one event per exit and re-entry (costly)")
    parser.add_argument("--syscall-probes", choices=SYSCALL_PROBE_KINDS, default=None,
                        help="classic (default): the per-syscall tracepoints; raw: "
                             "raw_syscalls sys_enter/sys_exit (x86-64; cheaper per exit, "
                             "dearer for every other syscall)")
    parser.add_argument("--ringbuf-pages", type=int, default=None, metavar="N",
                        help="ring buffer size in pages, a power of two (default 64; watch: "
                             "16384, 64 MiB)")
    parser.add_argument("--max-vcpus", type=int, default=None, metavar="N",
                        help="vCPUs tracked at once (sizes the per-vCPU, fd, thread and "
                             "process maps, default 4096)")
    parser.add_argument("--pending-time-sample", dest="pending_sample", type=int, default=None,
                        metavar="N", help="the pending-time histogram times one completed "
                        "window in N (a power of two, default 16; 1: every window, two clock "
                        "reads more per exit)")
    parser.add_argument("--probe-cache", dest="cache_dir", default=None, metavar="DIR",
                        help="keep the compiled probes here and load them at the next start "
                        "instead of compiling (default STATE_DIR/probe-cache; '' turns it off)")
    parser.add_argument("--no-guest-exits", dest="guest_exits", action="store_const",
                        const=False, default=None, help="do not count guest exits "
                        "(kvm:kvm_exit/kvm_entry: one program run per guest exit on hardware "
                        "KVM)")
    parser.add_argument("--no-stacks", dest="stacks", action="store_const", const=False,
                        default=None, help="no user-space stack in the alerts")


def _log_args(parser: argparse.ArgumentParser, from_config: bool = False) -> None:
    # run: None means "not passed", so the config file's [log] keys apply.
    parser.add_argument("--log-format", choices=("auto", "json", "console"),
                        default=None if from_config else "auto",
                        help="JSON lines, or the console renderer (auto: console on a TTY)")
    parser.add_argument("--log-level", choices=LEVELS, default=None if from_config else "info")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Catch vCPU state saves and "
                                     "restores during a pending KVM exit completion.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="trace every VM on this host (foreground)")
    _pipeline_args(run)
    metrics = run.add_mutually_exclusive_group()
    metrics.add_argument("--metrics-addr", metavar="HOST:PORT",
                         help="Prometheus exporter address ([::1]:PORT for IPv6)")
    metrics.add_argument("--no-metrics", action="store_true", default=None,
                         help="no Prometheus exporter")
    run.add_argument("--metrics-per-vcpu", action=argparse.BooleanOptionalAction, default=None,
                     help="per-vCPU metric series (capped by metrics.max_vcpu_series)")
    run.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                     help="static label on every alert and metric (repeatable)")
    run.add_argument("--state-dir", metavar="DIR",
                     help="state directory holding the instance lock "
                          "(default /var/lib/kvm-completion-tracer)")
    run.add_argument("--lock-wait", type=float, default=None, metavar="SECONDS",
                     help="at start-up, wait this long for a previous instance that is still "
                          "exiting to release the lock (default 5)")

    watch = sub.add_parser(
        "watch", help="run CMD under the probes and fail on a completion race (a CI gate)",
        usage=f"{PROG} watch [OPTIONS] -- CMD [ARGS...]",
        description="Run CMD with the probes attached, following CMD and every process it "
                    "forks; at its end print a report of every completion race to stderr. "
                    f"Exit status: CMD's own when nothing failed the gate, {EXIT_FINDINGS} "
                    "(--error-exitcode) when a finding did, "
                    f"{EXIT_INCONCLUSIVE} when findings are unverified (counted by the kernel, "
                    "their reports lost) or a map was full (no 'no race' claim without "
                    f"--allow-lost), {EXIT_CANNOT_RUN} when CMD could not be started.")
    _pipeline_args(watch)
    watch.add_argument("--fail-on", choices=("warning", "error", "critical", "snapshot"),
                       default="warning", help="what fails the gate: findings of this severity "
                       "or worse, or only snapshots and critical restores (default: warning)")
    watch.add_argument("--error-exitcode", type=int, default=EXIT_FINDINGS, metavar="N",
                       help=f"exit status when a finding fails the gate (default {EXIT_FINDINGS})")
    watch.add_argument("--allow-lost", action="store_true",
                       help="pass the gate even with unverified findings (their events "
                            "lost) or maps full")
    watch.add_argument("--reader-nice", type=int, default=None, metavar="N",
                       help="nice value of the thread reading the ring buffer once CMD runs "
                            "(default -10: keeps up when a test suite saturates every core; "
                            "0 leaves it alone)")
    watch.add_argument("--junit", type=Path, metavar="FILE",
                       help="JUnit XML report: one testcase per finding")
    watch.add_argument("--json", type=Path, metavar="FILE", help="the whole result as JSON")
    watch.add_argument("--log-file", type=Path, metavar="FILE",
                       help="every alert and notice as JSON lines (default: none)")
    _ci_args(watch)
    # dest "cmd": "command" is the subcommand's own dest
    watch.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")

    check = sub.add_parser("check", help="preflight: what this host lacks, and how to fix it")
    check.add_argument("--no-load", action="store_true", help="skip the trial BPF load")

    selftest = sub.add_parser("selftest",
                              help="drive the built-in VMM under the live probes")
    _log_args(selftest)
    selftest.add_argument("--iterations", type=int, default=3, metavar="N")
    selftest.add_argument("--metrics-addr", default=f"127.0.0.1:{DEFAULT_METRICS_PORT}",
                          metavar="HOST:PORT", help="serve metrics meanwhile (default: the "
                          "daemon's default address; skipped with a note if it is taken)")
    selftest.add_argument("--no-metrics", action="store_true", help="no exporter")
    selftest.add_argument("--linger", type=float, default=0.0, metavar="SECONDS",
                          help="keep serving metrics this long after the scenarios")
    selftest.add_argument("--scenario", action="append", default=[], metavar="NAME",
                          help="run only these scenarios (default: all)")
    return parser


def _ci_args(parser: argparse.ArgumentParser) -> None:
    """watch's CI adoption flags (tracer.gate_ci; docs/ci-adoption.md)."""
    group = parser.add_argument_group("CI adoption")
    group.add_argument("--suppressions", action="append", type=Path, default=[], metavar="FILE",
                       help="TOML file of [[suppress]] entries: races not reported and not "
                            "failing the gate (repeatable; also the config file's "
                            "suppressions list)")
    group.add_argument("--gen-suppressions", nargs="?", const="-", default=None, metavar="FILE",
                       help="write a [[suppress]] entry matching exactly each finding to FILE "
                            "(without FILE: to stderr after the report)")
    group.add_argument("--sarif", type=Path, metavar="FILE",
                       help="SARIF 2.1.0 results (GitHub code scanning, GitLab, IDEs)")
    group.add_argument("--source-root", type=Path, metavar="DIR",
                       help="paths in --sarif and --annotate are relative to it (default: the "
                            "working directory)")
    group.add_argument("--annotate", action="append", default=[], metavar="FORMAT",
                       help="github: workflow commands on stdout after CMD exited; "
                            "gitlab=FILE: GitLab Code Quality JSON (repeatable)")


def _ci_options(args: argparse.Namespace, config_files: Sequence[Path]) -> CiOptions:
    from tracer.gate_ci import CiOptions
    from tracer.suppressions import SuppressionError, load_files

    github, gitlab = False, None
    for item in args.annotate:
        name, sep, target = item.partition("=")
        if name == "github" and not sep:
            github = True
        elif name == "gitlab" and target:
            gitlab = Path(target)
        elif name == "gitlab":
            raise UsageError("--annotate gitlab needs a file: --annotate "
                             "gitlab=gl-code-quality-report.json")
        else:
            raise UsageError(f"--annotate {item!r}: expected github or gitlab=FILE")
    if args.source_root is not None and not args.source_root.is_dir():
        raise UsageError(f"--source-root {args.source_root}: not a directory")
    files = (*config_files, *args.suppressions)
    try:
        entries = load_files(files)
    except SuppressionError as err:
        raise UsageError(str(err)) from None
    return CiOptions(suppressions=tuple(entries), suppression_files=tuple(files),
                     gen_suppressions=args.gen_suppressions, sarif=args.sarif,
                     source_root=args.source_root, annotate_github=github, gitlab=gitlab)


def _checked_policy_flag(flag: str, value: str, overrides: PolicyOverrides) -> None:
    """Build the policy of one flag alone, so that an error names that flag."""
    try:
        build_policy(overrides)
    except PolicyError as err:
        raise PolicyError(f"{flag} {value}: {err}") from None


def _policy_flags(args: argparse.Namespace) -> PolicyOverrides:
    severities = {}
    for item in args.severity:
        key, sep, value = item.partition("=")
        if not sep:
            raise PolicyError(f"--severity {item!r}: expected KIND[:EXIT]=LEVEL")
        _checked_policy_flag("--severity", item, PolicyOverrides(severities={key: value}))
        severities[key] = value
    for flag, item, alone in (
            *(("--extra-pending-exit", v, PolicyOverrides(extra_pending_exits=[v]))
              for v in args.extra_pending_exit),
            *(("--ignore-exit", v, PolicyOverrides(ignored_exits=[v])) for v in args.ignore_exit),
            *(("--no-sanction", v, PolicyOverrides(disabled_sanctions=[v]))
              for v in args.no_sanction)):
        _checked_policy_flag(flag, item, alone)
    return PolicyOverrides(arch=args.arch, extra_pending_exits=args.extra_pending_exit,
                           ignored_exits=args.ignore_exit, disabled_sanctions=args.no_sanction,
                           severities=severities, inspection=args.inspection)


# flag (argparse dest) -> config key; the flag's value is checked by that key's rules.
_FLAG_KEYS = {"log_level": ("--log-level", "log.level"),
              "log_format": ("--log-format", "log.format"),
              "snapshot_idle": ("--snapshot-idle", "snapshot_idle_seconds"),
              "trace_exits": ("--trace-exits", "probes.trace_exits"),
              "ringbuf_pages": ("--ringbuf-pages", "probes.ringbuf_pages"),
              "syscall_probes": ("--syscall-probes", "probes.syscall_probes"),
              "max_vcpus": ("--max-vcpus", "probes.max_vcpus"),
              "pending_sample": ("--pending-time-sample", "probes.pending_time_sample"),
              "cache_dir": ("--probe-cache", "probes.cache_dir"),
              "guest_exits": ("--no-guest-exits", "probes.guest_exits"),
              "stacks": ("--no-stacks", "probes.stacks"),
              "metrics_addr": ("--metrics-addr", "metrics.addr"),
              "metrics_per_vcpu": ("--metrics-per-vcpu", "metrics.per_vcpu"),
              "state_dir": ("--state-dir", "state_dir"),
              "lock_wait": ("--lock-wait", "lock_wait_seconds")}


def _metrics_addr_flag(raw: str) -> str:
    """``--metrics-addr`` (run and selftest): HOST:PORT by the metrics.addr key's rules, but
    never "" (the config file's way to disable the exporter; the flag's is --no-metrics)."""
    addr = flag_value("--metrics-addr", raw, "metrics.addr") if raw else None
    if not isinstance(addr, str):
        raise ConfigError("--metrics-addr '': expected HOST:PORT (use --no-metrics to disable "
                          "the exporter)")
    return addr


def _flag_overrides(args: argparse.Namespace) -> FlagOverrides:
    values: dict[str, object] = {}
    for dest, (flag, key) in _FLAG_KEYS.items():
        raw = getattr(args, dest, None)  # watch has no metrics or state-dir flags
        if raw is not None:
            values[key] = (_metrics_addr_flag(raw) if dest == "metrics_addr"
                           else flag_value(flag, raw, key))
    if getattr(args, "no_metrics", None):
        values["metrics.addr"] = None
    labels = dict(label_flag(item) for item in getattr(args, "label", []))
    return FlagOverrides(values=values, labels=labels, policy_file=args.policy,
                         policy=_policy_flags(args))


def _require_host() -> None:
    missing = failures(basic_checks())
    if missing:
        first = missing[0]
        raise CliError(f"{first.name}: {first.detail}" + (f"; fix: {first.fix}"
                                                          if first.fix else ""))


def _say_lock_wait(holder: str, path: Path, wait_s: float) -> None:
    import structlog

    structlog.get_logger().warning(
        "waiting_for_lock", holder_pid=holder, lock=str(path), wait_s=wait_s,
        hint="a previous kvm-completion-tracer is still exiting (or running: then stop it)")


def cmd_run(args: argparse.Namespace) -> int:
    from tracer.daemon import run
    from tracer.reload import Reloader

    flags = _flag_overrides(args)
    path = args.config or DEFAULT_CONFIG_PATH
    settings = load_settings(path, args.config is not None, flags)
    options = settings.daemon_options()  # builds (and so validates) the merged policy
    _require_host()
    configure_logging(settings.log_format, settings.log_level)
    # before the probes load; a killed predecessor holds it until its programs are torn down
    lock = InstanceLock.acquire(settings.state_dir, settings.lock_wait_s, _say_lock_wait)
    try:
        return run(options, Reloader(path, args.config is not None, flags, settings))
    finally:
        lock.release()


def _reader_nice(value: int) -> int:
    if not -20 <= value <= 19:
        raise UsageError(f"--reader-nice {value}: expected -20..19")
    return value


def cmd_watch(args: argparse.Namespace) -> int:
    from tracer.alerts import LogSink
    from tracer.watch import WatchOptions, pid_namespace_error, watch

    command = list(args.cmd)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise UsageError("watch: no command given (usage: kvm-completion-tracer watch "
                         "[OPTIONS] -- CMD [ARGS...])")
    if not 1 <= args.error_exitcode <= 255:
        raise UsageError(f"--error-exitcode {args.error_exitcode}: expected 1..255")
    flags = _flag_overrides(args)
    path = args.config or DEFAULT_CONFIG_PATH
    settings = load_settings(path, args.config is not None, flags)
    options = settings.daemon_options()
    ci = _ci_options(args, settings.suppressions)
    _require_host()
    problem = pid_namespace_error()
    if problem is not None:
        raise CliError(problem)
    # CMD owns stdout and stderr: our lines go to --log-file, or (errors only) to stderr.
    if args.log_file is not None:
        try:
            stream = args.log_file.open("a", encoding="utf-8")
        except OSError as err:
            raise CliError(f"--log-file {args.log_file}: {err.strerror}") from None
        configure_logging("json", settings.log_level, stream)
    else:
        configure_logging("auto", "error", sys.stderr)
    gate = WatchOptions(command=command, fail_on=args.fail_on,
                        error_exitcode=args.error_exitcode, allow_lost=args.allow_lost,
                        junit=args.junit, json=args.json,
                        log_alerts=args.log_file is not None, ci=ci,
                        ringbuf_pages=(None if args.ringbuf_pages is None
                                       else options.probe_config.ringbuf_pages),
                        **({} if args.reader_nice is None
                           else {"reader_nice": _reader_nice(args.reader_nice)}))
    return watch(options, gate, LogSink())


def cmd_check(args: argparse.Namespace) -> int:
    results = basic_checks()
    if not args.no_load and not failures(results):
        def _load() -> None:
            from tracer.probes import Probes

            Probes(build_policy()).close()

        results.append(trial_load(_load))
    for result in results:
        print(result.line())
    bad = failures(results)
    print(f"{len(results) - len(bad)} ok, {len(bad)} failed" if bad else "all checks passed")
    return EXIT_FAILURE if bad else 0


def cmd_selftest(args: argparse.Namespace) -> int:
    from tracer.selftest import run_selftest

    # A malformed address is the operator's error (named before any host check), not a skipped
    # feature like a taken port.
    addr = None if args.no_metrics else _metrics_addr_flag(args.metrics_addr)
    _require_host()
    configure_logging(args.log_format, args.log_level)
    return run_selftest(args.iterations, args.scenario, addr, args.linger)


COMMANDS = {"run": cmd_run, "watch": cmd_watch, "check": cmd_check,
            "selftest": cmd_selftest}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (CliError, PolicyError, ConfigError, InstanceError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return (EXIT_USAGE if isinstance(err, PolicyError | ConfigError | UsageError)
                else EXIT_FAILURE)
    except KeyboardInterrupt:
        return 0
    except Exception as err:  # last resort: one line, no traceback, but say what it was
        from tracer.probes import ProbeError

        if isinstance(err, ProbeError | MetricsConfigError):
            print(f"{PROG}: error: {err}", file=sys.stderr)
        else:
            print(f"{PROG}: error: unexpected {type(err).__name__}: {err} (please report this)",
                  file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
