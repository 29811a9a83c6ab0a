"""Content hashes: the sha256 every pinned input and every artifact file is recorded and checked by."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path | str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# The weights file of a saved LoRA adapter, and of a fully fine-tuned model directory.
ADAPTER_FILE = "adapter_model.safetensors"


MODEL_FILE = "model.safetensors"


def weights_file(directory: Path | str) -> Path:
    """The trained weights of a saved adapter or fully fine-tuned model directory."""
    adapter = Path(directory) / ADAPTER_FILE
    return adapter if adapter.exists() else Path(directory) / MODEL_FILE
