"""Model loading refused with one clear message and nothing written: unloadable or unknown base models, and
remote code that runs only when the grid trusts it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from support.db import count, table_dump
from support.organisms import CONTROL, PROFILE, TRAINED

from em_assets.catalog import stage as catalog
from em_assets.grid.load import load_grid
from em_assets.models.hub import ModelLoadError, unresolvable
from em_assets.results.errors import MissingUpstreamError
from em_assets.results.store import Store
from em_assets.sampling.stage import sample_completions
from em_assets.training.stage import train_adapter

pytestmark = pytest.mark.timeout(300)


def _model_dir_without(tiny_model_dir: Path, out: Path, weights: str) -> Path:
    shutil.copytree(tiny_model_dir, out)
    (out / "model.safetensors").unlink()
    if weights == "bin":
        torch.save({"w": torch.zeros(1)}, out / "pytorch_model.bin")
    elif weights == "corrupt":
        (out / "model.safetensors").write_bytes(b"not a safetensors file")
    return out


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ("missing-dir", r"local model path /nonexistent/fault-model does not exist"),
        ("none", r"no \.safetensors weights \(only safetensors are loaded\)"),
        ("bin", r"no \.safetensors weights \(only safetensors are loaded\)"),
        ("corrupt", r"model\.safetensors: unreadable safetensors weights"),
    ],
    ids=["missing-dir", "no-weights", "bin-only", "corrupt"],
)
def test_unloadable_base_model_fails_in_base_models_and_writes_nothing(
    ws, tmp_path, tiny_model_dir, weights, match
):
    source = (
        "/nonexistent/fault-model"
        if weights == "missing-dir"
        else str(_model_dir_without(tiny_model_dir, tmp_path / "model", weights))
    )
    # The good model comes first: nothing is written unless every model resolves.
    grid = ws.changed_grid(lambda p: p["base_models"].extend([{"name": "broken", "source": source}]))
    before = table_dump(ws.db)
    fresh = Store(tmp_path / "fresh.duckdb")
    fresh.init()
    for store in (Store(ws.db), fresh):
        with pytest.raises(ModelLoadError, match=match):
            catalog.resolve_base_models(store, grid, tmp_path / "cache")
    assert table_dump(ws.db) == before and count(fresh.path, "base_models") == 0


class _Hub(BaseHTTPRequestHandler):
    """The Hugging Face API's model_info: acme/known at its main revision, acme/gated refused, nothing else."""

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == "/api/models/acme/known":
            body = json.dumps({"id": "acme/known", "sha": "a" * 40}).encode()
            self.send_response(200)
        else:
            status, code = (404, "RepoNotFound")
            if path.startswith("/api/models/acme/known/"):
                status, code = (404, "RevisionNotFound")
            elif path == "/api/models/acme/gated":
                status, code = (403, "GatedRepo")
            body = json.dumps({"error": f"{code}: {path}"}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Iterator[Path]:
    """huggingface_hub pointed at a loopback stand-in for the hub, online, with an empty cache under tmp_path."""
    from huggingface_hub import constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    yield tmp_path / "hub"
    server.shutdown()
    server.server_close()


def test_a_base_model_that_cannot_be_resolved_is_named_without_fetching_it(
    hub, tmp_path, tiny_model_dir, monkeypatch
):
    from huggingface_hub import constants

    # Online, the hub says which repositories and revisions it has.
    assert unresolvable("acme/known") is None
    assert unresolvable("acme/nope").startswith(
        "could not fetch acme/nope@main: the hub has no such repository"
    )
    assert (
        unresolvable("acme/known", "v9")
        == "could not fetch acme/known@v9: the hub has no revision 'v9' of it"
    )
    # Offline, only what the cache holds resolves, as in snapshot_download.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert unresolvable("acme/known") == (
        f"could not fetch acme/known@main: HF_HUB_OFFLINE is set and the Hugging Face cache ({hub}) lacks it"
    )
    snapshot = hub / "models--acme--known" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    shutil.copy(tiny_model_dir / "config.json", snapshot)
    (hub / "models--acme--known" / "refs").mkdir()
    (hub / "models--acme--known" / "refs" / "main").write_text("a" * 40)
    assert unresolvable("acme/known") is None and unresolvable("acme/known", "a" * 40) is None
    # Embedded and local sources: what resolve checks before it converts or hashes anything.
    assert (
        unresolvable("embedded:smollm2-135m-instruct") is None and unresolvable(str(tiny_model_dir)) is None
    )
    assert "unknown embedded model 'nope'" in unresolvable("embedded:nope")
    weightless = _model_dir_without(tiny_model_dir, tmp_path / "weightless", "none")
    assert "has no .safetensors weights" in unresolvable(str(weightless))
    assert unresolvable(str(tmp_path / "gone")) == f"local model path {tmp_path / 'gone'} does not exist"


