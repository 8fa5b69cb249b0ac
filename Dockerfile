# Image of the kvm-completion-tracer daemon (Debian bookworm, bcc from Debian's python3-bpfcc).
#
# bcc compiles the probes at start-up against the HOST kernel's headers and attaches them to the
# host kernel, so the container runs in the host PID namespace with the host's tracefs, debugfs
# and kernel headers mounted.  The exact command (docs/deploy.md "Container"; tests/unit/test_container.py
# checks that it and this file agree):
#
#   make image        # or: docker build -t kvm-completion-tracer .
#   docker run -d --name kvm-completion-tracer --pid=host --network=host \
#       --read-only --tmpfs /tmp \
#       --cap-drop=ALL --cap-add=BPF --cap-add=PERFMON --cap-add=SYS_PTRACE \
#       --cap-add=DAC_READ_SEARCH --security-opt apparmor=unconfined \
#       -v /sys/kernel/tracing:/sys/kernel/tracing -v /sys/kernel/debug:/sys/kernel/debug \
#       -v /lib/modules:/lib/modules:ro -v /usr/src:/usr/src:ro \
#       -v /var/lib/kvm-completion-tracer:/var/lib/kvm-completion-tracer \
#       kvm-completion-tracer
#
# Privileges: the daemon runs as uid 0 with only these capabilities, not --privileged:
#   BPF              create maps, load programs (kernel >= 5.8; older kernels: SYS_ADMIN instead)
#   PERFMON          tracing programs, tracepoint attachment, bpf_probe_read_user of the VMMs
#   SYS_PTRACE       /proc/PID/fd and /proc/PID/maps of VMMs running as other users (libvirt-qemu,
#                    KubeVirt's qemu): vCPU adoption and the kvm_run address
#   DAC_READ_SEARCH  enter those processes' /proc/PID/fd directories (mode 0500, their owner)
# apparmor=unconfined: Docker's docker-default profile allows ptrace reads only of processes in
# the same profile, so on AppArmor hosts (Debian, Ubuntu) the host VMMs' /proc/PID/fd, /maps
# and /task/*/syscall stay unreadable even with SYS_PTRACE and running VMs go unadopted (the
# daemon then logs vcpu_discovery_incomplete).  Hosts without AppArmor ignore the option.
# Why not a dedicated non-root user: the capabilities would have to be file capabilities on the
# interpreter, and setcap on /usr/bin/python3.11 grants them to every Python program in the image
# (and they are dropped anyway on a nosuid mount or under no_new_privs); ambient capabilities need a
# root parent to set them.  tracefs and debugfs are also root-only (mode 0700) on most hosts.
# Running as root with everything else dropped (--cap-drop=ALL) is the smaller grant.
# The host's state directory is mounted so the single-instance lock in it is host-wide.
# Docker >= 23 lets bpf(2)/perf_event_open(2) through its default seccomp profile with CAP_BPF /
# CAP_PERFMON; older Docker needs --security-opt seccomp=unconfined, and so do podman/buildah with
# Debian 12's /usr/share/containers/seccomp.json (bpf, perf_event_open only with CAP_SYS_ADMIN),
# or a profile allowing them with CAP_BPF/CAP_PERFMON (docs/deploy.md "Container").  Kernels < 5.11 charge BPF
# maps to RLIMIT_MEMLOCK: add --ulimit memlock=-1:-1 there.
#
# (On hosts without a linux-headers-$(uname -r) package, first run scripts/setup-host.sh run there
# so /lib/modules/$(uname -r)/{build,source} point at Debian's generic headers under /usr/src.)

# The metrics port: must equal tracer.metrics.DEFAULT_METRICS_PORT (tests/unit/test_container.py).
ARG METRICS_PORT=9110

# --- build: the venv, with the package and its PyPI dependencies (no pip, no source tree) -------
FROM debian:bookworm-slim AS build

# Versions are not pinned: bookworm's point releases replace them (an exact pin stops building
# when the archive drops it), and security updates are wanted.  python3-venv: its pip is enough;
# a TLS proxy's CA is lent to pip by scripts/build-image.sh, not installed.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv \
    && apt-get clean && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .
# bcc lives in Debian's dist-packages: the venv must see the system site-packages.  The wheel's
# dependencies (structlog, prometheus-client) come from PyPI at the versions pyproject.toml
# allows.  The runtime venv gets no pip: /opt/build's pip installs into it.
RUN /usr/bin/python3 -m venv /opt/build \
    && /opt/build/bin/pip wheel --no-cache-dir --disable-pip-version-check \
        --wheel-dir /wheels . \
    && /usr/bin/python3 -m venv --system-site-packages --without-pip /opt/venv \
    && PIP_ROOT_USER_ACTION=ignore /opt/build/bin/pip --python /opt/venv/bin/python install \
        --no-cache-dir --disable-pip-version-check --no-index --no-deps /wheels/*.whl

# --- runtime -------------------------------------------------------------------------------------
FROM debian:bookworm-slim

ARG METRICS_PORT

# See above for the unpinned versions.  python3-bpfcc pulls LLVM 14 and libclang-cpp 14 (bcc
# compiles the probes in-process): about 250 MB of the image's size, and not optional.  llvm
# (llvm-symbolizer, on the same libLLVM) names the alerts' stack frames; libdebuginfod1 (the client
# library, no server) fetches debug info when DEBUGINFOD_URLS is set (docs/stacks.md).
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-bpfcc \
       llvm libdebuginfod1 \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/apt/* /var/log/dpkg.log

# The venv's interpreter is /usr/bin/python3, the same in both stages.
COPY --from=build /opt/venv /opt/venv
RUN /opt/venv/bin/python -c "import bcc, tracer.cli"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    KVM_COMPLETION_TRACER_METRICS_PORT=${METRICS_PORT}

EXPOSE ${METRICS_PORT}

# /-/healthy: 200 while the event loop polls (503, and urlopen raises, once it has not for 10 s,
# or before the first poll: the probes compile for a few seconds, hence the start period).
# Plain Python (no curl in the image).  127.0.0.1 works because the daemon binds 0.0.0.0 on the
# host network.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['KVM_COMPLETION_TRACER_METRICS_PORT'] + '/-/healthy', timeout=4).read()"]

ENTRYPOINT ["kvm-completion-tracer", "run"]
CMD ["--log-format", "json", "--metrics-addr", "0.0.0.0:9110"]
