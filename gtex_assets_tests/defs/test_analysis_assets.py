"""Analysis assets on small synthetic inputs written straight into a data root (no image pipeline).

Three models embed 42 slides (14 donors × 3 tissues): an off-the-shelf backbone (noise with a weak
tissue signal), an epoch-1 checkpoint, and the selected epoch-5 checkpoint whose embedding carries
a strong tissue signal and a linear image of 3 latent factors. 6 of 60 genes (the planted
"image-linked" ones) follow those factors; every gene also has tissue means.
"""

import dagster as dg
import numpy as np
import pandas as pd
import polars as pl
import pyarrow.parquet as pq
import pytest

from gtex_assets.core.atomic import write_parquet
from gtex_assets.core.lake import Lake
from gtex_assets.defs.analysis.assets import (
    cluster_transcriptome,
    embedding_views,
    feature_comparison,
    gene_r2,
    joint_pca,
)
from gtex_assets.lib.embeddings import vector_store as V
from gtex_assets.lib.expression.log_tpm import ExpressionParams, ExpressionResult, write_outputs
from gtex_assets.resources import DataLakeResource, GTExSourceResource

TISSUES = ["Lung", "Liver", "Thyroid"]
N_DONORS, N_GENES, DIM = 14, 60, 24
LINKED = [f"ENSG{i:011d}.1" for i in range(6)]  # the planted image-linked genes
MARKERS = [f"ENSG{i:011d}.1" for i in range(6, 12)]  # tissue markers: high in one tissue
OTS, E1, E5 = "efficientnet_b0-imagenet", "run1-e01", "run1-e05"


