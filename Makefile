# ASR Hub: `make run` starts the hub on the sample config, `make test` runs the suite.
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV ?= .venv
EXTRAS ?=
CONFIG ?= config/config.sample.yaml
PYTEST_ARGS ?=
BIN := $(VENV)/bin
ALL_EXTRAS := whisper,test$(if $(EXTRAS),$(comma)$(EXTRAS),)
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(ALL_EXTRAS))

.PHONY: install run test clean clips

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[$(ALL_EXTRAS)]'
	touch $@

run: install
	$(BIN)/python -m hub.supervisor --config $(CONFIG)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clips: install
	PYTHON=$(abspath $(BIN)/python) tests/data/make_clips.sh

clean:
	rm -rf $(VENV) *.egg-info build .pytest_cache
