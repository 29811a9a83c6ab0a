"""Editing the grid file in place: add a base model without disturbing comments or layout."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import yaml
from pydantic import ValidationError

from em_assets.grid.load import GridError, load_grid
from em_assets.grid.schema import SLUG, BaseModelSpec


def slug_for(source: str) -> str:
    """A grid name from a source: `Qwen/Qwen2.5-7B-Instruct` -> `qwen2.5-7b-instruct`, a path -> its folder."""
    tail = re.split(r"[/\\:]", source.rstrip("/\\"))[-1]
    slug = re.sub(r"[^a-z0-9._-]+", "-", tail.lower()).strip("-._")[:64].rstrip("-._")
    if not re.fullmatch(SLUG, slug):
        raise GridError(f"cannot derive a model name from {source!r}; pass one")
    return slug


def _same_source(a: str, b: str) -> bool:
    if a == b:
        return True
    # The hub resolves a repository id whatever its letter case (qwen/... is Qwen/...).
    if not any(s.startswith(("/", ".", "~")) for s in (a, b)) and a.lower() == b.lower():
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve()


def _last_line(node: yaml.Node) -> int:
    """0-based line of the node's last character (block collections end at the next token, past comments)."""
    if isinstance(node, yaml.MappingNode | yaml.SequenceNode) and not node.flow_style and node.value:
        last = node.value[-1]
        return _last_line(last[1] if isinstance(node, yaml.MappingNode) else last)
    mark = node.end_mark
    return mark.line if mark.column > 0 else mark.line - 1


class _AliasesInPlace(yaml.SafeLoader):
    """Composes each alias as a leaf where it is written: as its anchor's node it would end wherever the anchor's
    value is written (often above the list), and an entry ending in `<<: *x` would be read as ending there."""

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            event = self.get_event()
            return yaml.ScalarNode(
                "tag:yaml.org,2002:str", f"*{event.anchor}", event.start_mark, event.end_mark
            )
        return super().compose_node(parent, index)


def _child(node: yaml.Node | None, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    if not isinstance(node, yaml.MappingNode):
        return None
    return next(((k, v) for k, v in node.value if k.value == key), None)


def _base_models_node(text: str, path: Path, profile: str) -> yaml.SequenceNode:
    profiles = _child(yaml.compose(text, Loader=_AliasesInPlace), "profiles")
    spec = _child(profiles[1], profile) if profiles else None
    pair = _child(spec[1], "base_models") if spec else None
    # An alias (a list written elsewhere in the file) reads as a leaf, not a list.
    if pair is None or not isinstance(pair[1], yaml.SequenceNode):
        raise GridError(f"{path}: profile {profile!r} has no base_models list of its own to add to")
    return pair[1]


def _insert(text: str, node: yaml.SequenceNode, entry: str) -> str:
    # Text insertion next to the existing entries, rather than a YAML round-trip, keeps every comment,
    # anchor, merge key and flow mapping byte for byte without a second YAML library.
    if node.flow_style:
        close = node.end_mark.index - 1
        sep = " " if text[:close].rstrip().endswith(",") else ", "
        return text[:close] + sep + entry + text[close:]
    lines = text.splitlines(keepends=True)
    # The file's own line ending (a grid saved on Windows keeps CRLF).
    newline = "\r\n" if lines[0].endswith("\r\n") else "\n"
    at = _last_line(node) + 1
    if not lines[at - 1].endswith("\n"):
        lines[at - 1] += newline
    # The first item's dash sets the indentation (the node's own mark may sit on an anchor instead).
    dash = text.rfind("-", 0, node.value[0].start_mark.index)
    indent = dash - text.rfind("\n", 0, dash) - 1
    lines.insert(at, " " * indent + "- " + entry + newline)
    return "".join(lines)


def add_base_model(
    grid_path: Path,
    profile: str,
    source: str,
    name: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> BaseModelSpec:
    """Append a base model to `profiles.<profile>.base_models`; the file changes only if the result validates."""
    grid_path = Path(grid_path)
    grid = load_grid(grid_path, profile)
    # An empty name is refused by validation below rather than read as no name.
    name = slug_for(source) if name is None else name
    for spec in grid.base_models:
        if spec.name == name or _same_source(spec.source, source):
            raise GridError(
                f"{grid_path}: profile {profile!r} already has base model {spec.name!r} ({spec.source})"
            )
    fields: dict[str, str | bool] = {"name": name, "source": source}
    if revision:
        fields["revision"] = revision
    if trust_remote_code:
        fields["trust_remote_code"] = True
    try:
        wanted = BaseModelSpec.model_validate(fields)
    except ValidationError as exc:
        why = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise GridError(f"not a valid base model entry {fields}: {why}") from None
    entry = yaml.safe_dump(fields, default_flow_style=True, sort_keys=False, width=1 << 16).strip()
    return _write_checked(grid_path, profile, _with_entry(grid_path, profile, entry), wanted)


def _with_entry(grid_path: Path, profile: str, entry: str) -> str:
    """The grid file's text with `entry` appended to the profile's base_models, refused where that would change
    another profile (a YAML anchor shares the list) or the layout cannot take it."""
    with open(grid_path, encoding="utf-8", newline="") as fh:
        text = fh.read()
    new_text = _insert(text, _base_models_node(text, grid_path, profile), entry)
    before = yaml.safe_load(text)["profiles"]
    try:
        after = yaml.safe_load(new_text)["profiles"]
    except yaml.YAMLError as exc:
        raise GridError(
            f"{grid_path}: cannot add to this base_models layout, edit it by hand: {exc}"
        ) from exc
    changed = sorted(p for p in before if p != profile and before[p] != after.get(p))
    if changed:
        raise GridError(f"{grid_path}: base_models of {profile!r} is shared (YAML anchor) with {changed}")
    return new_text


def _write_checked(grid_path: Path, profile: str, new_text: str, wanted: BaseModelSpec) -> BaseModelSpec:
    """Write `new_text` beside the grid, and rename it over the grid only if it loads with `wanted` in it."""
    try:
        # The new file is written beside the grid and renamed over it, so its folder must be writable too.
        fd, tmp_name = tempfile.mkstemp(dir=grid_path.parent, prefix=f".{grid_path.name}.", suffix=".tmp")
    except OSError as exc:
        raise GridError(
            f"{grid_path}: cannot write in its folder {grid_path.parent} ({exc.strerror}), left unchanged"
        ) from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(new_text)
        try:
            added = load_grid(tmp, profile).base_model(wanted.name)
        except GridError as exc:
            raise GridError(
                f"{grid_path}: adding {wanted.name!r} would break the grid, left unchanged:\n{exc}"
            ) from exc
        if added != wanted:
            raise GridError(f"{grid_path}: the inserted entry reads back as {added}, not {wanted}")
        try:
            shutil.copymode(grid_path, tmp)
            os.replace(tmp, grid_path)
        except OSError as exc:
            raise GridError(f"{grid_path}: cannot be replaced ({exc.strerror}), left unchanged") from None
    finally:
        tmp.unlink(missing_ok=True)
    return added
