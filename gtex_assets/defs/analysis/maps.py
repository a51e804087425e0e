"""Spatial maps of predicted expression (SPEC §8): `tile_gene_predictions`, one row per tile ×
mapped gene, from gene_r2's reported model; science in ``lib/analysis/maps``. The map model
(refitted per-gene ridge, gene_r2's penalties) is saved under ``models/tile_gene_maps/`` for
``gtex-assets nearest --slide FILE --map GENE``.
"""

import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field

from gtex_assets.core.atomic import write_parquet
from gtex_assets.core.tables import CATALOG_DATABASE
from gtex_assets.defs.embeddings.assets import tile_embeddings
from gtex_assets.defs.metadata import (
    column_schema,
    input_failure,
    md_table,
    plot_metadata,
    table_metadata,
)
from gtex_assets.lib.analysis import maps as MP
from gtex_assets.lib.embeddings import vector_store as V
from gtex_assets.lib.expression.log_tpm import load_log_tpm
from gtex_assets.resources import DataLakeResource

MAPS_VERSION = "1"
_P = MP.MapParams()
_EMPTY = pl.DataFrame(schema={"tissue_sample_id": pl.Utf8, "x": pl.Int32, "y": pl.Int32,
                              "tile_size": pl.Int32, "sampled": pl.Boolean, "gene": pl.Utf8,
                              "symbol": pl.Utf8, "predicted_log_tpm": pl.Float32,
                              "model_id": pl.Utf8})  # fmt: skip


class TileGenePredictionsConfig(dg.Config):
    top_n: int = Field(default=_P.top_n, description="Map the genes with the best gene_r2 R²")
    genes: list[str] = Field(
        default=list(_P.genes), description="Or map these genes (ids or symbols)"
    )
    slides_per_tissue: int = Field(
        default=_P.slides_per_tissue, description="Example heatmaps per tissue (UI metadata)"
    )
    plot_genes: int = Field(default=_P.plot_genes, description="Genes drawn per example slide")

    def params(self) -> MP.MapParams:
        return MP.MapParams(self.top_n, tuple(self.genes), self.slides_per_tissue, self.plot_genes)


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            MP.TABLE,
            group_name="analysis",
            kinds={"numpy", "parquet"},
            deps=[
                "gene_r2",
                "slide_embeddings",
                tile_embeddings,
                "filtered_tiles",
                "expression_matrix",
                "expression_genes",
                "expression_samples",
            ],
            code_version=MAPS_VERSION,
            description="SPEC §8 spatial maps: each stored tile's predicted log TPM of the top "
            "genes (linear in the embedding: the sampled tiles average to the slide's)",
            metadata={
                "dagster/table_name": f"{CATALOG_DATABASE}.main.{MP.TABLE}",
                "dagster/column_schema": column_schema(MP.TABLE, _EMPTY),
            },
        )
    ],  # fmt: skip
    name=MP.TABLE,
)
def tile_gene_predictions(
    context: dg.AssetExecutionContext, config: TileGenePredictionsConfig, lake: DataLakeResource
):
    """SPEC §8 spatial maps: each stored tile's predicted log TPM of the top genes (linear in
    the embedding, so the sampled tiles average to the slide's prediction), heatmaps over the
    slide for a few example slides per tissue, and the map model for new slides."""
    lk = lake.lake()
    try:
        g = pl.read_parquet(lk.table("gene_r2"))
        tbl = pl.read_parquet(lk.table("slide_embeddings"))
        X_expr, genes, samples = load_log_tpm(lk.root)
        run = MP.run_maps(
            gene_r2=g, slides=tbl.drop(V.VECTOR), expression=X_expr,
            slide_vectors=np.stack(tbl[V.VECTOR].to_numpy()).astype(np.float64),
            expression_genes=genes["gene_id"].astype(str).tolist(),
            samples=pl.from_pandas(samples[["tissue_sample_id", "sample_index"]]),
            tiles_dir=lk.partition_dir(MP.TILE_DIR), partition_table=lk.partition_table,
            plots_dir=lk.plots / "analysis" / "maps", params=config.params(),
        )  # fmt: skip
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise input_failure(e) from e
    out = write_parquet(run.predictions.to_arrow(), lk.table(MP.TABLE))
    MP.save_map_model(run.model, MP.map_model_path(lk.models, run.model.model_id))
    return dg.MaterializeResult(
        metadata={
            **table_metadata(run.predictions, out),
            "model_id": run.model.model_id,
            "genes": md_table(pl.DataFrame({"gene": run.model.genes, "symbol": run.model.symbols})),
            "slides": md_table(run.slides),
            "definition": "tile prediction = ȳ_tissue + (x_tile − x̄_tissue)·β, β = ridge on all "
            "paired slides' embeddings (tissue fixed effects, per-gene λ from gene_r2)",
            **{f"map_{p.stem}": plot_metadata(p) for p in run.pngs},
        }  # fmt: skip
    )
