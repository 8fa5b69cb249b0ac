"""deploy/systemd/kvm-completion-tracer.service: ``systemd-analyze verify`` accepts it, and it
keeps the settings the daemon relies on (notify, watchdog, reload by SIGHUP, sandboxing).

Needs neither KVM nor BPF, only systemd-analyze: skipped without it, which fails a CI=true run
(tests/conftest.py), since scripts/setup-host.sh installs it there.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "kvm-completion-tracer.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_unit_file_verifies(tmp_path: Path) -> None:
    # The installed ExecStart (/usr/local/bin/...) need not exist here: verify a copy that points
    # at this checkout's entry point instead, otherwise unchanged.
    text = UNIT.read_text()
    exec_start = re.search(r"^ExecStart=(\S+)", text, re.M)
    assert exec_start is not None
    assert exec_start.group(1) == "/usr/local/bin/kvm-completion-tracer"
    entry = Path(sys.executable).parent / "kvm-completion-tracer"
    assert entry.exists(), entry
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(exec_start.group(1), str(entry)))
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)],
                          capture_output=True, text=True, timeout=60)
    problems = [line for line in (done.stdout + done.stderr).splitlines()
                if str(copy) in line or UNIT.name in line]
    assert done.returncode == 0 and not problems, done
    for key in ("Type=notify", "NotifyAccess=main", "WatchdogSec=30", "Restart=on-failure",
                "ExecReload=/bin/kill -HUP $MAINPID", "StateDirectory=kvm-completion-tracer",
                "ConfigurationDirectory=kvm-completion-tracer", "ProtectSystem=strict",
                "NoNewPrivileges=yes", "CapabilityBoundingSet=", "SystemCallFilter="):
        assert re.search(rf"^{re.escape(key)}", text, re.M), key
