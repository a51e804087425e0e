"""Cluster-average transcriptome: planted clusters, pluggable nearest-neighbour lookup."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from gtex_assets.lib.analysis.cluster_transcriptome import (
    compare_gene_r2,
    evaluate_cluster_predictor,
    exact_nearest,
    fit_cluster_predictor,
)
from gtex_assets.lib.analysis.regression import ridge_gene_r2


def planted_clusters(k=4, per=15, d=6, g=25, noise=0.01, seed=0):
    """k tight clusters in embedding space; each cluster has its own transcriptome."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)) * 10
    transcriptomes = rng.uniform(0, 10, (k, g))
    c = np.repeat(np.arange(k), per)
    E = centres[c] + 0.3 * rng.standard_normal((k * per, d))
    Y = transcriptomes[c] + noise * rng.standard_normal((k * per, g))
    groups = np.arange(k * per) // 2  # donors with two slides
    return E, Y, groups, c, centres, transcriptomes


def test_fit_recovers_planted_clusters_and_means():
    E, Y, _, c, centres, T = planted_clusters()
    model = fit_cluster_predictor(E, Y, 4, random_state=0)
    # each fitted cluster is exactly one planted cluster (up to relabelling)
    pairs = set(zip(model.train_clusters.tolist(), c.tolist(), strict=True))
    assert len(pairs) == 4 and model.cluster_sizes.tolist() == [15] * 4
    for j, i in pairs:
        np.testing.assert_allclose(model.cluster_means[j], Y[c == i].mean(0))
        np.testing.assert_allclose(model.cluster_means[j], T[i], atol=0.01)
    new = centres + 0.1  # a new slide near each planted centre gets that cluster's transcriptome
    np.testing.assert_allclose(model.predict(new), T, atol=0.01)


def test_pluggable_nearest_is_used_and_matches_exact():
    E, Y, *_ = planted_clusters(seed=1)
    model = fit_cluster_predictor(E, Y, 4, assign="member", k_neighbors=3, random_state=0)
    vectors, ids = model.reference()
    assert vectors.shape == (60, 6) and np.array_equal(ids, model.train_clusters)
    calls = []

    def lookup(q, k):  # what a LanceDB search returns: row ids of the stored vectors
        calls.append((q.shape, k))
        return exact_nearest(vectors)(q, k)

    q = E[:7] + 0.05
    got = model.assign_clusters(q, nearest=lookup)
    assert calls == [((7, 6), 3)]
    np.testing.assert_array_equal(got, model.assign_clusters(q))
    np.testing.assert_array_equal(got, model.train_clusters[:7])

    def broken(q, k):
        return np.full((len(q), k), 99)

    with pytest.raises(ValueError, match="outside 0..59"):
        model.assign_clusters(q, nearest=broken)


def test_member_majority_and_centroid_agree_on_clean_clusters():
    E, Y, *_ = planted_clusters(seed=2)
    a = fit_cluster_predictor(E, Y, 4, assign="centroid", random_state=0)
    b = fit_cluster_predictor(E, Y, 4, assign="member", k_neighbors=5, random_state=0)
    np.testing.assert_array_equal(a.assign_clusters(E), b.assign_clusters(E))


def test_agglomerative_and_pca_space():
    E, Y, _, c, *_ = planted_clusters(d=30, seed=3)
    model = fit_cluster_predictor(E, Y, 4, method="agglomerative", n_components=3)
    assert model.centroids.shape == (4, 3) and model.transform(E).shape == (60, 3)
    assert len(set(zip(model.train_clusters.tolist(), c.tolist(), strict=True))) == 4


