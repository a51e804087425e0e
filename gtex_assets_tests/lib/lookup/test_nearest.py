"""lib.nearest + `gtex-assets nearest` on the embedded tiny mirror (3 tissues x 3 slides)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import pytest

from gtex_assets.cli.nearest import add_nearest_subcommand
from gtex_assets.lib.lookup.nearest import NearestError, nearest
from gtex_assets_tests.defs import test_embeddings_assets as fx
from gtex_assets_tests.defs.test_embeddings_assets import CKPT_MODEL_ID, OTS_MODEL_ID

# The session fixture that materialises the embedding assets on the tiny mirror (shared).
embedded_lake = fx.embedded_lake


def _tissue_of(embedded_lake) -> dict[str, str]:
    s = embedded_lake["sample"]
    return dict(zip(s["tissue_sample_id"], s["tissue"], strict=False))


def test_a_slide_is_its_own_nearest_neighbour(embedded_lake):
    sid = embedded_lake["ids"][0]
    res = nearest(sid, k=4, data_root=embedded_lake["root"])
    hits = res.neighbours
    assert len(hits) == 4 and hits["rank"].tolist() == [1, 2, 3, 4]
    assert hits["tissue_sample_id"].iloc[0] == sid
    assert hits["distance"].iloc[0] < 1e-5
    assert hits["distance"].is_monotonic_increasing
    assert {"tissue", "distance", "cluster", "subject_id"} <= set(hits.columns)
    assert res.query["model_id"] == CKPT_MODEL_ID  # the selected checkpoint by default
    assert res.query["source"] == "stored slide embedding"
    assert res.query["predicted_cluster"] == hits["cluster"].iloc[0]


@pytest.mark.parametrize("model_id", [CKPT_MODEL_ID, OTS_MODEL_ID])
def test_same_tissue_slides_rank_first(embedded_lake, model_id):
    tissue = _tissue_of(embedded_lake)
    for sid in embedded_lake["ids"]:
        hits = nearest(sid, k=3, model_id=model_id, data_root=embedded_lake["root"]).neighbours
        # 3 slides per tissue: itself and its two same-tissue slides come first.
        assert hits["tissue"].tolist() == [tissue[sid]] * 3, (sid, hits)
        assert hits["tissue_sample_id"].iloc[0] == sid


def test_tile_image_query_finds_that_tile(embedded_lake):
    s = embedded_lake["sample"].iloc[7]
    res = nearest(tile=s["path"], k=5, tiles=True, data_root=embedded_lake["root"])
    hits = res.neighbours
    assert hits["tile_id"].iloc[0] == s["tile_id"]
    assert hits["distance"].iloc[0] < 1e-4  # re-embedded alone vs in a batch
    assert hits["cluster"].notna().all() and {"x", "y", "tissue"} <= set(hits.columns)
    assert res.query["kind"] == "tile_image" and res.query["n_tiles"] == 1
    # The same tile against slides: its own slide's tissue wins.
    slides = nearest(tile=s["path"], k=3, data_root=embedded_lake["root"]).neighbours
    assert slides["tissue"].iloc[0] == s["tissue"]


def test_slide_file_query_is_tiled_embedded_and_matched(embedded_lake):
    sid = embedded_lake["ids"][4]
    svs = embedded_lake["mirror"] / "slides" / f"{sid}.svs"
    res = nearest(slide=svs, k=3, data_root=embedded_lake["root"])
    assert res.query["kind"] == "slide_file" and res.query["how"] == "tiler+filters"
    assert res.query["n_tiles"] > 0
    hits = res.neighbours
    # The query goes through the quality filters (like the pipeline), the fixture's stored
    # slides did not: fewer tiles, so not the same mean -- but still closest to itself.
    assert hits["tissue_sample_id"].iloc[0] == sid
    assert res.query["majority_tissue"] == _tissue_of(embedded_lake)[sid]


def test_unknown_sample_and_bad_queries_are_clear_errors(embedded_lake, tmp_path):
    root = embedded_lake["root"]
    with pytest.raises(NearestError, match="--slide"):
        nearest("GTEX-ZZZZ-0001", data_root=root)
    with pytest.raises(NearestError, match="no stored embeddings"):
        nearest(embedded_lake["ids"][0], model_id="nope", data_root=root)
    with pytest.raises(ValueError, match="exactly one"):
        nearest("GTEX-ZZZZ-0001", tile="x.jpg", data_root=root)
    with pytest.raises(NearestError, match="no slide embeddings"):
        nearest("GTEX-ZZZZ-0001", data_root=tmp_path / "empty")


def test_sample_with_tiles_but_not_in_the_store_is_embedded_on_the_fly(embedded_lake, tmp_path):
    """A slide tiled after the last load: its balanced-sample tiles are embedded for the query."""
    import shutil

    from gtex_assets.core.atomic import write_parquet
    from gtex_assets.core.lake import Lake

    src = Lake.at(embedded_lake["root"])
    root = tmp_path / "root"
    shutil.copytree(src.lancedb, root / "lancedb")
    (root / "tables").mkdir(parents=True)
    for name in ("embedding_models",):
        shutil.copy(src.table(name), root / "tables" / f"{name}.parquet")
    shutil.copytree(src.models, root / "models")
    s = embedded_lake["sample"]
    sid = embedded_lake["ids"][2]
    new = s[s["tissue_sample_id"] == sid].assign(tissue_sample_id="GTEX-NEW1-0001")
    write_parquet(new, root / "tables" / "balanced_tile_sample.parquet")
    res = nearest("GTEX-NEW1-0001", k=3, data_root=root)
    assert res.query["source"] == "embedded its stored tiles"
    assert res.query["n_tiles"] == len(new)
    hits = res.neighbours
    assert hits["tissue_sample_id"].iloc[0] == sid  # same tiles as that slide
    assert hits["distance"].iloc[0] < 1e-4


def _run_cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gtex-assets")
    add_nearest_subcommand(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.fn(args)


def test_cli_table_and_json(embedded_lake, capsys):
    root = str(embedded_lake["root"])
    sid = embedded_lake["ids"][3]
    assert _run_cli(["nearest", sid, "-k", "3", "--data-root", root]) == 0
    out = capsys.readouterr().out
    assert f"query: sample {sid}" in out and "3 nearest slides (cosine distance)" in out
    lines = out.splitlines()
    header = next(line for line in lines if line.strip("| ").startswith("rank"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[:3] == ["rank", "tissue_sample_id", "subject_id"]
    assert {"tissue", "cluster", "distance"} <= set(cols)
    first = next(line for line in lines if line.strip("| ").startswith("1 |"))
    assert sid in first and first.rstrip(" |").endswith("0.0000")

    assert _run_cli(["nearest", sid, "-k", "2", "--json", "--tiles", "--data-root", root]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["query"]["sample_id"] == sid and payload["query"]["target"] == "tiles"
    assert len(payload["neighbours"]) == 2
    assert {"tile_id", "distance", "cluster"} <= set(payload["neighbours"][0])
    assert np.isfinite(pd.DataFrame(payload["neighbours"])["distance"]).all()

    assert _run_cli(["nearest", "--data-root", root]) == 2
    assert "exactly one" in capsys.readouterr().err
    assert _run_cli(["nearest", "GTEX-ZZZZ-0001", "--data-root", root]) == 2
    assert "not in the store" in capsys.readouterr().err