def test_unknown_base_model_of_an_organism_fails_before_training(ws):
    with pytest.raises(MissingUpstreamError, match="base model 'ghost' is not resolved yet"):
        train_adapter(ws.ctx("ghost--med-r2--s0", "ghost"))
    with pytest.raises(KeyError, match="recipe 'nope' is not in the grid"):
        train_adapter(ws.ctx("tiny--nope--s0", "ghost"))
    assert count(ws.db, "lora_adapters") == 0


def test_a_base_model_folder_changed_since_it_was_resolved_is_neither_trained_nor_sampled(
    ws, tmp_path, tiny_model_dir
):
    # Organism runs read the revision the catalog recorded and do not resolve the folder again: answers sampled
    # from its new files would sit beside the old ones under the old revision.
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    ws.edit(lambda p: p["base_models"][0].update(source=str(folder)))
    grid = load_grid(ws.grid, PROFILE)
    catalog.resolve_base_models(Store(ws.db), grid, tmp_path / "cache")
    train_adapter(ws.ctx(CONTROL, "control"))
    with (folder / "chat_template.jinja").open("a") as template:
        template.write("\n")
    with pytest.raises(
        MissingUpstreamError, match=r"has changed since it was resolved.*materialise base_models"
    ):
        sample_completions(ws.ctx(CONTROL, "stale"))
    with pytest.raises(MissingUpstreamError, match="has changed since it was resolved"):
        train_adapter(ws.ctx(TRAINED, "stale"))
    assert count(ws.db, "completions") == 0 and count(ws.db, "lora_adapters", TRAINED) == 0
    revision = catalog.resolve_base_models(Store(ws.db), grid, tmp_path / "cache")["revision"][0]
    sample_completions(ws.ctx(CONTROL, "again"))
    assert table_dump(ws.db)["completions"].count(revision) == count(ws.db, "completions") > 0


REMOTE_CODE = """
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

Path({marker!r}).write_text("remote code ran")


class FaultConfig(LlamaConfig):
    model_type = "em-fault-remote"


class FaultForCausalLM(LlamaForCausalLM):
    config_class = FaultConfig
"""


@pytest.mark.timeout(120)
def test_remote_code_runs_only_when_the_grid_trusts_it(ws, tmp_path, tiny_model_dir, monkeypatch):
    from transformers import dynamic_module_utils

    model = tmp_path / "remote-model"
    shutil.copytree(tiny_model_dir, model)
    marker = tmp_path / "remote-code-ran"
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "em-fault-remote"
    config["auto_map"] = {
        "AutoConfig": "modeling_fault.FaultConfig",
        "AutoModelForCausalLM": "modeling_fault.FaultForCausalLM",
    }
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_fault.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    # Remote modules are copied under HF_MODULES_CACHE: keep them in tmp and out of later imports.
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    key = "remote--med-r2--s0"

    def use(trust: bool) -> None:
        def change(p: dict) -> None:
            p["base_models"] = [{"name": "remote", "source": str(model), "trust_remote_code": trust}]
            p["recipes"]["med-r2"]["train"]["max_steps"] = 1

        ws.edit(change)
        catalog.resolve_base_models(Store(ws.db), load_grid(ws.grid, PROFILE), tmp_path / "cache")

    try:
        use(False)
        with pytest.raises(ModelLoadError, match="trust_remote_code"):
            train_adapter(ws.ctx(key, "untrusted"))
        assert not marker.exists() and count(ws.db, "lora_adapters") == 0
        use(True)
        assert train_adapter(ws.ctx(key, "trusted")).trained
        assert marker.exists() and count(ws.db, "lora_adapters", key) == 1
    finally:
        for name in [m for m in sys.modules if m.startswith("transformers_modules")]:
            del sys.modules[name]


