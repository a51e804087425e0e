"""Paired tests for many genes at once: the Wilcoxon signed-rank test, vectorised over columns.

``scipy.stats.wilcoxon(B, A, axis=0)`` decides its method once for the whole matrix: a single
tie or zero difference anywhere sends every column of a small sample (n ≤ 13) to a permutation
test, which at 17,408 genes costs minutes to hours. :func:`wilcoxon_signed_rank` computes the
same test for all columns with array operations and decides the method *per column*, with the
rule scipy's ``method="auto"`` applies to a single column:

- no ties and no zero differences, n ≤ 50: the exact null distribution of the signed-rank sum
  (one table per n, shared by all such columns);
- ties or zeros, n ≤ 13: the exact conditional (permutation) distribution given the column's
  ranks, by dynamic programming over the 2ⁿ sign flips (scipy enumerates them one by one);
- otherwise the normal approximation with the tie correction of the variance
  (``σ² = [n(n+1)(2n+1) − Σ(t³ − t)/2] / 24``), no continuity correction (scipy's default).

Zero differences are dropped before ranking (Wilcoxon's ``zero_method="wilcox"``, scipy's
default), so a zero neither counts for nor against a feature set; Pratt's variant would rank
them and then discard their ranks, which makes the test depend on how many exact ties with the
baseline occur — with R² from repeated CV these are rare, and "wilcox" keeps the two-sided test
symmetric in the two sets. Columns with a NaN propagate NaN; a column of only zero differences
gets NaN (there is nothing to test).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import special

EXACT_MAX_N = 50  # exact table without ties/zeros up to this n (as scipy)
PERMUTATION_MAX_N = 13  # exact conditional distribution with ties/zeros up to this n (as scipy)


@dataclass(frozen=True)
class SignedRankResult:
    """Per column: ``statistic`` = min(R⁺, R⁻), two-sided ``pvalue``, ``method`` used."""

    statistic: np.ndarray
    pvalue: np.ndarray
    method: np.ndarray  # "exact" | "permutation" | "asymptotic" | "" (NaN column)
    n: np.ndarray  # non-zero differences per column


def average_ranks(a: np.ndarray, exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average ranks (1-based) of each column of ``a`` among its entries not in ``exclude``.

    Returns (ranks, tie sizes), both shaped like ``a``: excluded entries get rank 0 and tie size
    0; every other entry gets the size of its group of equal values (1 when untied).
    """
    R, g = a.shape
    lo = np.min(a, initial=0.0) - 1.0
    v = np.where(exclude, lo, a)  # excluded entries sort first, in a group of their own
    order = np.argsort(v, axis=0, kind="stable")
    s = np.take_along_axis(v, order, axis=0)
    new = np.ones((R, g), dtype=bool)
    new[1:] = s[1:] != s[:-1]
    gid = np.cumsum(new, axis=0) - 1 + np.arange(g) * R  # group id, unique over columns
    flat = gid.ravel()
    size = np.bincount(flat, minlength=R * g)
    pos = np.broadcast_to(np.arange(1, R + 1, dtype=np.float64)[:, None], (R, g))
    total = np.bincount(flat, weights=pos.ravel(), minlength=R * g)
    avg_sorted = (total[flat] / size[flat]).reshape(R, g)
    size_sorted = size[flat].reshape(R, g)
    cols = np.arange(g)[None, :]
    ranks = np.empty((R, g))
    ties = np.empty((R, g), dtype=np.int64)
    ranks[order, cols] = avg_sorted
    ties[order, cols] = size_sorted
    n_excl = exclude.sum(axis=0)
    ranks = np.where(exclude, 0.0, ranks - n_excl)
    ties = np.where(exclude, 0, ties)
    return ranks, ties


def _null_counts(doubled_ranks: np.ndarray) -> np.ndarray:
    """Counts of the doubled signed-rank sum 2R⁺ over all sign flips, per row of
    ``doubled_ranks`` (rows × n integer ranks ×2, 0 = dropped): rows × (max sum + 1)."""
    k = doubled_ranks.astype(np.int64)
    size = int(k.sum(axis=1).max()) + 1
    counts = np.zeros((len(k), size))
    counts[:, 0] = 1.0
    grid = np.arange(size)[None, :]
    for i in range(k.shape[1]):
        idx = grid - k[:, i : i + 1]
        shifted = np.take_along_axis(counts, np.clip(idx, 0, None), axis=1)
        counts = counts + np.where(idx >= 0, shifted, 0.0)
    return counts


def _two_sided_from_counts(counts: np.ndarray, t2: np.ndarray) -> np.ndarray:
    """2·min(P(T ≤ t), P(T ≥ t)) clipped to 1, for integer doubled statistics ``t2``; one row
    of ``counts`` per statistic, or a single row shared by all."""
    cdf = np.cumsum(counts, axis=1)
    t2 = t2.astype(np.int64)
    rows = np.zeros(len(t2), dtype=np.int64) if len(cdf) == 1 else np.arange(len(t2))
    total = cdf[rows, -1]
    le = cdf[rows, t2]
    lt = np.where(t2 > 0, cdf[rows, np.maximum(t2 - 1, 0)], 0.0)
    return np.minimum(1.0, 2.0 * np.minimum(le, total - lt) / total)


