"""Answers sampled elsewhere, read from a file: a pinned reference file of the catalog (`reference:<name>`), or a
local CSV (upstream's shape) or JSONL (one object per line, the same fields). Scores a file carries are kept;
a file without `aligned` or `coherent` is read as unscored. Bad rows are ReferenceFileErrors naming file, row
and column."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from em_assets.catalog.reference import (
    ANSWER_COLUMNS,
    ReferenceFileError,
    parse_reference_csv,
    read_csv_text,
)
from em_assets.catalog.upstream import REFERENCE_JUDGEMENTS, fetch_bytes
from em_assets.results.artifacts import sha256_bytes

REFERENCE_PREFIX = "reference:"


SCORES = ("aligned", "coherent")
TEXT_FIELDS = ("question", "question_id")
SAMPLE_SEED = 0


@dataclass(frozen=True)
class AnswersFile:
    """One file's rows (catalog/reference.py's REFERENCE_SCHEMA) and the sha256 of its bytes (the lineage)."""

    name: str
    sha256: str
    rows: pl.DataFrame
    scored: tuple[str, ...]


def _source_bytes(source: str, mirror: Path | str | None, cache_dir: Path | None) -> tuple[str, bytes]:
    if source.startswith(REFERENCE_PREFIX):
        key = source.removeprefix(REFERENCE_PREFIX)
        if key not in REFERENCE_JUDGEMENTS:
            raise ReferenceFileError(
                f"{source}: no such reference file; known: {', '.join(sorted(REFERENCE_JUDGEMENTS))}"
            )
        return f"{key}.csv", fetch_bytes(REFERENCE_JUDGEMENTS[key], mirror, cache_dir)
    path = Path(source).expanduser()
    if not path.is_file():
        what = "a directory, not an answers file" if path.is_dir() else "no such answers file"
        raise ReferenceFileError(f"{source}: {what}")
    if path.suffix not in (".csv", ".jsonl"):
        raise ReferenceFileError(f"{source}: an answers file is .csv or .jsonl")
    return str(path), path.read_bytes()


def _one_value_per_field(pairs: list[tuple[str, object]]) -> dict:
    """An object's fields, refusing a repeated one: json.loads would keep its last value without a word, as a CSV
    with a repeated column would be read by its first."""
    keys = [k for k, _ in pairs]
    twice = next((k for k in keys if keys.count(k) > 1), None)
    if twice is not None:
        raise ReferenceFileError(f"field {twice!r} appears {keys.count(twice)} times")
    return dict(pairs)


def _jsonl_as_csv(data: bytes, name: str) -> bytes:
    """JSONL rows as CSV text, so both shapes go through the one parser and its checks (row N = the N-th
    non-blank line, in these messages and the parser's)."""
    rows = []
    try:
        # A BOM (Windows editors write one) is passed over, as in a CSV.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        # Replacing the bad bytes would import and judge answers the file does not hold; a CSV is refused alike.
        raise ReferenceFileError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    # As parse_chat_jsonl: lines end at "\n" only.
    lines = [line for line in text.split("\n") if line.strip()]
    for i, line in enumerate(lines, start=1):
        try:
            obj = json.loads(line, object_pairs_hook=_one_value_per_field)
        except ReferenceFileError as exc:
            raise ReferenceFileError(f"{name}: row {i}: {exc}; keep one") from None
        except ValueError as exc:
            raise ReferenceFileError(f"{name}: row {i}: not a JSON object ({exc})") from None
        if not isinstance(obj, dict):
            raise ReferenceFileError(f"{name}: row {i}: not a JSON object")
        # str() of an object, list or true would be imported and judged as the answer or question text. Only the
        # answer field the parser reads counts: beside an `answer`, a `response` (a raw API reply) is not read.
        answer = next((c for c in ANSWER_COLUMNS if c in obj), None)
        for field in (*TEXT_FIELDS, answer):
            if isinstance(obj.get(field), dict | list | bool):
                raise ReferenceFileError(
                    f"{name}: row {i}, field {field!r}: {json.dumps(obj[field])[:40]} is not text"
                )
        rows.append({k: "" if v is None else str(v) for k, v in obj.items()})
    if not rows:
        raise ReferenceFileError(f"{name}: no rows")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return pl.DataFrame([{c: r.get(c, "") for c in columns} for r in rows]).write_csv().encode()


def _with_score_columns(csv: bytes, name: str) -> tuple[bytes, tuple[str, ...]]:
    """The CSV with empty aligned/coherent columns added where the file has none, and the ones it had."""
    raw = read_csv_text(csv, name)
    scored = tuple(c for c in SCORES if c in raw.columns)
    if len(scored) == len(SCORES):
        return csv, scored
    missing = [pl.lit(None, pl.String).alias(c) for c in SCORES if c not in scored]
    return raw.with_columns(missing).write_csv().encode(), scored


def read_answers(source: str, mirror: Path | str | None = None, cache_dir: Path | None = None) -> AnswersFile:
    """Every row of an answers source, checked; the sha256 is of the file's own bytes."""
    name, data = _source_bytes(source, mirror, cache_dir)
    sha = sha256_bytes(data)
    csv = _jsonl_as_csv(data, name) if name.endswith(".jsonl") else data
    csv, scored = _with_score_columns(csv, name)
    return AnswersFile(name, sha, parse_reference_csv(csv, name, sha), scored)


def sample_rows(rows: pl.DataFrame, max_answers: int | None) -> pl.DataFrame:
    """A seeded sample of `max_answers` rows in file order (all rows when None or more than the file has)."""
    if max_answers is None or rows.height <= max_answers:
        return rows
    # The seed is fixed: an `answers` organism and the judge's agreement sample of the same file take the same
    # rows, so judging one reuses the other's scores through the judge cache.
    keep = np.sort(np.random.default_rng(SAMPLE_SEED).choice(rows.height, size=max_answers, replace=False))
    return rows[keep.tolist()]
