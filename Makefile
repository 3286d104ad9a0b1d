# The two commands of the README. Both install what they need first (scripts/setup is idempotent).
SHELL := /bin/bash
DATA_DIR ?= $(HOME)/.local/share/fastsandbox
REGISTRY ?= 127.0.0.1:5000

.PHONY: setup run test check unit integration e2e bench demo-registry clean

setup:
	scripts/setup

## make run: install, serve the demo image from a loopback registry, start `fsb server`.
run: setup
	scripts/demo-registry "$(DATA_DIR)" "$(REGISTRY)"
	.venv/bin/fsb server --data-dir "$(DATA_DIR)" --insecure-registry "$(REGISTRY)"

## make test: install, check (lint, types, contracts), then the whole suite.
test: setup
	scripts/check
	.venv/bin/pytest -q -p no:cacheprovider tests

check: setup
	scripts/check

unit: setup
	.venv/bin/pytest -q tests/unit tests/contract -m "not integration"

integration: setup
	.venv/bin/pytest -q tests/integration

e2e: setup
	.venv/bin/pytest -q tests/e2e

bench: setup
	.venv/bin/python benchmarks/create_latency.py
