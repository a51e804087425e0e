"""Analysis assets (SPEC §7 views, §8 image → expression), thin wrappers over ``lib/analysis``:
``gene_r2`` (both R² views), ``views`` (joint PCA, embedding views), ``cluster_run``,
``feature_comparison``; decisions in ``selection``, inputs in ``inputs``. Every table written is
an AssetSpec of a multi_asset, its key the DuckDB view name."""

import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import polars as pl

from gtex_assets.core.atomic import write_parquet
from gtex_assets.core.errors import InputError
from gtex_assets.core.lake import Lake
from gtex_assets.defs import settings
from gtex_assets.defs.analysis.configs import (
    ClusterTranscriptomeConfig,
    EmbeddingViewsConfig,
    FeatureComparisonConfig,
    GeneR2Config,
    JointPCAConfig,
)
from gtex_assets.defs.metadata import md_table, plot_metadata, table_metadata
from gtex_assets.lib.analysis import cluster_run as CR
from gtex_assets.lib.analysis import cluster_transcriptome as CP
from gtex_assets.lib.analysis import gene_r2 as GR
from gtex_assets.lib.analysis import inputs as I
from gtex_assets.lib.analysis import plots as P
from gtex_assets.lib.analysis import views as VW
from gtex_assets.lib.analysis.feature_comparison import comparison_tables, run_feature_comparisons
from gtex_assets.lib.analysis.selection import pick_models
from gtex_assets.lib.embeddings import vector_store as V
from gtex_assets.resources import DataLakeResource, GTExSourceResource

GROUP = "analysis"


def _png(lk: Lake, name: str) -> Path:
    p = lk.plot(name)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _f(v: float) -> dg.MetadataValue:
    return dg.MetadataValue.float(float(v) if v is not None and np.isfinite(v) else float("nan"))


def _fail(name: str, e: Exception) -> dg.Failure:
    return dg.Failure(allow_retries=False, description=f"{name}: {e}")


def _spec(key: str, description: str, **kw) -> dg.AssetSpec:
    return dg.AssetSpec(key, group_name=GROUP, description=description, **kw)


# ----------------------------------------------------------------------------------------------
# joint_pca, embedding_views
# ----------------------------------------------------------------------------------------------


@dg.multi_asset(
    name="joint_pca",
    specs=[
        _spec(VW.JOINT_TABLE, "SPEC §7 design card: the joint PCA — the selected model's "
              "slide-embedding PCs and the expression PCs of the same samples (long table: "
              "block image | expression, component, score).",
              deps=["slide_embeddings", "embedding_models", "gene_log_tpm"],
              kinds={"scikitlearn", "parquet"}, code_version="1"),
    ],
)  # fmt: skip
def joint_pca(context: dg.AssetExecutionContext, config: JointPCAConfig, lake: DataLakeResource):
    config = settings.resolve(context, config, lake)
    lk = lake.lake()
    try:
        meta, vec = I.read_slides(lk)
        sel = pick_models(
            I.read_models(lk, sorted(meta["model_id"].unique())), config.selected_model_id
        ).selected
        F, Y, pm = I.paired(I.model_slides(meta, vec, sel), I.read_expression(lk))
    except InputError as e:
        raise _fail("joint_pca", e) from e
    table = VW.joint_pca_table(F, Y, pm, sel, config.n_components, config.random_state)
    out = write_parquet(table, lk.table(VW.JOINT_TABLE))
    _, img, ex = VW.joint_blocks(table)
    sil = VW.joint_silhouettes(img, ex, pm["tissue"].astype(str).to_numpy())
    yield dg.MaterializeResult(asset_key=VW.JOINT_TABLE, metadata={
        **table_metadata(table, out), "model_id": sel, "samples": len(pm),
        "components": int(img.shape[1]), **{f"silhouette_{k}": _f(v) for k, v in sil.items()},
    })  # fmt: skip