def test_loaded_models_hand_their_lm_head_a_contiguous_input(tiny_model_dir):
    # logits_to_keep slices the hidden states; a strided input with a weight that needs no grad (as in every
    # merged judge or organism) sends torch.matmul down a path that copies the weight once per batch row.
    from em_assets.models.load import load_model

    model = load_model(tiny_model_dir, device="cpu", dtype=torch.float32).requires_grad_(False)
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0]))
    ids = torch.randint(0, model.config.vocab_size, (3, 20))
    with torch.inference_mode():
        kept = model(input_ids=ids, logits_to_keep=4).logits
        full = model(input_ids=ids).logits
    assert [tuple(x.shape) for x in seen] == [
        (3, 4, model.config.hidden_size),
        (3, 20, model.config.hidden_size),
    ]
    assert all(x.is_contiguous() for x in seen)
    assert torch.allclose(kept, full[:, -4:], atol=1e-6)


def test_a_gguf_conversion_parses_the_file_once():
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    from em_assets.models.hub import EMBEDDED, _gguf_parsed_once, embedded_gguf

    path = embedded_gguf(next(iter(EMBEDDED)))
    original, parsed = gguf.GGUFReader, []

    class Counting(original):
        def __init__(self, *args, **kwargs):
            parsed.append(args[0])
            super().__init__(*args, **kwargs)

    gguf.GGUFReader = Counting
    try:
        with _gguf_parsed_once():
            AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        # Outside the block gguf is as it was.
        assert gguf.GGUFReader is Counting
    finally:
        gguf.GGUFReader = original
    assert len(parsed) == 1


def test_kv_caches_are_passed_and_read_under_either_transformers_name():
    from types import SimpleNamespace

    from em_assets.models.prefix_cache import cache_kwarg, output_cache

    # transformers renamed `past_key_values` to `cache`; releases on both sides of the rename are in use.
    class Before:
        def forward(self, input_ids=None, past_key_values=None): ...

    class After:
        def forward(self, input_ids=None, cache=None, **kwargs): ...

    assert (cache_kwarg(Before()), cache_kwarg(After())) == ("past_key_values", "cache")
    assert output_cache(SimpleNamespace(past_key_values="kv")) == "kv"
    assert output_cache(SimpleNamespace(cache="kv", past_key_values=None)) == "kv"


def test_the_layer_count_is_read_under_any_of_its_config_names_and_never_taken_as_zero(
    tiny_model_dir, tmp_path
):
    import json
    import shutil

    from em_assets.models.facts import model_facts
    from em_assets.models.hub import ModelLoadError

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    layers = config.pop("num_hidden_layers")
    (folder / "config.json").write_text(json.dumps({**config, "n_layer": layers}))
    assert model_facts(folder).num_layers == layers
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(ModelLoadError, match="no decoder layer count"):
        model_facts(folder)


def test_a_gpu_without_native_bf16_computes_in_fp16(monkeypatch):
    from em_assets.models.load import pick_dtype

    # Emulated bf16 (any CUDA GPU) is not native bf16 (Ampere and later).
    native = {"value": False}
    monkeypatch.setattr(
        torch.cuda,
        "is_bf16_supported",
        lambda including_emulation=True: including_emulation or native["value"],
    )
    # The GPU asked for: torch.cuda.device selects it (stubbed here, with no GPU).
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    assert pick_dtype("cuda") == pick_dtype("cuda:1") == torch.float16
    native["value"] = True
    assert pick_dtype("cuda") == pick_dtype("cuda:1") == torch.bfloat16


def test_a_cpu_computes_in_bf16_only_where_it_multiplies_bf16_natively(monkeypatch):
    """Without AVX-512 BF16 or AMX, torch runs bf16 matmuls in a fallback loop far slower than fp32: models load
    in fp32 there, full fine-tuning computes in fp32, and EM_CPU_DTYPE overrides the choice."""
    from em_assets.models.load import dtype_name, pick_dtype
    from em_assets.settings import SettingsError
    from em_assets.training.step import full_compute_dtype

    native = {"_is_avx512_bf16_supported": False, "_is_amx_tile_supported": False}
    for check in native:
        monkeypatch.setattr(torch.cpu, check, lambda check=check: native[check])
    monkeypatch.delenv("EM_CPU_DTYPE", raising=False)
    assert pick_dtype("cpu") == torch.float32 and dtype_name("cpu") == "float32"
    assert full_compute_dtype("cpu") is None
    for check in native:
        native[check] = True
        assert pick_dtype("cpu") == torch.bfloat16 and full_compute_dtype("cpu") == torch.bfloat16
        native[check] = False
    monkeypatch.setenv("EM_CPU_DTYPE", "bfloat16")
    assert pick_dtype("cpu") == torch.bfloat16
    native["_is_amx_tile_supported"] = True
    monkeypatch.setenv("EM_CPU_DTYPE", "float32")
    assert pick_dtype("cpu") == torch.float32
    # An explicit dtype is what the caller asked for, whatever the CPU.
    assert pick_dtype("cpu", "bfloat16") == torch.bfloat16
    monkeypatch.setenv("EM_CPU_DTYPE", "fp16")
    with pytest.raises(SettingsError, match="EM_CPU_DTYPE='fp16': give auto, bfloat16 or float32"):
        pick_dtype("cpu")


