"""Loading one profile of the grid file, with errors that name the offending key path."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from em_assets.grid.schema import GridConfig
from em_assets.settings import GRID_ENV, settings

# Every step of a run reads the grid afresh (edits apply to the next step); libyaml's parser, where PyYAML was
# built with it, parses it many times faster than the pure-Python one, with the same safe constructors.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MERGE_TAG = "tag:yaml.org,2002:merge"


class GridError(ValueError):
    """A grid file that is missing, malformed, or names a wrong key or value."""


def _format_errors(err: ValidationError, prefix: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def _repeated_key(node: yaml.Node | None, seen: set[int]) -> tuple[yaml.Node, yaml.Node] | None:
    """The first key given twice in one mapping, both times: YAML keeps the last value, so a recipe copied and left
    under its old name would replace the first without a word. Merge keys (<<) may be overridden, as YAML allows."""
    if node is None or id(node) in seen:
        return None
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], yaml.Node] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != MERGE_TAG:
                if (key.tag, key.value) in first:
                    return first[key.tag, key.value], key
                first[key.tag, key.value] = key
        children = [n for pair in node.value for n in pair]
    else:
        return None
    return next((found for child in children if (found := _repeated_key(child, seen))), None)


def _read_yaml(text: str, path: Path) -> object:
    """The document, refusing a key repeated in a mapping (GridError)."""
    loader = SAFE_LOADER(text)
    try:
        node = loader.get_single_node()
        twice = _repeated_key(node, set())
        if twice is not None:
            first, again = (k.start_mark.line + 1 for k in twice)
            raise GridError(
                f"{path}: key {twice[1].value!r} on line {again} is given on line {first} too, in the same "
                "mapping; YAML would keep only the last: rename or remove one"
            )
        return loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()


def load_grid(path: Path | str | None = None, profile: str | None = None) -> GridConfig:
    """Load one profile of the grid file; errors name the offending key path."""
    path = Path(path) if path is not None else settings().grid_path
    profile = profile or settings().profile
    try:
        # UTF-8 whatever the locale, as YAML is and as add-model writes it.
        doc = _read_yaml(path.read_text(encoding="utf-8"), path)
    except FileNotFoundError as exc:
        raise GridError(f"grid file {path} not found (set {GRID_ENV})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise GridError(f"grid file {path} cannot be read as text: {exc}") from exc
    except yaml.YAMLError as exc:
        raise GridError(f"{path}: not valid YAML: {exc}") from exc
    profiles = (doc or {}).get("profiles") if isinstance(doc, dict) else None
    if not isinstance(profiles, dict):
        raise GridError(f"{path}: expected a top-level 'profiles' mapping")
    if profile not in profiles:
        raise GridError(f"{path}: no profile {profile!r}; profiles are {sorted(map(str, profiles))}")
    try:
        return GridConfig.model_validate(profiles[profile])
    except ValidationError as exc:
        raise GridError(f"{path}: invalid grid\n{_format_errors(exc, f'profiles.{profile}')}") from exc