def _write_inputs(root, mirror) -> None:
    rng = np.random.default_rng(3)
    lk = Lake.at(root)
    donors = [f"GTEX-{1000 + i:04X}" for i in range(N_DONORS)]
    rows = [(d, t, f"{d}-{1026 + 100 * j:04d}") for d in donors for j, t in enumerate(TISSUES)]
    meta = pd.DataFrame(rows, columns=["subject_id", "tissue", "tissue_sample_id"])
    n = len(meta)
    t_idx = meta["tissue"].map({t: i for i, t in enumerate(TISSUES)}).to_numpy()
    z = rng.standard_normal((n, 3))  # per-slide morphology factors
    centres = rng.standard_normal((len(TISSUES), DIM)) * 4.0
    W = rng.standard_normal((3, DIM))

    def emb(tissue_scale: float, factor_scale: float, noise: float) -> np.ndarray:
        return (
            tissue_scale * centres[t_idx]
            + factor_scale * z @ W
            + noise * rng.standard_normal((n, DIM))
        )

    vecs = {OTS: emb(0.25, 0.0, 1.0), E1: emb(0.6, 0.5, 1.0), E5: emb(1.0, 1.0, 0.3)}
    parts, allv = [], []
    for mid, v in vecs.items():
        m = meta.assign(
            model_id=mid, row_id=mid + "|" + meta["tissue_sample_id"], split="train", n_tiles=3
        )
        m["cluster"] = t_idx
        m["content_hash"] = "h"
        parts.append(m)
        allv.append(v)
    slide_meta = pd.concat(parts, ignore_index=True)
    write_parquet(
        V.table_from_frame(slide_meta, np.vstack(allv), V.slide_schema(DIM)),
        lk.table("slide_embeddings"),
    )
    write_parquet(
        pd.DataFrame(
            {
                "model_id": [E1, E5, OTS],
                "kind": ["checkpoint", "checkpoint", "off_the_shelf"],
                "backbone": "efficientnet_b0",
                "weights": ["checkpoint", "checkpoint", "imagenet"],
                "epoch": pd.array([1, 5, None], dtype="Int64"),
                "selected": [False, True, False],
            }
        ),
        lk.table("embedding_models"),
    )
    write_parquet(
        pd.DataFrame({"model_id": [E1, E5], "epoch": [1, 5], "selected": [False, True]}),
        lk.table("classifier_checkpoints"),
    )
    # three tiles per slide for the off-the-shelf and the selected model
    for i, sid in enumerate(meta["tissue_sample_id"]):
        tm, tv = [], []
        for mid in (OTS, E5):
            tv.append(vecs[mid][i] + 0.2 * rng.standard_normal((3, DIM)))
            tm.append(
                pd.DataFrame(
                    {
                        "model_id": mid,
                        "tile_id": [f"{sid}_{k}_0" for k in range(3)],
                        "tissue_sample_id": sid,
                        "subject_id": meta["subject_id"].iloc[i],
                        "tissue": meta["tissue"].iloc[i],
                        "sampled": True,
                    }
                )
            )
        full = pd.concat(tm, ignore_index=True)
        full["row_id"] = full["model_id"] + "|" + full["tile_id"]
        write_parquet(
            V.table_from_frame(full, np.vstack(tv), V.tile_schema(DIM)),
            lk.partition_table("tile_embeddings", sid),
        )

    # expression: tissue means for every gene + the factors for the planted ones
    genes = [f"ENSG{i:011d}.1" for i in range(N_GENES)]
    tissue_means = rng.uniform(3, 9, (len(TISSUES), N_GENES))
    # small tissue differences, except the markers: +8 in one tissue
    tissue_means = 6.0 + 0.1 * (tissue_means - 6.0)
    for j in range(6, 12):
        tissue_means[:, j] = 5.0
        tissue_means[j % 3, j] += 8.0
    Y = tissue_means[t_idx] + 0.5 * rng.standard_normal((n, N_GENES))
    for g in range(len(LINKED)):
        Y[:, g] += 1.5 * z[:, g % 3]
    aliquots = (meta["tissue_sample_id"] + "-SM-A1").tolist()
    gene_tbl = pd.DataFrame(
        {
            "gene_id": genes,
            "symbol": [f"GENE{i}" for i in range(N_GENES)],
            "kept": True,
            "matrix_index": pd.array(range(N_GENES), dtype="Int64"),
        }
    )
    res = ExpressionResult(
        source=root / "fake.gct.gz",
        sample_ids=aliquots,
        genes=pl.from_pandas(gene_tbl),
        chunks=[(np.arange(N_GENES), Y.T.astype(np.float32))],
        counts={"kept": N_GENES},
        hist_before=np.zeros(3),
        hist_after=np.zeros(3),
        params=ExpressionParams(),
    )
    samples = pd.DataFrame(
        {
            "aliquot_id": aliquots,
            "tissue_sample_id": meta["tissue_sample_id"],
            "subject_id": meta["subject_id"],
            "tissue": meta["tissue"],
            "sample_index": np.arange(n, dtype=np.int64),
        }
    )
    write_outputs(res, pl.from_pandas(samples), root)
    (mirror / "truth").mkdir(parents=True)
    pd.DataFrame({"gene_id": LINKED, "symbol": [f"GENE{i}" for i in range(6)]}).to_csv(
        mirror / "truth" / "image_linked_genes.csv", index=False
    )


@pytest.fixture
def analysis_root(tmp_path):
    root, mirror = tmp_path / "data", tmp_path / "mirror"
    _write_inputs(root, mirror)
    return root, mirror


def _meta(result, node: str, key: str | None = None):
    """Metadata of one asset key of a node (default: the key named like the node)."""
    key = key or node
    (m,) = [m for m in result.asset_materializations_for_node(node)
            if m.asset_key.to_user_string() == key]  # fmt: skip
    return {k: getattr(v, "value", v) for k, v in m.metadata.items()}


