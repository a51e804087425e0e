"""Views: PCA, t-SNE/UMAP to 2-D and silhouette-by-tissue numbers."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import silhouette_score

from gtex_assets.lib.analysis.projection import (
    align_samples,
    compute_view,
    joint_matrix,
    pca_fit_transform,
    project_2d,
    silhouette_by_label,
)


def tissues(n_per=20, p=30, sep=4.0, seed=0, k=3):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, p)) * sep
    labels = np.repeat([f"T{i}" for i in range(k)], n_per)
    X = centres[np.repeat(np.arange(k), n_per)] + rng.standard_normal((k * n_per, p))
    return X, labels


def test_pca_caps_components_transforms_and_is_deterministic():
    X, _ = tissues(n_per=5, p=8)  # 15 samples × 8 features, 40 PCs asked for
    a = pca_fit_transform(X, 40)
    assert a.scores.shape == (15, 8)
    np.testing.assert_allclose(a.transform(X), a.scores, atol=1e-10)
    np.testing.assert_array_equal(a.scores, pca_fit_transform(X, 40).scores)
    assert a.explained_variance_ratio.sum() == pytest.approx(1.0)
    assert np.all(np.diff(a.explained_variance_ratio) <= 1e-12)


def test_silhouette_tracks_separation():
    # "clusters sharpen with training": same tissues, growing separation → rising score
    scores = [silhouette_by_label(*tissues(sep=s)) for s in (0.0, 0.3, 1.0, 4.0)]
    assert scores == sorted(scores) and scores[0] < 0.05 and scores[-1] > 0.7
    X, labels = tissues()
    assert silhouette_by_label(X, labels) == pytest.approx(silhouette_score(X, labels))
    assert np.isnan(silhouette_by_label(X, ["same"] * len(X)))
    # subsampled score stays close to the full one and keeps every label
    sub = silhouette_by_label(X, labels, sample_size=30, random_state=1)
    assert sub == pytest.approx(silhouette_score(X, labels), abs=0.1)


def test_compute_view_pca_and_tsne_tables():
    X, labels = tissues()
    ids = [f"GTEX-{i:04d}-0011" for i in range(len(X))]
    res = compute_view(X, labels, ids, n_components=5, methods=("tsne",), max_iter=250)
    c = res.coords
    assert list(c.columns) == ["sample_id", "label"] + [f"pc{i}" for i in range(1, 6)] + [
        "in_2d",
        "tsne_x",
        "tsne_y",
    ]
    assert c["sample_id"].tolist() == ids and c["in_2d"].all()
    assert set(res.silhouette) == {"pca", "tsne"}
    assert res.silhouette["pca"] > 0.7 and res.silhouette["tsne"] > 0.5
    again = compute_view(X, labels, ids, n_components=5, methods=("tsne",), max_iter=250)
    np.testing.assert_array_equal(again.coords["tsne_x"], c["tsne_x"])
    rows = res.silhouette_rows(view="slide", model_id="efficientnet_b0", checkpoint=5)
    assert rows[0] == {
        "view": "slide",
        "model_id": "efficientnet_b0",
        "checkpoint": 5,
        "space": "pca",
        "silhouette": res.silhouette["pca"],
        "n_samples": 60,
        "n_labels": 3,
    }


def test_compute_view_subsamples_2d_above_max_points():
    X, labels = tissues(n_per=30)
    res = compute_view(X, labels, n_components=4, methods=("tsne",), max_points=45, max_iter=250)
    c = res.coords
    assert c["in_2d"].sum() == 45 and c.loc[~c["in_2d"], "tsne_x"].isna().all()
    assert c.loc[c["in_2d"], "label"].value_counts().tolist() == [15, 15, 15]
    assert c["pc1"].notna().all()


def test_umap_projection_small():
    X, labels = tissues(n_per=15, p=10, sep=5.0)
    xy = project_2d(X, "umap", random_state=0, max_iter=100)
    assert xy.shape == (45, 2) and np.isfinite(xy).all()
    assert silhouette_by_label(xy, labels) > 0.5
    np.testing.assert_array_equal(xy, project_2d(X, "umap", random_state=0, max_iter=100))


def test_joint_matrix_balances_blocks_and_alignment():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((10, 3)) * 100, rng.standard_normal((10, 2))
    J = joint_matrix(a, b)
    assert J.shape == (10, 5)
    assert (J[:, :3] ** 2).sum() / 9 == pytest.approx(1.0)
    assert (J[:, 3:] ** 2).sum() / 9 == pytest.approx(1.0)
    common, ia, ib = align_samples(["s3", "s1", "s2"], ["s2", "s4", "s3"])
    assert common.tolist() == ["s2", "s3"] and ia.tolist() == [2, 0] and ib.tolist() == [0, 2]
    with pytest.raises(ValueError, match="duplicate sample id 's1'"):
        align_samples(["s1", "s1"], ["s1"])


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="non-finite"):
        pca_fit_transform(np.array([[1.0, np.nan], [2.0, 3.0]]))
    with pytest.raises(ValueError, match="method"):
        project_2d(np.zeros((10, 2)), "pca")
    with pytest.raises(ValueError, match="3 labels for 4 samples"):
        silhouette_by_label(np.zeros((4, 2)), ["a", "b", "a"])


def test_view_plots_are_pngs(tmp_path):
    from PIL import Image

    from gtex_assets.lib.analysis.plots import scatter_by_label, silhouette_trend, view_panels

    X, labels = tissues(n_per=10)
    res = compute_view(X, labels, n_components=4, methods=())
    out = view_panels(res.coords, tmp_path / "v.png", title="slides", silhouette=res.silhouette)
    p2 = scatter_by_label(X[:, :2], labels, tmp_path / "s.png", title="raw")
    rows = [
        r
        for ck, sep in ((0, 0.5), (5, 2.0))
        for r in compute_view(*tissues(sep=sep), n_components=3, methods=()).silhouette_rows(
            view="slide", checkpoint=ck
        )
    ]
    import pandas as pd

    p3 = silhouette_trend(pd.DataFrame(rows), tmp_path / "t.png")
    for p in (out, p2, p3):
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 300
    assert [r["silhouette"] for r in rows] == sorted(r["silhouette"] for r in rows)
