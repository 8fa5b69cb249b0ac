# kvm-completion-tracer: every target sets the host up first (scripts/setup-host.sh, idempotent;
# run as root): `run`, `check` and `selftest` only what the daemon needs, `test` and `lint` also
# the test tools.  Pass daemon options with ARGS, e.g. `sudo make run ARGS='--trace-exits'`.
SHELL := /bin/bash
VENV := .venv
ARGS ?=

.PHONY: all setup setup-run run check selftest lint test install uninstall

all: test

setup:
	@bash scripts/setup-host.sh test

setup-run:
	@bash scripts/setup-host.sh run

run: setup-run
	$(VENV)/bin/kvm-completion-tracer run $(ARGS)

# The daemon's preflight: what the host lacks and how to fix it, then a trial load.
check: setup-run
	$(VENV)/bin/kvm-completion-tracer check $(ARGS)

selftest: setup-run
	$(VENV)/bin/kvm-completion-tracer selftest $(ARGS)

lint: setup
	$(VENV)/bin/ruff check tracer tests bench scripts
	$(VENV)/bin/mypy --strict tracer

# pytest's exit code 5 means it collected no test: that is a failure too.
test: lint
	@rc=0; $(VENV)/bin/python -m pytest -q tests || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: error: pytest collected no tests (exit 5)" >&2; fi; \
	exit $$rc

# The README's set-up, check, selftest, a short run and a watch on a fresh Debian 13 root
# (mmdebstrap, cached under /var/cache/kvm-completion-tracer/distro-check): one line per step,
# under a minute with the root and its .debs cached.  DISTRO_ARGS=--full also runs `make test`.
DISTRO_ARGS ?=
.PHONY: distro-check
distro-check:
	@bash scripts/distro-check.sh $(DISTRO_ARGS)

# The container image from the Dockerfile (docker, podman or buildah; base made locally when no
# registry is reachable): scripts/build-image.sh.
.PHONY: image
image:
	@bash scripts/build-image.sh

# Overhead benchmark (bench/README.md): one table, JSON in bench/results.json; about 6 minutes.
# Options with BENCH_ARGS, e.g. `sudo make bench BENCH_ARGS='--quick'`.
BENCH_ARGS ?=
.PHONY: bench
bench:
	@bash scripts/setup-host.sh bench
	$(VENV)/bin/python bench/run.py $(BENCH_ARGS)

# Fault campaign (bench/faults.py): churn, overload, stalled reader, crash, soak, scrape storm,
# hostile names against the real daemon; one table, JSON in bench/faults.json; about 15 minutes
# (the soak is 10). Options with FAULTS_ARGS, e.g. `sudo make faults FAULTS_ARGS='--short'`.
FAULTS_ARGS ?=
.PHONY: faults
faults:
	@bash scripts/setup-host.sh bench
	$(VENV)/bin/python bench/faults.py $(FAULTS_ARGS)

# ---- system install (root): /opt venv, the systemd unit, a default config ----------------------
# The venv sees Debian's bcc (--system-site-packages from /usr/bin/python3); `pip install .`
# fetches structlog and prometheus-client from PyPI unless Debian's python3-structlog and
# python3-prometheus-client are installed. The config is never overwritten, nor removed by
# `uninstall` once edited.
OPT_DIR := /opt/kvm-completion-tracer
UNIT_DIR := /etc/systemd/system
CONF_DIR := /etc/kvm-completion-tracer
BIN_DIR := /usr/local/bin
UNIT := kvm-completion-tracer.service

install: setup-run
	/usr/bin/python3 -m venv --system-site-packages $(OPT_DIR)
	$(OPT_DIR)/bin/pip install --quiet --disable-pip-version-check --upgrade .
	install -m 0644 README.md $(OPT_DIR)/README.md
	install -d $(OPT_DIR)/docs
	install -m 0644 docs/*.md $(OPT_DIR)/docs/
	install -d $(BIN_DIR)
	ln -sfn $(OPT_DIR)/bin/kvm-completion-tracer $(BIN_DIR)/kvm-completion-tracer
	install -D -m 0644 deploy/systemd/$(UNIT) $(UNIT_DIR)/$(UNIT)
	install -d -m 0755 $(CONF_DIR)
	[ -e $(CONF_DIR)/config.toml ] || install -m 0644 deploy/config.example.toml $(CONF_DIR)/config.toml
	$(OPT_DIR)/bin/kvm-completion-tracer check --no-load
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed; start with: systemctl enable --now $(UNIT)"

uninstall:
	if [ -d /run/systemd/system ]; then systemctl disable --now $(UNIT) || true; fi
	rm -f $(UNIT_DIR)/$(UNIT)
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	if [ "$$(readlink $(BIN_DIR)/kvm-completion-tracer)" = "$(OPT_DIR)/bin/kvm-completion-tracer" ]; then rm -f $(BIN_DIR)/kvm-completion-tracer; fi
	rm -rf $(OPT_DIR)
	if cmp -s deploy/config.example.toml $(CONF_DIR)/config.toml; then rm -f $(CONF_DIR)/config.toml; rmdir $(CONF_DIR) 2>/dev/null || true; else echo "kept $(CONF_DIR)/config.toml (edited)"; fi