def test_analysis_assets_end_to_end(analysis_root):
    root, mirror = analysis_root
    result = dg.materialize(
        [joint_pca, embedding_views, gene_r2, cluster_transcriptome, feature_comparison],
        resources={
            "lake": DataLakeResource(root=str(root)),
            "gtex_source": GTExSourceResource(source=str(mirror)),
        },
        instance=dg.DagsterInstance.ephemeral(),
        run_config={
            "ops": {
                "joint_pca": {"config": {"n_components": 10}},
                "embedding_views": {
                    "config": {"methods": ["tsne"], "n_components": 10, "max_iter": 250}
                },
                "gene_r2": {"config": {"n_splits": 5, "inner_splits": 4}},
                "cluster_transcriptome": {"config": {"n_clusters": 6, "n_components": 10}},
                "feature_comparison": {"config": {"n_repeats": 3}},
            }
        },
    )
    assert result.success
    lk = Lake.at(root)
    tables = lk.tables

    # embedding_views: coords for every view, silhouettes sharpen with fine-tuning
    coords = pd.read_parquet(tables / "projection_coords.parquet")
    assert set(coords["view"]) == {"slides", "tiles", "expression", "joint"}
    assert set(coords["method"]) == {"pca", "tsne"}
    assert list(coords.columns) == ["view", "model_id", "sample_id", "tissue", "method", "x", "y"]
    slides = coords[(coords["view"] == "slides") & (coords["method"] == "tsne")]
    assert slides.groupby("model_id").size().to_dict() == {OTS: 42, E1: 42, E5: 42}
    assert (coords[(coords["view"] == "tiles") & (coords["method"] == "pca")].shape[0]) == 2 * 126
    sil = pd.read_parquet(tables / "projection_silhouettes.parquet")
    assert {"view", "model_id", "epoch", "space", "silhouette"} <= set(sil.columns)
    pca = sil[(sil["view"] == "slides") & (sil["space"] == "pca")].set_index("model_id")
    assert pca.loc[E5, "silhouette"] > pca.loc[E1, "silhouette"] > pca.loc[OTS, "silhouette"]
    assert pca.loc[E5, "epoch"] == 5 and pd.isna(pca.loc[OTS, "epoch"])
    # joint_pca: both blocks' 10 PCs for every paired slide; the joint view is drawn from it
    jp = pd.read_parquet(tables / "joint_pca.parquet")
    assert jp.groupby("block").size().to_dict() == {"expression": 420, "image": 420}
    assert set(jp["model_id"]) == {E5} and jp["component"].max() == 10
    img = jp[jp["block"] == "image"].pivot(
        index="tissue_sample_id", columns="component", values="score"
    )
    np.testing.assert_allclose(img.mean(0), 0, atol=1e-9)  # PCA scores are centred
    assert (np.diff(img.var(0).to_numpy()) <= 1e-9).all()  # in order of explained variance
    mj = _meta(result, "joint_pca")
    assert mj["silhouette_joint"] > mj["silhouette_expression_only"] - 0.5
    assert mj["dagster/table_name"] == "gtex.main.joint_pca"
    mv = _meta(result, "embedding_views")
    assert mv["silhouette_selected"] > mv["silhouette_off_the_shelf"]
    assert E5 in mv["selected_model_id"]
    assert np.isfinite(mv["silhouette_joint"]) and np.isfinite(mv["silhouette_image_only"])
    assert (lk.plot("analysis/silhouette_trend.png")).is_file()
    assert (lk.plot(f"analysis/view_slides_{E5}.png")).is_file()

    # gene_r2: the planted genes are the top 6 (within tissue, tissue means removed)
    g = pd.read_parquet(tables / "gene_r2.parquet")
    views = [f"{m}_{v}{s}" for v in ("across", "within")
             for m, s in (("r2", ""), ("r2", "_ci_low"), ("r2", "_ci_high"), ("pearson_r", ""),
                          ("r2", "_baseline"), ("rank", ""))]  # fmt: skip
    views.insert(6, "r2_across_tissue_only")
    assert list(g.columns) == [
        "gene", "symbol", "r2", "pearson_r", "alpha", "rank", "r2_baseline", "model_id",
        *views, "n_slides", "n_donors",
    ]  # fmt: skip
    # the ranking columns are the within view; both views rest on all 42 slides / 14 donors
    np.testing.assert_array_equal(g["r2"], g["r2_within"])
    assert (g["n_slides"] == 42).all() and (g["n_donors"] == N_DONORS).all()
    # across tissues the markers lead (the image shows the tissue); within, the planted genes
    across = g.sort_values("rank_across")
    assert set(across["gene"].head(6)) == set(MARKERS)
    assert (g.set_index("gene").loc[MARKERS, "r2_across_tissue_only"] > 0.8).all()
    within = g.sort_values("rank_within")
    assert set(within["gene"].head(6)) == set(LINKED)
    assert (g.set_index("gene").loc[MARKERS, "r2_within"] < 0.2).all()
    # intervals bracket the planted genes' and markers' estimates; the planted genes' lower
    # ends clear the no-image baseline
    strong = g.set_index("gene").loc[LINKED + MARKERS]
    for v in ("across", "within"):
        assert (strong[f"r2_{v}_ci_low"] <= strong[f"r2_{v}"]).all()
        assert (strong[f"r2_{v}"] <= strong[f"r2_{v}_ci_high"]).all()
    lk_ = g.set_index("gene").loc[LINKED]
    assert (lk_["r2_within_ci_low"] > lk_["r2_within_baseline"]).all()
    # model: best -- every model on the same folds; the fine-tuned E5 predicts best
    assert (g["model_id"] == E5).all()
    gm = pd.read_parquet(tables / "gene_r2_models.parquet").set_index("model_id")
    assert set(gm.index) == {OTS, E1, E5} and gm["reported"].sum() == 1 and gm.loc[E5, "reported"]
    assert gm.loc[E5, "sum_positive_r2"] == gm["sum_positive_r2"].max()
    assert gm.loc[E5, "planted_recall_at_k"] == 1.0 > gm.loc[OTS, "planted_recall_at_k"]
    assert len(pd.read_parquet(tables / "gene_r2_by_model.parquet")) == 3 * N_GENES
    # the no-image baseline: below 0 (means estimated from other donors); the linked genes
    # far above it, the unlinked ones not
    assert (g["r2_baseline"] < 0).all() and g["r2_baseline"].mean() > -0.4
    linked = g[g["gene"].isin(LINKED)]
    assert (linked["r2"] > linked["r2_baseline"] + 0.4).all()
    unlinked = g[~g["gene"].isin(LINKED)]
    assert (unlinked["r2"] < unlinked["r2_baseline"] + 0.2).all()
    assert len(g) == N_GENES and g["rank"].tolist() == list(range(1, N_GENES + 1))
    assert set(g["gene"].head(6)) == set(LINKED)
    assert g["r2"].head(6).min() > 0.4 and g["r2"].iloc[6:].max() < 0.2
    mg = _meta(result, "gene_r2")
    assert mg["planted_recall_at_k"] == 1.0
    assert mg["mean_r2_non_linked"] < 0.05
    assert mg["n_splits"] == 5 and mg["donors"] == N_DONORS and mg["tissue_strata"] is True
    assert mg["planted_recall_at_k_within"] == 1.0 and mg["planted_recall_at_k_across"] < 1.0
    assert "r2_across" in mg["definitions"] and "donor-bootstrap" in mg["definitions"]
    assert "Σ(y - ȳ_tissue)²" in mg["definitions"]
    assert set(result.asset_materializations_for_node("gene_r2")[i].asset_key.to_user_string()
               for i in range(4)) == {"gene_r2", "gene_r2_by_model", "gene_r2_models",
                                      "gene_r2_folds"}  # fmt: skip
    schema = mg["dagster/column_schema"]
    desc = {c.name: c.description for c in schema.columns}
    assert "tissue fixed effects" in desc["r2_within"] and "overall mean" in desc["r2_across"]

    # cluster_transcriptome: per-gene R² of both methods, same genes
    c = pd.read_parquet(tables / "cluster_transcriptome_r2.parquet")
    assert len(c) == N_GENES and {"r2_ridge", "r2_cluster", "delta_r2"} <= set(c.columns)
    assert c.set_index("gene").loc[LINKED, "r2_ridge"].min() > 0.4
    mc = _meta(result, "cluster_transcriptome", "cluster_transcriptome_r2")
    assert np.isfinite(mc["median_r2_cluster"]) and np.isfinite(mc["median_r2_ridge"])

    # feature_comparison: p-values per gene, fine-tuned better on the planted genes
    fg = pd.read_parquet(tables / "feature_comparison_genes.parquet")
    fa = pd.read_parquet(tables / "feature_comparison_accuracy.parquet")
    assert len(fg) == N_GENES and len(fa) == 3
    assert {"p_wilcoxon", "p_corrected", "q_corrected", "significant", "improved"} <= set(
        fg.columns
    )
    assert fg["p_corrected"].notna().all()
    linked = fg.set_index("gene").loc[LINKED]
    assert (linked["r2_b_mean"] > linked["r2_a_mean"]).all()
    assert fa["accuracy_b"].mean() >= fa["accuracy_a"].mean()
    mf = _meta(result, "feature_comparison")
    assert mf["fine_tuned"] == E5 and mf["off_the_shelf"] == OTS
    assert E5 in mf["summary"] and "Wilcoxon" in mf["summary"]


