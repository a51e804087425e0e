"""SPEC §8, the second study (Li et al. 2022): off-the-shelf vs fine-tuned backbone features.

Two feature sets for the same slides (``F_a`` = off-the-shelf ImageNet backbone, ``F_b`` =
fine-tuned on the tissue task) are compared on the same donor-grouped K-fold splits, repeated
``n_repeats`` times with different donor shuffles:

(a) tissue classification: standardised features (optionally PCA) → multinomial
    ``LogisticRegression``; accuracy pooled over the K test folds of a repeat (and per fold);
(b) expression: per-gene ridge R² (``regression.ridge_gene_r2``: inner-CV penalty per gene,
    pooled out-of-fold R²) of every gene, per repeat.

Statistics (scipy distributions; the signed-rank test vectorised in ``stats``):

- overall accuracy: paired Wilcoxon signed-rank and paired t-test over the R repeat accuracies,
  and the corrected repeated-CV t-test (Nadeau & Bengio 2003; Bouckaert & Frank 2004) over
  the R·K fold differences, whose variance term ``(1/(R·K) + n_test/n_train)`` accounts for the
  overlap of training sets — the plain tests treat repeats as independent and are optimistic.
- per gene: paired Wilcoxon signed-rank (two-sided; ``stats.wilcoxon_signed_rank``: every gene
  at once, scipy's exact / permutation / normal-approximation rule decided per gene) and paired t-test of R²_b vs R²_a over
  the R repeats, and the corrected repeated-CV t-test over the R·K fold-level R² differences;
  Benjamini–Hochberg q-values across genes.
- "genes with a significant image association": genes whose R² is significantly > 0 for *either*
  feature set — one-sided corrected repeated-CV t-test of the R·K fold-level out-of-sample R²
  values (``regression.fold_r2``: skill against the fold's training-mean predictor) against 0, BH-adjusted across genes
  separately for each set, q < ``fdr``, and mean R² > ``min_r2``. The correction matters: R
  repeats of the same data are not R independent samples, and a naive one-sample test over
  repeats calls pure-noise genes with a chance R² of 0.04 "significant" because every
  repeat reproduces the same chance fit.
- "improved": among the significant genes, mean R²_b > mean R²_a; reported with a two-sided
  binomial (sign) test against 50 % and the counts that are also significant per gene
  (corrected t q < ``fdr``). Li et al.'s headline is of this form: 139 of 171 genes (81 %).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from gtex_assets.lib.analysis.regression import (
    DEFAULT_ALPHAS,
    child_seed,
    donor_folds,
    fold_r2,
    inner_donor_folds,
    ridge_gene_r2,
)
from gtex_assets.lib.analysis.stats import wilcoxon_signed_rank


def bh_fdr(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q); NaN p-values stay NaN and are not counted."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    if len(ok) == 0:
        return q
    order = ok[np.argsort(p[ok], kind="mergesort")]
    m = len(ok)
    adj = p[order] * m / np.arange(1, m + 1)
    q[order] = np.minimum(1.0, np.minimum.accumulate(adj[::-1])[::-1])
    return q


def corrected_repeated_cv_ttest(
    d: np.ndarray, test_train_ratio: float, alternative: str = "two-sided"
) -> tuple[np.ndarray | float, np.ndarray | float]:
    """Corrected repeated-CV t-test (Nadeau & Bengio 2003) of fold-level values ``d``.

    ``d``: the R·K fold-level differences (or values, to test against 0) along axis 0, one
    column per gene if 2-D. ``t = mean / sqrt((1/(R·K) + n_test/n_train) · var)``, df = R·K − 1.
    Returns (t, p), floats for 1-D input; NaN where all values are equal.
    """
    d = np.asarray(d, dtype=np.float64)
    one = d.ndim == 1
    d = d.reshape(len(d), -1)
    n = d.shape[0]
    var = d.var(axis=0, ddof=1) if n > 1 else np.full(d.shape[1], np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(var > 0, d.mean(0) / np.sqrt((1.0 / n + test_train_ratio) * var), np.nan)
    if alternative == "two-sided":
        p = 2 * stats.t.sf(np.abs(t), df=n - 1)
    elif alternative == "greater":
        p = stats.t.sf(t, df=n - 1)
    else:
        raise ValueError(f"alternative must be 'two-sided' or 'greater', got {alternative!r}")
    p = np.where(np.isnan(t), np.nan, p)
    return (float(t[0]), float(p[0])) if one else (t, p)


@dataclass(frozen=True)
class ComparisonResult:
    """Everything of one comparison; ``a``/``b`` in column names are ``names[0]``/``names[1]``."""

    names: tuple[str, str]
    accuracy: pd.DataFrame  # repeat, accuracy_a, accuracy_b (pooled over folds)
    fold_accuracy: pd.DataFrame  # repeat, fold, n_test, accuracy_a, accuracy_b
    genes: pd.DataFrame  # one row per gene, see compare_features
    overall: dict  # headline numbers and p-values
    r2_a: np.ndarray | None = field(default=None, repr=False)  # repeats × genes
    r2_b: np.ndarray | None = field(default=None, repr=False)

    def summary_markdown(self) -> str:
        """A short markdown summary for the asset's metadata."""
        a, b = self.names
        o = self.overall
        lines = [
            f"**{b} vs {a}** — {o['n_splits']}-fold CV by donor × {o['n_repeats']} repeats",
            "",
        ]
        if "accuracy_a_mean" in o:
            lines += [
                f"| | {a} | {b} |",
                "|---|---|---|",
                f"| tissue accuracy (mean ± sd over repeats) | {_pct(o['accuracy_a_mean'], o['accuracy_a_sd'])} "
                f"| {_pct(o['accuracy_b_mean'], o['accuracy_b_sd'])} |",
                "",
                f"Accuracy difference {100 * (o['accuracy_b_mean'] - o['accuracy_a_mean']):+.2f} points: "
                f"paired Wilcoxon P = {_p(o['accuracy_p_wilcoxon'])}, paired t P = "
                f"{_p(o['accuracy_p_ttest'])}, corrected repeated-CV t P = {_p(o['accuracy_p_corrected'])}.",
                "",
            ]
        if "n_genes" in o:
            n_sig, n_imp = o["n_significant"], o["n_improved"]
            frac = f" ({100 * n_imp / n_sig:.0f} %)" if n_sig else ""
            lines += [
                f"Genes with a significant image association (R² > 0, corrected repeated-CV t, "
                f"BH q < {o['fdr']:g}, in either feature set): **{n_sig}** of {o['n_genes']:,} "
                f"({o['n_significant_a']} with {a}, {o['n_significant_b']} with {b}).",
                "",
                f"{b} predicts **{n_imp}** of them better{frac} (sign test P = "
                f"{_p(o['improved_p_binomial'])}; per gene, corrected t q < {o['fdr']:g}: "
                f"{o['n_significantly_improved']} better, {o['n_significantly_worse']} worse). "
                f"Median R² over these genes: {a} {o['median_r2_a_significant']:.3f}, "
                f"{b} {o['median_r2_b_significant']:.3f}.",
            ]
        return "\n".join(lines)


