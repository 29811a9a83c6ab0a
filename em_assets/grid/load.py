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


class GridError(ValueError):
    """A grid file that is missing, malformed, or names a wrong key or value."""


def _format_errors(err: ValidationError, prefix: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def load_grid(path: Path | str | None = None, profile: str | None = None) -> GridConfig:
    """Load one profile of the grid file; errors name the offending key path."""
    path = Path(path) if path is not None else settings().grid_path
    profile = profile or settings().profile
    try:
        doc = yaml.load(path.read_text(), Loader=SAFE_LOADER)
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
