"""tile_embeddings + slide_embeddings materialised on the generated mirror (3 tissues x 3 slides).

The fixture tiles the mirror's slides with the project's tiler, writes a balanced sample and a
classifier checkpoint table (a perturbed EfficientNet-Lite0 "checkpoint" + the off-the-shelf
Lite0 with its offline ImageNet weights), then materialises both assets in one Dagster run each.
`gtex_assets_tests/lib/test_nearest.py` reuses the same populated data root.
"""

from __future__ import annotations

import glob
import time
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from gtex_assets.core.atomic import write_parquet
from gtex_assets.core.lake import Lake
from gtex_assets.defs.embeddings.assets import (
    embeddings_store_matches_parquet,
    slide_embeddings,
    tile_embeddings,
)
from gtex_assets.lib.catalog.views import build_catalog
from gtex_assets.lib.embeddings import vector_store as V
from gtex_assets.lib.model import backbones as M
from gtex_assets.resources import DataLakeResource, GTExSourceResource

CKPT_MODEL_ID = "efficientnet_lite0-ft-e001-testrun"
OTS_MODEL_ID = "efficientnet_lite0-imagenet"


def _tile_mirror(mirror: Path, lk: Lake) -> pd.DataFrame:
    """Tile every mirror slide with the project's tiler; the 'balanced sample' is every tile."""
    from gtex_assets.lib.tiles.tiling import SlideJob, TilingParams, tile_slides

    ann = pd.read_csv(mirror / "GTEx Portal.csv")
    jobs = [
        SlideJob(
            sample_id=r["Tissue Sample ID"],
            tissue=r["Tissue"],
            slide_path=str(mirror / "slides" / f"{r['Tissue Sample ID']}.svs"),
            tiles_dir=lk.slide_tiles(r["Tissue Sample ID"]),
            index_path=lk.partition_table("slide_tiles", r["Tissue Sample ID"]),
            status_path=lk.partition_table("tiling_status", r["Tissue Sample ID"]),
        )
        for _, r in ann.iterrows()
    ]
    parts = [out.index for _job, out in tile_slides(jobs, TilingParams(), workers=1)]
    tiles = pd.concat(parts, ignore_index=True)
    tiles = tiles[tiles["status"] == "ok"].copy()
    subject = dict(zip(ann["Tissue Sample ID"], ann["Subject ID"], strict=True))
    tiles["subject_id"] = tiles["tissue_sample_id"].map(subject)
    donors = sorted(tiles["subject_id"].unique())
    tiles["split"] = tiles["subject_id"].map(
        {d: ("test" if i % 3 == 2 else "train") for i, d in enumerate(donors)}
    )
    tiles["tile_id"] = (
        tiles["tissue_sample_id"] + "_" + tiles["x"].astype(str) + "_" + tiles["y"].astype(str)
    )
    cols = ["tile_id", "tissue_sample_id", "subject_id", "tissue", "x", "y", "level",
            "tile_size", "path", "split"]  # fmt: skip
    sample = tiles[cols].sort_values(["tissue", "tissue_sample_id", "y", "x"])
    write_parquet(sample.reset_index(drop=True), lk.table("balanced_tile_sample"))
    return sample


def _fake_checkpoint(lk: Lake, tissues: list[str]) -> Path:
    """A 'fine-tuned' checkpoint: Lite0 ImageNet weights, slightly perturbed, 3-class head."""
    torch.manual_seed(1)
    model = M.build_model("efficientnet_lite0", len(tissues), weights="package")
    with torch.no_grad():
        model.body._conv_head.weight.mul_(
            1.0 + 0.05 * torch.randn_like(model.body._conv_head.weight)
        )
    path = lk.models / "tissue_classifier" / "testrun" / "epoch_001.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    card = {"model_id": CKPT_MODEL_ID, "run_id": "testrun", "epoch": 1, "classes": tissues,
            "input_size": 224}  # fmt: skip
    M.save_checkpoint(model, card, path)
    write_parquet(
        pd.DataFrame(
            [
                {
                    "run_id": "testrun",
                    "model_id": CKPT_MODEL_ID,
                    "backbone": "efficientnet_lite0",
                    "epoch": 1,
                    "path": str(path),
                    "card_path": str(path.with_suffix(".json")),
                    "selected": True,
                    "test_acc": 0.5,
                    "slide_test_acc": 0.5,
                }
            ]
        ),  # fmt: skip
        lk.table("classifier_checkpoints"),
    )
    return path


