"""The vectorised Wilcoxon signed-rank test against scipy, column by column."""

import warnings

import numpy as np
import pytest
from scipy import stats

from gtex_assets.lib.analysis.stats import average_ranks, wilcoxon_signed_rank


def _scipy(B: np.ndarray, A: np.ndarray) -> np.ndarray:
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for j in range(B.shape[1]):
            d = B[:, j] - A[:, j]
            out.append(np.nan if np.all(d == 0) else stats.wilcoxon(B[:, j], A[:, j]).pvalue)
    return np.array(out)


@pytest.mark.parametrize("R", [4, 6, 8, 16, 30, 60])
def test_matches_scipy_with_ties_and_zeros(R):
    rng = np.random.default_rng(R)
    A = rng.standard_normal((R, 40))
    B = A + 0.4 * rng.standard_normal((R, 40)) + 0.15
    # the first 12 columns on a coarse grid: tied |differences| and exact zeros
    A[:, :12], B[:, :12] = np.round(A[:, :12], 1), np.round(B[:, :12], 1)
    B[:, 12] = A[:, 12]  # nothing to test
    B[0, 13] = A[0, 13]  # one zero, otherwise untied
    res = wilcoxon_signed_rank(B, A)
    want = _scipy(B, A)
    np.testing.assert_allclose(res.pvalue, want, rtol=1e-10, atol=1e-14)
    assert np.isnan(res.pvalue[12]) and res.method[12] == ""
    if R <= 13:
        assert "permutation" in set(res.method[:12]) and res.method[13] == "permutation"
        assert set(res.method[14:]) == {"exact"}
    else:
        assert set(res.method[:12]) == {"asymptotic"}
        assert set(res.method[14:]) == {"exact" if R <= 50 else "asymptotic"}
    # the statistic: min(R+, R-), as scipy's two-sided result
    j = 30
    assert res.statistic[j] == stats.wilcoxon(B[:, j], A[:, j]).statistic


def test_some_columns_tied_does_not_change_the_others():
    # scipy on the whole matrix switches every column to a permutation test when any column
    # has a tie; per-column decisions keep the untied columns exact
    rng = np.random.default_rng(1)
    A, B = rng.standard_normal((8, 5)), rng.standard_normal((8, 5))
    alone = wilcoxon_signed_rank(B[:, 1:], A[:, 1:]).pvalue
    B[0, 0] = A[0, 0]
    np.testing.assert_array_equal(wilcoxon_signed_rank(B, A).pvalue[1:], alone)


def test_nan_propagates_and_one_dimensional_input():
    x = np.array([0.1, 0.5, -0.2, 0.7, 0.9, 0.3])
    r = wilcoxon_signed_rank(x)
    assert r.pvalue.shape == (1,) and r.pvalue[0] == pytest.approx(stats.wilcoxon(x).pvalue)
    X = np.column_stack([x, x])
    X[2, 1] = np.nan
    p = wilcoxon_signed_rank(X).pvalue
    assert np.isfinite(p[0]) and np.isnan(p[1])


def test_average_ranks_excludes_and_counts_ties():
    a = np.array([[3.0, 0.0], [1.0, 2.0], [3.0, 2.0], [0.0, 5.0]])
    ranks, ties = average_ranks(a, a == 0)
    np.testing.assert_array_equal(ranks[:, 0], [2.5, 1.0, 2.5, 0.0])
    np.testing.assert_array_equal(ranks[:, 1], [0.0, 1.5, 1.5, 3.0])
    np.testing.assert_array_equal(ties[:, 0], [2, 1, 2, 0])
    np.testing.assert_array_equal(stats.rankdata([3.0, 1.0, 3.0]), [2.5, 1.0, 2.5])