def test_evaluation_on_held_out_donors_and_comparison_table():
    E, Y, groups, *_ = planted_clusters(per=20, seed=4)
    ev = evaluate_cluster_predictor(E, Y, groups, n_clusters=4, n_splits=5, random_state=0)
    # the planted transcriptomes are recovered for held-out donors: R² ≈ 1 for every gene
    assert ev.r2.min() > 0.999 and ev.sample_r.min() > 0.99
    for f in range(5):  # no donor on both sides of a split
        te = ev.folds == f
        assert not set(groups[te]) & set(groups[~te])
    seen = []

    def factory(reference):
        seen.append(reference.shape)
        return exact_nearest(reference)

    ev2 = evaluate_cluster_predictor(
        E, Y, groups, n_clusters=4, folds=ev.folds, nearest_factory=factory
    )
    assert seen == [(4, 6)] * 5 and np.array_equal(ev2.oof, ev.oof)
    ridge = ridge_gene_r2(E, Y, groups, n_splits=5, random_state=0)
    assert np.array_equal(ridge.folds, ev.folds)  # same donor folds → a like-for-like table
    genes = [f"ENSG{i:011d}" for i in range(Y.shape[1])]
    table = compare_gene_r2(ridge.table(genes, [f"G{i}" for i in range(25)]), ev, genes)
    assert list(table.columns) == [
        "gene",
        "symbol",
        "r2_ridge",
        "r2_cluster",
        "pearson_ridge",
        "pearson_cluster",
        "delta_r2",
        "rank_ridge",
    ]
    assert len(table) == 25 and table["rank_ridge"].tolist() == list(range(1, 26))
    row = table.set_index("gene").loc[genes[3]]
    assert row.r2_cluster == pytest.approx(ev.r2[3]) and row.r2_ridge == pytest.approx(ridge.r2[3])
    with pytest.raises(ValueError, match="missing from the ridge table"):
        compare_gene_r2(
            pd.DataFrame(columns=["gene", "symbol", "r2", "pearson_r", "rank"]), ev, genes
        )


def test_cluster_average_is_coarser_than_ridge_on_continuous_linear_genes():
    # a continuous linear signal: clusters quantise it, ridge recovers it
    rng = np.random.default_rng(5)
    E = rng.standard_normal((80, 5))
    Y = E @ rng.standard_normal((5, 6)) + 0.05 * rng.standard_normal((80, 6))
    groups = np.arange(80) // 2
    ev = evaluate_cluster_predictor(E, Y, groups, n_clusters=8)
    ridge = ridge_gene_r2(E, Y, groups)
    assert (ev.r2 > 0.1).all() and (ev.r2 < 0.8).all() and (ridge.r2 > 0.99).all()


def test_bad_input():
    with pytest.raises(ValueError, match="same rows"):
        fit_cluster_predictor(np.zeros((5, 2)), np.zeros((4, 3)), 2)
    with pytest.raises(ValueError, match="method"):
        fit_cluster_predictor(np.eye(4), np.eye(4), 2, method="dbscan")


def test_within_tissue_metric_for_the_cluster_predictor():
    from gtex_assets.lib.analysis.regression import r2_pearson

    E, Y, groups, c, *_ = planted_clusters(per=20, seed=6)
    tissue = np.array(["A", "B", "C", "D"])[c]
    ev = evaluate_cluster_predictor(E, Y, groups, n_clusters=4, strata=tissue)
    np.testing.assert_allclose(ev.r2, r2_pearson(Y, ev.oof, tissue)[0])
    # clusters = tissues here: the cluster mean explains no within-tissue variation
    assert ev.r2.max() < 0.05


# ----------------------------------------------------------------------------- LanceDB serving


def test_lancedb_lookup_assigns_like_exact_search(tmp_path):
    from gtex_assets.lib.analysis import cluster_transcriptome as CP
    from gtex_assets.lib.embeddings.vector_store import VectorStore

    E, Y, groups, *_ = planted_clusters(per=20, d=12, seed=7)
    E = E + np.random.default_rng(0).standard_normal(E.shape) * 3.0  # overlapping clusters
    store = VectorStore(tmp_path / "db")
    kw = {"n_clusters": 6, "n_splits": 5, "n_components": 5}
    ev = evaluate_cluster_predictor(
        E, Y, groups, nearest_factory=CP.lancedb_nearest_factory(store, "m"), **kw
    )
    exact = evaluate_cluster_predictor(E, Y, groups, **kw)
    np.testing.assert_array_equal(ev.clusters, exact.clusters)
    np.testing.assert_array_equal(ev.oof, exact.oof)
    assert ev.n_agree_exact == len(E) and exact.n_agree_exact is None
    folds = store.read(CP.CENTROID_TABLE, ["fold", "cluster"]).to_pandas()
    assert folds.groupby("fold").size().to_dict() == {f: 6 for f in range(5)}

    # k > 1 on the served rows: the same rows, in the same order, as exact_nearest
    model = fit_cluster_predictor(E, Y, 6, n_components=5)
    CP.write_centroids(store, CP.centroid_table("m", model.centroids, fit_id="f1"))
    q = model.transform(E[::7] + 0.5)
    got = CP.lancedb_nearest(store, "m")(q, 3)
    np.testing.assert_array_equal(got, exact_nearest(model.centroids)(q, 3))
    np.testing.assert_array_equal(
        CP.lancedb_nearest(store, "m")(q[:1], 1), exact_nearest(model.centroids)(q[:1], 1)
    )
    hits = CP.search_centroids(store, "m", q[:2], k=2)
    d = np.linalg.norm(model.centroids[hits["cluster"]] - np.repeat(q[:2], 2, axis=0), axis=1)
    np.testing.assert_allclose(hits["distance"], d, rtol=1e-4)
    with pytest.raises(ValueError, match="fewer than 7 reference rows"):
        CP.lancedb_nearest(store, "m")(q, 7)


