# ASR Hub: `make run` starts the hub on the sample config, `make test` runs the fast tiers of the suite
# (unit, integration, models), `make test-all` every tier (system too: bench, soak, partition, deploy,
# image, browser, alert rules), `make lint` ruff and mypy. Each creates .venv and installs what it needs
# on first use. `make install EXTRAS=funasr` adds FunASR; the test targets always install it.

PYTHON ?= python3
VENV ?= .venv
EXTRAS ?=
CONFIG ?= config/config.sample.yaml
PYTEST_ARGS ?=
# FunASR needs torch but does not declare it. A bare `torch` requirement would fetch a CUDA build of
# several GB; this pin is the CPU wheel that lies on this machine's disk. A torch already in the
# venv (a CUDA build on a GPU host, say) is kept: override with `make install TORCH='torch==X'`.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# Python caches compiled modules (its default): the tests start hundreds of hubs, workers and gateways, and
# pytest rewrites every test file in each of its processes; recompiling them each time cost a minute of CPU
unexport PYTHONDONTWRITEBYTECODE
comma := ,
ALL_EXTRAS := whisper,test$(if $(EXTRAS),$(comma)$(EXTRAS),)
TEST_EXTRAS := $(ALL_EXTRAS)$(if $(findstring funasr,$(EXTRAS)),,$(comma)funasr)
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(ALL_EXTRAS))
TEST_STAMP := $(VENV)/.installed-$(subst $(comma),-,$(TEST_EXTRAS))
extras_of = $(subst -,$(comma),$(patsubst $(VENV)/.installed-%,%,$(1)))

.PHONY: install run test test-all lint clean clips image image-cuda

install: $(STAMP)

# One recipe for both stamps; the extras are read back from the stamp's name. torch goes in first,
# so that pip finds FunASR's needs met and never resolves a torch of its own.
$(sort $(STAMP) $(TEST_STAMP)): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(findstring funasr,$(call extras_of,$@)),$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/python -m pip install -q '$(TORCH)')
	$(BIN)/python -m pip install -q -e '.[$(call extras_of,$@)]'
	touch $@

run: install
	$(BIN)/python -m hub.supervisor --config $(CONFIG)

# The tiers (tests/README.md): unit (no process, no socket), integration (echo hubs), models (faster-whisper,
# FunASR), system (what needs minutes or outside tools). PYTEST_JOBS runs test files in parallel processes.
FAST_TIERS := tests/models tests/integration tests/unit  # the heaviest tier first: xdist hands out files in this order
PYTEST_JOBS ?= 4
PYTEST_SERIAL := ASR_HUB_REQUIRE_EXTRAS=1 $(BIN)/python -m pytest
PYTEST := $(PYTEST_SERIAL) $(if $(filter-out 0 1,$(PYTEST_JOBS)),-n $(PYTEST_JOBS) --dist loadfile --no-loadscope-reorder)

test: $(TEST_STAMP)
	scripts/install-test-packages.sh
	$(PYTEST) $(FAST_TIERS) $(PYTEST_ARGS)

# the system tier runs after the fast ones, one test at a time: its benchmarks and soak measure the machine
test-all: $(TEST_STAMP)
	scripts/install-test-packages.sh
	$(PYTEST) $(FAST_TIERS) $(PYTEST_ARGS)
	$(PYTEST_SERIAL) -p no:xdist tests/system $(PYTEST_ARGS)

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clips: install
	PYTHON=$(abspath $(BIN)/python) tests/data/make_clips.sh

clean:
	rm -rf $(VENV) *.egg-info build .pytest_cache

# `make image` builds the CPU image asr-hub:cpu, `make image-cuda` the GPU image asr-hub:cuda (deploy/), into
# the podman storage under IMAGE_STORE; `scripts/podman.sh $(IMAGE_STORE) ...` runs podman on it (run, save,
# push). No registry is needed: the base image is made from Debian's packages (scripts/base-image.sh) unless
# BASE names one, e.g. `make image BASE=docker.io/library/python:3.11-slim-bookworm`. Needs podman and, for
# the Debian base, debootstrap and root (scripts/test-packages.txt lists them).
IMAGE_STORE ?= .podman
BASE ?=

image:
	$(if $(BASE),BASE='$(BASE)') scripts/build-image.sh cpu $(IMAGE_STORE)

image-cuda:
	$(if $(BASE),BASE='$(BASE)') scripts/build-image.sh cuda $(IMAGE_STORE)

# `make bench` measures the pool against a single instance, direct faster-whisper and the machine's
# ceiling (several minutes); `make bench-quick` is the reduced run (under 3 minutes on 2 cores).
# Results go to bench/results/. Pass options with `make bench BENCH_ARGS="--max-workers 4"`.
BENCH_ARGS ?=
.PHONY: bench bench-quick

BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[whisper,bench]'
	touch $@

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

bench-quick: $(BENCH_STAMP)
	$(BIN)/python -m bench --quick $(BENCH_ARGS)

# `make bench-peers`: Ray Serve beside the hub on the same clips and thread settings (bench/README.md).
# Ray lives in a virtual environment of its own, so the project never depends on it; neither Ray Serve
# nor faster-whisper needs torch, so none is installed there. Pass `BENCH_ARGS=--quick` for a short run.
PEERS_VENV ?= .venv-peers
RAY_VERSION ?= 2.60.0
PEERS_STAMP := $(PEERS_VENV)/.installed-ray-$(RAY_VERSION)
.PHONY: bench-peers

$(PEERS_STAMP): setup.cfg pyproject.toml
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install -q -e '.[whisper,bench]' 'ray[serve]==$(RAY_VERSION)'
	touch $@

bench-peers: $(PEERS_STAMP)
	$(PEERS_VENV)/bin/python -m bench.peers $(BENCH_ARGS)

# `make soak DURATION=600`: a steady mixed load with periodic worker kills; exits non-zero on any
# lost request, an error rate of 0.1 % or more, memory growth or leaked descriptors or segments.
DURATION ?= 600
.PHONY: soak
soak: $(BENCH_STAMP)
	$(BIN)/python -m bench.soak --duration $(DURATION)
