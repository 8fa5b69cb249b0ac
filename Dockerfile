# Minimal image of the daemon.  bcc compiles the probes at start-up against the HOST kernel's
# headers, and attaches to the host kernel, so run it privileged in the host PID namespace with
# the host's tracing and header directories mounted, e.g.:
#
#   docker build -t kvm-completion-tracer .
#   docker run --rm --privileged --pid=host \
#       -v /sys/kernel/tracing:/sys/kernel/tracing -v /sys/kernel/debug:/sys/kernel/debug \
#       -v /lib/modules:/lib/modules:ro -v /usr/src:/usr/src:ro \
#       kvm-completion-tracer
#
# (On hosts without a linux-headers-$(uname -r) package, first run scripts/setup-host.sh there so
# /lib/modules/$(uname -r)/{build,source} point at Debian's generic headers.)
FROM debian:bookworm-slim

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3-bpfcc python3-pip python3-venv \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/kvm-completion-tracer
COPY . .

# bcc lives in Debian's dist-packages: the venv must see the system site-packages.
RUN /usr/bin/python3 -m venv --system-site-packages /opt/venv \
    && PIP_ROOT_USER_ACTION=ignore /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check . \
    && /opt/venv/bin/python -c "import bcc"

ENV PATH=/opt/venv/bin:$PATH
ENTRYPOINT ["kvm-completion-tracer", "run"]
