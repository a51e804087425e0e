"""SPEC §8: per-gene ridge R² from slide embeddings — every gene and every penalty in one solve.

Model, per gene g: ``y_g ≈ ȳ_g + (x − x̄) β_g`` with ``β_g = argmin ‖y_g − Xβ‖² + λ_g ‖β‖²``; the
intercept is not penalised (X and Y are centred within each training fold, exactly what
``sklearn.linear_model.Ridge(fit_intercept=True)`` does).

Why it is fast: for a centred training matrix ``X = U S Vᵀ`` the ridge solution of *every* gene
for *every* penalty is ``β(λ) = V diag(s / (s² + λ)) Uᵀ Y``. One decomposition per fold (an
eigendecomposition of the smaller Gram matrix, ``X Xᵀ`` or ``Xᵀ X``, so small singular values are
never divided by), ``B = Uᵀ Y`` once, and the validation predictions of all λ of the grid are
one matrix product ``[A·f(λ₁); …; A·f(λₘ)] B`` with ``A = X_val V diag(s)`` and
``f(λ) = 1 / (s² + λ)``. The nested CV over a λ grid for 17k genes is a handful of GEMMs
instead of genes × folds × λ separate fits. The inner-CV products (the bulk of the work) run in
float32 with an exact float64 re-check of near-tied genes (``precision="mixed"``), so the chosen
λ — and every reported number — is the float64 one.

Evaluation protocol (``ridge_gene_r2``):

- Outer K folds split by donor (no donor in both a training and a test set), then inside each
  outer training set inner folds, also by donor, choose λ per gene: the λ with the lowest mean
  over inner folds of the validation MSE (the rule of sklearn's ``GridSearchCV``; an exact tie
  goes to the first λ of the grid).
- The K outer models' predictions are pooled into one out-of-fold (OOF) prediction per sample
  and gene, and ``R² = 1 − Σᵢ (yᵢ − ŷᵢ)² / Σᵢ (yᵢ − ȳ)²`` with ȳ the mean over all samples, i.e.
  ``sklearn.metrics.r2_score`` on the pooled OOF predictions; Pearson r on the same pairs. A gene
  without image signal is predicted by its training-fold means, so its R² is slightly *below*
  0, not exactly 0. A constant gene has R² = NaN.

``strata`` (e.g. tissue) turns on tissue fixed effects: X and Y are centred within each stratum
of the training fold (Frisch–Waugh–Lovell: the same β as ridge with unpenalised per-tissue
intercepts), a held-out slide gets its stratum's training means back, and ``r2`` is the
*within-stratum* R² ``1 − Σ (y − ŷ)² / Σ (y − ȳ_stratum)²`` (``r2_total`` keeps the ordinary one).
Without it, every tissue-specific gene is "recoverable from the image" simply because the
tissue is; with it, the ranking is of what the image tells beyond the tissue.

``kernel="rbf"`` swaps the linear model for RBF kernel ridge (the non-linear option): with
``K = Q diag(w) Qᵀ`` on the training fold the predictions are ``K_val Q diag(1 / (w + λ)) Qᵀ Y`` —
the same shape of computation. Y is centred within the training fold (the kernel has no
intercept), which matches ``KernelRidge`` fitted on centred targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.linalg

DEFAULT_ALPHAS: np.ndarray = np.logspace(-2, 6, 17)

# Peak bytes for one block of stacked validation predictions (n_alphas × n_val × genes): genes
# are processed in blocks so 17k genes never materialise 17 prediction matrices at once.
_BLOCK_BYTES = 256 * 2**20
# precision="mixed": genes whose two best inner-CV MSEs differ by less than this × their
# variance are re-scored in float64 (see ridge_gene_r2).
_MIXED_TIE_TOL = 2e-5


# ----------------------------------------------------------------------------- folds


def donor_folds(
    groups: Sequence | np.ndarray,
    n_splits: int = 5,
    random_state: int = 0,
    strata: Sequence | np.ndarray | None = None,
) -> np.ndarray:
    """Fold id (0..n_splits-1) per sample; every donor's samples land in one fold.

    Donors are shuffled with ``random_state`` and then placed largest first into the currently
    smallest fold, so folds are balanced in samples and the split is deterministic. With
    ``strata`` (tissue per sample) a donor goes to the fold holding the fewest samples of its
    strata (then the smallest fold): each tissue's donors spread over the folds, so a tissue
    with at least two donors always has one on the training side.
    """
    groups = np.asarray(groups)
    if groups.ndim != 1 or len(groups) == 0:
        raise ValueError(f"groups must be a non-empty 1-D array, got shape {groups.shape}")
    if n_splits < 2:
        raise ValueError(f"n_splits must be >= 2, got {n_splits}")
    uniq, inv, counts = np.unique(groups, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    if len(uniq) < n_splits:
        raise ValueError(
            f"{len(uniq)} donor(s) but n_splits={n_splits}: each fold needs donors of its own"
        )
    rng = np.random.default_rng(random_state)
    order = rng.permutation(len(uniq))
    order = order[np.argsort(-counts[order], kind="stable")]
    sizes = np.zeros(n_splits, dtype=np.int64)
    fold_of_group = np.empty(len(uniq), dtype=np.int64)
    if strata is None:
        for gi in order:
            f = int(np.argmin(sizes))
            fold_of_group[gi] = f
            sizes[f] += counts[gi]
        return fold_of_group[inv]
    st = np.asarray(strata)
    if st.shape != groups.shape:
        raise ValueError(f"strata must have one label per sample ({len(groups)}), got {st.shape}")
    s_ids, s_inv = np.unique(st, return_inverse=True)
    per = np.zeros((len(uniq), len(s_ids)), dtype=np.int64)  # donor x stratum sample counts
    np.add.at(per, (inv, s_inv.reshape(-1)), 1)
    load = np.zeros((n_splits, len(s_ids)), dtype=np.int64)  # fold x stratum
    # rarest strata first: their few donors get distinct folds before the folds fill up
    rarity = (per > 0).sum(axis=0)
    order = order[np.argsort([rarity[per[g] > 0].min() for g in order], kind="stable")]
    for gi in order:
        mine = per[gi] > 0
        clash = (load[:, mine] > 0).sum(axis=1) * 1_000_000 + load[:, mine].sum(axis=1)
        f = int(np.lexsort((sizes, clash))[0])
        fold_of_group[gi] = f
        sizes[f] += counts[gi]
        load[f] += per[gi]
    return fold_of_group[inv]


def child_seed(random_state: int, *keys: int) -> int:
    """A seed derived from ``random_state`` and ``keys`` (inner folds, CV repeats)."""
    return int(np.random.SeedSequence([int(random_state), *map(int, keys)]).generate_state(1)[0])


def inner_donor_folds(
    groups: Sequence | np.ndarray,
    outer: np.ndarray,
    inner_splits: int = 4,
    random_state: int = 0,
    strata: Sequence | np.ndarray | None = None,
) -> list[np.ndarray]:
    """For each outer fold f: inner fold ids of the samples ``np.flatnonzero(outer != f)``
    (stratified by ``strata`` as in :func:`donor_folds`)."""
    groups = np.asarray(groups)
    st = None if strata is None else np.asarray(strata)
    out = []
    for f in range(int(outer.max()) + 1):
        tr = np.flatnonzero(outer != f)
        try:
            out.append(
                donor_folds(
                    groups[tr], inner_splits, child_seed(random_state, f),
                    None if st is None else st[tr],
                )
            )  # fmt: skip
        except ValueError as e:
            raise ValueError(f"outer fold {f}: training set too small for inner CV: {e}") from e
    return out


def strata_too_small(
    groups: Sequence | np.ndarray, strata: Sequence | np.ndarray, min_donors: int = 3
) -> list[str]:
    """Strata with fewer than ``min_donors`` donors: with stratified donor folds, 3 donors are
    what guarantees a training donor of the stratum in every outer and inner split."""
    g, s = np.asarray(groups), np.asarray(strata)
    return sorted(str(k) for k in np.unique(s) if len(np.unique(g[s == k])) < min_donors)


# ----------------------------------------------------------------------------- spectral solver


@dataclass(frozen=True)
class _Spectral:
    """One fold's decomposition: predictions(λ) = (A · 1/(w + λ)) @ (basis @ Y_c) + ȳ_train.

    Linear ridge with n ≤ p (dual): ``Xc Xcᵀ = U diag(w) Uᵀ``, ``basis = Uᵀ``, ``A = Ec Xcᵀ U``.
    Linear ridge with n > p (primal): ``Xcᵀ Xc = V diag(w) Vᵀ``, ``basis = Vᵀ Xcᵀ``, ``A = Ec V``.
    (Both equal ``Ec V diag(s/(s²+λ)) Uᵀ`` of the SVD, without dividing by small s.)
    RBF: ``K = Q diag(w) Qᵀ``, ``basis = Qᵀ``, ``A = K_eval,train Q``.
    """

    basis: np.ndarray  # k × n_train
    A: np.ndarray  # n_eval × k
    w: np.ndarray  # k eigenvalues (s² for linear)

    def filt(self, alphas: np.ndarray) -> np.ndarray:
        """n_alphas × k spectral filter factors 1 / (w + λ)."""
        return 1.0 / (self.w[None, :] + np.asarray(alphas, dtype=np.float64)[:, None])


@dataclass(frozen=True)
class _Centering:
    """Training means, overall and per stratum; ``offsets`` gives any rows' means to subtract."""

    mean: np.ndarray  # columns
    strata: np.ndarray | None = None  # sorted stratum labels seen in training
    means: np.ndarray | None = None  # strata × columns

    @classmethod
    def fit(cls, M: np.ndarray, strata: np.ndarray | None) -> _Centering:
        mean = M.mean(0)
        if strata is None:
            return cls(mean)
        uniq, inv = np.unique(strata, return_inverse=True)
        counts = np.bincount(inv, minlength=len(uniq))
        onehot = np.zeros((len(uniq), len(M)))
        onehot[inv, np.arange(len(M))] = 1.0 / counts[inv]
        return cls(mean, uniq, onehot @ M)

    def offsets(self, strata: np.ndarray | None, n: int) -> np.ndarray:
        """n × columns means for rows with labels ``strata`` (unseen stratum → overall mean)."""
        if self.strata is None or n == 0:
            return np.broadcast_to(self.mean, (n, len(self.mean)))
        if strata is None:
            raise ValueError("the model was fitted with strata: pass the strata of the new rows")
        strata = np.asarray(strata)
        pos = np.clip(np.searchsorted(self.strata, strata), 0, len(self.strata) - 1)
        seen = self.strata[pos] == strata
        return np.where(seen[:, None], self.means[pos], self.mean[None, :])


