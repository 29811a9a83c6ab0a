"""How the command line prints result tables: a statistic beside its interval in one column, markdown tables."""

from __future__ import annotations

import polars as pl

# Every row and column, as a markdown table a terminal or an issue shows alike.
MARKDOWN = {
    "tbl_rows": -1,
    "tbl_cols": -1,
    "tbl_hide_dataframe_shape": True,
    "tbl_hide_column_data_types": True,
    "tbl_formatting": "ASCII_MARKDOWN",
}


def interval_column(value: pl.Expr, lo: pl.Expr, hi: pl.Expr) -> pl.Expr:
    """A column of "value [lo, hi]", each rounded to 3 places; the value alone where an end is unknown, null where
    the value is (judging.agreement's with_interval writes one statistic so, as text)."""
    rounded = [e.round(3) for e in (value, lo, hi)]
    known = pl.format("{} [{}, {}]", *rounded)
    return pl.when(lo.is_null() | hi.is_null()).then(rounded[0].cast(pl.String)).otherwise(known)
