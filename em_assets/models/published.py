"""Organisms published elsewhere: a peft LoRA adapter or a fine-tuned model, resolved to local files pinned by
revision (hub commit or content hash) and checked against the organism's base model before anything runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from em_assets.grid.sources import OrganismSourceError, json_object
from em_assets.models.hub import (
    EMBEDDED_PREFIX,
    ModelLoadError,
    ResolvedModel,
    directory_revision,
    folder_source,
    hub_snapshot,
    resolve,
)
from em_assets.results.artifacts import sha256_file

ADAPTER_CONFIG = "adapter_config.json"


ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class ResolvedAdapter:
    """A peft adapter on local disk: its folder, the revision that pins it, its weights' sha256 and config."""

    source: str
    path: Path
    revision: str
    sha256: str
    config: dict

    @property
    def base_model_name_or_path(self) -> str:
        return str(self.config.get("base_model_name_or_path") or "")


def _hub_snapshot(source: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, revision=revision, allow_patterns=patterns))
    except Exception as exc:
        raise OrganismSourceError(
            f"{source}@{revision or 'main'}: could not fetch from the hub ({exc})"
        ) from exc


def adapter_folder(source: str, revision: str | None = None) -> Path:
    """The local folder of an adapter source: an existing directory, or a hub snapshot at `revision`."""
    if source.startswith(EMBEDDED_PREFIX):
        raise OrganismSourceError(
            f"{source}: no adapter is embedded in em-assets; give a hub id or a directory"
        )
    local = Path(source).expanduser()
    if local.exists() or source.startswith((".", "/", "~")):
        if not local.is_dir():
            raise OrganismSourceError(f"{source}: no such adapter directory")
        return local.resolve()
    return _hub_snapshot(source, revision, [ADAPTER_CONFIG, ADAPTER_WEIGHTS])


def resolve_adapter(source: str, revision: str | None = None) -> ResolvedAdapter:
    """The adapter's files, checked: adapter_config.json (a peft LoRA) and safetensors weights."""
    path = adapter_folder(source, revision)
    config_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not config_file.is_file():
        raise OrganismSourceError(f"{path}: no {ADAPTER_CONFIG}; not a peft adapter directory")
    config = json_object(config_file, OrganismSourceError)
    if config.get("peft_type", "LORA") != "LORA":
        raise OrganismSourceError(f"{config_file}: field peft_type is {config['peft_type']!r}, not LORA")
    if not weights.is_file():
        raise OrganismSourceError(f"{path}: no {ADAPTER_WEIGHTS} (only safetensors adapters are loaded)")
    # A hub snapshot is pinned by its commit; any other directory by its bytes.
    snapshot = hub_snapshot(path)
    rev = snapshot[1] if snapshot else directory_revision(path)
    return ResolvedAdapter(source, path, rev, sha256_file(weights), config)


def _name(model: str) -> str:
    """A model's name without its owner or folder, lower case (unsloth/Qwen2.5-7B-Instruct -> qwen2.5-7b-instruct)."""
    name = model.rstrip("/").removeprefix(EMBEDDED_PREFIX).rsplit("/", 1)[-1].lower()
    # Meta renamed its Llama 3.1 repositories (Meta-Llama-3.1-8B-Instruct became Llama-3.1-8B-Instruct, the same
    # weights), and re-uploads such as unsloth's kept the old name.
    return name.removeprefix("meta-")


def check_adapter_base(
    adapter: ResolvedAdapter, base_source: str, base_path: str | None, organism: str
) -> None:
    """The adapter was trained on the organism's base model: the same id, path, or model name (re-uploads such
    as unsloth/<name> of <owner>/<name> hold the same weights); raises OrganismSourceError otherwise."""
    declared = adapter.base_model_name_or_path
    candidates = {base_source, str(base_path or "")}
    if declared and declared in candidates:
        return
    local = Path(declared).expanduser() if declared else None
    if local and base_path and local.exists() and local.resolve() == Path(base_path).resolve():
        return
    # By name only where the adapter names a hub id: a folder's name (final, checkpoint-500) says nothing of it,
    # unless its layout names the source it was resolved from (an adapter trained here records that folder).
    named = folder_source(declared) if declared.startswith(("/", ".", "~")) else declared
    # A base model given as its hub snapshot folder (models--<owner>--<name>/snapshots/<commit>) is that hub id.
    if named and _name(named) in {_name(folder_source(c) or c) for c in candidates if c}:
        return
    raise OrganismSourceError(
        f"{adapter.path / ADAPTER_CONFIG}: field base_model_name_or_path is {declared or '(empty)'!r}, but "
        f"organism {organism} has base model {base_source!r}: the adapter belongs to another base model"
    )


def resolve_model(name: str, source: str, revision: str | None, cache_dir: Path | None) -> ResolvedModel:
    """A fine-tuned model (hub id at a revision, or a directory) resolved like a base model, with the tokenizer
    and chat template it samples with."""
    from em_assets.models.load import load_tokenizer

    try:
        model = resolve(name, source, revision, cache_dir)
    except ModelLoadError as exc:
        raise OrganismSourceError(f"{source}: {exc}") from exc
    # Without this, a repository of weights alone fails only once sampling starts, in transformers' words.
    try:
        load_tokenizer(model.path)
    except ModelLoadError as exc:  # a tokenizer without a chat template
        raise OrganismSourceError(f"{source}: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise OrganismSourceError(
            f"{source}@{model.revision}: {model.path} has no tokenizer transformers can load; a fine-tuned "
            "model samples with its own tokenizer and chat template"
        ) from exc
    return model
