"""SPEC §8 per-gene R², both views in one table, with uncertainty (issue #15 part 1).

- ``r2_across``: how well the image reads a gene across all samples (no tissue strata): ridge
  with one intercept, R² against the overall mean. Tissue markers rise to the top, because the
  image shows the tissue (the seed's question).
- ``r2_within``: what the image tells beyond tissue identity: tissue fixed effects (X and Y
  centred within tissue in each training fold), R² against the tissue means. The planted
  morphology genes rise to the top.

Both views are fitted on the same slides, the same tissue-stratified outer donor folds and the
same inner folds (penalty per gene and fold by inner CV), so they are paired. Tissues with fewer
than 3 donors are left out of both (the within view cannot fit them). Each view has its Pearson r,
its no-image baseline (the training folds' overall mean for ``across``, their tissue means for
``within``; ``r2_across_tissue_only`` is the tissue means' R² across tissues, what knowing the
tissue alone gives), and a 95 % donor-bootstrap percentile interval of the pooled out-of-fold R²
(``stats.donor_bootstrap_r2``). Genes are those kept by ``gene_log_tpm``'s expression filters,
chosen on all samples before any fold (no gene selection inside the CV).

``r2`` / ``pearson_r`` / ``alpha`` / ``rank`` / ``r2_baseline`` repeat the ranking view
(``within`` with ``tissue_strata``, the default; else ``across``); the model choice uses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from gtex_assets.core.tables import column_descriptions
from gtex_assets.lib.analysis.projection import pca_fit_transform
from gtex_assets.lib.analysis.regression import (
    DEFAULT_ALPHAS,
    GeneR2Result,
    baseline_oof,
    inner_donor_folds,
    r2_pearson,
    recall_at_k,
    ridge_gene_r2,
)
from gtex_assets.lib.analysis.selection import FoldPlan, best_model, fold_plan, tissues_to_keep
from gtex_assets.lib.analysis.stats import donor_bootstrap_r2

GENE_R2_TABLE = "gene_r2"
BY_MODEL_TABLE = "gene_r2_by_model"
MODELS_TABLE = "gene_r2_models"
FOLDS_TABLE = "gene_r2_folds"
VIEWS = ("across", "within")


@dataclass(frozen=True)
class GeneR2Params:
    """SPEC defaults of the gene_r2 asset (its Config takes them from here)."""

    features: str = "raw"  # 'raw' slide embeddings or their 'pcs'
    n_pcs: int = 40
    alphas: tuple[float, ...] = tuple(float(a) for a in DEFAULT_ALPHAS)
    n_splits: int = 5
    inner_splits: int = 4
    tissue_strata: bool = True  # rank (and choose the model) by r2_within; else by r2_across
    model: str = "best"  # 'best' | 'selected' | a model_id
    kernel: str = "linear"  # 'linear' ridge | 'rbf' kernel ridge
    top_n: int = 30
    n_boot: int = 200  # donor-bootstrap replicates of the confidence intervals
    ci_level: float = 0.95
    random_state: int = 0


@dataclass(frozen=True)
class GeneR2Output:
    gene_r2: pd.DataFrame  # the reported model, both views
    by_model: pd.DataFrame  # ranking view for every model
    models: pd.DataFrame  # one row per model
    folds: pd.DataFrame  # the donor folds
    primary: str
    how: str
    plan: FoldPlan
    tissues_left_out: list[str]
    width: int  # feature columns of the reported model
    planted: list[str] | None = None
    extra: dict = field(default_factory=dict)


def features(X: np.ndarray, kind: str, n_pcs: int, random_state: int) -> np.ndarray:
    if kind == "raw":
        return X
    if kind == "pcs":
        return pca_fit_transform(X, n_pcs, random_state=random_state).scores
    raise ValueError(f"features {kind!r}: use 'raw' or 'pcs'")


def _fit(X, Y, groups, plan, inner, strata, p: GeneR2Params) -> GeneR2Result:
    return ridge_gene_r2(
        X, Y, groups, alphas=p.alphas, folds=plan.folds, inner_folds=inner, strata=strata,
        random_state=p.random_state, return_oof=True, kernel=p.kernel,
    )  # fmt: skip


def _rank(r2: np.ndarray) -> np.ndarray:
    return (
        pd.Series(r2)
        .rank(ascending=False, method="first", na_option="bottom")
        .astype(int)
        .to_numpy()
    )


def view_columns(
    Y: np.ndarray,
    res: GeneR2Result,
    base_oof: np.ndarray,
    groups: np.ndarray,
    strata: np.ndarray | None,
    view: str,
    p: GeneR2Params,
) -> dict[str, np.ndarray]:
    """The columns of one view: R², its CI, Pearson r, the no-image baseline, rank."""
    lo, hi = donor_bootstrap_r2(
        Y, res.oof, groups, strata, n_boot=p.n_boot, level=p.ci_level, random_state=p.random_state
    )
    return {
        f"r2_{view}": res.r2,
        f"r2_{view}_ci_low": lo,
        f"r2_{view}_ci_high": hi,
        f"pearson_r_{view}": res.pearson_r,
        f"r2_{view}_baseline": r2_pearson(Y, base_oof, strata)[0],
        f"rank_{view}": _rank(res.r2),
    }


def run_gene_r2(
    feats: dict[str, np.ndarray],
    Y: np.ndarray,
    slides: pd.DataFrame,
    gene_ids: Sequence[str],
    symbols: Sequence[str],
    models: pd.DataFrame,
    params: GeneR2Params,
    *,
    selected: str,
    how: str,
    planted: Sequence[str] | None = None,
) -> GeneR2Output:
    """Both R² views for the reported model, the ranking view for every model in ``feats``.

    ``feats``: model_id → slides × features aligned with ``slides`` (tissue_sample_id,
    subject_id, tissue) and ``Y`` (slides × genes logTPM); ``selected`` is the model reported
    unless ``params.model == 'best'`` picks another. ``models``: model_id, kind, epoch.
    """
    keep, dropped = tissues_to_keep(slides["subject_id"].to_numpy(), slides["tissue"].to_numpy())
    slides = slides[keep].reset_index(drop=True)
    Y = Y[keep]
    feats = {m: F[keep] for m, F in feats.items()}
    groups = slides["subject_id"].astype(str).to_numpy()
    tissue = slides["tissue"].astype(str).to_numpy()
    rank_strata = tissue if params.tissue_strata else None
    plan = fold_plan(groups, params.n_splits, params.inner_splits, params.random_state, tissue)
    inner = inner_donor_folds(groups, plan.folds, plan.inner_splits, params.random_state, tissue)
    gene_ids, symbols = list(gene_ids), list(symbols)
    hl = [g for g in planted or [] if g in set(gene_ids)] or None
    base_rank = r2_pearson(Y, baseline_oof(Y, groups, plan.folds, rank_strata), rank_strata)[0]

    tables, sums, width = {}, {}, {}
    best_res: tuple[str, GeneR2Result] | None = None
    for m, Fm in feats.items():
        X = features(Fm, params.features, params.n_pcs, params.random_state)
        width[m] = X.shape[1]
        res = _fit(X, Y, groups, plan, inner, rank_strata, params)
        t = res.table(gene_ids, symbols)
        t["r2_baseline"] = pd.Series(base_rank, index=gene_ids).loc[t["gene"]].to_numpy()
        tables[m] = t.assign(model_id=m)
        sums[m] = float(np.nansum(np.clip(res.r2, 0, None)))
        if best_res is None or sums[m] > sums[best_res[0]]:
            best_res = (m, res)  # keep one model's out-of-fold predictions, not every model's
    primary = best_model(sums) if params.model == "best" else selected
    if params.model == "best":
        how = f"most held-out variance explained (Σ max(R², 0)) of {len(tables)} models"
    if best_res is None or best_res[0] != primary:
        raise ValueError(f"the reported model {primary!r} is not among {sorted(feats)}")

    # both views of the reported model, paired: same slides, same outer and inner folds
    X = features(feats[primary], params.features, params.n_pcs, params.random_state)
    res = {("within" if params.tissue_strata else "across"): best_res[1]}
    other = "across" if params.tissue_strata else "within"
    res[other] = _fit(X, Y, groups, plan, inner, tissue if other == "within" else None, params)
    tissue_means = baseline_oof(Y, groups, plan.folds, tissue)
    overall_mean = baseline_oof(Y, groups, plan.folds, None)
    cols: dict[str, np.ndarray] = {}
    cols.update(view_columns(Y, res["across"], overall_mean, groups, None, "across", params))
    cols["r2_across_tissue_only"] = r2_pearson(Y, tissue_means)[0]
    cols.update(view_columns(Y, res["within"], tissue_means, groups, tissue, "within", params))
    views = pd.DataFrame({"gene": gene_ids, **cols})
    views["n_slides"] = len(slides)
    views["n_donors"] = plan.n_donors
    table = tables[primary].merge(views, on="gene", how="left")

    summary = pd.DataFrame(
        [
            {
                "model_id": m,
                "kind": _attr(models, m, "kind", ""),
                "epoch": float(_attr(models, m, "epoch", np.nan)),
                "mean_r2": float(np.nanmean(t["r2"])),
                "sum_positive_r2": sums[m],
                "median_r2": float(np.nanmedian(t["r2"])),
                "genes_r2_above_0.1": int(np.nansum(t["r2"] > 0.1)),
                "top_r2": float(np.nanmax(t["r2"])),
                "planted_recall_at_k": recall_at_k(t["gene"], hl) if hl else np.nan,
                "reported": m == primary,
            }
            for m, t in tables.items()
        ]
    )
    folds = pd.DataFrame(
        {
            "tissue_sample_id": slides["tissue_sample_id"].astype(str),
            "subject_id": groups,
            "tissue": tissue,
            "fold": plan.folds.astype(np.int32),
            "model_id": primary,
        }
    )
    return GeneR2Output(
        gene_r2=table,
        by_model=pd.concat(tables.values(), ignore_index=True),
        models=summary,
        folds=folds,
        primary=primary,
        how=how,
        plan=plan,
        tissues_left_out=dropped,
        width=width[primary],
        planted=hl,
    )


def _attr(models: pd.DataFrame, model_id: str, column: str, default):
    if column not in models.columns:
        return default
    v = models.loc[models["model_id"] == model_id, column]
    return v.iloc[0] if len(v) and pd.notna(v.iloc[0]) else default


def warnings(out: GeneR2Output) -> list[str]:
    """What the user should know about a run: lowered folds, tissues left out."""
    msgs = []
    if out.plan.lowered:
        msgs.append(f"{out.plan.n_donors} donors: folds lowered to {out.plan.n_splits} outer / "
                    f"{out.plan.inner_splits} inner")  # fmt: skip
    if out.tissues_left_out:
        msgs.append(f"{len(out.tissues_left_out)} tissue(s) with < 3 donors left out of both "
                    f"views: {out.tissues_left_out}")  # fmt: skip
    return msgs


def definitions_markdown(params: GeneR2Params, plan: FoldPlan) -> str:
    """The metrics' definitions for the UI (from the table registry) plus the protocol used."""
    desc = column_descriptions(GENE_R2_TABLE)
    cols = [
        c
        for c in desc
        if c.startswith(("r2_", "pearson_r_", "rank_")) or c in ("n_slides", "n_donors")
    ]
    lines = [
        f"Protocol: {plan.n_splits} outer donor folds (stratified by tissue), {plan.inner_splits} "
        f"inner donor folds choosing each gene's penalty per outer fold; both views on the same "
        f"slides and folds; out-of-fold predictions pooled over folds. CI: {params.n_boot} donor-"
        f"bootstrap replicates, {100 * params.ci_level:g} % percentile interval of the pooled R². "
        f"Ranking view (`r2`, `rank`, model choice): "
        f"{'within' if params.tissue_strata else 'across'}. Genes: those kept by gene_log_tpm's "
        "filters (chosen on all samples, not per fold).",
        "",
        "| column | definition |",
        "|---|---|",
        *(f"| `{c}` | {desc[c]} |" for c in cols),
    ]
    return "\n".join(lines)


