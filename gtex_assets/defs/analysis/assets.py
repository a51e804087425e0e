"""Analysis assets (SPEC §7 views, §8 image → expression): thin wrappers over ``lib/projection``,
``lib/regression``, ``lib/cluster_predict``, ``lib/feature_comparison`` and ``lib/plots_analysis``.

Inputs: ``tables/slide_embeddings.parquet`` (one row per model × slide), ``tables/embedding_models``
(kind ``off_the_shelf`` | ``checkpoint``, epoch, selected), ``tables/classifier_checkpoints``
(fallback for the selected checkpoint), per-slide ``tables/tile_embeddings/<id>.parquet`` and the
``gene_log_tpm`` matrix. Slides are joined to expression on ``tissue_sample_id``.
"""

import dataclasses
import tempfile
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from pydantic import Field

from gtex_assets.core.atomic import write_parquet
from gtex_assets.core.errors import InputError
from gtex_assets.core.lake import Lake
from gtex_assets.defs.analysis.configs import GeneR2Config
from gtex_assets.defs.embeddings.assets import slide_embeddings, tile_embeddings
from gtex_assets.defs.expression.assets import gene_log_tpm
from gtex_assets.defs.metadata import plot_metadata, table_metadata
from gtex_assets.lib.analysis import cluster_transcriptome as CP
from gtex_assets.lib.analysis import gene_r2 as GR
from gtex_assets.lib.analysis import inputs as I
from gtex_assets.lib.analysis import plots as P
from gtex_assets.lib.analysis.cluster_transcriptome import (
    compare_gene_r2,
    evaluate_cluster_predictor,
)
from gtex_assets.lib.analysis.feature_comparison import compare_features
from gtex_assets.lib.analysis.projection import (
    align_samples,
    compute_view,
    joint_matrix,
    pca_fit_transform,
    silhouette_by_label,
)
from gtex_assets.lib.analysis.regression import (
    donor_folds,
    strata_too_small,
)
from gtex_assets.lib.analysis.selection import pick_models
from gtex_assets.lib.embeddings import vector_store as V
from gtex_assets.lib.expression.log_tpm import load_log_tpm
from gtex_assets.resources import DataLakeResource, GTExSourceResource

GROUP = "analysis"
SLIDE_TABLE = "slide_embeddings"
MODELS_TABLE = "embedding_models"
CHECKPOINTS_TABLE = "classifier_checkpoints"
TILE_DIR = "tile_embeddings"
COORDS_TABLE = "projection_coords"
SILHOUETTE_TABLE = "projection_silhouettes"
GENE_R2_TABLE = "gene_r2"
GENE_R2_FOLDS_TABLE = "gene_r2_folds"
GENE_R2_BY_MODEL_TABLE = "gene_r2_by_model"
GENE_R2_MODELS_TABLE = "gene_r2_models"
CLUSTER_TABLE = "cluster_transcriptome_r2"
TRANSCRIPTOMES_TABLE = "cluster_transcriptomes"  # served: the clusters' mean transcriptomes
MEMBERS_TABLE = "cluster_members"  # served: the final fit's slides and their cluster
FC_GENES_TABLE = "feature_comparison_genes"
FC_ACCURACY_TABLE = "feature_comparison_accuracy"
TRUTH_LINKED = "truth/image_linked_genes.csv"
ANALYSIS_VERSION = "1"
CLUSTER_VERSION = "2"  # 2: LanceDB lookup in the evaluation + the served predictor


# ----------------------------------------------------------------------------------------------
# shared input helpers
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Slides:
    """One model's slide embeddings: metadata rows and the aligned vectors."""

    model_id: str
    meta: pd.DataFrame  # tissue_sample_id, subject_id, tissue, ...
    vectors: np.ndarray


def _read_slides(lk: Lake) -> tuple[pd.DataFrame, np.ndarray]:
    path = lk.table(SLIDE_TABLE)
    if not path.is_file():
        raise dg.Failure(description=f"{path} is missing: materialise slide_embeddings first")
    tbl = pq.read_table(path)
    meta = tbl.drop_columns([V.VECTOR]).to_pandas()
    return meta, V.arrow_to_vectors(tbl.column(V.VECTOR)).astype(np.float64)


def _models(lk: Lake, model_ids: list[str]) -> pd.DataFrame:
    """model_id, kind, epoch, selected for every model of the slide table (missing: inferred)."""
    p = lk.table(MODELS_TABLE)
    m = pd.read_parquet(p) if p.is_file() else pd.DataFrame({"model_id": model_ids})
    m = pd.DataFrame({"model_id": model_ids}).merge(m, on="model_id", how="left")
    for col, default in (("kind", None), ("epoch", None), ("selected", False)):
        if col not in m.columns:
            m[col] = default
    # A model without a card: a checkpoint id carries an epoch; anything else is off the shelf.
    m["kind"] = m["kind"].where(m["kind"].notna(), np.where(m["epoch"].notna(), "checkpoint", None))
    m["kind"] = m["kind"].fillna("off_the_shelf")
    m["selected"] = m["selected"].fillna(False).astype(bool)
    ck = lk.table(CHECKPOINTS_TABLE)
    if not m["selected"].any() and ck.is_file():
        c = pd.read_parquet(ck)
        if {"selected", "model_id"} <= set(c.columns):
            sel = set(c.loc[c["selected"].fillna(False).astype(bool), "model_id"].astype(str))
            m["selected"] = m["model_id"].isin(sel)
    return m


