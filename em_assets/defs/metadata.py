"""Helpers that turn results into Dagster metadata the UI renders: markdown tables and inline PNGs."""

import base64
from pathlib import Path

import dagster as dg
import polars as pl

# Shown beside every judged EM rate: the judge's error rates and the rate corrected for them.
CORRECTED_SHOWN = [
    "judge_sensitivity",
    "judge_specificity",
    "em_rate_corrected",
    "em_corrected_lo",
    "em_corrected_hi",
]


def md_table(df: pl.DataFrame, max_rows: int = 50) -> dg.MetadataValue:
    """The first rows as a markdown table, saying how many there are when not all are shown; text cells
    (questions and names from files) are shown as text."""
    more = f"\n\nThe first {max_rows} of {df.height} rows." if df.height > max_rows else ""
    df = df.head(max_rows).with_columns(
        pl.col(pl.String).map_batches(_as_markdown_text, return_dtype=pl.String)
    )
    with pl.Config(
        tbl_formatting="MARKDOWN",
        tbl_hide_column_data_types=True,
        tbl_hide_dataframe_shape=True,
        tbl_rows=max_rows,
        tbl_cols=-1,
        fmt_str_lengths=120,
        float_precision=3,
        # Polars wraps a table wider than this inside its cells, which markdown reads as extra rows.
        tbl_width_chars=65_535,
    ):
        return dg.MetadataValue.md(str(df) + more)


# A cell's line breaks would start new rows, a "|" a new cell, and link, image, code or HTML syntax would
# render. Names keep their "_" (CommonMark never reads one inside a word as emphasis).
_MARKDOWN_SPECIAL = r"([\\`*\[\]<>|])"


def _as_markdown_text(cells: pl.Series) -> pl.Series:
    return cells.str.replace_all(r"\s*\n\s*", " ").str.replace_all(_MARKDOWN_SPECIAL, r"\$1")


def sampling_text(ways: tuple[str, ...]) -> str:
    """A sweep's `sampling` entry: each way its points were sampled, or that every answer was reused."""
    return "; ".join(ways) or "nothing sampled"


def md_image(path: Path, title: str) -> dg.MetadataValue:
    """A PNG inlined as a data URI so the UI shows the figure itself, not its path."""
    b64 = base64.b64encode(Path(path).read_bytes()).decode()
    return dg.MetadataValue.md(f"### {title}\n\n![{title}](data:image/png;base64,{b64})")