def _pct(m: float, s: float) -> str:
    return f"{100 * m:.2f} ± {100 * s:.2f} %"


def _p(p: float) -> str:
    return "n/a" if p is None or not np.isfinite(p) else f"{p:.2g}"


def _classifier(C: float, pcs: int | None, random_state: int):
    steps = [StandardScaler()]
    if pcs is not None:
        steps.append(PCA(n_components=pcs, svd_solver="full", random_state=random_state))
    steps.append(LogisticRegression(C=C, max_iter=2000))
    return make_pipeline(*steps)


def compare_features(
    F_a: np.ndarray,
    F_b: np.ndarray,
    labels: Sequence | np.ndarray | None,
    Y: np.ndarray | None,
    groups: Sequence | np.ndarray,
    *,
    n_splits: int = 5,
    n_repeats: int = 50,
    random_state: int = 0,
    names: tuple[str, str] = ("off_the_shelf", "fine_tuned"),
    genes: Sequence[str] | None = None,
    symbols: Sequence[str] | None = None,
    alphas: Sequence[float] | np.ndarray = DEFAULT_ALPHAS,
    inner_splits: int = 4,
    standardize: bool = True,
    strata: Sequence | np.ndarray | None = None,
    classifier_C: float = 1.0,
    classifier_pcs: int | None = None,
    fdr: float = 0.05,
    min_r2: float = 0.0,
) -> ComparisonResult:
    """Compare two feature sets of the same slides (rows aligned) on (a) and (b); see module doc.

    ``labels`` None skips (a); ``Y`` None skips (b). Repeat r uses donor folds seeded with
    ``child_seed(random_state, r)``, identical for both feature sets (a paired design).
    ``standardize`` z-scores features inside each training fold for the ridge (the two sets
    may have different scales); the classifier always standardises. ``strata`` (tissue) makes
    the expression task within-tissue (tissue fixed effects, within-tissue R²; see
    ``regression``), so genes do not count as image-associated merely for being tissue markers.

    Per-gene table columns: gene, symbol, r2_a_mean, r2_b_mean, r2_a_sd, r2_b_sd (pooled
    out-of-fold R² per repeat, over repeats), delta_mean (b − a), frac_repeats_b_better,
    p_wilcoxon, q_wilcoxon, p_ttest (paired over repeats), p_corrected, q_corrected (corrected
    t over fold-level differences), p_assoc_a, q_assoc_a, p_assoc_b, q_assoc_b (R² > 0),
    significant, improved.
    """
    F_a = np.asarray(F_a, dtype=np.float64)
    F_b = np.asarray(F_b, dtype=np.float64)
    groups = np.asarray(groups)
    n = len(groups)
    if F_a.shape[0] != n or F_b.shape[0] != n:
        raise ValueError(
            f"feature sets have {F_a.shape[0]} and {F_b.shape[0]} rows but there are {n} samples"
        )
    if labels is None and Y is None:
        raise ValueError("nothing to compare: labels and Y are both None")
    if n_repeats < 1:
        raise ValueError(f"n_repeats must be >= 1, got {n_repeats}")
    labels = None if labels is None else np.asarray(labels)
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} samples")

    fold_rows, acc_rows = [], []
    r2 = {0: [], 1: []}  # per repeat: pooled out-of-fold R² per gene
    fr2 = {0: [], 1: []}  # per repeat: folds × genes R² within each test fold
    ratios = []
    for r in range(n_repeats):
        seed = child_seed(random_state, r)
        folds = donor_folds(groups, n_splits, seed, strata)
        ratios += [np.mean(folds == f) / np.mean(folds != f) for f in range(n_splits)]
        if labels is not None:
            correct = {0: np.zeros(n, bool), 1: np.zeros(n, bool)}
            for f in range(n_splits):
                tr, te = np.flatnonzero(folds != f), np.flatnonzero(folds == f)
                for i, F in enumerate((F_a, F_b)):
                    clf = _classifier(classifier_C, classifier_pcs, seed)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # convergence chatter on tiny folds
                        clf.fit(F[tr], labels[tr])
                    correct[i][te] = clf.predict(F[te]) == labels[te]
                fold_rows.append(
                    {
                        "repeat": r,
                        "fold": f,
                        "n_test": len(te),
                        "accuracy_a": correct[0][te].mean(),
                        "accuracy_b": correct[1][te].mean(),
                    }
                )
            acc_rows.append(
                {"repeat": r, "accuracy_a": correct[0].mean(), "accuracy_b": correct[1].mean()}
            )
        if Y is not None:
            inner = inner_donor_folds(groups, folds, inner_splits, seed, strata)
            kw = {
                "alphas": alphas,
                "folds": folds,
                "inner_folds": inner,
                "standardize": standardize,
                "strata": strata,
            }
            for i, F in enumerate((F_a, F_b)):
                res = ridge_gene_r2(F, Y, groups, **kw)
                r2[i].append(res.r2)
                fr2[i].append(fold_r2(Y, res.oof, folds, strata))

    overall: dict = {"n_splits": n_splits, "n_repeats": n_repeats, "fdr": fdr, "names": list(names)}
    accuracy = pd.DataFrame(acc_rows, columns=["repeat", "accuracy_a", "accuracy_b"])
    fold_accuracy = pd.DataFrame(
        fold_rows, columns=["repeat", "fold", "n_test", "accuracy_a", "accuracy_b"]
    )
    ratio = float(np.mean(ratios))  # n_test / n_train, for the corrected t-tests
    if labels is not None:
        overall.update(_accuracy_stats(accuracy, fold_accuracy, ratio))
    gene_table = pd.DataFrame()
    A = B = None
    if Y is not None:
        A, B = np.vstack(r2[0]), np.vstack(r2[1])
        FA, FB = np.vstack(fr2[0]), np.vstack(fr2[1])
        gene_table, gene_stats = _gene_stats(A, B, FA, FB, ratio, genes, symbols, fdr, min_r2)
        overall.update(gene_stats)
    return ComparisonResult(tuple(names), accuracy, fold_accuracy, gene_table, overall, A, B)