VIEW_DEPS = [
    "slide_embeddings",
    "embedding_models",
    "tile_embeddings",
    "gene_log_tpm",
    VW.JOINT_TABLE,
]


@dg.multi_asset(
    name="embedding_views",
    specs=[
        _spec("embedding_views", "SPEC §7: PCA(40) → UMAP / t-SNE maps coloured by tissue (PNG "
              "under plots/analysis/): slides per model, tiles, expression, the joint PCA.",
              deps=[VW.COORDS_TABLE, VW.SILHOUETTE_TABLE], kinds={"matplotlib"}),
        _spec(VW.COORDS_TABLE, "2-D coordinates of every view (PCA, UMAP or t-SNE per tiles, slides, expression, joint).", deps=VIEW_DEPS,
              kinds={"scikitlearn", "parquet"}, code_version="1"),
        _spec(VW.SILHOUETTE_TABLE, "Tissue silhouette of every view and space.", deps=VIEW_DEPS,
              kinds={"scikitlearn", "parquet"}, code_version="1"),
    ],
)  # fmt: skip
def embedding_views(
    context: dg.AssetExecutionContext, config: EmbeddingViewsConfig, lake: DataLakeResource
):
    config = settings.resolve(context, config, lake)
    if set(config.methods) - {"umap", "tsne"}:
        raise dg.Failure(
            allow_retries=False,
            description=f"unknown methods {sorted(set(config.methods) - {'umap', 'tsne'})}: use 'umap' and/or 'tsne'",
        )
    lk, t0, p = lake.lake(), time.perf_counter(), config.params()
    try:
        meta, vec = I.read_slides(lk)
        models = I.read_models(lk, sorted(meta["model_id"].unique()))
        c = pick_models(models, config.selected_model_id)
        expr = I.read_expression(lk)
        joint = pl.read_parquet(lk.table(VW.JOINT_TABLE))
    except (InputError, FileNotFoundError) as e:
        raise _fail("embedding_views", e) from e
    slide_sets, tile_sets, ex = VW.view_inputs(meta, vec, models, c.selected, c.off_the_shelf, expr,
                                               lk.partition_dir("tile_embeddings"), p)  # fmt: skip
    out = VW.embedding_views(slide_sets, tile_sets, ex, joint, models, c.selected, p,
                             lambda name: _png(lk, f"analysis/{name}.png"), context.log.info)  # fmt: skip
    sil = out.silhouettes
    for name, df in ((VW.COORDS_TABLE, out.coords), (VW.SILHOUETTE_TABLE, sil)):
        path = write_parquet(df, lk.table(name))
        extra = (
            {"silhouettes": md_table(sil.drop(columns=["n_labels"]))}
            if name == VW.SILHOUETTE_TABLE
            else {}
        )
        yield dg.MaterializeResult(asset_key=name, metadata={**table_metadata(df, path), **extra})
    yield dg.MaterializeResult(asset_key="embedding_views", metadata={
        "selected_model_id": f"{c.selected} ({c.how})",
        **{k: _f(v) for k, v in VW.views_summary(sil, c.selected, c.off_the_shelf).items()},
        "tiles_viewed": out.n_tiles, "seconds": _f(time.perf_counter() - t0),
        **{f"plot_{k}": plot_metadata(v) for k, v in out.plots.items()},
    })  # fmt: skip


# ----------------------------------------------------------------------------------------------
# gene_r2
# ----------------------------------------------------------------------------------------------

