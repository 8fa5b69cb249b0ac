"""The container image: built from the Dockerfile by scripts/build-image.sh (`make image`), then
run with docs/deploy.md's capabilities and mounts (tests/unit/test_container.py's CAPABILITIES
and REQUIRED_MOUNTS, the single source the Dockerfile, docs/deploy.md and DaemonSet are checked
against).

Run with ``buildah run --isolation chroot`` (``podman run`` cannot start a container on every
test machine: crun's setrlimit is refused in some VMs).  What it can and cannot apply:

- capabilities: exactly the four.  ``--cap-drop ALL`` is not usable: buildah 1.28 applies it after
  ``--cap-add`` (nothing is left), so the default set is dropped by name instead.
- seccomp: the Docker >= 23 rule (``bpf`` with CAP_BPF, ``perf_event_open`` with CAP_PERFMON),
  through ``buildah from --security-opt seccomp=FILE`` (``buildah run`` has no --security-opt,
  and containers.conf's ``seccomp_profile`` is ignored by it).  The profile is
  /usr/share/containers/seccomp.json with only those two syscalls changed: its own rules let
  them through only with CAP_SYS_ADMIN (docs/deploy.md "Container"); Debian 12's in one rule naming
  both, Debian 13's in rules naming either with other syscalls, and with the Docker rule too.
- ``--pid host``, ``--network host``: applied.  AppArmor: buildah's chroot isolation applies no
  profile (docs/deploy.md's apparmor=unconfined).
- read-only root filesystem (``--read-only --tmpfs /tmp``): ``buildah run`` cannot apply it
  (it creates /run/.containerenv in the root at every run, and fails on a root remounted
  read-only). The last test shows the same from the container's overlay upper layer instead:
  after ``check``, ``selftest`` and the daemon ran, it holds nothing but the empty mount points
  buildah made; /tmp is a volume, as the tmpfs (and the DaemonSet's emptyDir) is.
- HEALTHCHECK: ``buildah run`` does not run it; the image's HEALTHCHECK command is run inside
  the container by hand, against the running daemon.
- ``docker run IMAGE --help`` is the entrypoint (``kvm-completion-tracer run``) plus
  ``--help``; ``docker exec ... kvm-completion-tracer check`` the command itself.
- ``/dev/kvm`` is mounted only for ``selftest`` (its buggy VMMs run inside); the daemon
  container has none, as documented.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "scripts" / "build-image.sh"
IMAGE = "localhost/kvm-completion-tracer:latest"
PORT = 19131  # the daemon's metrics port in the container (host network)
SELFTEST_PORT = 19132
# buildah 1.28's default capabilities (containers.conf default_capabilities), dropped by name.
BUILDAH_DEFAULT_CAPS = (
    "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "NET_BIND_SERVICE", "SETFCAP",
    "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
)

pytestmark = pytest.mark.kvm_bpf


def _container_checks() -> ModuleType:
    path = ROOT / "tests" / "unit" / "test_container.py"
    spec = importlib.util.spec_from_file_location("container_checks", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CHECKS = _container_checks()


def _engine() -> str | None:
    result = subprocess.run(["bash", str(BUILD), "--which-engine"], capture_output=True,
                            text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def _seccomp_profile(dest: Path) -> Path:
    profile = json.loads(Path("/usr/share/containers/seccomp.json").read_text())
    ours = ("bpf", "perf_event_open")
    rules = []
    for rule in profile["syscalls"]:
        if rule["action"] == "SCMP_ACT_ERRNO" and set(ours) & set(rule["names"]):
            # Every refusal of the two, whatever else the rule names (errno rules only refuse).
            rule = copy.deepcopy(rule)
            rule["names"] = [n for n in rule["names"] if n not in ours]
            if not rule["names"]:
                continue
        elif rule["action"] == "SCMP_ACT_ALLOW" and rule["names"] in (["bpf"],
                                                                        ["perf_event_open"]):
            continue  # the Docker rule, already there (Debian 13): added once below
        rules.append(rule)
    rules.append({"names": ["bpf"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_BPF"]}})
    rules.append({"names": ["perf_event_open"], "action": "SCMP_ACT_ALLOW",
                  "includes": {"caps": ["CAP_PERFMON"]}})
    profile["syscalls"] = rules
    dest.write_text(json.dumps(profile))
    return dest


def _buildah_raises_limits_it_may_not() -> bool:
    status = Path("/proc/self/status").read_text()
    (caps,) = [int(line.split()[1], 16) for line in status.splitlines()
               if line.startswith("CapEff:")]
    cap_sys_resource = 24
    out = subprocess.run(["buildah", "--version"], capture_output=True, text=True,
                         check=False).stdout.split()
    version = tuple(int(p) for p in out[2].split(".")[:2]) if len(out) > 2 else (0, 0)
    return not caps >> cap_sys_resource & 1 and version > (1, 28)


# buildah re-executes itself before it starts the container's command: containers/storage's
# unshare copies /proc/self/exe into a memfd and seals it, and the kernel refuses the seal with
# EBUSY while another CPU still holds a transient reference to one of the copy's pages (seen
# once in about ten suite runs on a loaded 2-CPU host). The command never ran: nothing of ours
# was tested, so that one failure of buildah's start is run again; anything else is a result.
REEXEC_ATTEMPTS = 3
REEXEC_TRANSIENT = "sealing memfd copy: Device or resource busy"


def _reexec_failed(done: subprocess.CompletedProcess[str]) -> bool:
    return done.returncode != 0 and not done.stdout and REEXEC_TRANSIENT in done.stderr


class Container:
    def __init__(self, work: Path) -> None:
        self.state = work / "state"
        self.state.mkdir()
        self.tmp = work / "tmp"  # the --tmpfs /tmp of docs/deploy.md's run line
        self.tmp.mkdir()
        seccomp = _seccomp_profile(work / "seccomp.json")
        # This process's limits where buildah would raise them and may not (the rule of
        # scripts/build-image.sh: buildah newer than 1.28, no CAP_SYS_RESOURCE).
        limits = [f"--ulimit={name}={':'.join(map(str, resource.getrlimit(which)))}"
                  for name, which in (("nproc", resource.RLIMIT_NPROC),
                                      ("nofile", resource.RLIMIT_NOFILE))
                  ] if _buildah_raises_limits_it_may_not() else []
        self.id = subprocess.run(
            ["buildah", "from", "--pull=never", "--security-opt", f"seccomp={seccomp}", *limits,
             IMAGE], capture_output=True, text=True, check=True).stdout.strip()

    def argv(self, *cmd: str, kvm: bool = False, env: tuple[str, ...] = ()) -> list[str]:
        argv = ["buildah", "run", *(f"--env={e}" for e in env), "--isolation", "chroot",
                "--pid", "host", "--network", "host",
                "--cap-drop", ",".join(f"CAP_{c}" for c in BUILDAH_DEFAULT_CAPS),
                "--cap-add", ",".join(f"CAP_{c}" for c in sorted(CHECKS.CAPABILITIES))]
        for host, inside, opts in sorted(CHECKS.REQUIRED_MOUNTS):
            if host == "/var/lib/kvm-completion-tracer":
                host = str(self.state)  # this test's, not the host's (a daemon may run there)
            argv += ["-v", f"{host}:{inside}" + (f":{opts}" if opts else "")]
        argv += ["-v", f"{self.tmp}:/tmp"]
        if kvm:
            argv += ["-v", "/dev/kvm:/dev/kvm"]
        return [*argv, self.id, "--", *cmd]

    def run(self, *cmd: str, kvm: bool = False, timeout: float = 300,
            env: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        for _ in range(REEXEC_ATTEMPTS):
            done = subprocess.run(self.argv(*cmd, kvm=kvm, env=env), capture_output=True,
                                  text=True, timeout=timeout, check=False)
            if not _reexec_failed(done):
                break
        return done

    def remove(self) -> None:
        subprocess.run(["buildah", "rm", self.id], capture_output=True, check=False)


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    engine = _engine()
    if engine is None:
        pytest.skip("no container engine (docker daemon, podman or buildah): "
                    "scripts/setup-host.sh test installs buildah and mmdebstrap")
    if shutil.which("buildah") is None:
        pytest.skip(f"image built with {engine}; running it here uses buildah, not installed")
    build = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True, timeout=1200,
                           check=False)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    c = Container(tmp_path_factory.mktemp("image"))
    yield c
    c.remove()


def _image_config() -> dict[str, Any]:
    out = subprocess.run(["buildah", "inspect", "--type", "image", IMAGE], capture_output=True,
                         text=True, check=True).stdout
    docker = json.loads(out)["Docker"]
    config: dict[str, Any] = docker["config"]
    return config


def test_image_config_entrypoint_and_healthcheck(container: Container) -> None:
    config = _image_config()
    assert config["Entrypoint"] == ["kvm-completion-tracer", "run"]
    assert config["Healthcheck"]["Test"][0] == "CMD"
    assert "/-/healthy" in config["Healthcheck"]["Test"][-1]


def test_no_host_configuration_in_the_image(container: Container) -> None:
    mnt = subprocess.run(["buildah", "mount", container.id], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        root = Path(mnt)
        for mount_point in ("etc/pip.conf", "etc/apt/apt.conf.d/99host-proxy"):
            path = root / mount_point
            assert not path.exists() or path.stat().st_size == 0, mount_point
        assert not any((root / "mnt" / "host-ca").iterdir())  # an empty mount point
        assert not (root / "etc" / "xdg" / "pip").exists()
        assert not (root / "opt" / "venv" / "bin" / "pip").exists()
    finally:
        subprocess.run(["buildah", "umount", container.id], capture_output=True, check=False)


def test_help(container: Container) -> None:
    result = container.run("kvm-completion-tracer", "run", "--help")
    assert result.returncode == 0, result.stderr
    assert "--state-dir" in result.stdout


def test_check_passes_with_the_four_capabilities(container: Container) -> None:
    caps = container.run("grep", "CapEff", "/proc/self/status")
    # BPF (39), PERFMON (38), SYS_PTRACE (19), DAC_READ_SEARCH (2), nothing else.
    assert caps.stdout.split() == ["CapEff:", f"{(1 << 39) | (1 << 38) | (1 << 19) | 4:016x}"]
    result = container.run("kvm-completion-tracer", "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout


def test_selftest_passes(container: Container) -> None:
    result = container.run("kvm-completion-tracer", "selftest", "--metrics-addr",
                           f"127.0.0.1:{SELFTEST_PORT}", kvm=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert " 0 failed" in result.stdout + result.stderr


def _get(path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{PORT}{path}", timeout=3) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except OSError:
        return 0, ""


def test_daemon_reports_a_host_vmm(container: Container, tmp_path: Path) -> None:
    log = tmp_path / "daemon.jsonl"

    def start() -> subprocess.Popen[bytes]:
        with log.open("w") as out:
            return subprocess.Popen(
                container.argv("kvm-completion-tracer", "run", "--log-format", "json",
                               "--metrics-addr", f"0.0.0.0:{PORT}",
                               "--state-dir", "/var/lib/kvm-completion-tracer"),
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    daemon = start()
    starts = 1
    try:
        deadline = time.monotonic() + 120
        while _get("/-/ready")[0] != 200:
            if (daemon.poll() is not None and starts < REEXEC_ATTEMPTS
                    and REEXEC_TRANSIENT in log.read_text()):
                daemon, starts = start(), starts + 1  # buildah's start failed (see Container)
                continue
            assert daemon.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        # The image's HEALTHCHECK, run in the container as the engine would (on this port).
        health = _image_config()["Healthcheck"]["Test"][1:]
        checked = container.run(*health, env=(f"KVM_COMPLETION_TRACER_METRICS_PORT={PORT}",))
        assert checked.returncode == 0, checked.stderr
        assert (container.state / "instance.lock").exists() or any(container.state.iterdir())

        report = tmp_path / "report.json"
        subprocess.run([sys.executable, "-m", "tracer.vmm", "buggy-io-out", "--iterations", "3",
                        "--report", str(report)], cwd=ROOT, check=True, timeout=120)
        pid = json.loads(report.read_text())["pid"]
        deadline = time.monotonic() + 30
        found: list[dict[str, Any]] = []
        while not found and time.monotonic() < deadline:
            time.sleep(0.5)
            for line in log.read_text().splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == "completion_violation" and event.get("pid") == pid:
                    found.append(event)
        assert found, log.read_text()[-3000:]
        vm = found[0]["vm"]
        assert vm and str(pid) in vm  # named: python[PID]
        status, metrics = _get("/metrics")
        assert status == 200
        assert any(line.startswith("kvm_completion_violations_total{") and f'vm="{vm}"' in line
                   for line in metrics.splitlines()), metrics[-3000:]
    finally:
        os.killpg(daemon.pid, 15)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, 9)
            daemon.wait()


# Buildah's own mount points in the upper layer: every -v target, /dev/kvm, and /run's files.
BUILDAH_MADE = ("run", "run/.containerenv", "dev", "dev/kvm", "tmp")


def test_nothing_was_written_to_the_root_filesystem(container: Container) -> None:
    """What ``--read-only`` would enforce: after every test above ran in this container, its
    overlay upper layer holds only the (empty) mount points buildah created for the volumes."""
    mnt = subprocess.run(["buildah", "mount", container.id], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        upper = Path(mnt).parent / "diff"
        assert upper.is_dir(), f"not an overlay container: {mnt}"
        targets = {inside.strip("/") for _, inside, _ in CHECKS.REQUIRED_MOUNTS}
        # merged /usr: /lib is a link to usr/lib, where buildah makes that mount point
        targets |= {f"usr/{t}" for t in targets if t.startswith(("lib/", "bin/", "sbin/"))}
        parents = {str(Path(*Path(t).parts[:i])) for t in targets
                   for i in range(1, len(Path(t).parts))}
        allowed = targets | parents | set(BUILDAH_MADE)
        written = []
        for path in sorted(upper.rglob("*")):
            rel = str(path.relative_to(upper))
            mount_point = path.is_dir() or (path.is_file() and path.stat().st_size == 0)
            if rel not in allowed or not mount_point:
                written.append(rel)
        assert written == [], f"written to the image's filesystem: {written}"
    finally:
        subprocess.run(["buildah", "umount", container.id], capture_output=True, check=False)