def _pick_models(
    models: pd.DataFrame, selected: str = "", off_the_shelf: str = ""
) -> tuple[str, str | None, str]:
    """(selected model id, off-the-shelf model id or None, how the selected one was chosen)."""
    ids = set(models["model_id"])
    for name, val in (("selected_model_id", selected), ("off_the_shelf_model_id", off_the_shelf)):
        if val and val not in ids:
            raise dg.Failure(
                description=f"{name} {val!r} is not in slide_embeddings: {sorted(ids)}"
            )
    ots = models[models["kind"] == "off_the_shelf"]["model_id"].tolist()
    ots_id = off_the_shelf or (sorted(ots)[0] if ots else None)
    if selected:
        return selected, ots_id, "config"
    ck = models[models["kind"] == "checkpoint"]
    sel = ck[ck["selected"]]
    if len(sel):
        return str(sel["model_id"].iloc[0]), ots_id, "selected checkpoint"
    if len(ck):  # no selection recorded: the last epoch
        last = ck.sort_values("epoch", na_position="first")["model_id"].iloc[-1]
        return str(last), ots_id, "latest checkpoint (none marked selected)"
    if ots_id is None:
        raise dg.Failure(description="slide_embeddings has no models")
    return ots_id, ots_id, "off-the-shelf (no fine-tuned checkpoint embedded)"


def _model_attr(models: pd.DataFrame, model_id: str, column: str, default=None):
    """One column of ``models`` for ``model_id`` (``default`` when absent or missing)."""
    v = models.loc[models["model_id"] == model_id, column] if column in models else pd.Series()
    return v.iloc[0] if len(v) and pd.notna(v.iloc[0]) else default


