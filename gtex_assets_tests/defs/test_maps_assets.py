"""A timm encoder end to end: tile_embeddings (EfficientNet-Lite0 + a small timm ViT built offline
and saved as a local weights file) → slide_embeddings (mixed widths) → tile_gene_predictions
for the ViT arm, each a real Dagster materialisation; then `gtex-assets nearest --slide FILE
--map GENE` on a slide file.

The gene_r2 table is written directly (gene, symbol, r2, alpha, model_id: the asset's output
contract) so this test does not depend on gene_r2's fold rules on a 9-slide mirror; gene_r2
itself is tested in test_analysis_assets.
"""

from __future__ import annotations

import dagster as dg
import numpy as np
import pandas as pd
import polars as pl
import pytest
import torch
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)
from PIL import Image

from gtex_assets.core.atomic import write_parquet
from gtex_assets.core.lake import Lake
from gtex_assets.defs.analysis.maps import tile_gene_predictions
from gtex_assets.defs.embeddings.assets import (
    embeddings_store_matches_parquet,
    slide_embeddings,
    tile_embeddings,
)
from gtex_assets.lib.analysis import maps as MP
from gtex_assets.lib.embeddings import vector_store as V
from gtex_assets.lib.expression.log_tpm import ExpressionParams, ExpressionResult, write_outputs
from gtex_assets.lib.model import backbones as M
from gtex_assets.resources import DataLakeResource
from gtex_assets_tests.defs.test_embeddings_assets import _tile_mirror

LITE0 = "efficientnet_lite0-imagenet"
N_GENES = 5


def _tiny_vit(path) -> str:
    import timm

    import gtex_assets.core.torchvision_compat  # noqa: F401  (timm imports torchvision)

    torch.manual_seed(5)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=3)
    torch.save(m.state_dict(), path)
    return f"vit_tiny_patch16_224?img_size=64@{path}"


def _expression(root, sample: pd.DataFrame) -> pd.DataFrame:
    """log TPM of N_GENES genes for the mirror's slides (tissue means + noise)."""
    slides = sample.drop_duplicates("tissue_sample_id").reset_index(drop=True)
    rng = np.random.default_rng(0)
    t_idx = pd.factorize(slides["tissue"])[0]
    Y = rng.uniform(3, 8, (3, N_GENES))[t_idx] + rng.standard_normal((len(slides), N_GENES))
    genes = pd.DataFrame({"gene_id": [f"ENSG{i:011d}.1" for i in range(N_GENES)],
                          "symbol": [f"GENE{i}" for i in range(N_GENES)], "kept": True,
                          "matrix_index": pd.array(range(N_GENES), dtype="Int64")})  # fmt: skip
    aliquots = (slides["tissue_sample_id"] + "-SM-A1").tolist()
    res = ExpressionResult(source=root / "fake.gct.gz", sample_ids=aliquots,
                           genes=pl.from_pandas(genes),
                           chunks=[(np.arange(N_GENES), Y.T.astype(np.float32))],
                           counts={"kept": N_GENES}, hist_before=np.zeros(3),
                           hist_after=np.zeros(3), params=ExpressionParams())  # fmt: skip
    samples = pd.DataFrame({"aliquot_id": aliquots, "tissue_sample_id": slides["tissue_sample_id"],
                            "subject_id": slides["subject_id"], "tissue": slides["tissue"],
                            "sample_index": np.arange(len(slides), dtype=np.int64)})  # fmt: skip
    write_outputs(res, pl.from_pandas(samples), root)
    return genes


@pytest.fixture(scope="module")
def timm_lake(tiny_mirror, tmp_path_factory):
    root = tmp_path_factory.mktemp("timm_root")
    lk = Lake.at(root)
    sample = _tile_mirror(tiny_mirror, lk)
    encoder = _tiny_vit(root / "tiny_vit.pth")
    ids = sorted(sample["tissue_sample_id"].unique())
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("slides", ids)
    resources = {"lake": DataLakeResource(root=str(root))}
    cfg = {"checkpoints": "none", "backbone": "efficientnet_lite0",
           "off_the_shelf_weights": "package", "encoders": [encoder], "decode_workers": 1}  # fmt: skip
    r1 = dg.materialize(
        [tile_embeddings], resources=resources, instance=instance,
        tags={ASSET_PARTITION_RANGE_START_TAG: ids[0], ASSET_PARTITION_RANGE_END_TAG: ids[-1]},
        run_config={"ops": {"tile_embeddings": {"config": cfg}}},
    )  # fmt: skip
    r2 = dg.materialize(
        [slide_embeddings, embeddings_store_matches_parquet], resources=resources, instance=instance
    )
    assert r1.success and r2.success
    vit_id = M.build_encoder(encoder).model_id
    genes = _expression(root, sample)
    write_parquet(pd.DataFrame({"gene": genes["gene_id"], "symbol": genes["symbol"],
                                "r2": np.linspace(0.4, 0.0, N_GENES), "alpha": 10.0,
                                "rank": np.arange(1, N_GENES + 1), "model_id": vit_id}),
                  lk.table("gene_r2"))  # fmt: skip
    r3 = dg.materialize(
        [tile_gene_predictions], resources=resources, instance=instance,
        run_config={"ops": {"tile_gene_predictions": {"config": {"top_n": 3, "plot_genes": 1,
                                                               "slides_per_tissue": 1}}}},
    )  # fmt: skip
    return {"root": root, "lake": lk, "sample": sample, "ids": ids, "vit": vit_id,
            "encoder": encoder, "mirror": tiny_mirror, "maps": r3, "slides": r2}  # fmt: skip


