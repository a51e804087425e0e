"""The DuckDB catalog: one file of views over every Parquet table under the data root.

Parquet stays the source of truth; the catalog only holds view definitions, so it is rebuilt
into a temp file and renamed over the old one. Readers that have the old file open keep
their snapshot, and nobody ever sees a half-built catalog.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import duckdb

from gtex_assets.core.atomic import atomic_path
from gtex_assets.core.sql import quote_literal

# Views derived from base tables; created when every table they read exists.
DERIVED_VIEWS: dict[str, tuple[tuple[str, ...], str]] = {
    "slide_quarantine": (
        ("raw_slides",),
        "SELECT tissue_sample_id, tissue, reason, path FROM raw_slides WHERE status <> 'ok'",
    ),
    "tiling_problems": (
        ("tiling_status",),
        "SELECT tissue_sample_id, tissue, status, reason, n_tiles, n_errors FROM tiling_status "
        "WHERE status <> 'ok' OR n_errors > 0",
    ),
    "tile_verdict_counts": (
        ("filtered_tiles",),
        "SELECT tissue, verdict, count(*) AS tiles FROM filtered_tiles GROUP BY ALL ORDER BY ALL",
    ),
    "slide_split": (
        ("selected_slides", "donor_split"),
        "SELECT s.tissue_sample_id, s.tissue, s.subject_id, d.split "
        "FROM selected_slides s JOIN donor_split d USING (subject_id)",
    ),
    "slide_clusters": (
        ("slide_embeddings",),
        "SELECT model_id, cluster, tissue, count(*) AS slides FROM slide_embeddings GROUP BY ALL",
    ),
    # Long view of the gene-major matrix: one gene's values across samples read one row group.
    "gene_expression": (
        ("expression_matrix", "expression_samples"),
        "SELECT s.aliquot_id, s.tissue_sample_id, s.tissue, m.gene_id, m.symbol, "
        "m.log_tpm[s.sample_index + 1] AS log_tpm "
        "FROM expression_matrix m CROSS JOIN expression_samples s",
    ),
}

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class View:
    name: str
    source: str  # the parquet file or glob it reads
    rows: int


def discover_tables(tables_dir: Path) -> dict[str, str]:
    """``name -> parquet path or glob`` for ``tables/<name>.parquet`` and ``tables/<name>/*.parquet``."""
    found: dict[str, str] = {}
    if not tables_dir.is_dir():
        return found
    for p in sorted(tables_dir.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file() and p.suffix == ".parquet" and _NAME_RE.match(p.stem):
            found[p.stem] = str(p.resolve())
        elif p.is_dir() and _NAME_RE.match(p.name) and any(p.glob("*.parquet")):
            found[p.name] = str(p.resolve() / "*.parquet")
    return found


def build_catalog(
    catalog_path: Path,
    tables_dir: Path,
    extra_views: dict[str, str] | None = None,
) -> list[View]:
    """(Re)build the catalog file with a view per table plus derived and ``extra_views``
    (``name -> SELECT``); returns the views with their row counts."""
    tables = discover_tables(tables_dir)
    views: list[View] = []
    with atomic_path(catalog_path) as tmp:
        tmp.unlink()  # duckdb wants to create the file itself
        con = duckdb.connect(str(tmp))
        try:
            for name, src in tables.items():
                con.execute(
                    f"CREATE VIEW {name} AS SELECT * FROM read_parquet({quote_literal(src)}, union_by_name=true)"
                )
            derived = {
                n: sql
                for n, (needs, sql) in DERIVED_VIEWS.items()
                if all(t in tables for t in needs)
            }
            for name, sql in {**derived, **(extra_views or {})}.items():
                con.execute(f"CREATE VIEW {name} AS {sql}")
            for name in [*tables, *derived, *(extra_views or {})]:
                n = con.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
                views.append(View(name, tables.get(name, "(derived)"), int(n)))
            con.execute("CHECKPOINT")
        finally:
            con.close()
    return views


def connect_readonly(catalog_path: Path) -> duckdb.DuckDBPyConnection:
    if not Path(catalog_path).is_file():
        raise FileNotFoundError(
            f"no DuckDB catalog at {catalog_path}: materialise the `duckdb_catalog` asset "
            "(or run `gtex-assets demo`) first"
        )
    return duckdb.connect(str(catalog_path), read_only=True)
