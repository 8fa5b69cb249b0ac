# kvm-completion-tracer: every target sets the host up first (scripts/setup-host.sh, idempotent;
# run as root): `run`, `check` and `selftest` only what the daemon needs, `test` and `lint` also
# the test tools.  Pass daemon options with ARGS, e.g. `sudo make run ARGS='--trace-exits'`.
SHELL := /bin/bash
VENV := .venv
ARGS ?=

.PHONY: all setup setup-run run check selftest lint test

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
	$(VENV)/bin/ruff check tracer tests
	$(VENV)/bin/mypy --strict tracer

# pytest's exit code 5 means it collected no test: that is a failure too.
test: lint
	@rc=0; $(VENV)/bin/python -m pytest -q tests || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: error: pytest collected no tests (exit 5)" >&2; fi; \
	exit $$rc