def test_timm_arm_rows_padded_to_the_common_width_and_exact(timm_lake):
    lk, vit = timm_lake["lake"], timm_lake["vit"]
    sid = timm_lake["ids"][0]
    t = pd.read_parquet(lk.partition_table("tile_embeddings", sid))
    assert set(t["model_id"]) == {LITE0, vit}
    vec = np.stack(t["vector"].to_numpy())
    assert vec.shape[1] == 1280  # the widest model's width
    mine = vec[(t["model_id"] == vit).to_numpy()]
    assert np.all(mine[:, 192:] == 0) and np.abs(mine[:, :192]).sum() > 0
    # the stored features are the encoder's own (timm ViT at 64 px, its 0.5/0.5 normalisation)
    enc = M.build_encoder(timm_lake["encoder"])
    rows = t[t["model_id"] == vit].head(2)
    imgs = [Image.open(p).convert("RGB").resize((64, 64), Image.Resampling.BILINEAR)
            for p in rows["path"]]  # fmt: skip
    x = torch.from_numpy(np.stack([np.asarray(i) for i in imgs])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        want = enc.model.forward_head(enc.model.forward_features((x - 0.5) / 0.5), pre_logits=True)
    np.testing.assert_allclose(mine[:2, :192], want.numpy(), rtol=1e-3, atol=1e-4)
    models = pd.read_parquet(lk.table("embedding_models")).set_index("model_id")
    assert models.loc[vit, "feature_dim"] == 192 and models.loc[LITE0, "feature_dim"] == 1280
    assert models.loc[vit, "input_size"] == 64 and "0.5" in models.loc[vit, "normalization"]
    assert models.loc[vit, "kind"] == "off_the_shelf"
    # LanceDB holds exactly the Parquet rows, at the common width
    evals = timm_lake["slides"].get_asset_check_evaluations()
    assert len(evals) == 1 and evals[0].passed
    assert V.VectorStore(lk.lancedb).width(V.TILE_TABLE) == 1280


def test_tile_gene_predictions_average_to_the_slide_and_show_maps(timm_lake):
    lk, vit = timm_lake["lake"], timm_lake["vit"]
    preds = pl.read_parquet(lk.table("tile_gene_predictions"))
    assert set(preds["model_id"]) == {vit}
    assert set(preds["gene"]) == {f"ENSG{i:011d}.1" for i in range(3)}  # top 3 by R²
    n_tiles = len(timm_lake["sample"])
    assert len(preds) == 3 * n_tiles
    model = MP.load_map_model(MP.map_model_path(lk.models, vit))
    slides = pd.read_parquet(lk.table("slide_embeddings"))
    slides = slides[slides["model_id"] == vit]
    for _, s in slides.iterrows():
        want = model.predict(np.asarray(s["vector"])[None, :], s["tissue"])[0]
        got = (
            preds.filter((pl.col("tissue_sample_id") == s["tissue_sample_id"]) & pl.col("sampled"))
            .group_by("gene").agg(pl.col("predicted_log_tpm").mean()).sort("gene")
        )  # fmt: skip
        np.testing.assert_allclose(got["predicted_log_tpm"].to_numpy(), want, rtol=1e-4)
    md = timm_lake["maps"].asset_materializations_for_node("tile_gene_predictions")[0].metadata
    maps = [k for k in md if k.startswith("map_")]
    assert len(maps) == 3  # one example slide per tissue, one gene each
    assert "data:image/png;base64," in md[maps[0]].value
    assert md["dagster/row_count"].value == len(preds)


def test_cli_map_for_a_new_slide(timm_lake, tmp_path, capsys):
    from gtex_assets.cli.main import main

    lk, sid = timm_lake["lake"], timm_lake["ids"][0]
    tissue = timm_lake["sample"].set_index("tissue_sample_id").loc[sid, "tissue"].iloc[0]
    slide = timm_lake["mirror"] / "slides" / f"{sid}.svs"
    out = tmp_path / "map.png"
    rc = main(["nearest", "--slide", str(slide), "--map", "GENE0", "--out", str(out),
               "--tissue", tissue, "--data-root", str(timm_lake["root"]), "--json"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    import json

    q = json.loads(capsys.readouterr().out)
    assert q["gene"] == "ENSG00000000000.1" and q["model_id"] == timm_lake["vit"]
    assert q["tissue"] == tissue and q["n_tiles"] == len(q["tiles"]) > 0
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape[1] > 400 and img.std() > 10
    # the new slide's tiles (re-tiled from the file, embedded now) get the predictions that
    # the asset stored for the same tiles; the slide's value is the mean of its tiles'
    stored = pl.read_parquet(lk.table("tile_gene_predictions")).filter(
        (pl.col("tissue_sample_id") == sid) & (pl.col("gene") == q["gene"])
    )
    new = pl.DataFrame(q["tiles"]).with_columns(pl.col("x", "y").cast(pl.Int32))
    both = new.join(stored.select("x", "y", pl.col("predicted_log_tpm").alias("stored")),
                    on=["x", "y"])  # fmt: skip
    assert len(both) >= 1
    np.testing.assert_allclose(both["predicted_log_tpm"], both["stored"], rtol=1e-3, atol=1e-3)
    assert abs(q["slide_prediction"] - float(new["predicted_log_tpm"].mean())) < 1e-4
    # errors name what to do
    rc = main(["nearest", "--slide", str(slide), "--map", "NOPE", "--out", str(out),
               "--data-root", str(timm_lake["root"])])  # fmt: skip
    assert rc == 2 and "mapped genes: GENE0" in capsys.readouterr().err
    rc = main(["nearest", "--slide", str(slide), "--map", "GENE0", "--data-root", "x"])
    assert rc == 2 and "--map needs --out FILE.png" in capsys.readouterr().err
