"""Expression (group ``expression``): the streaming GCT -> filtered log-TPM matrix, SPEC §5."""

import dagster as dg
import polars as pl

from gtex_assets.core.errors import InputError
from gtex_assets.defs import automation as auto
from gtex_assets.defs import settings
from gtex_assets.defs.expression.configs import GeneLogTpmConfig
from gtex_assets.defs.metadata import input_failure, md_table, plot_metadata, table_metadata
from gtex_assets.lib.expression.log_tpm import (
    GENE_VIEW_SQL,
    ExpressionPaths,
    build_sample_table,
    expression_summary,
    filter_gct,
    write_outputs,
)
from gtex_assets.lib.expression.plots import plot_writers
from gtex_assets.lib.ingest.sources import Kind
from gtex_assets.resources import DataLakeResource, GTExSourceResource

GROUP = "expression"
INPUTS = ("sample_attributes", "histology_annotations")  # tables that map aliquots to tissues
TABLES = {
    "expression_genes": "Every GCT gene: max/mean/std logTPM, kept, or the filter that dropped it.",
    "expression_samples": "Aliquot -> tissue sample -> tissue; sample_index = matrix row.",
    "expression_matrix": "Gene-major log-TPM (one list per gene) for SQL; see gene_expression.",
}


def _specs() -> list[dg.AssetSpec]:
    # A function, not a module-level list: the defs loader would take bare specs as assets.
    return [
        dg.AssetSpec(
            "gene_log_tpm",
            group_name=GROUP,
            kinds={"numpy"},
            deps=list(INPUTS),
            code_version="2",
            description="SPEC §5: the GTEx gene TPM GCT streamed once into log2(1+TPM); genes "
            "kept when logTPM > 5 in at least one sample, std > 0.5, and a standard, unique "
            "symbol. `expression/log_tpm.npy`: float32 samples x kept genes (load with mmap). "
            "All outputs are replaced together, only when complete.",
        ),
        *(
            dg.AssetSpec(
                name, group_name=GROUP, kinds={"parquet"}, deps=["gene_log_tpm"], description=desc
            )  # fmt: skip
            for name, desc in TABLES.items()
        ),
    ]


def _read(path) -> pl.DataFrame | None:
    return pl.read_parquet(path) if path.is_file() else None


@dg.multi_asset(name="gene_log_tpm", specs=_specs(), retry_policy=auto.DOWNLOAD_RETRY)
def gene_log_tpm(context: dg.AssetExecutionContext, config: GeneLogTpmConfig,
                 lake: DataLakeResource, gtex_source: GTExSourceResource):  # fmt: skip
    config = settings.resolve(context, config, lake)
    lk, src = lake.lake(), gtex_source.spec()
    gct_path = src.fetch(Kind.GCT, lk.raw)
    version = src.version(Kind.GCT, raw_dir=lk.raw)
    try:
        res = filter_gct(gct_path, config.params(), workers=config.n_workers)
    except InputError as e:  # a malformed GCT: the message names file, line and column
        raise input_failure(e) from e
    samples = build_sample_table(res.sample_ids, *(_read(lk.table(t)) for t in INPUTS))
    plots = plot_writers(res, lk.plots)
    manifest = write_outputs(res, samples, lk.root, source_version=version, extra_files=plots)
    summary = expression_summary(res, samples)
    context.log.info(f"{gct_path}: kept {summary['genes_kept']} of {summary['genes_in']} genes")
    paths = ExpressionPaths.under(lk.root)
    yield dg.MaterializeResult(
        asset_key="gene_log_tpm",
        metadata={
            **summary,
            "matrix": dg.MetadataValue.path(str(paths.matrix_npy)),
            "filter_funnel": md_table(res.funnel()),
            "gene_expression_view_sql": dg.MetadataValue.md(f"```sql\n{GENE_VIEW_SQL}\n```"),
            "params_hash": manifest["params_hash"],
            **{f"plot_{key}": plot_metadata(path) for key, path in plots.paths.items()},
        },
        # The source file's version: automation compares it with the GCT's current one.
        data_version=dg.DataVersion(version),
    )
    yield from _table_results(res, samples, paths, manifest["params_hash"])


def _table_results(res, samples: pl.DataFrame, paths: ExpressionPaths, version: str):
    """One materialisation per table, its schema and row count (the matrix by a 10-row head:
    one list of every sample's value per gene is large)."""
    matrix_head = pl.read_parquet(paths.matrix_parquet, n_rows=10)
    for name, df, path, rows in (
        ("expression_genes", res.genes, paths.genes, None),
        ("expression_samples", samples, paths.samples, None),
        ("expression_matrix", matrix_head, paths.matrix_parquet, res.n_kept),
    ):
        yield dg.MaterializeResult(asset_key=name, metadata=table_metadata(df, path, rows=rows),
                                   data_version=dg.DataVersion(version))  # fmt: skip
