"""Metadata helpers shared by assets: what the UI shows for a table or a plot."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from gtex_assets.core.tables import CATALOG_DATABASE, column_descriptions


def _polars(df: Any) -> pl.DataFrame:
    return df if isinstance(df, pl.DataFrame) else pl.from_pandas(df)


def column_schema(name: str, df: Any) -> dg.TableSchema:
    """The table's columns as written (names and types), described from the table registry."""
    frame = _polars(df)
    desc = column_descriptions(name)
    return dg.TableSchema(
        columns=[
            dg.TableColumn(col, str(dtype), description=desc.get(col))
            for col, dtype in frame.schema.items()
        ]
    )


def table_metadata(
    df: Any,
    path: Path,
    preview_rows: int = 10,
    name: str | None = None,
    rows: int | None = None,
) -> dict[str, dg.MetadataValue]:
    """Row count, path, column schema, the DuckDB name and a markdown preview of a written
    table (``name`` defaults to the file's / per-slide folder's name, which is the view's;
    ``rows`` when ``df`` is only a sample of the table). List/array columns stay out of the
    preview."""
    path = Path(path)
    name = name or (path.parent.name if path.parent.name != "tables" else path.stem)
    frame = _polars(df)
    flat = [c for c, t in frame.schema.items() if not t.is_nested()]
    preview = frame.head(preview_rows).select(flat).to_pandas()
    return {
        "dagster/row_count": dg.MetadataValue.int(frame.height if rows is None else rows),
        "dagster/table_name": dg.MetadataValue.text(f"{CATALOG_DATABASE}.main.{name}"),
        "dagster/column_schema": dg.MetadataValue.table_schema(column_schema(name, frame)),
        "path": dg.MetadataValue.path(str(path)),
        "preview": dg.MetadataValue.md(preview.to_markdown(index=False)),
    }


def counts_md(series: Any, label: str = "count") -> dg.MetadataValue:
    s = series if isinstance(series, pl.Series) else pl.from_pandas(series)
    counts = s.value_counts(name=label).sort(s.name or "")
    return dg.MetadataValue.md(counts.to_pandas().to_markdown(index=False))


def md_table(df: Any, digits: int = 4) -> dg.MetadataValue:
    """A small frame as a markdown table (floats rounded)."""
    frame = _polars(df)
    frame = frame.with_columns(pl.col(pl.Float32, pl.Float64).round(digits))
    return dg.MetadataValue.md(
        frame.to_pandas().to_markdown(index=False) if frame.height else "none"
    )


def plot_metadata(path: Path) -> dg.MetadataValue:
    """A PNG embedded in the asset's metadata (the UI renders it)."""
    b64 = base64.b64encode(Path(path).read_bytes()).decode()
    return dg.MetadataValue.md(f"![{Path(path).name}](data:image/png;base64,{b64})")


def input_failure(e: Exception) -> dg.Failure:
    """A user-fixable input problem (``core.errors.InputError``) as a Dagster failure whose
    description is the message, not a traceback. Never retried: the download retry policy is
    for transient network errors, and bad data stays bad."""
    return dg.Failure(allow_retries=False, description=str(e))