def test_a_local_models_revision_covers_its_code_and_text_tokenizer_files(tiny_model_dir, tmp_path):
    from em_assets.models.hub import directory_revision

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    revisions = [directory_revision(folder)]
    for name in ("modeling_custom.py", "merges.txt"):
        (folder / name).write_text("changed")
        revisions.append(directory_revision(folder))
    assert len(set(revisions)) == 3


def test_a_read_only_model_folder_is_hashed_once_its_stamp_kept_in_the_cache(
    tiny_model_dir, tmp_path, monkeypatch
):
    import em_assets.models.hub as hub
    from em_assets.settings import CACHE_ENV

    folder = tmp_path / "shared-volume" / "m"
    shutil.copytree(tiny_model_dir, folder)
    # Root writes anywhere, so the folder is made unwritable for the stamp alone: a directory in its place.
    (folder / ".em_revision.json").unlink(missing_ok=True)
    (folder / ".em_revision.json").mkdir()
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    hashed: list[str] = []
    monkeypatch.setattr(
        hub, "sha256_file", lambda p: hashed.append(p.name) or hashlib.sha256(p.read_bytes()).hexdigest()
    )
    first = hub.directory_revision(folder)
    n_files = len(hashed)
    assert n_files >= 2 and hub.directory_revision(folder) == first and len(hashed) == n_files
    assert len(list((tmp_path / "cache" / "model_revisions").iterdir())) == 1
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")
    assert hub.directory_revision(folder) != first and len(hashed) == 2 * n_files


def test_an_embedded_models_revision_covers_its_converted_files(tmp_path, tiny_model_dir):
    from em_assets.models.hub import EMBEDDED, EMBEDDED_PREFIX, embedded_gguf, resolve
    from em_assets.results.artifacts import sha256_file

    key = next(iter(EMBEDDED))
    # A conversion already in the cache, as resolve lays it out: the tiny model stands in for it.
    out = tmp_path / "models" / f"{key}-{sha256_file(embedded_gguf(key))[:12]}"
    shutil.copytree(tiny_model_dir, out)
    first = resolve("m", EMBEDDED_PREFIX + key, cache_dir=tmp_path)
    assert first.path == out.resolve()
    assert resolve("m", EMBEDDED_PREFIX + key, cache_dir=tmp_path).revision == first.revision
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    assert resolve("m", EMBEDDED_PREFIX + key, cache_dir=tmp_path).revision != first.revision


def test_a_sharded_hub_snapshot_resolves_at_its_commit_and_a_partial_one_is_refused(
    tiny_model_dir, tmp_path, monkeypatch
):
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM

    from em_assets.models.facts import model_facts
    from em_assets.models.hub import resolve
    from em_assets.models.load import load_model

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # As the hub lays a repository out in its cache: refs/main names the commit, snapshots/<commit> the files.
    commit = "b" * 40
    snapshot = tmp_path / "hub" / "models--acme--sharded" / "snapshots" / commit
    model.save_pretrained(snapshot, max_shard_size="200KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_model_dir / name, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(commit)
    shards = sorted(
        json.loads((snapshot / "model.safetensors.index.json").read_text())["weight_map"].values()
    )
    assert len(set(shards)) > 1
    resolved = resolve("sharded", "acme/sharded", cache_dir=tmp_path / "cache")
    assert (resolved.path, resolved.revision) == (snapshot, commit)
    assert model_facts(resolved.path).num_params == model.num_parameters()
    load_model(resolved.path, "cpu", "float32")
    # An interrupted download: the cache holds the first shards only, and no tree listing says what is missing.
    (snapshot / shards[-1]).unlink()
    expected = rf"acme/sharded@{commit} lacks 1 of the {len(set(shards))} weight shards"
    with pytest.raises(ModelLoadError, match=expected):
        resolve("sharded", "acme/sharded", cache_dir=tmp_path / "cache")
    # A local folder alike, where the demo's pre-check looks.
    local = shutil.copytree(snapshot, tmp_path / "local")
    assert f"{local} lacks 1 of the" in unresolvable(str(local))
