"""What a base model source may be, checked before a command writes it into the grid."""

from __future__ import annotations

import json
import re
from pathlib import Path

from em_assets.grid.load import GridError

EMBEDDED_PREFIX = "embedded:"
# Hugging Face's rule for repo ids (huggingface_hub.utils.validate_repo_id), with the owner required.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def check_source(source: str, embedded: list[str]) -> str:
    """The kind of a valid source ("hub", "local", "embedded"); a GridError saying what is valid otherwise."""
    valid = (
        "a Hugging Face id owner/name (e.g. Qwen/Qwen2.5-0.5B-Instruct), an existing local model directory "
        f"(holding config.json), or {EMBEDDED_PREFIX}<name> with name one of {embedded}"
    )
    if source.startswith(EMBEDDED_PREFIX):
        if source.removeprefix(EMBEDDED_PREFIX) in embedded:
            return "embedded"
        raise GridError(f"unknown embedded model {source!r}; a base model source is {valid}")
    if not source.strip():
        raise GridError(f"the base model source is empty; a base model source is {valid}")
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            json_object(path / "config.json")
            return "local"
        raise GridError(f"{source!r} is a directory without config.json; a base model source is {valid}")
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1
    hub_like = _HUB_ID.fullmatch(source) and not any(bad in source for bad in ("..", "--"))
    if not looks_local and hub_like and not source.endswith((".", "-")):
        return "hub"
    missing = f"no directory {source!r}" if looks_local else f"{source!r} is not a model source"
    raise GridError(f"{missing}; a base model source is {valid}")


def json_object(path: Path, error: type[GridError] = GridError) -> dict:
    """A config file's JSON object; `error` where it cannot be read or holds something else, so a config no loader
    could read is refused when its source is checked, not when a step first loads it."""
    try:
        parsed = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise error(f"{path} holds {json.dumps(parsed)[:40]}, not a config object")
    return parsed


class OrganismSourceError(GridError):
    """An adapter, model or answers file a recipe names that cannot be used (the message says where and why)."""