GENE_R2_INPUTS = ["slide_embeddings", "embedding_models", "gene_log_tpm"]
# A tuple, not a list: the defs loader would take a module-level list of specs as assets.
GENE_R2_SPECS = (
    _spec(
        GR.GENE_R2_TABLE,
        "SPEC §8 / issue #15: per-gene R² of logTPM from the slide embedding on held-out "
        "donors, both views in one table — r2_across (no tissue term: tissue markers on top) and "
        "r2_within (tissue fixed effects: morphology beyond tissue identity) — each with "
        "Pearson r, the no-image baseline, a donor-bootstrap CI and the donors/slides it rests "
        "on. `model: best` reports the model explaining the most held-out variance.",
        deps=GENE_R2_INPUTS,
        kinds={"numpy", "parquet"},
        code_version="2",
    ),
    _spec(
        GR.BY_MODEL_TABLE,
        "The ranking view's per-gene R² of every embedded model, same folds.",
        deps=GENE_R2_INPUTS,
        kinds={"parquet"},
    ),  # fmt: skip
    _spec(
        GR.MODELS_TABLE,
        "One row per model: variance explained, planted recall, reported.",
        deps=[GR.BY_MODEL_TABLE],
        kinds={"parquet"},
    ),  # fmt: skip
    _spec(
        GR.FOLDS_TABLE,
        "The tissue-stratified donor folds gene_r2 used (reused downstream).",
        deps=["slide_embeddings", "gene_log_tpm"],
        kinds={"parquet"},
    ),  # fmt: skip
)


@dg.multi_asset(name="gene_r2", specs=GENE_R2_SPECS)
def gene_r2(
    context: dg.AssetExecutionContext,
    config: GeneR2Config,
    lake: DataLakeResource,
    gtex_source: GTExSourceResource,
):
    config = settings.resolve(context, config, lake)
    lk, t0, p = lake.lake(), time.perf_counter(), config.params()
    try:
        meta, vec = I.read_slides(lk)
        models = I.read_models(lk, sorted(meta["model_id"].unique()))
        explicit = "" if p.model in ("best", "selected") else p.model
        choice = pick_models(models, explicit)
        expr = I.read_expression(lk)
        _, Y, pm = I.paired(I.model_slides(meta, vec, choice.selected), expr)
        feats, skipped = I.candidate_features(meta, vec, choice.selected, pm, p.model == "best")
        out = GR.run_gene_r2(feats, Y, pm, expr.gene_ids, expr.symbols, models.to_pandas(), p,
                             selected=choice.selected, how=choice.how,
                             planted=I.planted_genes(_mirror(gtex_source)))  # fmt: skip
    except (InputError, ValueError) as e:  # e.g. a tissue missing from a training fold
        raise dg.Failure(allow_retries=False, description=f"gene_r2: {e}") from e
    for m in skipped:
        context.log.warning(f"gene_r2 model 'best': {m} left out")
    for msg in GR.warnings(out):
        context.log.warning(msg)
    tables = {GR.GENE_R2_TABLE: out.gene_r2, GR.BY_MODEL_TABLE: out.by_model,
              GR.MODELS_TABLE: out.models, GR.FOLDS_TABLE: out.folds}  # fmt: skip
    paths = {name: write_parquet(df, lk.table(name)) for name, df in tables.items()}
    md = GR.gene_r2_metadata(out, p, time.perf_counter() - t0)
    md["plot"] = plot_metadata(P.r2_ranking_plot(
        out.gene_r2, _png(lk, "analysis/gene_r2_ranking.png"), highlight=out.planted,
        title=f"Per-gene R² from {out.primary} (held-out donors, {md['ranking_view']})"))  # fmt: skip
    md["plot_views"] = plot_metadata(P.r2_scatter(
        out.gene_r2["r2_across"], out.gene_r2["r2_within"], _png(lk, "analysis/gene_r2_views.png"),
        xlabel="r2_across (across tissues)", ylabel="r2_within (within tissue)",
        title=f"Both R² views per gene ({out.primary})"))  # fmt: skip
    context.log.info(f"gene_r2: {len(out.gene_r2)} genes, {md['samples']} slides, "
                     f"{len(out.models)} model(s), {md['seconds']:.1f}s")  # fmt: skip
    for name, df in tables.items():
        extra = _gene_r2_md(md) if name == GR.GENE_R2_TABLE else {}
        yield dg.MaterializeResult(
            asset_key=name, metadata={**table_metadata(df, paths[name]), **extra}
        )