def _keep_slides(root, keep) -> pd.DataFrame:
    """Rewrite slide_embeddings with the rows for which ``keep(table)`` is True."""
    lk = Lake.at(root)
    tbl = pq.read_table(lk.table("slide_embeddings")).to_pandas()
    small = tbl[keep(tbl)].reset_index(drop=True)
    vec = np.vstack(small[V.VECTOR].to_numpy())
    write_parquet(
        V.table_from_frame(small.drop(columns=[V.VECTOR]), vec, V.slide_schema(DIM)),
        lk.table("slide_embeddings"),
    )
    return small


def _run_gene_r2(root, mirror, config: dict | None = None):
    result = dg.materialize(
        [gene_r2],
        resources={
            "lake": DataLakeResource(root=str(root)),
            "gtex_source": GTExSourceResource(source=str(mirror)),
        },
        instance=dg.DagsterInstance.ephemeral(),
        run_config={"ops": {"gene_r2": {"config": config or {}}}},
    )
    assert result.success
    return _meta(result, "gene_r2")


def test_gene_r2_lowers_folds_for_few_donors(analysis_root):
    root, mirror = analysis_root
    # keep 4 donors only: 4 outer folds, 3 training donors → 3 inner folds
    _keep_slides(root, lambda t: t["subject_id"].isin(sorted(t["subject_id"].unique())[:4]))
    m = _run_gene_r2(root, mirror)
    assert m["n_splits"] == 4 and m["inner_splits"] == 3 and m["folds_lowered"] is True
    assert m["samples"] == 12


