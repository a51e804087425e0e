"""Fine-tuned vs off-the-shelf: repeated donor-grouped CV and its paired statistics."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from gtex_assets.lib.analysis.feature_comparison import (
    bh_fdr,
    compare_features,
    corrected_repeated_cv_ttest,
)

ALPHAS = np.logspace(-2, 4, 7)


def two_feature_sets(n_per=24, seed=0):
    """3 tissues; a latent image trait z drives 8 genes. The 'fine-tuned' features see tissue
    and z clearly, the 'off-the-shelf' ones through heavy noise; 12 genes are pure noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(["Lung", "Liver", "Muscle"], n_per)
    n = len(labels)
    tissue = np.repeat(np.arange(3), n_per)
    z = rng.standard_normal(n)
    onehot = np.eye(3)[tissue]
    W = rng.standard_normal((4, 10))
    signal = np.column_stack([onehot, z]) @ W
    F_b = signal + 0.3 * rng.standard_normal((n, 10))
    F_a = signal + 2.5 * rng.standard_normal((n, 10))
    Y = np.hstack([np.outer(z, rng.uniform(1, 2, 8)), np.zeros((n, 12))])
    Y += 0.5 * rng.standard_normal(Y.shape) + 5
    groups = np.arange(n) // 2
    return F_a, F_b, labels, Y, groups


@pytest.fixture(scope="module")
def result():
    F_a, F_b, labels, Y, groups = two_feature_sets()
    genes = [f"ENSG{i:011d}" for i in range(20)]
    return compare_features(
        F_a, F_b, labels, Y, groups, n_splits=4, n_repeats=6, random_state=0,
        genes=genes, alphas=ALPHAS, inner_splits=3,
    )  # fmt: skip


def test_planted_improvement_is_found(result):
    o = result.overall
    assert o["accuracy_b_mean"] > 0.95 and o["accuracy_b_mean"] > o["accuracy_a_mean"] + 0.05
    g = result.genes
    assert len(g) == 20 and g["gene"].iloc[0] == "ENSG00000000000"
    # the 8 linked genes (and only they) have a significant image association, all improved
    assert g["significant"].tolist() == [True] * 8 + [False] * 12
    assert g["improved"].sum() == 8 and o["n_significant"] == 8 and o["n_improved"] == 8
    assert o["frac_improved"] == 1.0 and o["n_significantly_improved"] == 8
    assert (g["r2_b_mean"][:8] > 0.5).all() and (g["r2_b_mean"][8:] < 0.05).all()
    md = result.summary_markdown()
    assert "fine_tuned vs off_the_shelf" in md and "**8** of 20" in md and "tissue accuracy" in md


def test_paired_statistics_are_the_scipy_tests(result):
    acc = result.accuracy
    assert acc["repeat"].tolist() == list(range(6))
    o = result.overall
    assert o["accuracy_p_ttest"] == pytest.approx(
        stats.ttest_rel(acc["accuracy_b"], acc["accuracy_a"]).pvalue
    )
    assert o["accuracy_p_wilcoxon"] == pytest.approx(
        stats.wilcoxon(acc["accuracy_b"], acc["accuracy_a"]).pvalue
    )
    fa = result.fold_accuracy
    assert len(fa) == 24 and fa["n_test"].groupby(fa["repeat"]).sum().eq(72).all()
    # pooled accuracy of a repeat = test-size weighted mean of its folds
    r0 = fa[fa.repeat == 0]
    assert acc["accuracy_b"][0] == pytest.approx(np.average(r0.accuracy_b, weights=r0.n_test))
    j = 3
    A, B = result.r2_a[:, j], result.r2_b[:, j]
    assert result.r2_a.shape == (6, 20)
    row = result.genes.iloc[j]
    assert row.p_wilcoxon == pytest.approx(stats.wilcoxon(B, A).pvalue)
    assert row.p_ttest == pytest.approx(stats.ttest_rel(B, A).pvalue)
    # association and per-gene corrected tests use the fold-level R² (6 repeats × 4 folds)
    t, p = corrected_repeated_cv_ttest(np.full(24, 0.5) + np.arange(24) * 0.01, 1 / 3, "greater")
    assert p == pytest.approx(stats.t.sf(t, 23)) and t > 0
    assert 0 <= row.p_assoc_b < 0.01 and 0 <= row.p_corrected <= 1
    assert row.delta_mean == pytest.approx((B - A).mean())
    # repeats use different donor shuffles: R² varies across repeats
    assert result.r2_b[:, j].std() > 0