def materialize_embeddings(root: Path, mirror: Path, instance: dg.DagsterInstance, ids: list[str]):
    resources = {
        "lake": DataLakeResource(root=str(root)),
        "gtex_source": GTExSourceResource(source=str(mirror)),
    }
    tags = {ASSET_PARTITION_RANGE_START_TAG: ids[0], ASSET_PARTITION_RANGE_END_TAG: ids[-1]}
    r1 = dg.materialize(
        [tile_embeddings], resources=resources, instance=instance, tags=tags,
        run_config={"ops": {"tile_embeddings": {"config": {"decode_workers": 1}}}},
    )  # fmt: skip
    r2 = dg.materialize(
        [slide_embeddings, embeddings_store_matches_parquet], resources=resources, instance=instance
    )
    return r1, r2


def _check_passed(result: dg.ExecuteInProcessResult) -> bool:
    evals = result.get_asset_check_evaluations()
    return len(evals) == 1 and evals[0].passed


def _meta(result: dg.ExecuteInProcessResult, key: str) -> dict:
    mats = [
        e.materialization
        for e in result.get_asset_materialization_events()
        if e.materialization.asset_key.to_user_string() == key
    ]
    return {k: v.value for k, v in mats[-1].metadata.items()}


def _slides_meta(result: dg.ExecuteInProcessResult) -> dict[str, dict]:
    """tile_embeddings: each partition's own metadata (status, tiles computed ...)."""
    mats = result.asset_materializations_for_node("tile_embeddings")
    return {m.partition: {k: v.value for k, v in m.metadata.items()} for m in mats}


def _count(result: dg.ExecuteInProcessResult, status: str) -> int:
    return sum(m["status"] == status for m in _slides_meta(result).values())


def _computed(result: dg.ExecuteInProcessResult) -> int:
    return sum(m["tile_embeddings_computed"] for m in _slides_meta(result).values())


@pytest.fixture(scope="session")
def embedded_lake(tiny_mirror, tmp_path_factory):
    """A data root with tile + slide embeddings of the tiny mirror (2 models)."""
    root = tmp_path_factory.mktemp("embedded_root")
    lk = Lake.at(root)
    sample = _tile_mirror(tiny_mirror, lk)
    _fake_checkpoint(lk, sorted(sample["tissue"].unique()))
    ids = sorted(sample["tissue_sample_id"].unique())
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("slides", ids)
    t0 = time.perf_counter()
    r1, r2 = materialize_embeddings(root, tiny_mirror, instance, ids)
    return {
        "root": root,
        "lake": lk,
        "mirror": tiny_mirror,
        "sample": sample,
        "ids": ids,
        "instance": instance,
        "first": (r1, r2),
        "seconds": time.perf_counter() - t0,
    }


def test_tile_embeddings_rows_shapes_and_model_ids(embedded_lake):
    lk, sample = embedded_lake["lake"], embedded_lake["sample"]
    files = sorted(glob.glob(str(lk.partition_dir("tile_embeddings") / "*.parquet")))
    assert [Path(f).stem for f in files] == embedded_lake["ids"]
    tiles = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    assert set(tiles["model_id"]) == {CKPT_MODEL_ID, OTS_MODEL_ID}
    assert len(tiles) == 2 * len(sample)
    for _mid, g in tiles.groupby("model_id"):
        assert sorted(g["tile_id"]) == sorted(sample["tile_id"])
    vec = np.stack(tiles["vector"].to_numpy())
    assert vec.shape == (len(tiles), 1280) and np.isfinite(vec).all()
    assert tiles["sampled"].all() and set(tiles["precision"]) <= {"fp32", "bf16"}
    # The two models give different embeddings for the same tile.
    a = tiles[tiles["model_id"] == CKPT_MODEL_ID].sort_values("tile_id")
    b = tiles[tiles["model_id"] == OTS_MODEL_ID].sort_values("tile_id")
    assert not np.allclose(np.stack(a["vector"]), np.stack(b["vector"]))
    per_slide = _slides_meta(embedded_lake["first"][0])
    assert sorted(per_slide) == embedded_lake["ids"]  # one event per slide, its own numbers
    assert {m["status"] for m in per_slide.values()} == {"embedded"}
    n_tiles = sample.groupby("tissue_sample_id").size()
    assert all(m["tile_embeddings_computed"] == 2 * n_tiles[s] for s, m in per_slide.items())
    assert per_slide[embedded_lake["ids"][0]]["vector_width"] == 1280


