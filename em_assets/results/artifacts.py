"""Content hashes: the sha256 every pinned input and every artifact file is recorded and checked by; and the
temporary names files are written under before they are renamed into place."""

from __future__ import annotations

import functools
import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from em_assets.results.errors import MissingUpstreamError


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def private_tmp(path: Path, suffix: str = ".tmp") -> Path:
    """A hidden sibling of `path` no other writer names: two processes writing `path` at once (two report runs,
    two steps fetching one file) each rename a whole file of their own into place."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}{suffix}")


def write_atomically(path: Path, write: Callable[[Path], object], suffix: str = ".tmp") -> Path:
    """`write(tmp)` to a private temporary sibling renamed over `path`: readers see the old file or the whole
    new one, and a failed write leaves no temporary file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = private_tmp(path, suffix)
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def file_version(path: Path | str) -> tuple[str, int, int, int, int]:
    """(real path, inode, size, mtime_ns, ctime_ns): changes whenever the file is rewritten or replaced, so
    what a process derives from a file can be kept under it."""
    st = os.stat(path)
    return os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def sha256_file(path: Path | str) -> str:
    # Steps of one process hash the same model and adapter files again and again (the GGUF alone is a second
    # each time): a file is hashed once per version.
    return _sha256_of(file_version(path))


@functools.lru_cache(maxsize=256)
def _sha256_of(version: tuple[str, int, int, int, int]) -> str:
    with open(version[0], "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# The weights file of a saved LoRA adapter, and of a fully fine-tuned model directory.
ADAPTER_FILE = "adapter_model.safetensors"


MODEL_FILE = "model.safetensors"


def weights_file(directory: Path | str) -> Path:
    """The trained weights of a saved adapter or fully fine-tuned model directory."""
    adapter = Path(directory) / ADAPTER_FILE
    return adapter if adapter.exists() else Path(directory) / MODEL_FILE


def check_weights(adapter: dict) -> None:
    """The organism's saved weights still have the sha256 its lora_adapters row recorded. Retraining writes into
    the same folder, so a step killed between replacing the files and writing the row would otherwise have
    later stages label the new weights with the old sha256."""
    check_recorded_weights(
        adapter.get("organism"), adapter.get("adapter_path"), adapter.get("adapter_sha256")
    )


def check_recorded_weights(
    organism: str | None, path: str | None, recorded: str | None, row: str = "adapter"
) -> None:
    """The weights under `path` still have the sha256 `recorded` in the organism's `row` row (check_weights);
    nothing to check where either is missing."""
    if not path or not recorded:
        return
    weights = weights_file(path)
    actual = sha256_file(weights) if weights.is_file() else "missing"
    if actual != recorded:
        raise MissingUpstreamError(
            f"organism {organism}: {weights} has sha256 {actual[:12]}, not the {recorded[:12]} its {row} row "
            "recorded; materialise lora_adapter again"
        )
