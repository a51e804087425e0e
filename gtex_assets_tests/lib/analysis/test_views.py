"""joint_pca's long table round-trips to its blocks; the cluster run's reuse decisions."""

import numpy as np
import pandas as pd
import pytest

from gtex_assets.core.errors import InputError
from gtex_assets.lib.analysis.cluster_run import eval_rows, merge_models
from gtex_assets.lib.analysis.projection import pca_fit_transform
from gtex_assets.lib.analysis.views import joint_blocks, joint_pca_table, joint_silhouettes


def _slides(n=30):
    return pd.DataFrame({
        "tissue_sample_id": [f"S{i:02d}" for i in range(n)][::-1],  # not sorted: order is kept
        "subject_id": [f"D{i // 2}" for i in range(n)],
        "tissue": np.repeat(["Lung", "Liver", "Skin"], n // 3),
    })  # fmt: skip


def test_joint_pca_table_round_trips_in_written_order():
    rng = np.random.default_rng(0)
    s = _slides()
    F, Y = rng.standard_normal((30, 12)), rng.standard_normal((30, 8))
    t = joint_pca_table(F, Y, s, "m", 5, 0)
    assert t.height == 30 * 5 * 2 and set(t["block"]) == {"image", "expression"}
    samples, img, ex = joint_blocks(t)
    assert samples["tissue_sample_id"].tolist() == s["tissue_sample_id"].tolist()
    np.testing.assert_allclose(img, pca_fit_transform(F, 5, random_state=0).scores)
    np.testing.assert_allclose(ex, pca_fit_transform(Y, 5, random_state=0).scores)
    # tissue-separated image PCs score a higher silhouette than noise expression PCs
    t_idx = s["tissue"].map({"Lung": 0, "Liver": 1, "Skin": 2}).to_numpy()
    F2 = F + 6.0 * np.eye(12)[t_idx]
    _, img2, ex2 = joint_blocks(joint_pca_table(F2, Y, s, "m", 5, 0))
    sil = joint_silhouettes(img2, ex2, s["tissue"].to_numpy())
    assert sil["image_only"] > 0.5 > sil["expression_only"]
    assert sil["image_only"] > sil["joint"] > sil["expression_only"]


def test_eval_rows_follows_gene_r2_folds_and_detects_changed_inputs():
    s = _slides(6)
    folds = pd.DataFrame({"tissue_sample_id": s["tissue_sample_id"][:4], "fold": [1, 0, 1, 0]})
    rows, f = eval_rows(s, folds)
    assert rows.tolist() == [True] * 4 + [False] * 2 and f.tolist() == [1, 0, 1, 0]
    gone = pd.concat([folds, pd.DataFrame({"tissue_sample_id": ["X"], "fold": [0]})])
    with pytest.raises(InputError, match="re-materialise gene_r2"):
        eval_rows(s, gone)


def test_merge_models_replaces_this_model_and_dropped_ones():
    old = pd.DataFrame({"model_id": ["a", "b", "c"], "v": [1, 2, 3]})
    new = pd.DataFrame({"model_id": ["b"], "v": [20]})
    got = merge_models(old, new, "b", ["c"])
    assert got.sort_values("model_id").to_dict("list") == {"model_id": ["a", "b"], "v": [1, 20]}
    assert merge_models(None, new, "b", []).equals(new)
    assert merge_models(old.rename(columns={"v": "w"}), new, "b", []).equals(new)  # old layout