def test_deterministic_and_repeat_seeds():
    F_a, F_b, labels, Y, groups = two_feature_sets(n_per=12, seed=1)
    kw = {"n_splits": 3, "n_repeats": 2, "alphas": ALPHAS, "inner_splits": 2}
    a = compare_features(F_a, F_b, labels, Y[:, :3], groups, random_state=4, **kw)
    b = compare_features(F_a, F_b, labels, Y[:, :3], groups, random_state=4, **kw)
    np.testing.assert_array_equal(a.r2_b, b.r2_b)
    assert a.accuracy.equals(b.accuracy)
    only_acc = compare_features(F_a, F_b, labels, None, groups, random_state=4, **kw)
    assert only_acc.genes.empty and only_acc.accuracy.equals(a.accuracy)
    assert "Genes with" not in only_acc.summary_markdown()


def test_bh_fdr_matches_scipy():
    p = np.array([0.01, 0.04, 0.03, 0.2, np.nan, 0.001])
    q = bh_fdr(p)
    want = stats.false_discovery_control(p[~np.isnan(p)])
    np.testing.assert_allclose(q[~np.isnan(p)], want)
    assert np.isnan(q[4])


def test_corrected_ttest_formula():
    d = np.array([0.02, 0.01, 0.03, 0.0, 0.02, 0.01])
    t, p = corrected_repeated_cv_ttest(d, 0.25)
    want_t = d.mean() / np.sqrt((1 / 6 + 0.25) * d.var(ddof=1))
    assert t == pytest.approx(want_t) and p == pytest.approx(2 * stats.t.sf(want_t, 5))
    # the correction makes it more conservative than the naive one-sample t-test
    assert p > stats.ttest_1samp(d, 0).pvalue
    assert np.isnan(corrected_repeated_cv_ttest(np.zeros(4), 0.25)[1])


def test_bad_input():
    with pytest.raises(ValueError, match="rows but there are 4 samples"):
        compare_features(np.zeros((3, 2)), np.zeros((4, 2)), None, np.zeros((4, 1)), np.arange(4))
    with pytest.raises(ValueError, match="nothing to compare"):
        compare_features(np.zeros((4, 2)), np.zeros((4, 2)), None, None, np.arange(4))


def test_paired_accuracy_plot(result, tmp_path):
    from PIL import Image

    from gtex_assets.lib.analysis.plots import paired_accuracy_plot

    p = paired_accuracy_plot(result.accuracy, result.names, tmp_path / "acc.png")
    with Image.open(p) as im:
        assert im.format == "PNG"


def test_within_tissue_expression_task():
    F_a, F_b, labels, Y, groups = two_feature_sets(seed=2)
    Y = Y + np.repeat([0.0, 4.0, -3.0], 24)[:, None]  # tissue offsets on every gene
    res = compare_features(
        F_a, F_b, None, Y, groups, n_splits=4, n_repeats=3, alphas=ALPHAS, inner_splits=3,
        strata=labels,
    )  # fmt: skip
    g = res.genes
    # the offsets would make every gene "image-associated"; within tissue only the 8 are
    assert g["significant"].tolist() == [True] * 8 + [False] * 12
    assert res.accuracy.empty and "tissue accuracy" not in res.summary_markdown()
