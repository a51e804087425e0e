"""Both R² views of gene_r2 and their donor-bootstrap intervals, on data of known effect."""

import numpy as np
import pandas as pd
import pytest

from gtex_assets.lib.analysis.gene_r2 import GeneR2Params, definitions_markdown, run_gene_r2
from gtex_assets.lib.analysis.regression import r2_pearson
from gtex_assets.lib.analysis.stats import donor_bootstrap_r2

TISSUES = ["Lung", "Liver", "Thyroid"]


def planted(n_donors=60, n_genes=40, seed=0):
    """Every donor has one slide per tissue. Features see the tissue and 3 latent factors z.
    Gene j = tissue mean + b_j · (z w_j) + N(0, 1), so its population R² is known:
    within tissue v/(v + 1), across tissues (T + v)/(T + v + 1), v = b_j²‖w_j‖², T the
    variance of its tissue means."""
    rng = np.random.default_rng(seed)
    slides = pd.DataFrame(
        [(f"D{d:03d}", t, f"D{d:03d}-{t}") for d in range(n_donors) for t in TISSUES],
        columns=["subject_id", "tissue", "tissue_sample_id"],
    )
    n = len(slides)
    t_idx = slides["tissue"].map({t: i for i, t in enumerate(TISSUES)}).to_numpy()
    z = rng.standard_normal((n, 3))
    X = np.hstack([3.0 * np.eye(3)[t_idx], z]) @ rng.standard_normal((6, 10))
    X += 0.05 * rng.standard_normal(X.shape)
    w = rng.standard_normal((3, n_genes))
    w /= np.linalg.norm(w, axis=0)
    v = np.linspace(0.25, 4.0, n_genes)  # signal variance: population R² within 0.2 .. 0.8
    means = rng.uniform(-1, 1, (3, n_genes))
    Y = means[t_idx] + (z @ w) * np.sqrt(v) + rng.standard_normal((n, n_genes))
    T = means.var(axis=0)
    return slides, X, Y, v / (v + 1), (T + v) / (T + v + 1), T / (T + v + 1)


@pytest.fixture(scope="module")
def result():
    slides, X, Y, within, across, tissue_only = planted()
    genes = [f"G{j}" for j in range(Y.shape[1])]
    out = run_gene_r2(
        {"m": X}, Y, slides, genes, genes, pd.DataFrame({"model_id": ["m"]}),
        GeneR2Params(alphas=(0.1, 1.0, 10.0, 100.0), n_boot=300, model="selected"),
        selected="m", how="test",
    )  # fmt: skip
    return out, within, across, tissue_only


def _fit(seed: int):
    slides, X, Y, within, across, tissue_only = planted(seed=seed)
    genes = [f"G{j}" for j in range(Y.shape[1])]
    out = run_gene_r2(
        {"m": X}, Y, slides, genes, genes, pd.DataFrame({"model_id": ["m"]}),
        GeneR2Params(alphas=(0.1, 1.0, 10.0, 100.0), n_boot=300, model="selected",
                     random_state=seed),
        selected="m", how="test",
    )  # fmt: skip
    return out.gene_r2.set_index("gene").loc[genes], within, across


def test_intervals_cover_the_known_r2(result):
    # two independent cohorts (80 planted genes): the genes of one cohort share its donors,
    # so their coverages are correlated and one cohort alone is a noisy check
    fits = [_fit(0), _fit(1)]
    for view in ("within", "across"):
        hit, width = [], []
        for g, within, across in fits:
            truth = within if view == "within" else across
            lo, hi = g[f"r2_{view}_ci_low"].to_numpy(), g[f"r2_{view}_ci_high"].to_numpy()
            hit.append((lo <= truth) & (truth <= hi))
            width.append(hi - lo)
            assert np.corrcoef(g[f"r2_{view}"], truth)[0, 1] > 0.95
        cover = np.mean(np.concatenate(hit))
        # nominal 95 %: the interval covers the sampling of held-out donors, not the training
        # fits' variation, and out-of-fold R² runs a little below the population value;
        # measured 78-93 % per cohort. Below 80 % pooled the intervals would mislead.
        assert cover >= 0.8, (view, cover)
        assert np.mean(np.concatenate(width)) < 0.25  # and they are informative


def test_views_baselines_and_counts(result):
    out, _, _, tissue_only = result
    g = out.gene_r2
    np.testing.assert_array_equal(g["r2"], g["r2_within"])  # the default ranking view
    assert (g["n_slides"] == 180).all() and (g["n_donors"] == 60).all()
    # tissue means explain part of every gene across tissues, none within
    assert (g["r2_across"] > g["r2_within"]).mean() > 0.9
    g = g.set_index("gene").loc[[f"G{j}" for j in range(len(tissue_only))]]
    assert np.corrcoef(g["r2_across_tissue_only"], tissue_only)[0, 1] > 0.8
    assert (g["r2_within_baseline"] < 0).all()
    assert (g["r2_across_baseline"] < 0).all() and (g["r2_across_baseline"] > -0.05).all()
    # the strongest planted genes lead the within ranking
    assert set(g.sort_values("rank_within").index[:5]) <= {f"G{j}" for j in range(25, 40)}
    md = definitions_markdown(GeneR2Params(), out.plan)
    assert "`r2_within_ci_low`" in md and "5 outer donor folds" in md


def test_donor_bootstrap_replicate_is_r2_of_resampled_donors():
    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(12), 3)
    strata = np.tile(["a", "b", "c"], 12)
    Y = rng.standard_normal((36, 4)) + (strata == "a")[:, None] * 2.0
    P = Y + 0.7 * rng.standard_normal(Y.shape)
    for st in (None, strata):
        lo, hi = donor_bootstrap_r2(Y, P, groups, st, n_boot=1, random_state=5)
        draw = np.random.default_rng(5).integers(0, 12, 12)
        rows = np.concatenate([np.flatnonzero(groups == d) for d in draw])
        want = r2_pearson(Y[rows], P[rows], None if st is None else st[rows])[0]
        np.testing.assert_allclose(lo, want, rtol=1e-10)
        np.testing.assert_allclose(hi, want, rtol=1e-10)