def test_gene_r2_selected_model_and_tissues_with_too_few_donors(analysis_root):
    root, mirror = analysis_root
    # one tissue keeps 2 donors: it cannot have a training donor in every split -> left out
    rare = TISSUES[0]

    def keep(t: pd.DataFrame) -> pd.Series:
        two = sorted(t["subject_id"].unique())[:2]
        return ~((t["tissue"] == rare) & ~t["subject_id"].isin(two))

    small = _keep_slides(root, keep)
    m = _run_gene_r2(root, mirror, {"model": "selected"})
    assert m["tissues_left_out"] == rare
    assert m["samples"] == len(small[small["model_id"] == E5]) - 2
    assert "selected checkpoint" in m["model_id"]
    tables = Lake.at(root).root / "tables"
    assert set(pd.read_parquet(tables / "gene_r2_by_model.parquet")["model_id"]) == {E5}
    folds = pd.read_parquet(tables / "gene_r2_folds.parquet")
    assert rare not in set(folds["tissue"]) and (folds["model_id"] == E5).all()


def test_gene_r2_non_linear_kernel(analysis_root):
    root, mirror = analysis_root
    m = _run_gene_r2(root, mirror, {"model": "selected", "kernel": "rbf"})
    assert m["kernel"] == "rbf" and m["planted_recall_at_k"] >= 0.8
    g = pd.read_parquet(Lake.at(root).root / "tables" / "gene_r2.parquet")
    assert g.set_index("gene").loc[LINKED, "r2"].min() > 0.2


