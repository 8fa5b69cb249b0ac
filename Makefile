# kvm-completion-tracer: every target sets the host up first (scripts/setup-host.sh, idempotent;
# run as root).  Pass daemon options with ARGS, e.g. `sudo make run ARGS='--trace-exits'`.
SHELL := /bin/bash
VENV := .venv
ARGS ?=

.PHONY: all setup run check selftest lint test

all: test

setup:
	@bash scripts/setup-host.sh

run: setup
	$(VENV)/bin/kvm-completion-tracer run $(ARGS)

# The daemon's preflight: reports what the host lacks, loads nothing.
check: setup
	$(VENV)/bin/kvm-completion-tracer check $(ARGS)

selftest: setup
	$(VENV)/bin/kvm-completion-tracer selftest $(ARGS)

lint: setup
	$(VENV)/bin/ruff check tracer tests
	$(VENV)/bin/mypy --strict tracer

# pytest's exit code 5 means it collected no test: that is a failure too.
test: lint
	@rc=0; $(VENV)/bin/python -m pytest -q tests || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: error: pytest collected no tests (exit 5)" >&2; fi; \
	exit $$rc
