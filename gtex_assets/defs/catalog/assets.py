"""The DuckDB catalog: views over every table, so everything is queryable with SQL."""

import dagster as dg
import pandas as pd

from gtex_assets.defs.analysis.assets import (
    cluster_transcriptome,
    embedding_views,
    feature_comparison,
    gene_r2,
)
from gtex_assets.defs.embeddings.assets import slide_embeddings, tile_embeddings
from gtex_assets.defs.expression.assets import gene_log_tpm
from gtex_assets.defs.ingest.assets import (
    gtex_histology_annotations,
    gtex_sample_attributes,
    raw_slides,
    selected_slides,
)
from gtex_assets.defs.model.assets import tissue_classifier
from gtex_assets.defs.tiles.assets import balanced_tile_sample, filtered_tiles, slide_tiles
from gtex_assets.lib.catalog.views import build_catalog
from gtex_assets.resources import DataLakeResource


@dg.asset(
    group_name="catalog",
    kinds={"duckdb"},
    deps=[
        gtex_histology_annotations,
        gtex_sample_attributes,
        selected_slides,
        raw_slides,
        gene_log_tpm,
        slide_tiles,
        filtered_tiles,
        balanced_tile_sample,
        tissue_classifier,
        tile_embeddings,
        slide_embeddings,
        embedding_views,
        gene_r2,
        cluster_transcriptome,
        feature_comparison,
    ],
    pool="duckdb_catalog",  # the only writer of gtex.duckdb; dagster.yaml limits pools to 1
)
def duckdb_catalog(
    context: dg.AssetExecutionContext, lake: DataLakeResource
) -> dg.MaterializeResult:
    """`gtex.duckdb` under the data root: a view per Parquet table (per-slide tables read by
    glob, so new slides show up without a rebuild) and derived views such as
    `slide_quarantine`. Open it with `duckdb -readonly gtex_data/gtex.duckdb` or `gtex-assets sql`."""
    lk = lake.lake()
    views = build_catalog(lk.catalog, lk.tables)
    df = pd.DataFrame([{"view": v.name, "rows": v.rows, "source": v.source} for v in views])
    context.log.info(f"catalog {lk.catalog}: {len(views)} views")
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(lk.catalog)),
            "views": dg.MetadataValue.md(df.to_markdown(index=False) if len(df) else "none"),
            "view_count": dg.MetadataValue.int(len(views)),
        }
    )