def _mirror(gtex_source: GTExSourceResource) -> Path | None:
    spec = gtex_source.spec()
    return spec.mirror_dir if spec.mode == "local" else None


def _gene_r2_md(md: dict) -> dict:
    """Metadata values for the UI: markdown for text tables, floats/ints as themselves."""
    out = {}
    for k, v in md.items():
        if isinstance(v, dg.MetadataValue):
            out[k] = v
        elif isinstance(v, bool):
            out[k] = dg.MetadataValue.bool(v)
        elif isinstance(v, int):
            out[k] = dg.MetadataValue.int(v)
        elif isinstance(v, float):
            out[k] = _f(v)
        elif isinstance(v, str) and v.startswith(("|", "Protocol")):
            out[k] = dg.MetadataValue.md(v)
        else:
            out[k] = dg.MetadataValue.text(str(v))
    return out


# ----------------------------------------------------------------------------------------------
# cluster_transcriptome
# ----------------------------------------------------------------------------------------------

CLUSTER_DEPS = ["slide_embeddings", "gene_log_tpm", GR.GENE_R2_TABLE, GR.FOLDS_TABLE]


@dg.multi_asset(
    name="cluster_transcriptome",
    specs=[
        _spec("cluster_transcriptome", "SPEC §8 cluster-average transcriptome: the predictor "
              "fitted on every paired slide (PCA under models/cluster_transcriptome/<model>.npz); "
              "`gtex-assets nearest SAMPLE --transcriptome` serves it.",
              deps=CLUSTER_DEPS, kinds={"scikitlearn"}, code_version="2"),
        _spec(CR.R2_TABLE, "Per-gene R² of the nearest-cluster transcriptome on held-out donors "
              "(gene_r2's folds, nearest centroid through LanceDB) beside the ridge R².",
              deps=CLUSTER_DEPS, kinds={"parquet"}, code_version="2"),
        _spec(CR.TRANSCRIPTOMES_TABLE, "Each cluster's mean transcriptome (served).",
              deps=["cluster_transcriptome"], kinds={"parquet"}),
        _spec(CR.MEMBERS_TABLE, "The final fit's slides and their cluster (served).",
              deps=["cluster_transcriptome"], kinds={"parquet"}),
        _spec(CP.CENTROID_TABLE, "The clusters' centroids in LanceDB (replaced per model).",
              deps=["cluster_transcriptome"], kinds={"lancedb"}),
    ],
    pool="lancedb_writer",  # writes cluster_centroids (dagster.yaml: every pool is exclusive)
)  # fmt: skip
def cluster_transcriptome(
    context: dg.AssetExecutionContext, config: ClusterTranscriptomeConfig, lake: DataLakeResource
):
    config = settings.resolve(context, config, lake)
    lk, t0 = lake.lake(), time.perf_counter()
    try:
        sel, run = _cluster_run(lk, config)
    except InputError as e:
        raise _fail("cluster_transcriptome", e) from e
    ev = CR.evaluation_summary(run)
    if ev["assignments_agree_exact"] < ev["held_out_assignments"]:
        context.log.warning(
            f"LanceDB and exact search disagree on {ev['held_out_assignments'] - ev['assignments_agree_exact']} held-out assignments (float32 near-ties)"
        )
    proj, wrote = _serve(lk, run, sel, context.log.warning)
    tables = _cluster_tables(lk, run, sel, wrote.dropped_models)
    paths = {name: write_parquet(df, lk.table(name)) for name, df in tables.items()}
    png = P.r2_scatter(run.r2["r2_ridge"], run.r2["r2_cluster"], _png(lk, "analysis/cluster_vs_ridge_r2.png"),
                       xlabel="ridge R²", ylabel="cluster-average R²", title=f"Per-gene R², held-out donors ({sel})")  # fmt: skip
    yield dg.MaterializeResult(asset_key="cluster_transcriptome", metadata={
        "model_id": sel, "n_clusters": config.n_clusters, "fit_id": run.fit_id,
        "final_clusters": md_table(run.summary[["cluster", "n_slides", "majority_tissue", "majority_fraction"]], 2),
        "projection_path": dg.MetadataValue.path(str(proj)), "seconds": _f(time.perf_counter() - t0),
    })  # fmt: skip
    yield dg.MaterializeResult(asset_key=CR.R2_TABLE, metadata={
        **table_metadata(run.r2, paths[CR.R2_TABLE]), "model_id": sel, "plot": plot_metadata(png),
        **{k: _f(v) if isinstance(v, float) else v for k, v in ev.items()}})  # fmt: skip
    for name in (CR.TRANSCRIPTOMES_TABLE, CR.MEMBERS_TABLE):
        yield dg.MaterializeResult(
            asset_key=name, metadata=table_metadata(tables[name], paths[name])
        )
    yield dg.MaterializeResult(asset_key=CP.CENTROID_TABLE, metadata={
        "lancedb_table": f"{lk.lancedb}/{CP.CENTROID_TABLE}", "centroid_rows_model": int(wrote.rows),
        "centroid_rows_total": int(wrote.total_rows), "fit_id": run.fit_id,
    })  # fmt: skip