def test_write_centroids_replaces_per_model_never_duplicates(tmp_path):
    from gtex_assets.lib.analysis import cluster_transcriptome as CP
    from gtex_assets.lib.embeddings.vector_store import VectorStore

    store = VectorStore(tmp_path / "db")
    rng = np.random.default_rng(1)
    a = CP.centroid_table("a", rng.standard_normal((4, 3)), fit_id="a1", n_slides=[1, 2, 3, 4])
    b = CP.centroid_table("b", rng.standard_normal((5, 3)), fit_id="b1")
    assert CP.write_centroids(store, a).rows == 4
    assert CP.write_centroids(store, b).total_rows == 9
    for _ in range(2):  # a re-run replaces its rows
        w = CP.write_centroids(store, a)
        assert (w.rows, w.total_rows, w.dropped_models) == (4, 9, [])
    fewer = CP.centroid_table("a", rng.standard_normal((2, 3)), fit_id="a2")
    assert CP.write_centroids(store, fewer).total_rows == 7  # clusters 2, 3 of 'a' are gone
    assert CP.centroid_models(store) == {"a": "a2", "b": "b1"}
    wide = CP.centroid_table("a", rng.standard_normal((3, 8)), fit_id="a3")
    w = CP.write_centroids(store, wide)  # another width: the table holds this fit only
    assert (w.rows, w.total_rows, w.dropped_models) == (3, 3, ["b"])
    assert CP.centroid_models(store) == {"a": "a3"}
    with pytest.raises(ValueError, match="one \\(model_id, fold\\)"):
        CP.write_centroids(store, pa.concat_tables([a, b]))


def test_projection_summary_and_transcriptome_table(tmp_path):
    from gtex_assets.lib.analysis import cluster_transcriptome as CP

    E, Y, _, c, *_ = planted_clusters(d=30, seed=8)
    model = fit_cluster_predictor(E, Y, 4, n_components=3)
    path = CP.save_projection(model, CP.projection_path(tmp_path, "run/1 e05"), {"fit_id": "x"})
    assert path.name == "run_1_e05.npz"
    proj = CP.load_projection(path)
    assert proj.card == {"fit_id": "x"} and proj.dim_in == 30
    np.testing.assert_allclose(proj.transform(E[:5]), model.transform(E[:5]))
    with pytest.raises(ValueError, match="expects 30"):
        proj.transform(E[:2, :10])
    plain = CP.load_projection(
        CP.save_projection(fit_cluster_predictor(E, Y, 4), tmp_path / "p.npz", {})
    )
    np.testing.assert_array_equal(plain.transform(E[:2]), E[:2])

    tissue = np.array(["Lung", "Liver", "Liver", "Muscle"])[c]
    summ = CP.cluster_summary(model, tissue)
    assert summ["n_slides"].tolist() == model.cluster_sizes.tolist()
    assert summ["majority_fraction"].eq(1.0).all()
    genes = [f"ENSG{i}" for i in range(Y.shape[1])]
    t = CP.transcriptome_table(
        model, genes, [f"S{i}" for i in range(25)], summ, model_id="m", fit_id="x"
    )
    assert len(t) == 4 * 25 and list(t.columns) == [
        "model_id", "fit_id", "cluster", "n_slides", "majority_tissue", "gene_id", "symbol", "log_tpm"
    ]  # fmt: skip
    j = int(model.train_clusters[0])
    row = t[(t["cluster"] == j) & (t["gene_id"] == "ENSG3")].iloc[0]
    assert row["log_tpm"] == pytest.approx(Y[model.train_clusters == j, 3].mean(), rel=1e-6)
    assert row["majority_tissue"] == tissue[0]