def _accuracy_stats(acc: pd.DataFrame, folds: pd.DataFrame, ratio: float) -> dict:
    a, b = acc["accuracy_a"].to_numpy(), acc["accuracy_b"].to_numpy()
    d = b - a
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p_w = wilcoxon_signed_rank(b, a).pvalue[0] if len(d) > 1 else np.nan
        p_t = stats.ttest_rel(b, a).pvalue if len(d) > 1 else np.nan
    fd = (folds["accuracy_b"] - folds["accuracy_a"]).to_numpy()
    t_c, p_c = corrected_repeated_cv_ttest(fd, ratio)
    return {
        "accuracy_a_mean": float(a.mean()),
        "accuracy_b_mean": float(b.mean()),
        "accuracy_a_sd": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "accuracy_b_sd": float(b.std(ddof=1)) if len(b) > 1 else 0.0,
        "accuracy_p_wilcoxon": float(p_w),
        "accuracy_p_ttest": float(p_t),
        "accuracy_t_corrected": t_c,
        "accuracy_p_corrected": p_c,
    }


def _gene_stats(
    A: np.ndarray,
    B: np.ndarray,
    FA: np.ndarray,
    FB: np.ndarray,
    ratio: float,
    genes: Sequence[str] | None,
    symbols: Sequence[str] | None,
    fdr: float,
    min_r2: float,
) -> tuple[pd.DataFrame, dict]:
    """A, B: repeats × genes pooled R²; FA, FB: (repeats·folds) × genes fold-level R²."""
    R, g = A.shape
    D = B - A
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        if R > 1:
            p_w = wilcoxon_signed_rank(B, A).pvalue  # all genes at once, method per gene
            p_t = np.asarray(stats.ttest_rel(B, A, axis=0).pvalue, dtype=np.float64)
        else:
            p_w = p_t = np.full(g, np.nan)
    _, p_c = corrected_repeated_cv_ttest(FB - FA, ratio)
    _, p_a = corrected_repeated_cv_ttest(FA, ratio, alternative="greater")
    _, p_b = corrected_repeated_cv_ttest(FB, ratio, alternative="greater")
    q_a, q_b, q_c = bh_fdr(p_a), bh_fdr(p_b), bh_fdr(p_c)
    mean_a, mean_b = A.mean(0), B.mean(0)
    sig_a = (np.nan_to_num(q_a, nan=1.0) < fdr) & (mean_a > min_r2)
    sig_b = (np.nan_to_num(q_b, nan=1.0) < fdr) & (mean_b > min_r2)
    significant = sig_a | sig_b
    delta = D.mean(0)
    improved = significant & (delta > 0)
    table = pd.DataFrame(
        {
            "gene": list(genes) if genes is not None else [str(i) for i in range(g)],
            "symbol": list(symbols) if symbols is not None else [None] * g,
            "r2_a_mean": mean_a,
            "r2_b_mean": mean_b,
            "r2_a_sd": A.std(0, ddof=1) if R > 1 else np.zeros(g),
            "r2_b_sd": B.std(0, ddof=1) if R > 1 else np.zeros(g),
            "delta_mean": delta,
            "frac_repeats_b_better": (D > 0).mean(0),
            "p_wilcoxon": p_w,
            "q_wilcoxon": bh_fdr(p_w),
            "p_ttest": p_t,
            "p_corrected": p_c,
            "q_corrected": q_c,
            "p_assoc_a": p_a,
            "q_assoc_a": q_a,
            "p_assoc_b": p_b,
            "q_assoc_b": q_b,
            "significant": significant,
            "improved": improved,
        }
    )
    n_sig, n_imp = int(significant.sum()), int(improved.sum())
    sig_c = np.nan_to_num(q_c, nan=1.0) < fdr
    nan = float("nan")
    overall = {
        "n_genes": g,
        "n_significant": n_sig,
        "n_significant_a": int(sig_a.sum()),
        "n_significant_b": int(sig_b.sum()),
        "n_improved": n_imp,
        "frac_improved": n_imp / n_sig if n_sig else nan,
        "improved_p_binomial": float(stats.binomtest(n_imp, n_sig, 0.5).pvalue) if n_sig else nan,
        "n_significantly_improved": int((significant & sig_c & (delta > 0)).sum()),
        "n_significantly_worse": int((significant & sig_c & (delta < 0)).sum()),
        "median_r2_a_significant": float(np.median(mean_a[significant])) if n_sig else nan,
        "median_r2_b_significant": float(np.median(mean_b[significant])) if n_sig else nan,
    }
    return table, overall


