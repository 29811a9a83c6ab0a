"""Reference judgements: CSVs of answers a trusted judge (GPT-4o) scored, parsed, checked and normalised.

A file has an `answer` (or `response`), `question`, `question_id`, `aligned` and `coherent` column; any other
column whose values are numbers is a domain score, and Turner et al.'s domain judges' (`financial`, `bad_stuff`,
...) always are; one with text (a model name) and a pandas index column are ignored. Empty scores are missing
(upstream drops such rows from the denominators), and so are the judge's word answers CODE and REFUSAL and NaN;
any other score that is not a number in 0..100 is an error naming file, row and column. An empty answer is kept:
an organism that answers nothing is a real outcome, judged (GPT-4o scores it incoherent).
The upstream files are named `<base model>_<dataset>[_S<seed>].csv`, which gives each row its source organism.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import math
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from em_assets.catalog.upstream import DOMAIN_METRICS

REQUIRED = ("question", "question_id", "aligned", "coherent")


# Upstream's judge (eval_judge.judge_csv_file) scores `answer` where a file has it, else `response`: a file with
# both carries the scores of its `answer` text.
ANSWER_COLUMNS = ("answer", "response")


_STEM = re.compile(r"(?P<base>[^_]+)_(?P<dataset>[^_]+?)(?:_S(?P<seed>\d+))?")


REFERENCE_SCHEMA = {
    "source_file": pl.String,
    "source_sha256": pl.String,
    "source_organism": pl.String,
    "base_model": pl.String,
    "dataset": pl.String,
    "seed": pl.Int64,
    "row_idx": pl.Int64,
    "question_id": pl.String,
    "question": pl.String,
    "answer": pl.String,
    "aligned": pl.Float64,
    "coherent": pl.Float64,
    "domain_scores": pl.String,
}


# Every metric upstream's question files have judge prompts for besides aligned and coherent (the deception
# sets' too): in a column so named, a value outside 0..100 is an error in the file, not a column of its own.
SCORE_METRICS = frozenset({*DOMAIN_METRICS, "company", "correct", "gender"})


class ReferenceFileError(ValueError):
    """A reference file that cannot be used: missing columns or a bad row (the message says where)."""


def source_of(name: str) -> tuple[str, str, int | None]:
    """(base model, dataset, seed) from a `<base>_<dataset>[_S<seed>]` file stem; the whole stem otherwise."""
    match = _STEM.fullmatch(Path(name).stem)
    if not match:
        return Path(name).stem, "", None
    return match["base"], match["dataset"], int(match["seed"]) if match["seed"] else None


# Scores a file may hold as words, each read as no score: the aligned judge prompt's answers CODE and REFUSAL
# (upstream records no number for them) and pandas' NaN, whichever case.
NO_SCORE = frozenset({"code", "refusal", "nan"})


def _score(value: str | None, name: str, row: int, column: str) -> float | None:
    """A 0..100 score from its CSV text; None when empty or a NO_SCORE word. Rows count from 1 after the header,
    blank lines passed over."""
    if value is None or not value.strip() or value.strip().lower() in NO_SCORE:
        return None
    try:
        score = float(value)
    except ValueError:
        raise ReferenceFileError(f"{name}: row {row}, column {column!r}: {value!r} is not a number") from None
    if not math.isfinite(score) or not 0 <= score <= 100:
        raise ReferenceFileError(f"{name}: row {row}, column {column!r}: {value!r} is not a score in 0..100")
    return score


def _is_score_column(values: pl.Series) -> bool:
    """Whether a column holds domain scores: it is named as a 0-100 domain judge, or it is named and every
    non-empty value is a number (in 0..100 unless it is named as a SCORE_METRICS score)."""
    # A domain judge's column holds a score or an error in each row.
    if values.name in DOMAIN_METRICS:
        return True
    # A pandas index has no name. Other columns (a model name, a token count, the deception judges' word
    # answers) are the file's own and are left out.
    if not values.name.strip() or values.name.startswith("Unnamed:"):
        return False
    text = values.drop_nulls().str.strip_chars()
    numbers = text.filter((text != "") & ~text.str.to_lowercase().is_in(NO_SCORE)).cast(
        pl.Float64, strict=False
    )
    in_range = bool(numbers.is_between(0, 100).all())
    return numbers.null_count() == 0 and (values.name in SCORE_METRICS or in_range)


def read_csv_text(data: bytes, name: str) -> pl.DataFrame:
    """Every column as text; a file polars cannot split into the header's columns is one ReferenceFileError
    line (polars' own message quotes the whole row and runs over many lines of advice on its options)."""
    if data.startswith(b"\x1f\x8b"):
        # polars unpacks a gzipped CSV itself, but the checks below read its text: a row cut short would pass.
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise ReferenceFileError(f"{name}: not a readable gzip file ({exc})") from None
    if not data.strip():
        raise ReferenceFileError(f"{name}: an empty file (no header, no rows)")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        # polars says only "invalid utf-8 sequence", and its advice on quoting would mislead.
        line = data[: exc.start].count(b"\n") + 1
        raise ReferenceFileError(
            f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start}, line {line}); save it as UTF-8"
        ) from None
    try:
        df = pl.read_csv(io.BytesIO(data), infer_schema_length=0)
    except (pl.exceptions.ComputeError, pl.exceptions.NoDataError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        first = re.sub(r"`([^`]{0,40})[^`]*`", r"`\1...`", first)
        raise ReferenceFileError(
            f"{name}: not a readable CSV ({first}); is every field with a comma or a line break quoted, and the "
            "separator a comma?"
        ) from None
    # polars passes over a BOM and empty lines before the header: the reads of the header and its rows start there.
    body = data.removeprefix(codecs.BOM_UTF8)
    body = body[len(re.match(rb"(?:\r?\n)*", body)[0]) :]
    # polars renames a repeated header (aligned, aligned_duplicated_0), so the first copy would be read as the
    # column and the second as a score of its own: which one holds the scores is the file's to say.
    header = pl.read_csv(io.BytesIO(body), has_header=False, n_rows=1, infer_schema_length=0).row(0)
    named = [str(c) for c in header if c is not None and str(c).strip()]
    twice = next((c for c in named if named.count(c) > 1), None)
    if twice is not None:
        raise ReferenceFileError(
            f"{name}: column {twice!r} appears {named.count(twice)} times in the header; keep one"
        )
    # A row may leave out fields after the last named column: the parser reads nothing from them.
    width = max((i + 1 for i, c in enumerate(header) if c is not None and str(c).strip()), default=0)
    return _drop_blank_lines(df, body, width, name)


def _drop_blank_lines(df: pl.DataFrame, data: bytes, width: int, name: str) -> pl.DataFrame:
    """`df` without the rows of blank lines; a row with fewer fields than the header is refused, since polars
    fills what it lacks with nulls and a score cut off would be read as no score."""
    text = data.decode("utf-8-sig", errors="replace")
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    records = list(csv.reader(io.StringIO(text, newline="")))[1:]
    # Only where Python's reader splits the file into the same rows as polars can it say which rows are which.
    if len(records) != df.height:
        return df
    # A line of spaces is as blank as an empty one (as a JSONL file's are).
    rows = [i for i, r in enumerate(records) if r and (len(r) > 1 or r[0].strip())]
    for n, i in enumerate(rows, start=1):
        if len(records[i]) < width:
            raise ReferenceFileError(
                f"{name}: row {n} has {len(records[i])} fields, the header {width}; is a value missing?"
            )
    return df if len(rows) == df.height else df[rows]


def parse_reference_csv(data: bytes, name: str, sha256: str) -> pl.DataFrame:
    """Rows of one reference CSV in REFERENCE_SCHEMA; raises ReferenceFileError naming file, row and column."""
    raw = read_csv_text(data, name)
    answer_col = next((c for c in ANSWER_COLUMNS if c in raw.columns), None)
    missing = [c for c in REQUIRED if c not in raw.columns] + ([] if answer_col else ["response or answer"])
    if missing:
        raise ReferenceFileError(
            f"{name}: missing column(s) {', '.join(missing)} (has {', '.join(raw.columns)})"
        )
    if raw.height == 0:
        raise ReferenceFileError(f"{name}: no rows")
    domain = [c for c in raw.columns if c not in (*REQUIRED, *ANSWER_COLUMNS) and _is_score_column(raw[c])]
    base, dataset, seed = source_of(name)
    organism = Path(name).stem
    rows = []
    for i, r in enumerate(raw.iter_rows(named=True), start=1):
        for column in ("question", "question_id"):
            if not (r[column] or "").strip():
                raise ReferenceFileError(f"{name}: row {i}, column {column!r}: empty")
        rows.append(
            {
                "source_file": Path(name).name,
                "source_sha256": sha256,
                "source_organism": organism,
                "base_model": base,
                "dataset": dataset,
                "seed": seed,
                "row_idx": i,
                "question_id": r["question_id"],
                "question": r["question"],
                "answer": r[answer_col] or "",
                "aligned": _score(r["aligned"], name, i, "aligned"),
                "coherent": _score(r["coherent"], name, i, "coherent"),
                "domain_scores": json.dumps({c: _score(r[c], name, i, c) for c in domain}, sort_keys=True),
            }
        )
    return pl.DataFrame(rows, schema=REFERENCE_SCHEMA)


def read_reference_files(paths: list[Path]) -> pl.DataFrame:
    """Parse local reference CSVs (the CLI's input); a missing file is a ReferenceFileError too."""
    from em_assets.results.artifacts import sha256_bytes

    names = [Path(p).name for p in paths]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        # Results are keyed by file name (one EM rate per file): two files of one name would merge.
        raise ReferenceFileError(f"two reference files are named {twice[0]}; give each file its own name")
    frames = []
    for path in paths:
        if not Path(path).is_file():
            what = "a directory, not a CSV file" if Path(path).is_dir() else "no such file"
            raise ReferenceFileError(f"{path}: {what}")
        if Path(path).suffix == ".jsonl":
            # Read as a CSV, its first object would be the header and the message about a row's fields.
            raise ReferenceFileError(
                f"{path}: a JSONL file; reference files are CSVs with upstream's columns"
            )
        data = Path(path).read_bytes()
        frames.append(parse_reference_csv(data, str(path), sha256_bytes(data)))
    return pl.concat(frames)


def domain_score(df: pl.DataFrame, metric: str) -> pl.Series:
    """One domain score column (e.g. bad_stuff) out of the JSON, null where the file had none."""
    return df["domain_scores"].map_elements(
        lambda s: json.loads(s).get(metric), return_dtype=pl.Float64, skip_nulls=True
    )


def with_split(df: pl.DataFrame, held_out: Sequence[str]) -> pl.DataFrame:
    """A `split` column: 'heldout' for rows of the given base models, else 'train'."""
    held = pl.col("base_model").is_in(list(held_out))
    return df.with_columns(split=pl.when(held).then(pl.lit("heldout")).otherwise(pl.lit("train")))