def _aligned(slides: Slides, sample_ids: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(vectors of ``slides`` in the order of ``sample_ids``, mask of the ids it has)."""
    pos = pd.Index(slides.meta["tissue_sample_id"].astype(str)).get_indexer(sample_ids.astype(str))
    return slides.vectors[pos[pos >= 0]], pos >= 0


def _model_slides(meta: pd.DataFrame, vec: np.ndarray, model_id: str) -> Slides:
    idx = np.flatnonzero((meta["model_id"] == model_id).to_numpy())
    m = meta.iloc[idx].reset_index(drop=True)
    if m["tissue_sample_id"].duplicated().any():
        dup = m.loc[m["tissue_sample_id"].duplicated(), "tissue_sample_id"].iloc[0]
        raise dg.Failure(description=f"slide_embeddings: {model_id} has {dup!r} twice")
    return Slides(model_id, m, vec[idx])


def _expression(lk: Lake) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    try:
        return load_log_tpm(lk.root)
    except FileNotFoundError as e:
        raise dg.Failure(description=str(e)) from e


def _paired(
    slides: Slides, X_expr: np.ndarray, samples: pd.DataFrame
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Rows of the slide embeddings with expression: (features, logTPM, slide meta)."""
    s = samples.dropna(subset=["tissue_sample_id"]).drop_duplicates("tissue_sample_id")
    ids, ia, ib = align_samples(slides.meta["tissue_sample_id"].astype(str), s["tissue_sample_id"])
    if len(ids) == 0:
        raise dg.Failure(
            description=f"no slide of {slides.model_id} has expression (no shared tissue_sample_id)"
        )
    rows = s["sample_index"].to_numpy()[ib]
    order = np.argsort(rows, kind="stable")  # ascending rows: friendlier to the memory map
    ia, rows = ia[order], rows[order]
    Y = np.asarray(X_expr[rows], dtype=np.float64)
    meta = slides.meta.iloc[ia].reset_index(drop=True)
    if meta["tissue"].isna().any() or meta["subject_id"].isna().any():
        bad = meta.loc[meta["tissue"].isna() | meta["subject_id"].isna(), "tissue_sample_id"]
        raise dg.Failure(description=f"slide_embeddings: {bad.iloc[0]!r} has no tissue/subject_id")
    return slides.vectors[ia], Y, meta


def _fold_counts(
    groups: np.ndarray,
    n_splits: int,
    inner_splits: int,
    seed: int,
    strata: np.ndarray | None = None,
) -> dict:
    """Outer/inner fold counts lowered to what the number of donors allows (donor folds
    stratified by tissue when ``strata`` is given)."""
    n_donors = len(np.unique(groups))
    if n_donors < 4:
        # 3 donors leave 1 donor in an inner training fold: nothing left within a tissue
        raise dg.Failure(description=f"{n_donors} donor(s): donor-grouped nested CV needs >= 4")
    k = max(2, min(n_splits, n_donors))
    outer = donor_folds(groups, k, seed, strata)
    min_train = min(len(np.unique(groups[outer != f])) for f in range(k))
    # as many inner folds as allowed (<= training donors): keeps >= 2 donors per inner fit
    inner = max(2, min(inner_splits, min_train))
    return {
        "n_splits": k,
        "inner_splits": inner,
        "n_donors": n_donors,
        "lowered": k != n_splits or inner != inner_splits,
        "folds": outer,
    }


def _drop_small_tissues(
    context: dg.AssetExecutionContext, pm: pd.DataFrame, *arrays: np.ndarray
) -> tuple[pd.DataFrame, list[str], list[np.ndarray]]:
    """Leave out tissues with < 3 donors: a within-tissue fit needs a training donor of the
    tissue in every outer and inner split (stratified donor folds guarantee it from 3)."""
    small = strata_too_small(pm["subject_id"].astype(str), pm["tissue"].astype(str))
    if not small:
        return pm, [], list(arrays)
    keep = ~pm["tissue"].astype(str).isin(small).to_numpy()
    context.log.warning(
        f"{len(small)} tissue(s) with < 3 donors left out of the within-tissue fit "
        f"({int((~keep).sum())} slides): {small}"
    )
    return pm[keep].reset_index(drop=True), small, [a[keep] for a in arrays]


def _features(X: np.ndarray, features: str, n_pcs: int, seed: int) -> np.ndarray:
    if features == "raw":
        return X
    if features == "pcs":
        return pca_fit_transform(X, n_pcs, random_state=seed).scores
    raise dg.Failure(description=f"features {features!r}: use 'raw' or 'pcs'")


def _planted(gtex_source: GTExSourceResource) -> pd.DataFrame | None:
    spec = gtex_source.spec()
    if spec.mode != "local":
        return None
    p = spec.mirror_dir / TRUTH_LINKED
    return pd.read_csv(p) if p.is_file() else None


def _png(lk: Lake, name: str) -> Path:
    p = lk.plot(name)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _f(v: float) -> dg.MetadataValue:
    return dg.MetadataValue.float(float(v) if v is not None and np.isfinite(v) else float("nan"))


# ----------------------------------------------------------------------------------------------
# embedding_views
# ----------------------------------------------------------------------------------------------


class EmbeddingViewsConfig(dg.Config):
    n_components: int = Field(default=40, description="PCA components before the 2-D maps")
    methods: list[str] = Field(
        default=["umap", "tsne"],
        description="2-D methods after PCA ('umap', 'tsne'); [] = PCA only",
    )
    tiles: bool = Field(default=True, description="Also view tile embeddings (subsampled)")
    tiles_per_slide: int = Field(default=20, description="Tiles drawn per slide and model")
    max_points: int = Field(
        default=20_000, description="Most points per 2-D map (label-stratified subset)"
    )
    max_iter: int = Field(
        default=0, description="t-SNE iterations (>= 250) / UMAP epochs; 0 = library default"
    )
    selected_model_id: str = Field(default="", description="Override the selected checkpoint")
    random_state: int = Field(default=0, description="Seed of PCA / UMAP / t-SNE / subsampling")


def _label(models: pd.DataFrame, mid: str) -> tuple[str, int | None]:
    r = models.set_index("model_id").loc[mid]
    if r["kind"] == "off_the_shelf" or pd.isna(r["epoch"]):
        return "off-the-shelf", None
    return f"epoch {int(r['epoch'])}", int(r["epoch"])


def _coord_rows(view: str, model_id: str | None, vr, methods: list[str]) -> pd.DataFrame:
    c = vr.coords
    parts = []
    for method, cx, cy in [("pca", "pc1", "pc2")] + [(m, f"{m}_x", f"{m}_y") for m in methods]:
        if cx not in c:
            continue
        parts.append(
            pd.DataFrame(
                {
                    "view": view,
                    "model_id": model_id,
                    "sample_id": c["sample_id"].astype(str),
                    "tissue": c["label"].astype(str),
                    "method": method,
                    "x": c[cx].astype(float),
                    "y": c[cy].astype(float) if cy in c else 0.0,
                }
            )
        )
    out = pd.concat(parts, ignore_index=True)
    return out[np.isfinite(out["x"])]


def _tile_sample(lk: Lake, model_ids: list[str], per_slide: int, seed: int):
    """Up to ``per_slide`` tiles per slide and model (the balanced sample first)."""
    d = lk.partition_dir(TILE_DIR)
    files = sorted(d.glob("*.parquet")) if d.is_dir() else []
    rng = np.random.default_rng(seed)
    metas, vecs = [], []
    for fp in files:
        t = pq.read_table(
            fp,
            columns=["model_id", "tile_id", "tissue", "sampled", V.VECTOR],
            filters=[("model_id", "in", model_ids)],
        )
        if t.num_rows == 0:
            continue
        m = t.drop_columns([V.VECTOR]).to_pandas()
        keep = []
        for _, idx in m.groupby("model_id").indices.items():
            pool = idx[m["sampled"].fillna(False).to_numpy()[idx]]
            pool = pool if len(pool) else idx
            keep.append(rng.choice(pool, min(per_slide, len(pool)), replace=False))
        keep = np.sort(np.concatenate(keep))
        metas.append(m.iloc[keep])
        vecs.append(V.arrow_to_vectors(t.column(V.VECTOR).take(keep)))
    if not metas:
        return None, None
    return pd.concat(metas, ignore_index=True), np.vstack(vecs).astype(np.float64)


@dg.asset(
    group_name=GROUP,
    kinds={"scikitlearn", "parquet"},
    deps=[slide_embeddings, tile_embeddings, gene_log_tpm],
    code_version=ANALYSIS_VERSION,
)
def embedding_views(
    context: dg.AssetExecutionContext, config: EmbeddingViewsConfig, lake: DataLakeResource
) -> dg.MaterializeResult:
    """SPEC §7: PCA(40) → UMAP / t-SNE views coloured by tissue, with the silhouette by tissue
    of each space: slides per model (every checkpoint), tiles (selected + off-the-shelf),
    expression, and the joint view (selected model's slide PCs ⊕ expression PCs, shared samples).
    Writes `tables/projection_coords.parquet`, `tables/projection_silhouettes.parquet`, a PNG per
    view and the silhouette trend across checkpoints."""
    bad = set(config.methods) - {"umap", "tsne"}
    if bad:
        raise dg.Failure(description=f"unknown methods {sorted(bad)}: use 'umap' and/or 'tsne'")
    lk = lake.lake()
    t0 = time.perf_counter()
    meta, vec = _read_slides(lk)
    model_ids = sorted(meta["model_id"].unique())
    models = _models(lk, model_ids)
    sel, ots, how = _pick_models(models, config.selected_model_id)
    kw = {
        "n_components": config.n_components,
        "methods": list(config.methods),
        "max_points": config.max_points,
        "random_state": config.random_state,
        "max_iter": config.max_iter or None,
    }
    coords, sil, plots = [], [], {}

    def add(view: str, mid: str | None, X, labels, ids, title: str, epoch=None, checkpoint=""):
        vr = compute_view(X, labels, ids, **kw)
        coords.append(_coord_rows(view, mid, vr, list(config.methods)))
        sil.extend(vr.silhouette_rows(view=view, model_id=mid, epoch=epoch, checkpoint=checkpoint))
        name = f"view_{view}" + (f"_{mid}" if mid else "")
        plots[name] = P.view_panels(
            vr.coords, _png(lk, f"analysis/{name}.png"), title=title, silhouette=vr.silhouette
        )
        context.log.info(f"{name}: silhouette {vr.silhouette}")
        return vr

    order = sorted(
        model_ids, key=lambda m: (_label(models, m)[1] is not None, _label(models, m)[1] or 0, m)
    )
    for mid in order:
        s = _model_slides(meta, vec, mid)
        lab, ep = _label(models, mid)
        add("slides", mid, s.vectors, s.meta["tissue"].astype(str), s.meta["tissue_sample_id"],
            f"Slide embeddings — {mid} ({lab})", ep, lab)  # fmt: skip

    n_tiles = 0
    if config.tiles:
        tm, tv = _tile_sample(
            lk, sorted({sel, ots} - {None}), config.tiles_per_slide, config.random_state
        )
        if tm is not None:
            for mid, idx in tm.groupby("model_id").indices.items():
                lab, ep = _label(models, mid)
                n_tiles += len(idx)
                add("tiles", mid, tv[idx], tm["tissue"].iloc[idx].astype(str),
                    tm["tile_id"].iloc[idx], f"Tile embeddings — {mid} ({lab})", ep, lab)  # fmt: skip

    X_expr, _, samples = _expression(lk)
    has = samples["tissue"].notna().to_numpy()
    rows = np.flatnonzero(has)
    Xe = np.asarray(X_expr[rows], dtype=np.float64)
    sid_e = samples["tissue_sample_id"].astype("string").fillna(samples["aliquot_id"]).iloc[rows]
    add("expression", None, Xe, samples["tissue"].iloc[rows].astype(str), sid_e,
        "Expression (log TPM)")  # fmt: skip

    # joint: selected model's slide PCs ⊕ expression PCs, on the samples with both
    s = _model_slides(meta, vec, sel)
    F, Y, pm = _paired(s, X_expr, samples)
    k = config.n_components
    img = pca_fit_transform(F, k, random_state=config.random_state).scores
    ex = pca_fit_transform(Y, k, random_state=config.random_state).scores
    labels = pm["tissue"].astype(str).to_numpy()
    jv = compute_view(
        joint_matrix(img, ex), labels, pm["tissue_sample_id"], **{**kw, "n_components": None}
    )
    coords.append(_coord_rows("joint", sel, jv, list(config.methods)))
    sil.extend(jv.silhouette_rows(view="joint", model_id=sel, epoch=_label(models, sel)[1]))
    plots["view_joint"] = P.view_panels(
        jv.coords, _png(lk, "analysis/view_joint.png"),
        title=f"Joint: slide PCs ({sel}) ⊕ expression PCs", silhouette=jv.silhouette,
    )  # fmt: skip
    sil_img = silhouette_by_label(img, labels)
    sil_expr = silhouette_by_label(ex, labels)
    for space_name, v in (("image_only", sil_img), ("expression_only", sil_expr)):
        sil.append({"view": "joint", "model_id": sel, "epoch": _label(models, sel)[1],
                    "space": f"pca_{space_name}", "silhouette": v, "n_samples": len(labels),
                    "n_labels": int(len(np.unique(labels)))})  # fmt: skip

    coords_df = pd.concat(coords, ignore_index=True)
    sil_df = pd.DataFrame(sil)
    sil_df["epoch"] = sil_df["epoch"].astype("Int64")
    sil_df["checkpoint"] = sil_df["checkpoint"].fillna("")
    out_c = write_parquet(coords_df, lk.table(COORDS_TABLE))
    out_s = write_parquet(sil_df, lk.table(SILHOUETTE_TABLE))
    trend = sil_df[sil_df["view"].isin(["slides", "tiles"])]
    plots["silhouette_trend"] = P.silhouette_trend(trend, _png(lk, "analysis/silhouette_trend.png"))

    def pca_sil(view: str, mid: str | None) -> float:
        r = sil_df[(sil_df["view"] == view) & (sil_df["space"] == "pca")]
        r = r[r["model_id"] == mid] if mid is not None else r
        return float(r["silhouette"].iloc[0]) if len(r) else float("nan")

    md = {
        **table_metadata(coords_df, out_c),
        "silhouettes_path": dg.MetadataValue.path(str(out_s)),
        "silhouettes": dg.MetadataValue.md(
            sil_df.drop(columns=["n_labels"]).to_markdown(index=False, floatfmt=".4f")
        ),
        "selected_model_id": dg.MetadataValue.text(f"{sel} ({how})"),
        "silhouette_selected": _f(pca_sil("slides", sel)),
        "silhouette_off_the_shelf": _f(pca_sil("slides", ots) if ots else float("nan")),
        "silhouette_joint": _f(pca_sil("joint", sel)),
        "silhouette_image_only": _f(sil_img),
        "silhouette_expression_only": _f(sil_expr),
        "silhouette_expression_all_samples": _f(pca_sil("expression", None)),
        "joint_samples": dg.MetadataValue.int(len(labels)),
        "tiles_viewed": dg.MetadataValue.int(n_tiles),
        "seconds": _f(time.perf_counter() - t0),
    }
    md.update({f"plot_{k}": plot_metadata(p) for k, p in plots.items()})
    return dg.MaterializeResult(metadata=md)


# ----------------------------------------------------------------------------------------------
# gene_r2
# ----------------------------------------------------------------------------------------------


def _spec(key: str, description: str, **kw) -> dg.AssetSpec:
    return dg.AssetSpec(key, group_name=GROUP, description=description, **kw)


GENE_R2_INPUTS = ["slide_embeddings", "embedding_models", "gene_log_tpm"]
GENE_R2_SPECS = [
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
]


@dg.multi_asset(name="gene_r2", specs=GENE_R2_SPECS)
def gene_r2(
    context: dg.AssetExecutionContext,
    config: GeneR2Config,
    lake: DataLakeResource,
    gtex_source: GTExSourceResource,
):
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
        raise dg.Failure(description=f"gene_r2: {e}") from e
    for m in skipped:
        context.log.warning(f"gene_r2 model 'best': {m} left out")
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


class ClusterTranscriptomeConfig(dg.Config):
    n_clusters: int = Field(default=20, description="k-means clusters (capped at training slides)")
    n_components: int = Field(default=40, description="PCA of the embeddings before clustering")
    method: str = Field(default="kmeans", description="'kmeans' or 'agglomerative'")
    tissue_strata: bool = Field(
        default=True, description="Report within-tissue R² (as gene_r2 does), for a like-for-like"
    )
    random_state: int = Field(default=0, description="Seed of k-means")


def _merge_models(path: Path, new: pd.DataFrame, model_id: str, drop: list[str]) -> pd.DataFrame:
    """``new`` rows for ``model_id`` + the other models' rows already at ``path`` (minus ``drop``)."""
    if not path.is_file():
        return new
    old = pd.read_parquet(path)
    if "model_id" not in old.columns or list(old.columns) != list(new.columns):
        return new  # an older layout: rewrite with this fit only
    old = old[~old["model_id"].isin([model_id, *drop])]
    return pd.concat([old, new], ignore_index=True) if len(old) else new


@dg.asset(
    group_name=GROUP,
    kinds={"scikitlearn", "parquet", "lancedb"},
    deps=["gene_r2", "gene_r2_folds", "slide_embeddings", "gene_log_tpm"],
    code_version=CLUSTER_VERSION,
    pool="lancedb_writer",  # writes cluster_centroids (dagster.yaml: every pool is exclusive)
)
def cluster_transcriptome(
    context: dg.AssetExecutionContext, config: ClusterTranscriptomeConfig, lake: DataLakeResource
) -> dg.MaterializeResult:
    """SPEC §8: cluster-average transcriptome. (1) Held-out donors (the same donor folds and
    model as gene_r2): each fold's centroids go to a temporary LanceDB table and every held-out
    slide is assigned through the LanceDB search that serves lookups; per-gene R² next to the
    ridge R² → `tables/cluster_transcriptome_r2.parquet`. (2) The predictor fitted on all paired
    slides, what `gtex-assets nearest SAMPLE --transcriptome` serves: `tables/cluster_transcriptomes`
    (long: model_id, cluster, n_slides, majority_tissue, gene_id, symbol, log_tpm),
    `tables/cluster_members`, the PCA under `models/cluster_transcriptome/<model>.npz` and the
    centroids in the LanceDB table `cluster_centroids` (replaced per model)."""
    lk = lake.lake()
    t0 = time.perf_counter()
    fp = lk.table(GENE_R2_FOLDS_TABLE)
    if not fp.is_file() or not lk.table(GENE_R2_TABLE).is_file():
        raise dg.Failure(description=f"{fp} is missing: materialise gene_r2 first")
    if config.method not in ("kmeans", "agglomerative"):
        raise dg.Failure(description=f"method {config.method!r}: use 'kmeans' or 'agglomerative'")
    folds = pd.read_parquet(fp)
    ridge = pd.read_parquet(lk.table(GENE_R2_TABLE))
    sel = str(folds["model_id"].iloc[0])
    meta, vec = _read_slides(lk)
    X_expr, genes, samples = _expression(lk)
    F_all, Y_all, pm_all = _paired(_model_slides(meta, vec, sel), X_expr, samples)
    # held-out evaluation on gene_r2's slides and folds (it may have left out rare tissues);
    # the served predictor below uses every paired slide
    ev_rows = pm_all["tissue_sample_id"].isin(set(folds["tissue_sample_id"])).to_numpy()
    F, Y, pm = F_all[ev_rows], Y_all[ev_rows], pm_all[ev_rows].reset_index(drop=True)
    f = pm[["tissue_sample_id"]].merge(folds, on="tissue_sample_id", how="left")
    if f["fold"].isna().any() or len(f) != len(folds):
        raise dg.Failure(
            description="slides or expression changed since gene_r2: re-materialise gene_r2"
        )
    groups = pm["subject_id"].astype(str).to_numpy()
    strata = pm["tissue"].astype(str).to_numpy() if config.tissue_strata else None
    fit_kw = {"n_components": config.n_components, "method": config.method}

    # (1) held-out donors, nearest cluster through LanceDB (fold rows in a throwaway store)
    with tempfile.TemporaryDirectory(prefix="gtex_cluster_cv_") as tmp:
        cv_store = V.VectorStore(Path(tmp) / "lancedb")
        ev = evaluate_cluster_predictor(
            F,
            Y,
            groups,
            n_clusters=config.n_clusters,
            folds=f["fold"].to_numpy(dtype=np.int64),
            random_state=config.random_state,
            strata=strata,
            nearest_factory=CP.lancedb_nearest_factory(cv_store, sel),
            **fit_kw,
        )
    agree = ev.n_agree_exact
    if agree < len(ev.clusters):
        context.log.warning(
            f"LanceDB and exact search disagree on {len(ev.clusters) - agree} of "
            f"{len(ev.clusters)} held-out assignments (float32 near-ties)"
        )
    gene_ids = genes["gene_id"].astype(str).tolist()
    symbols = genes["symbol"].astype(str).tolist()
    table = compare_gene_r2(ridge, ev, gene_ids)
    out = write_parquet(table, lk.table(CLUSTER_TABLE))
    png = P.r2_scatter(
        table["r2_ridge"], table["r2_cluster"], _png(lk, "analysis/cluster_vs_ridge_r2.png"),
        xlabel="ridge R²", ylabel="cluster-average R²", title=f"Per-gene R², held-out donors ({sel})",
    )  # fmt: skip

    # (2) the served predictor: every paired slide of the model
    F, Y, pm = F_all, Y_all, pm_all
    final = CP.fit_cluster_predictor(
        F, Y, config.n_clusters, random_state=config.random_state, **fit_kw
    )
    params = {"model_id": sel, "n_clusters": config.n_clusters, "random_state": config.random_state,
              **fit_kw, "samples": pm["tissue_sample_id"].astype(str).tolist(), "genes": gene_ids}  # fmt: skip
    fit_id = CP.fit_fingerprint(final, params)
    summary = CP.cluster_summary(final, pm["tissue"].astype(str).to_numpy())
    card = {k: v for k, v in params.items() if k not in ("samples", "genes")}
    card.update(fit_id=fit_id, n_slides=len(pm), n_genes=len(gene_ids), dim=int(F.shape[1]),
                space_dim=int(final.centroids.shape[1]), clusters=int(final.n_clusters))  # fmt: skip
    proj = CP.save_projection(final, CP.projection_path(lk.models, sel), card)
    store = V.VectorStore(lk.lancedb)
    cents = CP.centroid_table(
        sel, final.centroids, fit_id=fit_id,
        n_slides=summary["n_slides"], majority_tissue=summary["majority_tissue"],
    )  # fmt: skip
    wrote = CP.write_centroids(store, cents)
    if wrote.dropped_models:
        context.log.warning(
            f"{CP.CENTROID_TABLE}: vectors now {final.centroids.shape[1]}-D, so the clusters of "
            f"{wrote.dropped_models} (another width) were dropped; re-materialise for them"
        )
        for m in wrote.dropped_models:
            CP.projection_path(lk.models, m).unlink(missing_ok=True)
    tx = CP.transcriptome_table(final, gene_ids, symbols, summary, model_id=sel, fit_id=fit_id)
    members = CP.member_table(final, pm, model_id=sel, fit_id=fit_id)
    out_tx = lk.table(TRANSCRIPTOMES_TABLE)
    write_parquet(_merge_models(out_tx, tx, sel, wrote.dropped_models), out_tx)
    out_m = lk.table(MEMBERS_TABLE)
    write_parquet(_merge_models(out_m, members, sel, wrote.dropped_models), out_m)
    sizes = summary[["cluster", "n_slides", "majority_tissue", "majority_fraction"]]
    context.log.info(
        f"cluster_transcriptome: {len(pm)} slides, {final.n_clusters} clusters, "
        f"{agree}/{len(ev.clusters)} LanceDB = exact, {time.perf_counter() - t0:.1f}s"
    )
    return dg.MaterializeResult(
        metadata={
            **table_metadata(table, out),
            "model_id": dg.MetadataValue.text(sel),
            "n_clusters": dg.MetadataValue.int(config.n_clusters),
            "median_r2_cluster": _f(np.nanmedian(table["r2_cluster"])),
            "median_r2_ridge": _f(np.nanmedian(table["r2_ridge"])),
            "median_delta_r2": _f(np.nanmedian(table["delta_r2"])),
            "genes_cluster_better": dg.MetadataValue.int(int((table["delta_r2"] > 0).sum())),
            "median_sample_r": _f(np.nanmedian(ev.sample_r)),
            "nearest_lookup": dg.MetadataValue.text(
                "LanceDB (exact L2 scan of each fold's centroids, the served search)"
            ),
            "held_out_assignments": dg.MetadataValue.int(len(ev.clusters)),
            "assignments_agree_exact": dg.MetadataValue.int(agree),
            "fit_id": dg.MetadataValue.text(fit_id),
            "final_clusters": dg.MetadataValue.md(sizes.to_markdown(index=False, floatfmt=".2f")),
            "transcriptomes_path": dg.MetadataValue.path(str(out_tx)),
            "members_path": dg.MetadataValue.path(str(out_m)),
            "projection_path": dg.MetadataValue.path(str(proj)),
            "lancedb_table": dg.MetadataValue.text(f"{lk.lancedb}/{CP.CENTROID_TABLE}"),
            "centroid_rows_model": dg.MetadataValue.int(wrote.rows),
            "centroid_rows_total": dg.MetadataValue.int(wrote.total_rows),
            "seconds": _f(time.perf_counter() - t0),
            "plot": plot_metadata(png),
        }
    )


# ----------------------------------------------------------------------------------------------
# feature_comparison
# ----------------------------------------------------------------------------------------------


class FeatureComparisonConfig(dg.Config):
    n_splits: int = Field(default=5, description="Donor folds per repeat (lowered for few donors)")
    inner_splits: int = Field(default=4, description="Inner donor folds of the ridge")
    n_repeats: int = Field(default=50, description="CV repeats (Li et al. 2022 used 50)")
    tissue_strata: bool = Field(
        default=True, description="Within-tissue expression task (tissue fixed effects)"
    )
    classifier_pcs: int = Field(
        default=0, description="PCA components before the tissue classifier (0 = none)"
    )
    fdr: float = Field(default=0.05, description="BH FDR for 'significant' genes")
    selected_model_id: str = Field(default="", description="Override the fine-tuned model")
    off_the_shelf_model_id: str = Field(default="", description="Override the off-the-shelf model")
    random_state: int = Field(default=0, description="Seed of the repeats' donor shuffles")


@dg.asset(
    group_name=GROUP,
    kinds={"scikitlearn", "parquet"},
    deps=[slide_embeddings, gene_log_tpm],
    code_version=ANALYSIS_VERSION,
)
def feature_comparison(
    context: dg.AssetExecutionContext, config: FeatureComparisonConfig, lake: DataLakeResource
) -> dg.MaterializeResult:
    """SPEC §8 (Li et al. 2022): off-the-shelf vs selected fine-tuned slide embeddings of the
    same slides — tissue accuracy (linear classifier) and per-gene ridge R², repeated donor CV,
    paired tests. `tables/feature_comparison_genes.parquet`, `..._accuracy.parquet`."""
    lk = lake.lake()
    t0 = time.perf_counter()
    meta, vec = _read_slides(lk)
    models = _models(lk, sorted(meta["model_id"].unique()))
    sel, ots, _ = _pick_models(models, config.selected_model_id, config.off_the_shelf_model_id)
    if ots is None or ots == sel:
        raise dg.Failure(
            description=f"need an off-the-shelf and a fine-tuned model; have {models.to_dict('records')}"
        )
    X_expr, genes, samples = _expression(lk)
    Fb, Y, pm = _paired(_model_slides(meta, vec, sel), X_expr, samples)
    Fa, keep = _aligned(_model_slides(meta, vec, ots), pm["tissue_sample_id"])
    if not keep.all():
        context.log.warning(f"{int((~keep).sum())} slide(s) have no {ots} embedding: left out")
    Fb, Y, pm = Fb[keep], Y[keep], pm[keep].reset_index(drop=True)
    dropped: list[str] = []
    if config.tissue_strata:
        pm, dropped, (Fa, Fb, Y) = _drop_small_tissues(context, pm, Fa, Fb, Y)
    groups = pm["subject_id"].astype(str).to_numpy()
    tissue = pm["tissue"].astype(str).to_numpy()
    fc = _fold_counts(
        groups, config.n_splits, config.inner_splits, config.random_state,
        tissue if config.tissue_strata else None,
    )  # fmt: skip
    res = compare_features(
        Fa,
        Fb,
        tissue,
        Y,
        groups,
        n_splits=fc["n_splits"],
        inner_splits=fc["inner_splits"],
        n_repeats=config.n_repeats,
        random_state=config.random_state,
        names=(ots, sel),
        genes=genes["gene_id"].astype(str).tolist(),
        symbols=genes["symbol"].astype(str).tolist(),
        strata=tissue if config.tissue_strata else None,
        classifier_pcs=config.classifier_pcs or None,
        fdr=config.fdr,
    )
    out_g = write_parquet(res.genes, lk.table(FC_GENES_TABLE))
    acc = res.accuracy.assign(model_a=ots, model_b=sel)
    out_a = write_parquet(acc, lk.table(FC_ACCURACY_TABLE))
    png = P.paired_accuracy_plot(
        res.accuracy, (ots, sel), _png(lk, "analysis/feature_comparison_accuracy.png")
    )
    o = res.overall
    md = {
        **table_metadata(res.genes, out_g),
        "accuracy_path": dg.MetadataValue.path(str(out_a)),
        "summary": dg.MetadataValue.md(res.summary_markdown()),
        "off_the_shelf": dg.MetadataValue.text(ots),
        "tissues_left_out": dg.MetadataValue.text(", ".join(dropped) or "none"),
        "fine_tuned": dg.MetadataValue.text(sel),
        "samples": dg.MetadataValue.int(len(pm)),
        "n_splits": dg.MetadataValue.int(fc["n_splits"]),
        "inner_splits": dg.MetadataValue.int(fc["inner_splits"]),
        "folds_lowered": dg.MetadataValue.bool(bool(fc["lowered"])),
        "n_repeats": dg.MetadataValue.int(config.n_repeats),
        "seconds": _f(time.perf_counter() - t0),
        "plot": plot_metadata(png),
    }
    for key in (
        "accuracy_a_mean",
        "accuracy_b_mean",
        "accuracy_p_wilcoxon",
        "accuracy_p_corrected",
        "improved_p_binomial",
    ):
        if key in o and o[key] is not None:
            md[key] = _f(o[key])
    for key in ("n_significant", "n_improved", "n_genes"):
        if key in o:
            md[key] = dg.MetadataValue.int(int(o[key]))
    return dg.MaterializeResult(metadata=md)