def _cluster_run(lk: Lake, config: ClusterTranscriptomeConfig) -> tuple[str, CR.ClusterRun]:
    """gene_r2's model and folds, its slides paired with expression, and the clustering run."""
    folds = _read(lk, GR.FOLDS_TABLE, "gene_r2")
    ridge = _read(lk, GR.GENE_R2_TABLE, "gene_r2")
    sel = str(folds["model_id"].iloc[0])
    meta, vec = I.read_slides(lk)
    expr = I.read_expression(lk)
    F, Y, pm = I.paired(I.model_slides(meta, vec, sel), expr)
    run = CR.run_cluster_transcriptome(
        F, Y, pm, folds, ridge, expr.gene_ids, expr.symbols, sel, config.params()
    )
    return sel, run


def _cluster_tables(lk: Lake, run: CR.ClusterRun, sel: str, dropped) -> dict:
    """The R² table, and the served tables with this model's rows replaced."""
    tables = {CR.R2_TABLE: run.r2}
    for name, new in (
        (CR.TRANSCRIPTOMES_TABLE, run.transcriptomes),
        (CR.MEMBERS_TABLE, run.members),
    ):
        old = pd.read_parquet(lk.table(name)) if lk.table(name).is_file() else None
        tables[name] = CR.merge_models(old, new, sel, dropped)
    return tables


def _serve(lk: Lake, run: CR.ClusterRun, sel: str, warn) -> tuple[Path, CP.CentroidWrite]:
    """Write the served predictor: its PCA file and its centroids in LanceDB (a model of another
    width loses its clusters there, so its PCA file goes too)."""
    proj = CP.save_projection(run.final, CP.projection_path(lk.models, sel), run.card)
    wrote = CP.write_centroids(V.VectorStore(lk.lancedb), run.centroids)
    for m in wrote.dropped_models:
        CP.projection_path(lk.models, m).unlink(missing_ok=True)
    if wrote.dropped_models:
        warn(
            f"{CP.CENTROID_TABLE}: vectors now {run.final.centroids.shape[1]}-D; dropped {wrote.dropped_models}"
        )
    return proj, wrote


def _read(lk: Lake, name: str, asset: str) -> pd.DataFrame:
    p = lk.table(name)
    if not p.is_file():
        raise InputError(str(p), "is missing", f"materialise {asset} first")
    return pd.read_parquet(p)


# ----------------------------------------------------------------------------------------------
# feature_comparison
# ----------------------------------------------------------------------------------------------

