# The two commands of the README. Both install what they need first (scripts/setup is idempotent).
SHELL := /bin/bash
DATA_DIR ?= $(HOME)/.local/share/fastsandbox
REGISTRY ?= 127.0.0.1:5000

.PHONY: setup run test check unit native-test integration e2e kube kube-tools bench demo-registry clean fuzz fault soak

setup:
	scripts/setup

## make run: install, serve the demo image from a loopback registry, start `fsb server`.
run: setup
	scripts/demo-registry "$(DATA_DIR)" "$(REGISTRY)"
	.venv/bin/fsb server --data-dir "$(DATA_DIR)" --insecure-registry "$(REGISTRY)"

## make test: install, build the Kubernetes tier's binaries (cached outside the tree), check
## (lint, types, contracts), the Rust crates' own tests, then the whole suite, both shapes, and
## the deployable image (tests/integration/test_image.py; its debootstrap and wheels are cached in
## ~/.cache/fastsandbox). With CI=true a tier that cannot run here (no root, a binary or Go
## missing) fails, not skips.
test: setup kube-tools native-test
	scripts/check
	.venv/bin/pytest -q -p no:cacheprovider tests

## kube-tools: kube-apiserver, etcd, kubectl and helm for the Kubernetes tier, in ~/.cache/fastsandbox
## (cold: several minutes on 2 cores; cached: instant).
kube-tools:
	scripts/build-kube-apiserver >/dev/null
	if [ -x scripts/build-helm ]; then scripts/build-helm >/dev/null; fi

## make kube: only the Kubernetes tier (real etcd + kube-apiserver + process kubelet).
kube: setup kube-tools
	.venv/bin/pytest -q -m kubernetes tests

check: setup
	scripts/check

## make unit: the tests that need nothing installed (no root, containerd, Go or kube-apiserver):
## tests/unit and the fake/memory/SQLite runs of tests/contract; only the Python part of setup.
unit:
	scripts/setup --python-only
	.venv/bin/pytest -q -p no:cacheprovider -m "not integration and not e2e and not kubernetes" \
		tests/unit tests/contract

## native-test: the Rust crates' own tests (cargo test in every native/*/Cargo.toml).
native-test:
	@cargo=$$(command -v cargo || echo $$HOME/.cargo/bin/cargo); \
	for m in native/*/Cargo.toml; do "$$cargo" test --quiet --locked --manifest-path "$$m" || exit 1; done

integration: setup
	.venv/bin/pytest -q tests/integration

e2e: setup
	.venv/bin/pytest -q tests/e2e

## make bench: every benchmark of issue 11 in one run (docs/performance.md); as root. Installs
## docker.io (the `docker run -d` / `docker exec` baseline) when missing. BENCH_ARGS="-n 30
## --kubernetes" adds the Kubernetes shape; results also go to bench-results.json.
BENCH_ARGS ?= -n 30
bench: setup
	command -v dockerd >/dev/null || (apt-get update -qq && apt-get install -y -qq docker.io)
	.venv/bin/python benchmarks/bench.py $(BENCH_ARGS)

## make fuzz: the property-based fuzz targets at full size (CI runs 500 cases per target).
fuzz: setup
	FSB_FUZZ_EXAMPLES=10000 .venv/bin/pytest -q -p no:cacheprovider --timeout=3600 tests/fuzz

## make fault: the fault-injection suite (tests/fault, docs/reliability.md) at full size: 20 rounds
## of each kill/restart scenario, 500 concurrent creates against 50 slots. `make test` runs it at
## 1 round and 100 against 10.
fault: setup
	FSB_FAULT_ROUNDS=$${FSB_FAULT_ROUNDS:-20} FSB_FAULT_CREATES=$${FSB_FAULT_CREATES:-500} \
		FSB_FAULT_CAPACITY=$${FSB_FAULT_CAPACITY:-50} \
		.venv/bin/pytest -q -s -p no:cacheprovider --timeout=3600 tests/fault

## make soak: create / exec / file write / delete at a steady rate, resources at start vs end
## (benchmarks/soak.py; SOAK_MINUTES=30 by default). Not in CI.
SOAK_MINUTES ?= 30
soak: setup
	.venv/bin/python benchmarks/soak.py --minutes $(SOAK_MINUTES)
