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
    with pl.Config(
        tbl_formatting="MARKDOWN",
        tbl_hide_column_data_types=True,
        tbl_hide_dataframe_shape=True,
        tbl_rows=max_rows,
        tbl_cols=-1,
        fmt_str_lengths=120,
        float_precision=3,
    ):
        return dg.MetadataValue.md(str(df.head(max_rows)))


def md_image(path: Path, title: str) -> dg.MetadataValue:
    """A PNG inlined as a data URI so the UI shows the figure itself, not its path."""
    b64 = base64.b64encode(Path(path).read_bytes()).decode()
    return dg.MetadataValue.md(f"### {title}\n\n![{title}](data:image/png;base64,{b64})")
