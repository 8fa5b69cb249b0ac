"""Command line: ``run``, ``check``, ``selftest``. Every failure is one line and a non-zero exit."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tracer import __version__
from tracer.alerts import LEVELS, configure_logging
from tracer.policy import PolicyError, PolicyOverrides, build_policy, load_policy_file
from tracer.preflight import basic_checks, failures, trial_load

PROG = "kvm-completion-tracer"
EXIT_FAILURE = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A problem the operator must fix; printed as one line."""


def _policy_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("policy")
    group.add_argument("--policy", type=Path, metavar="FILE",
                       help="TOML file with a [policy] table (see README)")
    group.add_argument("--extra-pending-exit", action="append", default=[], metavar="EXIT",
                       help="also treat this exit reason as leaving a completion pending")
    group.add_argument("--ignore-exit", action="append", default=[], metavar="EXIT",
                       help="never treat this exit reason as pending")
    group.add_argument("--no-sanction", action="append", default=[], metavar="RULE",
                       help="report a sanctioned case anyway: port-0x7e, restore-after-pio")
    group.add_argument("--severity", action="append", default=[], metavar="KIND[:EXIT]=LEVEL",
                       help="override a severity, e.g. save:KVM_EXIT_MMIO=critical")
    group.add_argument("--arch", help="policy architecture (default: this host's)")


def _log_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=("auto", "json", "console"), default="auto",
                        help="JSON lines, or the console renderer (auto: console on a TTY)")
    parser.add_argument("--log-level", choices=LEVELS, default="info")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Catch vCPU state saves and "
                                     "restores during a pending KVM exit completion.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="trace every VM on this host (foreground)")
    _log_args(run)
    _policy_args(run)
    run.add_argument("--snapshot-idle", type=float, default=1.0, metavar="SECONDS",
                     help="report a snapshot after a window stays idle this long (default 1)")
    run.add_argument("--trace-exits", action="store_true",
                     help="debug: one event per exit and re-entry (costly)")
    run.add_argument("--ringbuf-pages", type=int, default=64, metavar="N",
                     help="ring buffer size in pages, a power of two (default 64)")
    run.add_argument("--max-vcpus", type=int, default=4096, metavar="N",
                     help="vCPUs tracked at once (BPF map size, default 4096)")

    check = sub.add_parser("check", help="preflight: what this host lacks, and how to fix it")
    check.add_argument("--no-load", action="store_true", help="skip the trial BPF load")

    selftest = sub.add_parser("selftest",
                              help="drive the built-in VMM under the live probes")
    _log_args(selftest)
    selftest.add_argument("--iterations", type=int, default=3, metavar="N")
    selftest.add_argument("--scenario", action="append", default=[], metavar="NAME",
                          help="run only these scenarios (default: all)")
    return parser


def _overrides(args: argparse.Namespace) -> PolicyOverrides:
    base = load_policy_file(args.policy) if args.policy else PolicyOverrides()
    severities = {}
    for item in args.severity:
        key, sep, value = item.partition("=")
        if not sep:
            raise PolicyError(f"--severity {item!r}: expected KIND[:EXIT]=LEVEL")
        severities[key] = value
    flags = PolicyOverrides(arch=args.arch, extra_pending_exits=args.extra_pending_exit,
                            ignored_exits=args.ignore_exit,
                            disabled_sanctions=args.no_sanction, severities=severities)
    return base.merged(flags)


def _require_host() -> None:
    missing = failures(basic_checks())
    if missing:
        first = missing[0]
        raise CliError(f"{first.name}: {first.detail}" + (f"; fix: {first.fix}"
                                                          if first.fix else ""))


def cmd_run(args: argparse.Namespace) -> int:
    from tracer.daemon import DaemonOptions, run
    from tracer.probes import ProbeConfig

    policy = build_policy(_overrides(args))
    if args.ringbuf_pages < 1 or args.ringbuf_pages & (args.ringbuf_pages - 1):
        raise CliError(f"--ringbuf-pages {args.ringbuf_pages}: must be a power of two")
    if not 1 <= args.max_vcpus <= 1 << 20:
        raise CliError(f"--max-vcpus {args.max_vcpus}: must be between 1 and 1048576")
    if args.snapshot_idle <= 0:
        raise CliError("--snapshot-idle must be positive")
    _require_host()
    configure_logging(args.log_format, args.log_level)
    config = ProbeConfig(max_vcpus=args.max_vcpus, max_vcpu_fds=4 * args.max_vcpus,
                         ringbuf_pages=args.ringbuf_pages, trace_exits=args.trace_exits)
    return run(DaemonOptions(policy=policy, probe_config=config,
                             snapshot_idle_s=args.snapshot_idle))


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

    _require_host()
    configure_logging(args.log_format, args.log_level)
    return run_selftest(args.iterations, args.scenario)


COMMANDS = {"run": cmd_run, "check": cmd_check, "selftest": cmd_selftest}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (CliError, PolicyError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_USAGE if isinstance(err, PolicyError) else EXIT_FAILURE
    except KeyboardInterrupt:
        return 0
    except Exception as err:  # last resort: one line, no traceback, but say what it was
        from tracer.probes import ProbeError

        if isinstance(err, ProbeError):
            print(f"{PROG}: error: {err}", file=sys.stderr)
        else:
            print(f"{PROG}: error: unexpected {type(err).__name__}: {err} (please report this)",
                  file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