def gene_r2_metadata(out: GeneR2Output, params: GeneR2Params, seconds: float) -> dict:
    """The UI's numbers (plain values; markdown strings start with '|' or 'Protocol')."""
    t = out.gene_r2
    r2 = t["r2"].to_numpy(dtype=float)
    view = "within" if params.tissue_strata else "across"
    md: dict = {
        "model_id": f"{out.primary} ({out.how})",
        "kernel": params.kernel,
        "features": f"{params.features} ({out.width} columns)",
        "samples": int(t["n_slides"].iloc[0]) if len(t) else 0,
        "donors": out.plan.n_donors,
        "tissues_left_out": ", ".join(out.tissues_left_out) or "none",
        "genes": len(t),
        "n_splits": out.plan.n_splits,
        "inner_splits": out.plan.inner_splits,
        "folds_lowered": bool(out.plan.lowered),
        "tissue_strata": bool(params.tissue_strata),
        "ranking_view": view,
        "median_r2": float(np.nanmedian(r2)),
        "median_r2_across": float(np.nanmedian(t["r2_across"])),
        "median_r2_within": float(np.nanmedian(t["r2_within"])),
        "mean_r2_no_image_baseline": float(np.nanmean(t["r2_baseline"])),
        "genes_r2_above_0.1": int(np.nansum(r2 > 0.1)),
        "top_r2": float(np.nanmax(r2)),
        "seconds": float(seconds),
    }
    if out.planted:
        hs = set(out.planted)
        linked = t["gene"].isin(hs)
        md["planted_recall_at_k"] = recall_at_k(t["gene"], out.planted)
        for v in VIEWS:
            ranked = t.sort_values(f"rank_{v}", kind="mergesort")["gene"]
            md[f"planted_recall_at_k_{v}"] = recall_at_k(ranked, out.planted)
        md["planted_genes_kept"] = len(out.planted)
        md["mean_r2_linked"] = float(t.loc[linked, "r2"].mean())
        md["mean_r2_non_linked"] = float(t.loc[~linked, "r2"].mean())
    show = ["gene", "symbol", "r2_across", "r2_across_ci_low", "r2_across_ci_high",
            "r2_within", "r2_within_ci_low", "r2_within_ci_high", "alpha"]  # fmt: skip
    for v in VIEWS:
        top = t.sort_values(f"rank_{v}", kind="mergesort").head(params.top_n)
        md[f"top_genes_{v}"] = top[show].to_markdown(index=False, floatfmt=".3f")
    md["top_genes"] = md[f"top_genes_{view}"]
    md["models"] = out.models.to_markdown(index=False, floatfmt=".4f")
    md["definitions"] = definitions_markdown(params, out.plan)
    return md