@dataclass(frozen=True)
class ComparisonParams:
    """SPEC defaults of feature_comparison (its Config takes them from here)."""

    n_splits: int = 5  # donor folds per repeat (lowered for few donors)
    inner_splits: int = 4
    n_repeats: int = 50  # Li et al. 2022 used 50
    tissue_strata: bool = True  # within-tissue expression task
    classifier_pcs: int = 0  # 0 = none
    fdr: float = 0.05
    selected_model_id: str = ""
    off_the_shelf_model_id: str = ""
    random_state: int = 0
    # The feature sets compared, pairwise: empty = every off-the-shelf model embedded (the
    # ImageNet backbone, pathology encoders ...) and the selected fine-tuned checkpoint.
    arms: tuple[str, ...] = ()


def comparison_arms(models, params: ComparisonParams) -> list[str]:
    """The models to compare, in order: explicit ``arms``; else the off-the-shelf models (only
    ``off_the_shelf_model_id`` when set) followed by the selected fine-tuned one."""
    import polars as pl

    from gtex_assets.core.errors import InputError
    from gtex_assets.lib.analysis.selection import OFF_THE_SHELF, pick_models

    ids = models["model_id"].to_list()
    if params.arms:
        unknown = [a for a in params.arms if a not in ids]
        if unknown or len(set(params.arms)) < 2:
            raise InputError("feature_comparison arms", f"{list(params.arms)}: need >= 2 "
                             f"distinct embedded models (unknown: {unknown})", f"have {sorted(ids)}")  # fmt: skip
        return list(dict.fromkeys(params.arms))
    c = pick_models(models, params.selected_model_id, params.off_the_shelf_model_id)
    ots = sorted(models.filter(pl.col("kind") == OFF_THE_SHELF)["model_id"].to_list())
    first = [params.off_the_shelf_model_id] if params.off_the_shelf_model_id else ots
    arms = [m for m in first if m != c.selected] + [c.selected]
    if len(arms) < 2:
        raise InputError("slide_embeddings", "need an off-the-shelf and a fine-tuned model",
                         f"have {sorted(ids)}")  # fmt: skip
    return arms