CLUSTER_RUN = {
    "ops": {
        "gene_r2": {"config": {"alphas": [1.0, 100.0]}},
        "cluster_transcriptome": {"config": {"n_clusters": 6, "n_components": 10}},
    }
}


def materialize_clusters(root, mirror, assets=None, run_config=None):
    """gene_r2 + cluster_transcriptome on the planted inputs (also used by test_nearest_*)."""
    assets = assets or [gene_r2, cluster_transcriptome]
    names = {a.node_def.name for a in assets}  # op names (gene_r2 is a multi_asset)
    ops = (run_config or CLUSTER_RUN)["ops"]
    return dg.materialize(
        assets,
        resources={
            "lake": DataLakeResource(root=str(root)),
            "gtex_source": GTExSourceResource(source=str(mirror)),
        },
        instance=dg.DagsterInstance.ephemeral(),
        run_config={"ops": {k: v for k, v in ops.items() if k in names}},
    )


def test_cluster_transcriptome_serves_lancedb_centroids_idempotently(analysis_root):
    from gtex_assets.lib.analysis import cluster_transcriptome as CP
    from gtex_assets.lib.expression.log_tpm import load_log_tpm

    root, mirror = analysis_root
    result = materialize_clusters(root, mirror)
    assert result.success
    lk = Lake.at(root)
    m = _meta(result, "cluster_transcriptome")
    ev = _meta(result, "cluster_transcriptome", "cluster_transcriptome_r2")
    # the held-out evaluation went through LanceDB and agrees with exact search
    assert "LanceDB" in ev["nearest_lookup"]
    assert ev["held_out_assignments"] == 42 and ev["assignments_agree_exact"] == 42
    cm = _meta(result, "cluster_transcriptome", "cluster_centroids")
    assert m["model_id"] == E5 and cm["centroid_rows_model"] == 6 and cm["fit_id"] == m["fit_id"]

    tx = pd.read_parquet(lk.table("cluster_transcriptomes"))
    assert list(tx.columns) == ["model_id", "fit_id", "cluster", "n_slides", "majority_tissue",
                                "gene_id", "symbol", "log_tpm"]  # fmt: skip
    assert len(tx) == 6 * N_GENES and set(tx["model_id"]) == {E5}
    assert set(tx["fit_id"]) == {m["fit_id"]}
    members = pd.read_parquet(lk.table("cluster_members"))
    assert len(members) == 42 and members["cluster"].nunique() == 6
    sizes = members.groupby("cluster").size()
    per = tx.drop_duplicates("cluster").set_index("cluster")
    assert per["n_slides"].to_dict() == sizes.to_dict()
    # each cluster's transcriptome is the mean expression of its member slides
    X, genes, samples = load_log_tpm(root)
    row = samples.set_index("tissue_sample_id")["sample_index"]
    for c, ids in members.groupby("cluster")["tissue_sample_id"]:
        want = np.asarray(X[row.loc[ids].to_numpy()], dtype=np.float64).mean(0)
        got = tx[tx["cluster"] == c].set_index("gene_id").loc[genes["gene_id"], "log_tpm"]
        np.testing.assert_allclose(got.to_numpy(), want, rtol=1e-5)
        tissues = members[members["cluster"] == c]["tissue"].value_counts()
        assert per.loc[c, "majority_tissue"] in set(tissues[tissues == tissues.max()].index)
    proj = CP.load_projection(CP.projection_path(lk.models, E5))
    assert proj.card["fit_id"] == m["fit_id"] and proj.components.shape == (10, DIM)

    store = V.VectorStore(lk.lancedb)
    assert CP.centroid_models(store) == {E5: m["fit_id"]}
    before = store.read(CP.CENTROID_TABLE).to_pandas()
    assert len(before) == 6 and set(before["fold"]) == {CP.SERVED_FOLD}
    # a re-run replaces, never duplicates: same rows in LanceDB and in the tables
    again = materialize_clusters(root, mirror, [cluster_transcriptome])
    assert again.success
    assert _meta(again, "cluster_transcriptome")["fit_id"] == m["fit_id"]
    after = store.read(CP.CENTROID_TABLE).to_pandas()
    assert len(after) == 6 and sorted(after["row_id"]) == sorted(before["row_id"])
    assert len(pd.read_parquet(lk.table("cluster_transcriptomes"))) == 6 * N_GENES
    assert len(pd.read_parquet(lk.table("cluster_members"))) == 42
    # another clustering of the same model: its rows replace the old ones
    fewer = {"ops": {"cluster_transcriptome": {"config": {"n_clusters": 4, "n_components": 10}}}}
    assert materialize_clusters(root, mirror, [cluster_transcriptome], fewer).success
    assert store.count(CP.CENTROID_TABLE) == 4
    assert len(pd.read_parquet(lk.table("cluster_transcriptomes"))) == 4 * N_GENES