def test_slide_embedding_is_mean_of_its_tiles_and_stored_in_lancedb(embedded_lake):
    lk = embedded_lake["lake"]
    slides = pd.read_parquet(lk.table("slide_embeddings"))
    assert len(slides) == 2 * len(embedded_lake["ids"])
    for _, row in slides.iterrows():
        t = pd.read_parquet(lk.partition_table("tile_embeddings", row["tissue_sample_id"]))
        t = t[t["model_id"] == row["model_id"]]
        np.testing.assert_allclose(
            np.asarray(row["vector"]), np.stack(t["vector"]).mean(0), rtol=1e-5, atol=1e-6
        )
        assert row["n_tiles"] == len(t)
    # Clusters: one per tissue by default, every slide assigned.
    assert (slides["cluster"] >= 0).all()
    assert slides.groupby("model_id")["cluster"].nunique().max() <= 3
    store = V.VectorStore(lk.lancedb)
    assert store.count(V.SLIDE_TABLE) == len(slides)
    assert store.count(V.TILE_TABLE) == 2 * len(embedded_lake["sample"])
    lance = store.read(V.SLIDE_TABLE).to_pandas().set_index("row_id").sort_index()
    pq_rows = slides.set_index("row_id").sort_index()
    np.testing.assert_array_equal(np.stack(lance["vector"]), np.stack(pq_rows["vector"]))
    assert _check_passed(embedded_lake["first"][1])
    models = pd.read_parquet(lk.table("embedding_models")).set_index("model_id")
    assert (
        models.loc[CKPT_MODEL_ID, "selected"]
        and models.loc[OTS_MODEL_ID, "kind"] == "off_the_shelf"
    )


def test_rerun_is_idempotent(embedded_lake):
    lk = embedded_lake["lake"]
    store = V.VectorStore(lk.lancedb)
    before = (store.count(V.TILE_TABLE), store.count(V.SLIDE_TABLE))
    files = sorted(lk.partition_dir("tile_embeddings").glob("*.parquet"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    slides_before = pd.read_parquet(lk.table("slide_embeddings"))
    r1, r2 = materialize_embeddings(
        embedded_lake["root"],
        embedded_lake["mirror"],
        embedded_lake["instance"],
        embedded_lake["ids"],
    )
    assert (store.count(V.TILE_TABLE), store.count(V.SLIDE_TABLE)) == before
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # skipped: same tiles + weights
    m2 = _meta(r2, "tile_embedding_store")
    assert _count(r1, "unchanged") == len(files) and _computed(r1) == 0
    assert m2["slides_loaded"] == 0 and m2["rows_inserted"] == 0
    assert _check_passed(r2)
    slides_after = pd.read_parquet(lk.table("slide_embeddings"))
    pd.testing.assert_frame_equal(
        slides_before.drop(columns=["vector"]), slides_after.drop(columns=["vector"])
    )
    # A slide whose file changed (as if re-embedded) is re-loaded, still without duplicates.
    one = files[0]
    t = pq.read_table(one)
    i = t.schema.get_field_index("content_hash")
    write_parquet(t.set_column(i, "content_hash", pa.array(["changed"] * t.num_rows)), one)
    resources = {"lake": DataLakeResource(root=str(embedded_lake["root"]))}
    r2 = dg.materialize([slide_embeddings], resources=resources, instance=embedded_lake["instance"])
    assert _meta(r2, "tile_embedding_store")["slides_loaded"] == 1
    assert (store.count(V.TILE_TABLE), store.count(V.SLIDE_TABLE)) == before
    # tile_embeddings notices the foreign hash and re-embeds that slide only.
    r1, r2 = materialize_embeddings(
        embedded_lake["root"], embedded_lake["mirror"], embedded_lake["instance"], [one.stem]
    )
    assert _count(r1, "embedded") == 1
    assert _meta(r2, "tile_embedding_store")["slides_loaded"] == 1
    assert (store.count(V.TILE_TABLE), store.count(V.SLIDE_TABLE)) == before
    restored = pq.read_table(one)
    assert restored.column("content_hash").to_pylist() != ["changed"] * restored.num_rows


def test_duckdb_sees_the_embeddings(embedded_lake):
    lk = embedded_lake["lake"]
    build_catalog(lk.catalog, lk.tables)
    con = duckdb.connect(str(lk.catalog), read_only=True)
    try:
        rows = con.execute(
            "SELECT tissue, count(*) FROM slide_embeddings GROUP BY 1 ORDER BY 1"
        ).fetchall()
        assert [n for _t, n in rows] == [6, 6, 6]  # 3 slides x 2 models per tissue
        n_tiles = con.execute(
            "SELECT count(*) FROM tile_embeddings WHERE model_id = ?", [OTS_MODEL_ID]
        ).fetchone()[0]
        assert n_tiles == len(embedded_lake["sample"])
        dim = con.execute("SELECT len(vector) FROM tile_embeddings LIMIT 1").fetchone()[0]
        assert dim == 1280
    finally:
        con.close()
