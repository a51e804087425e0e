"""Per-gene ridge R²: planted linear signals, equality with the per-gene sklearn loop."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn.kernel_ridge import KernelRidge
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score

from gtex_assets.lib.analysis.regression import (
    DEFAULT_ALPHAS,
    baseline_r2,
    donor_folds,
    fit_ridge,
    inner_donor_folds,
    per_group_r2,
    r2_pearson,
    recall_at_k,
    ridge_gene_r2,
    sklearn_per_gene_reference,
    strata_too_small,
)

ALPHAS = np.logspace(-2, 4, 7)  # a short grid keeps the sklearn loop fast


def planted(n=96, p=24, n_signal=5, n_noise=15, noise=1e-6, seed=0, donors=32):
    """Y = X B + tiny noise for the first ``n_signal`` genes; pure noise for the rest."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p))
    B = rng.standard_normal((p, n_signal))
    Y = np.hstack(
        [X @ B + noise * rng.standard_normal((n, n_signal)), rng.standard_normal((n, n_noise))]
    )
    Y += rng.uniform(1, 8, Y.shape[1])  # logTPM-like offsets: intercepts must be handled
    groups = np.repeat(np.arange(donors), n // donors)
    return X, Y, groups


# ----------------------------------------------------------------------------- folds


def test_donor_folds_keep_donors_together_and_balance():
    groups = np.repeat([f"GTEX-{i:04d}" for i in range(23)], [1, 2, 3] * 7 + [2, 2])
    folds = donor_folds(groups, n_splits=5, random_state=3)
    for d in np.unique(groups):
        assert len(set(folds[groups == d])) == 1
    sizes = np.bincount(folds, minlength=5)
    assert sizes.max() - sizes.min() <= 3 and sizes.sum() == len(groups)
    assert np.array_equal(folds, donor_folds(groups, 5, 3))
    assert not np.array_equal(folds, donor_folds(groups, 5, 4))


def test_donor_folds_error_names_the_problem():
    with pytest.raises(ValueError, match="3 donor"):
        donor_folds(["a", "a", "b", "c"], n_splits=5)


def test_inner_folds_cover_each_outer_training_set():
    groups = np.repeat(np.arange(30), 2)
    outer = donor_folds(groups, 5, 0)
    inner = inner_donor_folds(groups, outer, 4, 0)
    for f, ids in enumerate(inner):
        tr = np.flatnonzero(outer != f)
        assert ids.shape == tr.shape and set(ids) == {0, 1, 2, 3}
        for d in np.unique(groups[tr]):
            assert len(set(ids[groups[tr] == d])) == 1


# ----------------------------------------------------------------------------- planted signal


@pytest.mark.parametrize("precision", ["mixed", "double"])
def test_planted_linear_genes_recovered_exactly_noise_genes_near_zero(precision):
    X, Y, groups = planted()
    res = ridge_gene_r2(X, Y, groups, precision=precision)
    assert res.r2[:5].min() > 1 - 1e-6
    assert res.pearson_r[:5].min() > 1 - 1e-6
    assert res.alpha[:5].max() == DEFAULT_ALPHAS[0]  # no shrinkage wanted for exact signals
    assert np.abs(res.r2[5:]).max() < 0.1 and res.r2[5:].mean() < 0.02
    table = res.table(genes=[f"g{i}" for i in range(20)], symbols=[f"S{i}" for i in range(20)])
    assert set(table["gene"][:5]) == {f"g{i}" for i in range(5)}
    assert list(table["rank"]) == list(range(1, 21))
    assert recall_at_k(table["gene"], [f"g{i}" for i in range(5)]) == 1.0
    assert res.oof.shape == Y.shape and res.alpha_by_fold.shape == (5, 20)


@pytest.mark.parametrize(
    ("p", "kw"),
    [
        (12, {}),  # n > p: primal path
        (60, {}),  # n < p: dual path (embeddings wider than the sample)
        (12, {"standardize": True}),
        (12, {"precision": "double"}),
        (12, {"kernel": "rbf"}),
    ],
)
def test_equals_per_gene_sklearn_loop_on_same_folds(p, kw):
    rng = np.random.default_rng(1)
    n = 60
    X = rng.standard_normal((n, p)) * rng.uniform(0.5, 3, p)
    w = rng.standard_normal(p)
    # genes with graded signal so different genes pick different penalties
    Y = np.column_stack([X @ w * s + rng.standard_normal(n) for s in (2.0, 0.3, 0.05, 0.0)]) + 4
    groups = np.repeat(np.arange(20), 3)
    res = ridge_gene_r2(X, Y, groups, alphas=ALPHAS, random_state=5, **kw)
    inner = inner_donor_folds(groups, res.folds, 4, 5)
    ref = sklearn_per_gene_reference(
        X, Y, res.folds, inner, alphas=ALPHAS, **{k: v for k, v in kw.items() if k != "precision"}
    )
    np.testing.assert_array_equal(res.alpha_by_fold, ref.alpha_by_fold)
    np.testing.assert_allclose(res.oof, ref.oof, atol=1e-6, rtol=0)
    np.testing.assert_allclose(res.r2, ref.r2, atol=1e-6, rtol=0)
    np.testing.assert_allclose(res.pearson_r, ref.pearson_r, atol=1e-6, rtol=0)
    assert len(set(res.alpha.tolist())) > 1  # the per-gene choice is exercised


def test_mixed_precision_picks_the_double_precision_penalty():
    # many pure-noise genes: flat inner-CV curves at large λ, the hard case for float32
    rng = np.random.default_rng(2)
    X = rng.standard_normal((120, 40))
    signal = X[:, :3] @ rng.standard_normal((3, 10)) + rng.standard_normal((120, 10))
    Y = np.hstack([signal, rng.standard_normal((120, 300))]) + 6
    groups = np.repeat(np.arange(40), 3)
    a = ridge_gene_r2(X, Y, groups, precision="mixed", gene_block=64)
    b = ridge_gene_r2(X, Y, groups, precision="double")
    np.testing.assert_array_equal(a.alpha_by_fold, b.alpha_by_fold)
    np.testing.assert_allclose(a.r2, b.r2, atol=1e-12, rtol=0)


def test_precomputed_folds_are_used():
    X, Y, groups = planted(n=60, donors=20, n_noise=2)
    folds = donor_folds(groups, 3, 11)
    res = ridge_gene_r2(X, Y, groups, folds=folds, return_oof=False)
    assert np.array_equal(res.folds, folds) and res.alpha_by_fold.shape == (3, 7)
    assert res.oof is None


# ----------------------------------------------------------------------------- pieces


def test_fit_ridge_matches_sklearn_with_per_gene_penalties():
    rng = np.random.default_rng(3)
    for p in (8, 50):  # primal and dual
        X = rng.standard_normal((30, p))
        Y = rng.standard_normal((30, 3)) + X[:, :1]
        alpha = np.array([0.1, 10.0, 0.1])
        model = fit_ridge(X, Y, alpha)
        Xn = rng.standard_normal((5, p))
        for j in range(3):
            want = Ridge(alpha=alpha[j]).fit(X, Y[:, j]).predict(Xn)
            np.testing.assert_allclose(model.predict(Xn)[:, j], want, atol=1e-9)
    model = fit_ridge(X, Y, 2.0, kernel="rbf", gamma=0.01)
    kr = KernelRidge(alpha=2.0, kernel="rbf", gamma=0.01).fit(X, Y - Y.mean(0))
    np.testing.assert_allclose(model.predict(Xn), kr.predict(Xn) + Y.mean(0), atol=1e-9)


def test_r2_pearson_definitions():
    rng = np.random.default_rng(4)
    Y = rng.standard_normal((40, 3))
    P = Y + rng.standard_normal((40, 3))
    Y[:, 2] = 1.0  # constant gene
    r2, r = r2_pearson(Y, P)
    for j in range(2):
        assert r2[j] == pytest.approx(r2_score(Y[:, j], P[:, j]), abs=1e-12)
        assert r[j] == pytest.approx(pearsonr(Y[:, j], P[:, j])[0], abs=1e-12)
    assert np.isnan(r2[2]) and np.isnan(r[2])


def test_per_group_r2_long_table():
    rng = np.random.default_rng(5)
    Y = rng.standard_normal((30, 2))
    P = Y + 0.1 * rng.standard_normal((30, 2))
    labels = np.array(["Lung"] * 15 + ["Liver"] * 13 + ["Testis"] * 2)
    df = per_group_r2(Y, P, labels, genes=["A", "B"])
    assert sorted(df["label"].unique()) == ["Liver", "Lung"]  # Testis: too few samples
    row = df[(df.label == "Lung") & (df.gene == "B")].iloc[0]
    assert row.r2 == pytest.approx(r2_score(Y[:15, 1], P[:15, 1])) and row.n_samples == 15


def test_bad_input_errors():
    X = np.zeros((10, 3))
    with pytest.raises(ValueError, match="X has 10 samples"):
        ridge_gene_r2(X, np.zeros((9, 2)), np.arange(10))
    X[4, 1] = np.nan
    with pytest.raises(ValueError, match=r"X has 1 non-finite value\(s\), first at \[4, 1\]"):
        ridge_gene_r2(X, np.zeros((10, 2)), np.arange(10))
    with pytest.raises(ValueError, match="kernel"):
        ridge_gene_r2(
            np.ones((10, 2)) * np.arange(10)[:, None],
            np.ones((10, 1)),
            np.arange(10),
            kernel="poly",
        )


def test_ranking_and_scatter_plots(tmp_path):
    from PIL import Image

    from gtex_assets.lib.analysis.plots import r2_ranking_plot, r2_scatter

    X, Y, groups = planted(n=60, donors=20, n_noise=5)
    res = ridge_gene_r2(X, Y, groups)
    table = res.table([f"g{i}" for i in range(10)])
    a = r2_ranking_plot(table, tmp_path / "rank.png", highlight=["g0", "g1"])
    b = r2_scatter(res.r2, res.r2 / 2, tmp_path / "sc.png", xlabel="ridge", ylabel="cluster")
    for p in (a, b):
        with Image.open(p) as im:
            assert im.format == "PNG"


def tissue_data(seed=6, per=30):
    """3 tissues: embeddings carry tissue (big offsets) and a within-tissue trait z;
    'tissue' genes follow the tissue only, 'linked' genes follow z, the rest are noise."""
    rng = np.random.default_rng(seed)
    t = np.repeat(np.arange(3), per)
    n = len(t)
    z = rng.standard_normal(n)
    X = rng.standard_normal((3, 16))[t] * 5 + np.outer(z, rng.standard_normal(16))
    X += 0.1 * rng.standard_normal((n, 16))
    tissue_genes = rng.normal(0, 4, (3, 4))[t] + 0.3 * rng.standard_normal((n, 4))
    linked = np.outer(z, rng.uniform(1, 2, 4)) + 0.05 * rng.standard_normal((n, 4))
    Y = np.hstack([tissue_genes, linked, rng.standard_normal((n, 4))]) + 6
    labels = np.array(["Lung", "Liver", "Muscle"])[t]
    return X, Y, labels, np.arange(n) // 3


def test_strata_rank_image_linked_genes_above_tissue_markers():
    X, Y, labels, groups = tissue_data()
    plain = ridge_gene_r2(X, Y, groups)
    within = ridge_gene_r2(X, Y, groups, strata=labels)
    # without tissue fixed effects the tissue markers look "image-recoverable" too
    assert plain.r2[:4].min() > 0.9
    # within tissue: markers and noise ≈ 0, the linked genes ≈ 1 and ranked first
    assert within.r2[4:8].min() > 0.98
    other = within.r2[[0, 1, 2, 3, 8, 9, 10, 11]]
    # (out-of-fold R² of a null gene is slightly negative: the held-out tissue means are
    # training estimates)
    assert other.max() < 0.05 and other.min() > -0.25
    genes = [f"g{i}" for i in range(12)]
    assert recall_at_k(within.table(genes)["gene"], genes[4:8]) == 1.0
    np.testing.assert_allclose(within.r2_total[4:8], plain.r2[4:8], atol=0.02)
    # within-stratum R² is r2_score around each tissue's own mean
    yc = Y[:, 5] - np.array([Y[labels == lab, 5].mean() for lab in labels])
    sse = ((Y[:, 5] - within.oof[:, 5]) ** 2).sum()
    assert within.r2[5] == pytest.approx(1 - sse / (yc**2).sum())


def test_strata_equal_sklearn_loop_on_centred_data():
    X, Y, labels, groups = tissue_data(seed=7, per=15)
    res = ridge_gene_r2(X, Y[:, [0, 4, 9]], groups, strata=labels, alphas=ALPHAS)
    inner = inner_donor_folds(groups, res.folds, 4, 0, labels)  # stratified, as the fit does
    ref = sklearn_per_gene_reference(
        X, Y[:, [0, 4, 9]], res.folds, inner, alphas=ALPHAS, strata=labels
    )
    np.testing.assert_array_equal(res.alpha_by_fold, ref.alpha_by_fold)
    np.testing.assert_allclose(res.oof, ref.oof, atol=1e-6, rtol=0)
    np.testing.assert_allclose(res.r2, ref.r2, atol=1e-6, rtol=0)


def test_fit_ridge_strata_is_ridge_with_unpenalised_tissue_intercepts():
    X, Y, labels, _ = tissue_data(seed=8, per=10)
    lam = 3.0
    model = fit_ridge(X, Y[:, :2], lam, strata=labels)
    # direct solve of min ‖y − Dγ − Xβ‖² + λ‖β‖² with tissue dummies D (not penalised)
    D = (labels[:, None] == np.array(["Liver", "Lung", "Muscle"])[None, :]).astype(float)
    Z = np.hstack([D, X])
    pen = np.diag([0.0] * 3 + [lam] * X.shape[1])
    coef = np.linalg.solve(Z.T @ Z + pen, Z.T @ Y[:, :2])
    Xn, ln = X[:5] + 0.1, labels[:5]
    Dn = (ln[:, None] == np.array(["Liver", "Lung", "Muscle"])[None, :]).astype(float)
    np.testing.assert_allclose(model.predict(Xn, ln), np.hstack([Dn, Xn]) @ coef, atol=1e-8)
    with pytest.raises(ValueError, match="pass the strata"):
        model.predict(Xn)


def test_fold_r2_is_skill_against_the_training_mean():
    from gtex_assets.lib.analysis.regression import fold_r2

    rng = np.random.default_rng(9)
    Y = rng.standard_normal((30, 2)) + 3
    folds = np.arange(30) % 3
    null = np.vstack([Y[folds != f].mean(0) for f in folds])  # each row: its training mean
    np.testing.assert_allclose(fold_r2(Y, null, folds), 0.0, atol=1e-12)
    np.testing.assert_allclose(fold_r2(Y, Y, folds), 1.0)
    assert fold_r2(Y, null + 5.0, folds).max() < 0


# ----------------------------------------------------------------------------- strata edge cases


def _two_strata(n_per=6, seed=11):
    """One slide per donor, strata A (donors 0..n_per-1) and B (the rest)."""
    rng = np.random.default_rng(seed)
    n = 2 * n_per
    labels = np.array(["A"] * n_per + ["B"] * n_per)
    X = rng.standard_normal((n, 4)) + (labels == "B")[:, None] * 3.0
    Y = X[:, :2] @ rng.standard_normal((2, 3)) + 0.1 * rng.standard_normal((n, 3)) + 5.0
    return X, Y, labels, np.arange(n)


def test_strata_with_single_slide_training_strata_fit_beta_zero_like_sklearn():
    """An inner training set of one slide per stratum (X centred within strata = 0) used to
    crash with a reshape error; the ridge solution there is β = 0 (stratum means), as in
    sklearn."""
    X, Y, labels, groups = _two_strata()
    folds = np.array([0, 1, 2, 2, 2, 2, 0, 1, 2, 2, 2, 2])
    inner = []
    for f in range(3):
        tr = np.flatnonzero(folds != f)
        ids = np.ones(len(tr), dtype=np.int64)
        for s in "AB":  # inner fold 1 trains on one slide of A and one of B only
            ids[np.flatnonzero(labels[tr] == s)[0]] = 0
        inner.append(ids)
    res = ridge_gene_r2(X, Y, groups, folds=folds, inner_folds=inner, strata=labels, alphas=ALPHAS)
    ref = sklearn_per_gene_reference(X, Y, folds, inner, alphas=ALPHAS, strata=labels)
    np.testing.assert_array_equal(res.alpha_by_fold, ref.alpha_by_fold)
    np.testing.assert_allclose(res.oof, ref.oof, atol=1e-6, rtol=0)
    assert np.isfinite(res.r2).all()


def test_stratum_missing_from_a_training_fold_is_a_clear_error():
    X, Y, labels, groups = _two_strata()
    labels = labels.copy()
    labels[3] = "C"  # a tissue with a single donor
    folds = np.array([0, 1, 2, 1, 2, 0, 0, 1, 2, 0, 1, 2])  # donor 3 (C) is tested in fold 1
    inner = inner_donor_folds(groups, folds, 3, 0)
    # outer fold 0 trains on donor 3: the inner fold that validates on it has no C to train on
    v = int(inner[0][np.flatnonzero(np.flatnonzero(folds != 0) == 3)[0]])
    with pytest.raises(ValueError) as e:
        ridge_gene_r2(X, Y, groups, folds=folds, inner_folds=inner, strata=labels)
    msg = str(e.value)
    assert f"outer fold 0, inner fold {v}: stratum 'C' is in the inner validation" in msg
    assert "1 sample(s) from 1 donor(s)" in msg
    assert "fewer folds" in msg and "tissue_strata=False" in msg
    # outer level: fold 0 tests on the only C donor
    folds0 = np.where(folds == 0, 1, np.where(folds == 1, 0, 2))
    with pytest.raises(ValueError, match=r"outer fold 0: stratum 'C' is in the held-out \(test\)"):
        ridge_gene_r2(X, Y, groups, folds=folds0, strata=labels, inner_splits=2)


def test_stratified_donor_folds_spread_every_tissue():
    rng = np.random.default_rng(4)
    # 40 donors, each with 1-4 of 6 tissues; two rare tissues with 2 and 3 donors
    rows = []
    for d in range(40):
        for t in rng.choice(4, size=int(rng.integers(1, 4)), replace=False):
            rows.append((f"D{d}", f"T{t}"))
    rows += [("D1", "rare2"), ("D2", "rare2"), ("D3", "rare3"), ("D4", "rare3"), ("D5", "rare3")]
    groups = np.array([r[0] for r in rows])
    st = np.array([r[1] for r in rows])
    folds = donor_folds(groups, 5, 0, st)
    for d in np.unique(groups):  # donors stay whole
        assert len(np.unique(folds[groups == d])) == 1
    for t in np.unique(st):  # every tissue's donors spread over distinct folds first
        n_donors = len(np.unique(groups[st == t]))
        assert len(np.unique(folds[st == t])) == min(n_donors, 5)
    inner = inner_donor_folds(groups, folds, 4, 0, st)
    for f, ids in enumerate(inner):  # with >= 3 donors a tissue is trained on in every split
        tr = np.flatnonzero(folds != f)
        for v in np.unique(ids):
            itr = tr[ids != v]
            assert {"T0", "T1", "T2", "T3", "rare3"} <= set(st[itr])
    assert strata_too_small(groups, st) == ["rare2"]
    # deterministic; sizes still balanced
    np.testing.assert_array_equal(folds, donor_folds(groups, 5, 0, st))
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 4


def test_baseline_r2_is_the_training_tissue_mean_predictor():
    rng = np.random.default_rng(5)
    groups = np.repeat(np.arange(12), 2).astype(str)
    st = np.tile(["a", "b"], 12)
    Y = rng.normal(size=(24, 3)) + (st == "a")[:, None] * 5.0
    folds = donor_folds(groups, 4, 0, st)
    got = baseline_r2(Y, groups, folds, st)
    oof = np.empty_like(Y)
    for f in range(4):
        tr, te = folds != f, folds == f
        for t in ("a", "b"):
            oof[te & (st == t)] = Y[tr & (st == t)].mean(axis=0)
    ref = np.empty(3)
    for g in range(3):
        ss_res = ((Y[:, g] - oof[:, g]) ** 2).sum()
        ss_tot = sum(((Y[st == t, g] - Y[st == t, g].mean()) ** 2).sum() for t in ("a", "b"))
        ref[g] = 1 - ss_res / ss_tot
    np.testing.assert_allclose(got, ref, rtol=1e-10)
    assert (got < 0).all()