def _add_arm(root, model_id: str, rng_seed: int = 5) -> None:
    """A further off-the-shelf arm (a pathology encoder, say) whose slide embeddings carry the
    morphology factors: the E5 vectors plus noise."""
    lk = Lake.at(root)
    se = pd.read_parquet(lk.table("slide_embeddings"))
    base = se[se["model_id"] == E5].copy()
    rng = np.random.default_rng(rng_seed)
    vec = np.stack(base["vector"].to_numpy()) + 0.3 * rng.standard_normal((len(base), DIM))
    base["model_id"] = model_id
    base["row_id"] = model_id + "|" + base["tissue_sample_id"]
    meta = pd.concat(
        [se.drop(columns=["vector"]), base.drop(columns=["vector"])], ignore_index=True
    )
    vecs = np.vstack([np.stack(se["vector"].to_numpy()), vec])
    write_parquet(V.table_from_frame(meta, vecs, V.slide_schema(DIM)), lk.table("slide_embeddings"))
    models = pd.read_parquet(lk.table("embedding_models"))
    extra = models[models["model_id"] == OTS].assign(
        model_id=model_id, weights="hf-hub:x/pathology"
    )
    write_parquet(pd.concat([models, extra], ignore_index=True), lk.table("embedding_models"))


def test_feature_comparison_with_three_arms(analysis_root):
    """ImageNet off-the-shelf, a pathology encoder and the fine-tuned checkpoint: every pair
    compared on the same folds, each row naming its pair; both morphology-aware arms beat the
    ImageNet arm on the planted genes."""
    root, _ = analysis_root
    _add_arm(root, "path-encoder")
    result = dg.materialize(
        [feature_comparison],
        resources={"lake": DataLakeResource(root=str(root))},
        instance=dg.DagsterInstance.ephemeral(),
        run_config={"ops": {"feature_comparison": {"config": {"n_repeats": 2}}}},
    )
    assert result.success
    fg = pd.read_parquet(Lake.at(root).table("feature_comparison_genes"))
    pairs = sorted(set(zip(fg["model_a"], fg["model_b"], strict=True)))
    assert pairs == sorted([(OTS, "path-encoder"), (OTS, E5), ("path-encoder", E5)])
    assert (fg.groupby(["model_a", "model_b"]).size() == N_GENES).all()
    for b in ("path-encoder", E5):
        linked = fg[(fg["model_a"] == OTS) & (fg["model_b"] == b)].set_index("gene").loc[LINKED]
        assert (linked["r2_b_mean"] > linked["r2_a_mean"]).all()
    md = _meta(result, "feature_comparison")
    assert md["pairs"] == 3 and md["fine_tuned"] == E5