def _center_fit(
    Mtr: np.ndarray, s_tr: np.ndarray | None, s_ev: np.ndarray | None, n_ev: int
) -> tuple[np.ndarray, np.ndarray]:
    """(training rows centred within strata, the eval rows' offsets from training means)."""
    c = _Centering.fit(Mtr, s_tr)
    return Mtr - c.offsets(s_tr, len(Mtr)), c.offsets(s_ev, n_ev)


def _scale_of(Xc: np.ndarray, standardize: bool) -> np.ndarray:
    if not standardize:
        return np.ones(Xc.shape[1])
    scale = Xc.std(axis=0)
    scale[scale == 0] = 1.0  # constant columns: like sklearn's StandardScaler
    return scale


def _rbf(a: np.ndarray, b: np.ndarray, gamma: float) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    np.maximum(d, 0.0, out=d)
    return np.exp(-gamma * d)


def _eigh_nonzero(G: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of a PSD Gram matrix, numerically-zero ones dropped.

    Centring leaves a zero eigenvalue whose vector is ∝ 1 (orthogonal to centred Y), and for
    n > p or p > n the Gram matrix has more null directions; they contribute nothing to the
    ridge fit, so dropping them is exact and saves work in every later product.
    """
    w, Q = scipy.linalg.eigh(G, driver="evd")
    if len(w) == 0:
        return w, Q
    keep = w > max(w[-1], 0.0) * G.shape[0] * np.finfo(np.float64).eps
    return w[keep], Q[:, keep]


def _spectral(
    Xtr: np.ndarray,
    Xev: np.ndarray,
    s_tr: np.ndarray | None = None,
    s_ev: np.ndarray | None = None,
    *,
    standardize: bool,
    kernel: str,
    gamma: float | None,
) -> _Spectral:
    Xc, off = _center_fit(Xtr, s_tr, s_ev, len(Xev))
    scale = _scale_of(Xc, standardize)
    Xc = Xc / scale
    Ec = (Xev - off) / scale
    if kernel == "linear":
        n, p = Xc.shape
        if n <= p:
            w, U = _eigh_nonzero(Xc @ Xc.T)
            return _Spectral(basis=U.T, A=(Ec @ Xc.T) @ U, w=w)
        w, V = _eigh_nonzero(Xc.T @ Xc)
        return _Spectral(basis=(Xc @ V).T, A=Ec @ V, w=w)
    if kernel == "rbf":
        g = _rbf_gamma(Xc, gamma)
        w, Q = scipy.linalg.eigh(_rbf(Xc, Xc, g))
        w = np.maximum(w, 0.0)
        return _Spectral(basis=Q.T, A=_rbf(Ec, Xc, g) @ Q, w=w)
    raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")


def _rbf_gamma(Xc: np.ndarray, gamma: float | None) -> float:
    """``gamma=None``: 1 / (n_features · Var(X_train)) — sklearn's ``gamma='scale'`` heuristic."""
    if gamma is not None:
        return float(gamma)
    var = float(Xc.var())
    return 1.0 / (Xc.shape[1] * var) if var > 0 else 1.0


# ----------------------------------------------------------------------------- metrics


def r2_pearson(
    Y: np.ndarray, P: np.ndarray, strata: Sequence | np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-column R² (``r2_score`` definition) and Pearson r of predictions ``P`` vs ``Y``.

    With ``strata``: within-stratum versions — R² against the stratum means of Y (pooled over
    all rows), r between Y and P each centred by its own stratum means. NaN where Y (R², r) or
    P (r) is constant (within strata).
    """
    Y = np.asarray(Y, dtype=np.float64)
    P = np.asarray(P, dtype=np.float64)
    s = None if strata is None else np.asarray(strata)
    yc = Y - _Centering.fit(Y, s).offsets(s, len(Y))
    pc = P - _Centering.fit(P, s).offsets(s, len(P))
    sst = np.einsum("ij,ij->j", yc, yc)
    res = Y - P
    sse = np.einsum("ij,ij->j", res, res)
    spp = np.einsum("ij,ij->j", pc, pc)
    spy = np.einsum("ij,ij->j", pc, yc)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(sst > 0, 1.0 - sse / sst, np.nan)
        r = np.where((sst > 0) & (spp > 0), spy / np.sqrt(sst * spp), np.nan)
    return r2, r


def fold_r2(
    Y: np.ndarray, P: np.ndarray, folds: np.ndarray, strata: Sequence | np.ndarray | None = None
) -> np.ndarray:
    """Out-of-sample R² of each test fold (folds × genes), for the repeated-CV statistics.

    ``R²_f = 1 − Σ_f (y − ŷ)² / Σ_f (y − ȳ_train)²``: skill against the honest null model of
    that fold, its training mean (the training stratum mean with ``strata``). Unlike
    ``r2_score`` within the fold, a null model scores 0 in expectation and small folds with
    little spread do not produce wild negative values. NaN where the null error is 0.
    """
    Y = np.asarray(Y, dtype=np.float64)
    P = np.asarray(P, dtype=np.float64)
    folds = np.asarray(folds)
    st = None if strata is None else np.asarray(strata)
    out = []
    for f in np.unique(folds):
        te, tr = folds == f, folds != f
        sub = (None, None) if st is None else (st[tr], st[te])
        _, off = _center_fit(Y[tr], sub[0], sub[1], int(te.sum()))
        sse = ((Y[te] - P[te]) ** 2).sum(0)
        sse0 = ((Y[te] - off) ** 2).sum(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            out.append(np.where(sse0 > 0, 1.0 - sse / sse0, np.nan))
    return np.vstack(out)


def per_group_r2(
    Y: np.ndarray,
    P: np.ndarray,
    labels: Sequence | np.ndarray,
    genes: Sequence[str] | None = None,
    min_samples: int = 3,
) -> pd.DataFrame:
    """R² and Pearson r of pooled predictions within each label (e.g. per tissue), long format.

    Within a tissue the tissue mean no longer counts as signal, so this measures how much of
    the within-tissue variation the image explains. Labels with fewer than ``min_samples``
    samples are skipped. Columns: label, gene, r2, pearson_r, n_samples.
    """
    labels = np.asarray(labels)
    genes = np.asarray(genes) if genes is not None else np.arange(Y.shape[1])
    parts = []
    for lab in np.unique(labels):
        m = labels == lab
        if m.sum() < min_samples:
            continue
        r2, r = r2_pearson(Y[m], P[m])
        parts.append(
            pd.DataFrame(
                {"label": lab, "gene": genes, "r2": r2, "pearson_r": r, "n_samples": int(m.sum())}
            )
        )
    cols = ["label", "gene", "r2", "pearson_r", "n_samples"]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=cols)


# ----------------------------------------------------------------------------- main entry


@dataclass(frozen=True)
class GeneR2Result:
    """Output of :func:`ridge_gene_r2` (arrays indexed by gene in the input column order)."""

    r2: np.ndarray  # pooled out-of-fold R² (within strata when fitted with strata)
    pearson_r: np.ndarray
    alpha: np.ndarray  # per gene: the (lower) median over outer folds of the chosen λ
    alpha_by_fold: np.ndarray  # n_splits × genes
    folds: np.ndarray  # outer fold id per sample
    alphas: np.ndarray  # the λ grid
    oof: np.ndarray | None = field(default=None, repr=False)  # samples × genes
    r2_total: np.ndarray | None = None  # ordinary pooled R² (== r2 without strata)

    def table(
        self, genes: Sequence[str] | None = None, symbols: Sequence[str] | None = None
    ) -> pd.DataFrame:
        """gene, symbol, r2, pearson_r, alpha, rank (1 = best R²; NaN genes last)."""
        n = len(self.r2)
        df = pd.DataFrame(
            {
                "gene": list(genes) if genes is not None else [str(i) for i in range(n)],
                "symbol": list(symbols) if symbols is not None else [None] * n,
                "r2": self.r2,
                "pearson_r": self.pearson_r,
                "alpha": self.alpha,
            }
        )
        df["rank"] = df["r2"].rank(ascending=False, method="first", na_option="bottom").astype(int)
        return df.sort_values("rank", kind="mergesort").reset_index(drop=True)


def _check_xy(X: np.ndarray, Y: np.ndarray, groups: np.ndarray | None) -> tuple:
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim == 1:
        Y = Y[:, None]
    if X.ndim != 2 or Y.ndim != 2:
        raise ValueError(f"X and Y must be 2-D, got shapes {X.shape} and {Y.shape}")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} samples (rows) but Y has {Y.shape[0]}")
    if groups is not None and len(groups) != X.shape[0]:
        raise ValueError(f"groups has {len(groups)} entries but X has {X.shape[0]} samples")
    for name, a in (("X", X), ("Y", Y)):
        bad = ~np.isfinite(a)
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise ValueError(
                f"{name} has {int(bad.sum())} non-finite value(s), first at [{i}, {j}]"
            )
    return X, Y


def _block_size(n_alphas: int, max_eval: int, n_genes: int, gene_block: int | None) -> int:
    if gene_block is not None:
        return max(1, int(gene_block))
    return int(max(64, min(n_genes, _BLOCK_BYTES // (8 * n_alphas * max(1, max_eval)))))


@dataclass
class _InnerFold:
    """An inner fold's training/validation rows and the stacked all-λ prediction operator."""

    itr: np.ndarray
    iva: np.ndarray
    s_tr: np.ndarray | None
    s_va: np.ndarray | None
    basis: np.ndarray
    AF: np.ndarray  # (n_alphas · n_val) × k: every λ's predictions in one GEMM
    basis32: np.ndarray | None = None
    AF32: np.ndarray | None = None

    def sse_mean(self, Yb: np.ndarray, n_alphas: int, single: bool) -> np.ndarray:
        """n_alphas × genes validation MSE of the targets ``Yb`` (all samples' rows)."""
        yc, off = _center_fit(Yb[self.itr], self.s_tr, self.s_va, len(self.iva))
        yv = Yb[self.iva] - off
        if single:
            P = self.AF32 @ (self.basis32 @ yc.astype(np.float32))
            yv = yv.astype(np.float32)
        else:
            P = self.AF @ (self.basis @ yc)
        P = P.reshape(n_alphas, len(self.iva), -1)
        np.subtract(P, yv, out=P)
        return np.einsum("avg,avg->ag", P, P, dtype=np.float64) / len(self.iva)


def _check_strata_seen(
    st: np.ndarray,
    groups: np.ndarray,
    itr: np.ndarray,
    iev: np.ndarray,
    outer: int,
    inner: int | None,
) -> None:
    """Every stratum of the evaluated rows must occur among the training rows.

    With tissue fixed effects a stratum absent from the training rows has no intercept to
    predict from (falling back to the overall mean would score the tissue difference as an
    error of the image model), so the split cannot be evaluated: say where and what to do.
    """
    missing = np.setdiff1d(np.unique(st[iev]), np.unique(st[itr]))
    if len(missing) == 0:
        return
    s = missing[0]
    donors = np.unique(groups[st == s])
    where = (
        f"outer fold {outer}, inner fold {inner}: stratum {str(s)!r} is in the inner validation "
        "donors but not in the inner training donors"
        if inner is not None
        else f"outer fold {outer}: stratum {str(s)!r} is in the held-out (test) donors but not in "
        "the training donors"
    )
    more = (
        f" (and {len(missing) - 1} more: {[str(m) for m in missing[1:4]]})"
        if len(missing) > 1
        else ""
    )
    raise ValueError(
        f"ridge_gene_r2 with strata, {where}{more}; it has {int((st == s).sum())} sample(s) from "
        f"{len(donors)} donor(s) in all, so it gets no fixed effect (tissue mean) to predict "
        "from. Use fewer folds (n_splits / inner_splits), drop strata with too few donors, or "
        "fit without strata (gene_r2 / feature_comparison: tissue_strata=False)."
    )


def ridge_gene_r2(
    X: np.ndarray,
    Y: np.ndarray,
    groups: Sequence | np.ndarray,
    *,
    alphas: Sequence[float] | np.ndarray = DEFAULT_ALPHAS,
    n_splits: int = 5,
    inner_splits: int = 4,
    random_state: int = 0,
    folds: np.ndarray | None = None,
    inner_folds: Sequence[np.ndarray] | None = None,
    standardize: bool = False,
    strata: Sequence | np.ndarray | None = None,
    kernel: str = "linear",
    gamma: float | None = None,
    precision: str = "mixed",
    gene_block: int | None = None,
    return_oof: bool = True,
) -> GeneR2Result:
    """Nested-CV ridge from features ``X`` (samples × features) to every column of ``Y``.

    Parameters
    ----------
    X, Y : samples × features (slide embeddings or their PCs), samples × genes (logTPM).
    groups : donor (subject) id per sample; outer and inner folds never split a donor.
    alphas : the λ grid; each gene gets its own λ per outer fold by inner CV.
    n_splits, inner_splits : outer / inner fold counts.
    random_state : seeds the donor shuffles (outer folds: ``random_state``; inner folds of outer
        fold f: ``child_seed(random_state, f)``).
    folds, inner_folds : precomputed outer fold ids per sample (e.g. shared with another model
        or CV repeat) and, optionally, inner fold ids per outer fold as from
        :func:`inner_donor_folds`; override ``n_splits`` / ``inner_splits``.
    standardize : z-score features with the training fold's mean/std (``StandardScaler``).
    strata : label per sample (tissue) for tissue fixed effects and within-tissue R² (see the
        module docstring); None: one global intercept, ordinary R². Every stratum of a
        validation / test set must occur in its training set (else ``ValueError`` naming the
        outer and inner fold and the stratum); a training set whose strata are all single
        slides carries no within-stratum signal and fits β = 0 (predicts the stratum means).
    kernel : ``"linear"`` (ridge) or ``"rbf"`` (kernel ridge; ``gamma`` None = 1/(p·Var X)).
    precision : ``"double"``: everything in float64. ``"mixed"`` (default; ~1.8× faster in the
        per-gene part, ~1.3-1.6× overall at 1,800 × 1,280): the inner-CV error curves (the
        dominant cost) in float32, then every gene whose best and
        second-best λ are closer than ``2e-5 ×`` its variance is re-scored in
        float64, so the chosen λ is the float64 choice; outer fits and predictions are float64.
    gene_block : genes per block (None: sized to bound memory at ~256 MiB).
    return_oof : keep the samples × genes out-of-fold predictions.

    Returns a :class:`GeneR2Result`; see the module docstring for the R² definition.
    """
    if precision not in ("mixed", "double"):
        raise ValueError(f"precision must be 'mixed' or 'double', got {precision!r}")
    groups_arr = np.asarray(groups)
    X, Y = _check_xy(X, Y, groups_arr)
    alphas = np.asarray(alphas, dtype=np.float64)
    if alphas.ndim != 1 or len(alphas) == 0 or (alphas <= 0).any():
        raise ValueError(f"alphas must be a non-empty 1-D array of positive values, got {alphas}")
    st_arr = None if strata is None else np.asarray(strata)
    outer = (
        donor_folds(groups_arr, n_splits, random_state, st_arr)
        if folds is None
        else np.asarray(folds)
    )
    if outer.shape != (X.shape[0],):
        raise ValueError(f"folds must have one id per sample ({X.shape[0]}), got {outer.shape}")
    k_outer = int(outer.max()) + 1
    if inner_folds is None:
        inner_folds = inner_donor_folds(groups_arr, outer, inner_splits, random_state, st_arr)
    n, g = Y.shape
    st = None if strata is None else np.asarray(strata)
    if st is not None and st.shape != (n,):
        raise ValueError(f"strata must have one label per sample ({n}), got shape {st.shape}")

    def sub(idx: np.ndarray) -> np.ndarray | None:
        return None if st is None else st[idx]

    na = len(alphas)
    mixed = precision == "mixed"
    oof = np.empty((n, g))
    best_idx = np.empty((k_outer, g), dtype=np.int64)
    spec_kw = {"standardize": standardize, "kernel": kernel, "gamma": gamma}

    for f in range(k_outer):
        tr = np.flatnonzero(outer != f)
        te = np.flatnonzero(outer == f)
        if len(te) == 0:
            raise ValueError(f"outer fold {f} has no samples (fold ids must be 0..{k_outer - 1})")
        ids = np.asarray(inner_folds[f])
        if ids.shape != tr.shape:
            raise ValueError(
                f"inner_folds[{f}] must have one id per training sample of outer fold {f} "
                f"({len(tr)}), got shape {ids.shape}"
            )
        if st is not None:
            _check_strata_seen(st, groups_arr, tr, te, f, None)
        parts = []
        for v in range(int(ids.max()) + 1):
            itr, iva = tr[ids != v], tr[ids == v]
            if st is not None:
                _check_strata_seen(st, groups_arr, itr, iva, f, v)
            sp = _spectral(X[itr], X[iva], sub(itr), sub(iva), **spec_kw)
            # explicit shape: with no informative direction (e.g. every training stratum a
            # single slide, so X centred within strata is 0) w is empty and the fit is β = 0
            AF = (sp.filt(alphas)[:, None, :] * sp.A[None, :, :]).reshape(na * len(iva), len(sp.w))
            part = _InnerFold(itr, iva, sub(itr), sub(iva), sp.basis, AF)
            if mixed:
                part.basis32 = sp.basis.astype(np.float32)
                part.AF32 = AF.astype(np.float32)
            parts.append(part)
        osp = _spectral(X[tr], X[te], sub(tr), sub(te), **spec_kw)
        ofilt = osp.filt(alphas)
        bs = _block_size(na, max(len(p.iva) for p in parts), g, gene_block)
        for j0 in range(0, g, bs):
            cols = slice(j0, min(g, j0 + bs))
            Yb = Y[:, cols]
            mse = sum(p.sse_mean(Yb, na, mixed) for p in parts) / len(parts)
            if mixed and na > 1:
                # Re-score near ties in float64. Near the minimum the float32 error of an MSE
                # is ~1e-7 of the gene's variance (measured ≤ 7e-8 at 1,800 × 1,280; the
                # bound eps32·√k is 2e-6), so outside a 2e-5 margin the float32 argmin is the
                # float64 one. Typically 1-5 % of genes (flat curves at large λ) are re-scored.
                ref = _center_fit(Yb[tr], sub(tr), None, 0)[0].var(0)
                two = np.partition(mse, 1, axis=0)[:2]
                amb = np.flatnonzero(two[1] - two[0] <= _MIXED_TIE_TOL * ref)
                if len(amb):
                    Ya = Yb[:, amb]
                    mse[:, amb] = sum(p.sse_mean(Ya, na, False) for p in parts) / len(parts)
            # mean over inner folds; argmin → first λ on exact ties, like GridSearchCV
            best = np.argmin(mse, axis=0)
            best_idx[f, cols] = best
            yc, off = _center_fit(Yb[tr], sub(tr), sub(te), len(te))
            B = osp.basis @ yc
            for a in np.unique(best):
                m = np.flatnonzero(best == a)
                oof[np.ix_(te, j0 + m)] = (osp.A * ofilt[a]) @ B[:, m] + off[:, m]

    r2, r = r2_pearson(Y, oof, st)
    r2_total = r2 if st is None else r2_pearson(Y, oof)[0]
    alpha_by_fold = alphas[best_idx]
    alpha = np.sort(alpha_by_fold, axis=0)[(k_outer - 1) // 2]
    return GeneR2Result(
        r2=r2,
        pearson_r=r,
        alpha=alpha,
        alpha_by_fold=alpha_by_fold,
        folds=outer,
        alphas=alphas,
        oof=oof if return_oof else None,
        r2_total=r2_total,
    )


def baseline_oof(
    Y: np.ndarray,
    groups: Sequence | np.ndarray,
    folds: np.ndarray,
    strata: Sequence | np.ndarray | None = None,
) -> np.ndarray:
    """Out-of-fold predictions of the no-image predictor: each held-out sample gets its
    training fold's tissue mean (``strata``) or overall mean (without)."""
    Y = np.asarray(Y, dtype=np.float64)
    st = None if strata is None else np.asarray(strata)
    oof = np.empty_like(Y)
    for f in np.unique(folds):
        tr, te = np.flatnonzero(folds != f), np.flatnonzero(folds == f)
        if st is not None:
            _check_strata_seen(st, np.asarray(groups), tr, te, int(f), None)
        s_tr, s_te = (None, None) if st is None else (st[tr], st[te])
        oof[te] = _center_fit(Y[tr], s_tr, s_te, len(te))[1]
    return oof


def baseline_r2(
    Y: np.ndarray,
    groups: Sequence | np.ndarray,
    folds: np.ndarray,
    strata: Sequence | np.ndarray | None = None,
) -> np.ndarray:
    """Per-gene held-out R² of the no-image predictor (the training folds' tissue means, or the
    overall mean without strata) under the same folds: the score of a gene with no image signal.
    Below 0 because the means are estimated from the other donors."""
    oof = baseline_oof(Y, groups, folds, strata)
    return r2_pearson(Y, oof, None if strata is None else np.asarray(strata))[0]


# ----------------------------------------------------------------------------- final model


@dataclass(frozen=True)
class RidgeModel:
    """Multi-output (kernel) ridge fitted on all samples, one λ per gene; ``predict`` new slides."""

    x_center: _Centering
    y_center: _Centering
    x_scale: np.ndarray
    coef: np.ndarray | None  # features × genes (linear)
    dual: np.ndarray | None = None  # train × genes (rbf)
    x_train: np.ndarray | None = field(default=None, repr=False)  # centred, scaled (rbf)
    gamma: float | None = None

    def predict(self, X: np.ndarray, strata: Sequence | np.ndarray | None = None) -> np.ndarray:
        """Predicted logTPM (rows × genes); ``strata`` required if the fit used strata."""
        X = np.asarray(X, dtype=np.float64)
        s = None if strata is None else np.asarray(strata)
        Xc = (X - self.x_center.offsets(s, len(X))) / self.x_scale
        off = self.y_center.offsets(s, len(X))
        if self.coef is not None:
            return Xc @ self.coef + off
        return _rbf(Xc, self.x_train, self.gamma) @ self.dual + off


def fit_ridge(
    X: np.ndarray,
    Y: np.ndarray,
    alpha: float | Sequence[float] | np.ndarray,
    *,
    standardize: bool = False,
    strata: Sequence | np.ndarray | None = None,
    kernel: str = "linear",
    gamma: float | None = None,
) -> RidgeModel:
    """Fit all genes on all samples with per-gene ``alpha`` (e.g. ``GeneR2Result.alpha``).

    One eigendecomposition for every gene; the model predicts new slides' transcriptomes.
    """
    X, Y = _check_xy(X, Y, None)
    alpha = np.broadcast_to(np.asarray(alpha, dtype=np.float64), (Y.shape[1],))
    s = None if strata is None else np.asarray(strata)
    xc, yc = _Centering.fit(X, s), _Centering.fit(Y, s)
    Xc = X - xc.offsets(s, len(X))
    scale = _scale_of(Xc, standardize)
    Xc = Xc / scale
    sp = _spectral(
        X,
        X[:0],
        s,
        s[:0] if s is not None else None,
        standardize=standardize,
        kernel=kernel,
        gamma=gamma,
    )
    B = sp.basis @ (Y - yc.offsets(s, len(Y)))
    uniq, inv = np.unique(alpha, return_inverse=True)
    filt = sp.filt(uniq)
    # predictions = Ec W diag(filt) basis Y_c: coef = W diag(filt) (basis Y_c) for linear,
    # dual = Q diag(filt) (Qᵀ Y_c) for rbf
    W = _linear_map(Xc, sp) if kernel == "linear" else sp.basis.T
    out = np.empty((W.shape[0], Y.shape[1]))
    for i in range(len(uniq)):
        m = np.flatnonzero(inv == i)
        out[:, m] = (W * filt[i]) @ B[:, m]
    if kernel == "linear":
        return RidgeModel(xc, yc, scale, out)
    return RidgeModel(xc, yc, scale, None, out, Xc, _rbf_gamma(Xc, gamma))


def _linear_map(Xc: np.ndarray, sp: _Spectral) -> np.ndarray:
    """features × k matrix W with ``sp.A == Ec @ W`` for the linear kernel."""
    n, p = Xc.shape
    if n <= p:
        return Xc.T @ sp.basis.T  # A = Ec Xcᵀ U
    # primal: basis = (Xc V)ᵀ → V = Xcᵀ basisᵀ / w (w = s² > 0 after dropping null directions)
    return (Xc.T @ sp.basis.T) / sp.w


# ----------------------------------------------------------------------------- reference


def sklearn_per_gene_reference(
    X: np.ndarray,
    Y: np.ndarray,
    folds: np.ndarray,
    inner_folds: Sequence[np.ndarray],
    *,
    alphas: Sequence[float] | np.ndarray = DEFAULT_ALPHAS,
    standardize: bool = False,
    strata: Sequence | np.ndarray | None = None,
    kernel: str = "linear",
    gamma: float | None = None,
) -> GeneR2Result:
    """The slow baseline: one sklearn fit per gene × outer fold × inner fold × λ, same folds.

    Used to validate :func:`ridge_gene_r2` and as the benchmark's baseline; selection rule, R²
    and Pearson definitions are identical. ``kernel="rbf"`` fits ``KernelRidge`` on targets
    centred with the training mean. With ``strata``, X and y are centred within strata (training
    means) before the sklearn fit and the eval rows get the training stratum means back.
    """
    from sklearn.kernel_ridge import KernelRidge
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, Y = _check_xy(X, Y, None)
    alphas = np.asarray(alphas, dtype=np.float64)

    st = None if strata is None else np.asarray(strata)

    def fit_predict(ia, ib, y, lam):
        Xa, Xb, ya = X[ia], X[ib], y[ia]
        off = 0.0
        if st is not None:
            Xa, xoff = _center_fit(Xa, st[ia], st[ib], len(ib))
            Xb = Xb - xoff
            ya, yoff = _center_fit(ya[:, None], st[ia], st[ib], len(ib))
            ya, off = ya[:, 0], yoff[:, 0]
        return off + _fit_predict_1(Xa, ya, Xb, lam)

    def _fit_predict_1(Xa, ya, Xb, lam):
        if kernel == "linear":
            est = Ridge(alpha=lam)
            if standardize:
                est = make_pipeline(StandardScaler(), est)
            return est.fit(Xa, ya).predict(Xb)
        if standardize:
            sc = StandardScaler().fit(Xa)
            Xa, Xb = sc.transform(Xa), sc.transform(Xb)
        mean = Xa.mean(0)
        gam = _rbf_gamma(Xa - mean, gamma)
        kr = KernelRidge(alpha=lam, kernel="rbf", gamma=gam).fit(Xa, ya - ya.mean())
        return kr.predict(Xb) + ya.mean()

    k_outer = int(folds.max()) + 1
    oof = np.empty_like(Y)
    best_idx = np.empty((k_outer, Y.shape[1]), dtype=np.int64)
    for j in range(Y.shape[1]):
        y = Y[:, j]
        for f in range(k_outer):
            tr, te = np.flatnonzero(folds != f), np.flatnonzero(folds == f)
            ids = np.asarray(inner_folds[f])
            n_inner = int(ids.max()) + 1
            mse = np.zeros(len(alphas))
            for v in range(n_inner):
                itr, iva = tr[ids != v], tr[ids == v]
                for a, lam in enumerate(alphas):
                    p = fit_predict(itr, iva, y, lam)
                    mse[a] += np.mean((y[iva] - p) ** 2)
            best_idx[f, j] = int(np.argmin(mse / n_inner))
            oof[te, j] = fit_predict(tr, te, y, alphas[best_idx[f, j]])
    r2, r = r2_pearson(Y, oof, st)
    alpha_by_fold = alphas[best_idx]
    return GeneR2Result(
        r2=r2,
        pearson_r=r,
        alpha=np.sort(alpha_by_fold, axis=0)[(k_outer - 1) // 2],
        alpha_by_fold=alpha_by_fold,
        folds=np.asarray(folds),
        alphas=alphas,
        oof=oof,
        r2_total=r2_pearson(Y, oof)[0],
    )


def recall_at_k(ranked_genes: Sequence[str], planted: Sequence[str], k: int | None = None) -> float:
    """Fraction of ``planted`` genes among the first ``k`` of ``ranked_genes`` (k = len(planted))."""
    planted = set(planted)
    if not planted:
        raise ValueError("planted gene set is empty")
    k = len(planted) if k is None else k
    return len(planted.intersection(list(ranked_genes)[:k])) / len(planted)
