"""Expression (group ``expression``): the streaming GCT -> filtered log-TPM matrix, SPEC §5."""

import dagster as dg
import pandas as pd
from pydantic import Field

from gtex_assets.defs.ingest.assets import gtex_histology_annotations, gtex_sample_attributes
from gtex_assets.defs.metadata import plot_metadata, table_metadata
from gtex_assets.lib.expression.gct import DECOMPRESSOR
from gtex_assets.lib.expression.log_tpm import (
    GENE_VIEW_SQL,
    HIST_EDGES,
    MIN_MAX_LOG_TPM,
    MIN_STD,
    ExpressionParams,
    ExpressionPaths,
    build_sample_table,
    filter_gct,
    hist_summary,
    write_outputs,
)
from gtex_assets.lib.expression.plots import (
    plot_max_log_tpm,
    plot_std_log_tpm,
    plot_value_distribution,
)
from gtex_assets.lib.ingest.sources import Kind
from gtex_assets.resources import DataLakeResource, GTExSourceResource

GROUP = "expression"
PLOTS = {
    "max": "expression_max_log_tpm.png",
    "std": "expression_std_log_tpm.png",
    "values": "expression_values_before_after.png",
}


class GeneLogTpmConfig(dg.Config):
    """SPEC §5 thresholds and the name rules; the parser's parallelism."""

    min_max_log_tpm: float = Field(
        default=MIN_MAX_LOG_TPM, description="Keep genes with logTPM above this in >= 1 sample"
    )
    min_std: float = Field(default=MIN_STD, description="Keep genes with logTPM std above this")
    drop_nonstandard_names: bool = Field(
        default=True, description="Drop clone-based / RNA-family / non-HGNC-style symbols"
    )
    drop_duplicate_names: bool = Field(
        default=True, description="Drop every gene whose symbol names more than one Ensembl gene"
    )
    workers: int = Field(default=2, description="Parse threads (one more thread decompresses)")


def _read_optional(path) -> pd.DataFrame | None:
    return pd.read_parquet(path) if path.is_file() else None


@dg.asset(
    group_name=GROUP,
    kinds={"python", "numpy", "parquet"},
    deps=[gtex_sample_attributes, gtex_histology_annotations],
    code_version="1",
)
def gene_log_tpm(
    context: dg.AssetExecutionContext,
    config: GeneLogTpmConfig,
    lake: DataLakeResource,
    gtex_source: GTExSourceResource,
) -> dg.MaterializeResult:
    """SPEC §5: the GTEx gene TPM GCT streamed once into log2(1+TPM); genes kept when logTPM > 5
    in at least one sample, std > 0.5, and a standard, unique symbol. Writes
    `expression/log_tpm.npy` (float32 samples x kept genes, load with mmap), the tables
    `expression_genes` (every gene: max/std, kept or why dropped), `expression_samples`
    (aliquot -> tissue sample -> tissue, `sample_index` = matrix row) and the gene-major
    `expression_matrix` for SQL; all replaced together only when complete."""
    lk, src = lake.lake(), gtex_source.spec()
    gct_path = src.fetch(Kind.GCT, lk.raw)
    version = src.version(Kind.GCT, raw_dir=lk.raw)
    params = ExpressionParams(
        min_max_log_tpm=config.min_max_log_tpm,
        min_std=config.min_std,
        drop_nonstandard_names=config.drop_nonstandard_names,
        drop_duplicate_names=config.drop_duplicate_names,
    )
    res = filter_gct(gct_path, params, workers=config.workers)
    context.log.info(
        f"{gct_path}: {res.counts['genes_in']} genes x {len(res.sample_ids)} samples parsed in "
        f"{res.seconds:.1f} s ({DECOMPRESSOR}); kept {res.n_kept}"
    )
    samples = build_sample_table(
        res.sample_ids,
        _read_optional(lk.table("sample_attributes")),
        _read_optional(lk.table("histology_annotations")),
    )
    g = res.genes
    expressed = (g["max_log_tpm"] > params.min_max_log_tpm).to_numpy()
    n_after = (res.n_kept, len(res.sample_ids))
    plots = {key: lk.plot(name) for key, name in PLOTS.items()}
    writers = {
        plots["max"]: lambda p: plot_max_log_tpm(g["max_log_tpm"], params.min_max_log_tpm, p),
        plots["std"]: lambda p: plot_std_log_tpm(g["std_log_tpm"], expressed, params.min_std, p),
        plots["values"]: lambda p: plot_value_distribution(
            HIST_EDGES, res.hist_before, res.hist_after, (len(g), len(res.sample_ids)), n_after, p
        ),
    }
    manifest = write_outputs(res, samples, lk.root, source_version=version, extra_files=writers)
    paths = ExpressionPaths.under(lk.root)
    c = res.counts
    funnel = pd.DataFrame(
        [
            ("genes in the GCT", c["genes_in"], ""),
            (f"max logTPM > {params.min_max_log_tpm:g}", c["after_expression"], "lowly_expressed"),
            (f"std > {params.min_std:g}", c["after_variance"], "non_variable"),
            ("standard symbol", c["after_name"], "nonstandard_name"),
            ("unique symbol (kept)", c["kept"], "duplicate_name"),
        ],
        columns=["filter", "genes", "drop_reason"],
    )
    before, after = hist_summary(res.hist_before), hist_summary(res.hist_after)
    tissue_counts = samples["tissue"].fillna("(unknown)").value_counts()
    return dg.MaterializeResult(
        metadata={
            **table_metadata(g, paths.genes),
            "genes_in": dg.MetadataValue.int(c["genes_in"]),
            "after_expression": dg.MetadataValue.int(c["after_expression"]),
            "after_variance": dg.MetadataValue.int(c["after_variance"]),
            "after_name": dg.MetadataValue.int(c["after_name"]),
            "genes_kept": dg.MetadataValue.int(c["kept"]),
            "samples": dg.MetadataValue.int(len(res.sample_ids)),
            "samples_with_slide": dg.MetadataValue.int(
                int(samples["has_slide"].fillna(False).sum())
            ),
            "filter_funnel": dg.MetadataValue.md(funnel.to_markdown(index=False)),
            "samples_per_tissue": dg.MetadataValue.md(
                tissue_counts.rename("samples")
                .rename_axis("tissue")
                .reset_index()
                .to_markdown(index=False)
            ),
            "zero_fraction_before": dg.MetadataValue.float(before["zero_fraction"]),
            "zero_fraction_after": dg.MetadataValue.float(after["zero_fraction"]),
            "matrix": dg.MetadataValue.path(str(paths.matrix_npy)),
            "matrix_shape": dg.MetadataValue.text(f"{res.shape[0]} samples x {res.shape[1]} genes"),
            "parse_seconds": dg.MetadataValue.float(round(res.seconds, 3)),
            "gene_expression_view_sql": dg.MetadataValue.md(f"```sql\n{GENE_VIEW_SQL}\n```"),
            "params_hash": dg.MetadataValue.text(manifest["params_hash"]),
            "plot_max_log_tpm": plot_metadata(plots["max"]),
            "plot_std_log_tpm": plot_metadata(plots["std"]),
            "plot_values_before_after": plot_metadata(plots["values"]),
        },
        # The source file's version: `gtex_source_sensor` compares it with the GCT's current one.
        data_version=dg.DataVersion(version),
    )
