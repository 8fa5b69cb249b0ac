"""Copy what tracer.vmident and tracer.handover read of a live process into tests/unit/procfs.

    .venv/bin/python tests/capture_procfs.py qemu-guest   # start the recipe's VMM, capture, stop
    .venv/bin/python tests/capture_procfs.py pid PID      # a process started some other way

Copied, and nothing else: cmdline, comm, cgroup, stat, status, maps, every fd as a symlink to
what it points at, and per thread task/TID/{comm,stat,syscall,schedstat}. Never environ (it can
hold secrets) nor mem. The one rewrite: a cgroup path under this sandbox's own cgroup names the
sandbox, not the VM, and becomes ``/sandbox``. Records each capture in tests/unit/procfs/README.md
by hand (the date and the command printed here).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tracer.handover import threads_in_kvm_run

PROCFS = Path(__file__).resolve().parent / "unit" / "procfs"
FILES = ("cmdline", "comm", "cgroup", "stat", "status", "maps")
TASK_FILES = ("comm", "stat", "syscall", "schedstat")
SANDBOX_CGROUP = re.compile(r"/process_api/[0-9a-f]+")

# The command lines the fixtures come from (the forms tests/unit/test_vmident.py names), each
# with its number of vCPUs.
RECIPES: dict[str, tuple[int, list[str]]] = {
    # As QEMU is run by hand or by a script: guest= with ",," (a literal comma), an upper-case
    # -uuid, debug-threads=on (threads named "CPU n/KVM"), two vCPUs. (No "-cpu host": on
    # this PVM host QEMU 7.2 then aborts setting MSR 0x10a.)
    "qemu-guest": (2, ["qemu-system-x86_64", "-enable-kvm", "-name",
                   "guest=build,,ci,debug-threads=on",
                   "-uuid", "6E9B3F4A-1C2D-4E5F-8A9B-0C1D2E3F4A5B", "-machine", "q35",
                   "-smp", "2", "-m", "128", "-nodefaults", "-display", "none",
                   "-serial", "none", "-monitor", "none"]),
    # Proxmox's form on Debian's QEMU: /usr/bin/kvm (a symlink to qemu-system-x86_64, so comm
    # is "kvm"), the plain "-name NAME,debug-threads=on", the UUID only inside -smbios.
    # (Proxmox's own -id option is a Proxmox patch: Debian's QEMU refuses it; and no "enforce"
    # in -cpu: this host lacks some of kvm64's features.)
    "kvm-plain-name": (2, ["/usr/bin/kvm", "-name", "web01,debug-threads=on", "-no-shutdown",
                       "-smbios", "type=1,uuid=8d1b6f3e-2a4c-4e5d-9f60-7a8b9c0d1e2f",
                       "-smp", "2,sockets=1,cores=2,maxcpus=2", "-nodefaults",
                       "-cpu", "kvm64,+kvm_pv_eoi,+kvm_pv_unhalt", "-m", "128",
                       "-machine", "type=pc", "-display", "none", "-serial", "none",
                       "-monitor", "none"]),
    # The plainest form: "-name NAME" alone, no debug-threads (every thread is
    # "qemu-system-x86"), one vCPU, no -uuid.
    "qemu-plain-name": (1, ["qemu-system-x86_64", "-enable-kvm", "-name", "plain-vm", "-m", "64",
                            "-nodefaults", "-display", "none", "-serial", "none", "-monitor",
                            "none"]),
}


def _copy_file(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    if src.name == "cgroup":
        data = SANDBOX_CGROUP.sub("/sandbox", data.decode()).encode()
    dst.write_bytes(data)


def capture(pid: int, dest: Path = PROCFS) -> Path:
    """Copy /proc/PID into ``dest``/PID (replacing an earlier capture of that pid)."""
    src, out = Path(f"/proc/{pid}"), dest / str(pid)
    shutil.rmtree(out, ignore_errors=True)
    (out / "fd").mkdir(parents=True)
    for name in FILES:
        _copy_file(src / name, out / name)
    for fd in sorted(os.listdir(src / "fd"), key=int):
        try:
            os.symlink(os.readlink(src / "fd" / fd), out / "fd" / fd)
        except FileNotFoundError:
            continue  # closed since listdir
    for task in sorted(os.listdir(src / "task"), key=int):
        (out / "task" / task).mkdir(parents=True)
        for name in TASK_FILES:
            _copy_file(src / "task" / task / name, out / "task" / task / name)
    return out


def run_recipe(name: str) -> Path:
    vcpus, argv = RECIPES[name]
    with tempfile.TemporaryDirectory(prefix="kct-capture-") as tmp:
        log = Path(tmp) / "vmm.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT)
        try:
            # SeaBIOS past its option ROMs and halted: every vCPU thread asleep in KVM_RUN
            # (a thread caught running the guest shows "running": copy again).
            time.sleep(3)
            for _ in range(20):
                if proc.poll() is not None:
                    raise SystemExit(f"{argv[0]} exited: {log.read_text()}")
                out_dir = capture(proc.pid)
                if len(threads_in_kvm_run(proc.pid, PROCFS)) == vcpus:
                    break
                time.sleep(0.1)
            else:
                raise SystemExit("never caught every vCPU thread inside KVM_RUN")
        finally:
            proc.kill()
            proc.wait(timeout=10)
    print(f"captured pid {proc.pid} into {out_dir} on {time.strftime('%Y-%m-%d')} from:")
    print("  " + " ".join(argv))
    return out_dir


def main(args: list[str]) -> int:
    if len(args) == 2 and args[0] == "pid" and args[1].isdigit():
        print(f"captured into {capture(int(args[1]))}")
        return 0
    if len(args) == 1 and args[0] in RECIPES:
        run_recipe(args[0])
        return 0
    print(f"usage: capture_procfs.py {{{'|'.join(RECIPES)}}} | pid PID", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