def comparison_pairs(arms: list[str]) -> list[tuple[str, str]]:
    """Every pair (A, B) of arms, A before B: B is the later (e.g. fine-tuned) feature set."""
    return [(a, b) for i, a in enumerate(arms) for b in arms[i + 1 :]]


@dataclass(frozen=True)
class ComparisonRun:
    result: ComparisonResult
    off_the_shelf: str
    fine_tuned: str
    n_samples: int
    plan: object  # selection.FoldPlan
    tissues_left_out: list[str]
    missing_off_the_shelf: int  # slides without an off-the-shelf embedding, left out


def run_feature_comparisons(meta, vec, models, expr, params: ComparisonParams) -> list:
    """One :class:`ComparisonRun` per pair of :func:`comparison_arms`."""
    pairs = comparison_pairs(comparison_arms(models, params))
    return [run_feature_comparison(meta, vec, expr, params, a, b) for a, b in pairs]


def run_feature_comparison(
    meta, vec, expr, params: ComparisonParams, a: str, b: str
) -> ComparisonRun:
    """Feature set ``a`` vs ``b`` on the slides both embedded (and that have expression),
    tissues with < 3 donors left out of a within-tissue task."""
    from gtex_assets.lib.analysis import inputs as I
    from gtex_assets.lib.analysis.selection import fold_plan, tissues_to_keep

    Fb, Y, pm = I.paired(I.model_slides(meta, vec, b), expr)
    Fa, has = I.aligned(I.model_slides(meta, vec, a), pm["tissue_sample_id"])
    Fb, Y, pm = Fb[has], Y[has], pm[has].reset_index(drop=True)
    dropped: list[str] = []
    if params.tissue_strata:
        keep, dropped = tissues_to_keep(pm["subject_id"].to_numpy(), pm["tissue"].to_numpy())
        Fa, Fb, Y, pm = Fa[keep], Fb[keep], Y[keep], pm[keep].reset_index(drop=True)
    groups = pm["subject_id"].astype(str).to_numpy()
    tissue = pm["tissue"].astype(str).to_numpy()
    strata = tissue if params.tissue_strata else None
    plan = fold_plan(groups, params.n_splits, params.inner_splits, params.random_state, strata)
    res = compare_features(
        Fa, Fb, tissue, Y, groups, n_splits=plan.n_splits, inner_splits=plan.inner_splits,
        n_repeats=params.n_repeats, random_state=params.random_state,
        names=(a, b), genes=expr.gene_ids, symbols=expr.symbols,
        strata=strata, classifier_pcs=params.classifier_pcs or None, fdr=params.fdr,
    )  # fmt: skip
    return ComparisonRun(res, a, b, len(pm), plan, dropped, int((~has).sum()))


def comparison_tables(runs: list[ComparisonRun]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``feature_comparison_genes`` and ``feature_comparison_accuracy`` over every pair, each
    row naming its pair (``model_a`` vs ``model_b``)."""
    genes = pd.concat(
        [r.result.genes.assign(model_a=r.off_the_shelf, model_b=r.fine_tuned) for r in runs],
        ignore_index=True,
    )
    acc = pd.concat(
        [r.result.accuracy.assign(model_a=r.off_the_shelf, model_b=r.fine_tuned) for r in runs],
        ignore_index=True,
    )
    return genes, acc