def wilcoxon_signed_rank(x: np.ndarray, y: np.ndarray | None = None) -> SignedRankResult:
    """Two-sided paired Wilcoxon signed-rank test of ``x − y`` along axis 0, every column at once.

    ``x``, ``y``: samples × columns (1-D is one column). See the module docstring for the
    method per column; the p-values equal ``scipy.stats.wilcoxon(x[:, j], y[:, j]).pvalue``.
    """
    x = np.asarray(x, dtype=np.float64)
    d = x if y is None else x - np.asarray(y, dtype=np.float64)
    if d.ndim == 1:
        d = d[:, None]
    R, g = d.shape
    bad = np.isnan(d).any(axis=0)
    d = np.where(bad[None, :], 0.0, d)
    zero = d == 0
    n = (~zero).sum(axis=0)
    ranks, ties = average_ranks(np.abs(d), zero)
    r_plus = np.where(d > 0, ranks, 0.0).sum(axis=0)
    r_minus = np.where(d < 0, ranks, 0.0).sum(axis=0)
    has_ties = (ties > 1).any(axis=0)
    has_zero = zero.any(axis=0)

    p = np.full(g, np.nan)
    method = np.full(g, "", dtype=object)
    ok = ~bad & (n > 0)
    exact = ok & ~has_ties & ~has_zero & (R <= EXACT_MAX_N)
    perm = ok & (has_ties | has_zero) & (R <= PERMUTATION_MAX_N)
    asym = ok & ~exact & ~perm
    if exact.any():  # no zeros: n == R for every such column, one table
        table = _null_counts(2 * np.arange(1, R + 1)[None, :])
        cols = np.flatnonzero(exact)
        p[cols] = _two_sided_from_counts(table, np.round(2 * r_plus[cols]))
        method[cols] = "exact"
    if perm.any():
        cols = np.flatnonzero(perm)
        counts = _null_counts(np.round(2 * ranks[:, cols].T))
        p[cols] = _two_sided_from_counts(counts, np.round(2 * r_plus[cols]))
        method[cols] = "permutation"
    if asym.any():
        cols = np.flatnonzero(asym)
        m = n[cols].astype(np.float64)
        tie = (ties[:, cols].astype(np.float64) ** 2 - 1).clip(0).sum(axis=0)  # Σ(t³ − t)
        var = (m * (m + 1) * (2 * m + 1) - tie / 2) / 24
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (r_plus[cols] - m * (m + 1) / 4) / np.sqrt(var)
        p[cols] = np.minimum(1.0, 2 * special.ndtr(-np.abs(z)))
        method[cols] = "asymptotic"
    stat = np.where(ok, np.minimum(r_plus, r_minus), np.nan)
    return SignedRankResult(statistic=stat, pvalue=p, method=method, n=n)


# ----------------------------------------------------------------------------- donor bootstrap


def donor_bootstrap_r2(
    Y: np.ndarray,
    P: np.ndarray,
    groups: np.ndarray,
    strata: np.ndarray | None = None,
    *,
    n_boot: int = 200,
    level: float = 0.95,
    random_state: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile confidence interval of the pooled out-of-fold R² per gene, resampling donors.

    ``Y``, ``P``: samples × genes observed and out-of-fold predicted values; ``groups``: donor per
    sample. Each replicate draws as many donors as there are, with replacement, and takes every
    slide of a drawn donor (slides of a donor are not independent); R² is recomputed on the
    replicate with the definition of ``regression.r2_pearson`` — against the replicate's stratum
    means of Y with ``strata`` (within-tissue R²), against its overall mean without. The
    predictions stay fixed, so the interval covers the sampling of held-out donors (the
    uncertainty of the reported R² as an estimate for new donors), not the variation of the
    fitted models between training sets. Returns (low, high); NaN where Y has no spread.
    """
    Y = np.asarray(Y, dtype=np.float64)
    P = np.asarray(P, dtype=np.float64)
    donors, d_idx = np.unique(np.asarray(groups), return_inverse=True)
    st = (
        np.zeros(len(Y), dtype=np.int64)
        if strata is None
        else np.unique(strata, return_inverse=True)[1]
    )
    n_d, n_s = len(donors), int(st.max()) + 1
    # per (donor, stratum) cell: sums that the replicate's weighted totals are built from
    cell = d_idx * n_s + st
    cells, c_idx = np.unique(cell, return_inverse=True)
    c_donor, c_stratum = cells // n_s, cells % n_s

    def cell_sum(a: np.ndarray) -> np.ndarray:
        out = np.zeros((len(cells), a.shape[1]))
        np.add.at(out, c_idx, a)
        return out

    # centre by the full-sample stratum means first: R² is unchanged, cancellation is smaller
    mu = np.zeros((n_s, Y.shape[1]))
    np.add.at(mu, st, Y)
    mu /= np.bincount(st, minlength=n_s)[:, None]
    Yc = Y - mu[st]
    sse_c, syy_c, sy_c = cell_sum((Y - P) ** 2), cell_sum(Yc**2), cell_sum(Yc)
    cnt_c = np.bincount(c_idx, minlength=len(cells)).astype(np.float64)
    rng = np.random.default_rng(random_state)
    W = np.stack([np.bincount(rng.integers(0, n_d, n_d), minlength=n_d) for _ in range(n_boot)])
    Wc = W[:, c_donor].astype(np.float64)  # replicate weight of each cell
    sse = Wc @ sse_c
    sst = Wc @ syy_c
    for s in range(n_s):
        m = c_stratum == s
        n = Wc[:, m] @ cnt_c[m]
        with np.errstate(divide="ignore", invalid="ignore"):
            sst -= np.where(n[:, None] > 0, (Wc[:, m] @ sy_c[m]) ** 2 / n[:, None], 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(sst > 1e-12 * np.maximum(Wc @ syy_c, 1e-300), 1.0 - sse / sst, np.nan)
    a = (1.0 - level) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN genes
        lo, hi = np.nanquantile(r2, [a, 1 - a], axis=0)
    return lo, hi