FC_GENES, FC_ACCURACY = "feature_comparison_genes", "feature_comparison_accuracy"
FC_DEPS = ["slide_embeddings", "embedding_models", "gene_log_tpm"]


@dg.multi_asset(
    name="feature_comparison",
    specs=[
        _spec("feature_comparison", "SPEC §8 (Li et al. 2022): off-the-shelf vs the selected "
              "fine-tuned slide embeddings — the summary and the paired accuracy plot.",
              deps=[FC_GENES, FC_ACCURACY], kinds={"matplotlib"}),
        _spec(FC_GENES, "Per-gene ridge R² of both feature sets over repeated donor CV, paired tests.",
              deps=FC_DEPS, kinds={"scikitlearn", "parquet"}, code_version="2"),
        _spec(FC_ACCURACY, "Per-repeat tissue accuracy of both feature sets.",
              deps=FC_DEPS, kinds={"scikitlearn", "parquet"}, code_version="2"),
    ],
)  # fmt: skip
def feature_comparison(
    context: dg.AssetExecutionContext, config: FeatureComparisonConfig, lake: DataLakeResource
):
    config = settings.resolve(context, config, lake)
    lk, t0 = lake.lake(), time.perf_counter()
    try:
        meta, vec = I.read_slides(lk)
        models = I.read_models(lk, sorted(meta["model_id"].unique()))
        runs = run_feature_comparisons(meta, vec, models, I.read_expression(lk), config.params())
    except (InputError, ValueError) as e:
        raise _fail("feature_comparison", e) from e
    for run in runs:
        if run.missing_off_the_shelf:
            context.log.warning(f"{run.missing_off_the_shelf} slide(s) have no "
                                f"{run.off_the_shelf} embedding: left out of that pair")  # fmt: skip
    genes, acc = comparison_tables(runs)
    out_g, out_a = (
        write_parquet(genes, lk.table(FC_GENES)),
        write_parquet(acc, lk.table(FC_ACCURACY)),
    )
    png = P.paired_accuracy_plot(runs[-1].result.accuracy, runs[-1].result.names,
                                 _png(lk, "analysis/feature_comparison_accuracy.png"))  # fmt: skip
    md = {**_comparison_metadata(runs), "n_repeats": config.n_repeats,
          "seconds": _f(time.perf_counter() - t0), "plot": plot_metadata(png)}  # fmt: skip
    yield dg.MaterializeResult(asset_key=FC_GENES, metadata=table_metadata(genes, out_g))
    yield dg.MaterializeResult(asset_key=FC_ACCURACY, metadata=table_metadata(acc, out_a))
    yield dg.MaterializeResult(asset_key="feature_comparison", metadata=md)


def _comparison_metadata(runs) -> dict:
    """The last pair (… vs the fine-tuned model) in the top-level keys, every pair's summary."""
    run = runs[-1]
    o = run.result.overall
    md = {"summary": dg.MetadataValue.md("\n\n".join(r.result.summary_markdown() for r in runs)),
          "arms": ", ".join(dict.fromkeys(m for r in runs for m in (r.off_the_shelf, r.fine_tuned))),
          "pairs": len(runs), "off_the_shelf": run.off_the_shelf, "fine_tuned": run.fine_tuned,
          "tissues_left_out": ", ".join(run.tissues_left_out) or "none", "samples": run.n_samples,
          "n_splits": run.plan.n_splits, "inner_splits": run.plan.inner_splits,
          "folds_lowered": bool(run.plan.lowered)}  # fmt: skip
    md.update({k: _f(o[k]) for k in ("accuracy_a_mean", "accuracy_b_mean", "accuracy_p_wilcoxon",
               "accuracy_p_corrected", "improved_p_binomial") if o.get(k) is not None})  # fmt: skip
    md.update({k: int(o[k]) for k in ("n_significant", "n_improved", "n_genes") if k in o})
    return md
