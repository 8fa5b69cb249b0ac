"""``kvm-completion-tracer run`` as a child process for end-to-end tests: JSON lines in a file,
its own state dir and metrics port (so it runs next to any other daemon), bounded waits."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from conftest import free_port

from tracer.vmm.report import ScenarioReport

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT_IDLE_S = 0.2


class DaemonProcess:
    """Started and ready on construction (killed again if it never gets ready).

    ``state_dir``: the daemon's state directory; a private temporary one (removed at the end)
    unless given, e.g. to hand over across a restart."""

    TEST_ARGS: tuple[str, ...] = ("run", "--log-format", "json", "--log-level", "debug",
                                  "--snapshot-idle", str(SNAPSHOT_IDLE_S))

    def __init__(self, *args: str, state_dir: Path | None = None,
                 base_args: Sequence[str] = TEST_ARGS, env: Mapping[str, str] | None = None,
                 preexec_fn: Callable[[], None] | None = None) -> None:
        """``python -m tracer`` with ``base_args`` (by default ``run`` as the tests want it),
        a private state dir and metrics port, then ``args``."""
        fd, out_name = tempfile.mkstemp(prefix="kct-daemon-", suffix=".jsonl")
        efd, err_name = tempfile.mkstemp(prefix="kct-daemon-", suffix=".err")
        self.out, self.err = Path(out_name), Path(err_name)
        self.own_state_dir = state_dir is None
        self.state_dir = state_dir or Path(tempfile.mkdtemp(prefix="kct-state-"))
        port = free_port()
        self.metrics_url = f"http://127.0.0.1:{port}/metrics"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tracer", *base_args, "--state-dir", str(self.state_dir),
             "--metrics-addr", f"127.0.0.1:{port}", *args],
            cwd=REPO, stdout=fd, stderr=efd, env=env, preexec_fn=preexec_fn)
        os.close(fd)
        os.close(efd)
        try:
            self.wait_for(lambda e: e["event"] == "ready", timeout_s=90)
        except BaseException:
            self.kill()
            raise

    def lines(self) -> list[dict[str, Any]]:
        text = self.out.read_text()
        complete = text[:text.rfind("\n") + 1]  # a line still being written is not parsed
        return [json.loads(raw) for raw in complete.splitlines()]  # every line must be JSON

    def wait_for(self, match: Callable[[dict[str, Any]], bool],
                 timeout_s: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.lines():
                if match(line):
                    return line
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: "
                                     f"{self.err.read_text()}")
            time.sleep(0.05)
        raise AssertionError("timed out waiting for the daemon")

    def settle(self, timeout_s: float = 30) -> None:
        """Until the daemon has printed nothing new for a while (ring drained, windows idle)."""
        seen, quiet_since = -1, time.monotonic()
        deadline = quiet_since + timeout_s
        while time.monotonic() - quiet_since < SNAPSHOT_IDLE_S + 0.4:
            assert time.monotonic() < deadline, "the daemon never went quiet"
            count = len(self.out.read_text())
            if count != seen:
                seen, quiet_since = count, time.monotonic()
            time.sleep(0.05)

    def for_pid(self, pid: int, event: str) -> list[dict[str, Any]]:
        return [e for e in self.lines() if e.get("event") == event and e.get("pid") == pid]

    def stop(self) -> int:
        """SIGTERM; the exit code. The JSON lines stay readable until :meth:`cleanup`."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        self._remove(keep_out=True)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._remove(keep_out=False)

    def cleanup(self) -> None:
        self.out.unlink(missing_ok=True)

    def _remove(self, keep_out: bool) -> None:
        self.err.unlink(missing_ok=True)
        if not keep_out:
            self.out.unlink(missing_ok=True)
        if self.own_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)


def run_vmm(scenario: str, iterations: int = 3, *extra: str) -> ScenarioReport:
    """Run a built-in VMM scenario (``python -m tracer.vmm``) to its end; its report."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "tracer.vmm", scenario, "--iterations",
                        str(iterations), "--report", str(path), *extra], cwd=REPO, check=True,
                       timeout=120)
        return ScenarioReport.from_json(path.read_text())
