"""``python -m tracer.vmm SCENARIO``: run one VMM scenario on /dev/kvm and write its report.

Exit status: 0 done; 1 the VMM failed (KVM misbehaved); 2 usage error; 3 no usable /dev/kvm.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tracer.vmm.kvm import KvmUnavailableError, VmmError
from tracer.vmm.scenarios import SCENARIOS, describe, run_scenario, set_gate

EXIT_VMM_FAILED = 1
EXIT_NO_KVM = 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tracer.vmm",
        description="Run a KVM VMM scenario (correct or buggy completion handling) and report "
        "the save/restore ioctls a tracer must flag.",
    )
    p.add_argument("scenario", nargs="?", choices=sorted(SCENARIOS), metavar="SCENARIO",
                   help="scenario name (see --list)")
    p.add_argument("--list", action="store_true", help="list scenarios and exit")
    p.add_argument("--iterations", type=int, default=None,
                   help="exits per vCPU (default: the scenario's own)")
    p.add_argument("--vms", type=int, default=2, help="VMs for 'multi' (default 2)")
    p.add_argument("--vcpus", type=int, default=2, help="vCPUs per VM for 'multi' (default 2)")
    p.add_argument("--start-delay", type=float, default=0.0, metavar="SECONDS",
                   help="sleep before opening /dev/kvm (lets a watcher attach to the pid)")
    p.add_argument("--hold-before-exit", type=float, default=0.0, metavar="SECONDS",
                   help="after writing the report, stay alive this long before exiting")
    p.add_argument("--gate", metavar="FILE", type=Path,
                   help="after the first vCPU exists, touch FILE.ready and wait for FILE")
    p.add_argument("--report", metavar="FILE", help="write the JSON report here (default stdout)")
    p.add_argument("--no-logs", action="store_true",
                   help="leave ioctl_log and run_log out of the report (large for loop-io)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list:
        width = max(map(len, SCENARIOS))
        for name in SCENARIOS:
            print(f"{name:<{width}}  {describe(name)}")
        return 0
    if args.scenario is None:
        parser.error("a SCENARIO (or --list) is required")
    if args.iterations is not None and args.iterations < 1:
        parser.error("--iterations must be at least 1")
    if args.start_delay > 0:
        time.sleep(args.start_delay)
    if args.gate is not None:
        set_gate(args.gate)
    try:
        report = run_scenario(args.scenario, args.iterations, vms=args.vms, vcpus=args.vcpus)
    except KvmUnavailableError as err:
        print(f"tracer.vmm: KVM unavailable: {err}", file=sys.stderr)
        return EXIT_NO_KVM
    except (VmmError, OSError, ValueError) as err:
        print(f"tracer.vmm: {args.scenario} failed: {err}", file=sys.stderr)
        return EXIT_VMM_FAILED
    text = report.to_json(with_logs=not args.no_logs)
    if args.report:
        try:
            with open(args.report, "w", encoding="utf-8") as out:
                out.write(text + "\n")
        except OSError as err:
            print(f"tracer.vmm: cannot write {args.report}: {err.strerror}", file=sys.stderr)
            return EXIT_VMM_FAILED
    else:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    if args.hold_before_exit > 0:
        time.sleep(args.hold_before_exit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
