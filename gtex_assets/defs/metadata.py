"""Metadata helpers shared by assets: what the UI shows for a table or a plot."""

from __future__ import annotations

import base64
from pathlib import Path

import dagster as dg
import pandas as pd


def table_metadata(
    df: pd.DataFrame, path: Path, preview_rows: int = 10
) -> dict[str, dg.MetadataValue]:
    """Row count, path and a markdown preview of a written table."""
    return {
        "dagster/row_count": dg.MetadataValue.int(len(df)),
        "path": dg.MetadataValue.path(str(path)),
        "preview": dg.MetadataValue.md(df.head(preview_rows).to_markdown(index=False)),
    }


def counts_md(series: pd.Series, label: str = "count") -> dg.MetadataValue:
    counts = series.value_counts().sort_index().rename(label).reset_index()
    return dg.MetadataValue.md(counts.to_markdown(index=False))


def plot_metadata(path: Path) -> dg.MetadataValue:
    """A PNG embedded in the asset's metadata (the UI renders it)."""
    b64 = base64.b64encode(Path(path).read_bytes()).decode()
    return dg.MetadataValue.md(f"![{Path(path).name}](data:image/png;base64,{b64})")
