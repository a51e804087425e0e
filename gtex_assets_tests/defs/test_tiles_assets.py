"""Materialise the tiles group: slide_tiles -> filtered_tiles -> balanced_tile_sample."""

import shutil
from pathlib import Path

import dagster as dg
import duckdb
import pandas as pd
import pytest

from gtex_assets.defs.ingest.assets import (
    gtex_histology_annotations,
    gtex_sample_attributes,
    raw_slides,
    selected_slides,
)
from gtex_assets.defs.tiles.assets import (
    balanced_sample_split_is_clean,
    balanced_tile_sample,
    filtered_tiles,
    slide_tiles,
)
from gtex_assets.resources import DataLakeResource, GTExSourceResource

INGEST = [gtex_histology_annotations, gtex_sample_attributes, selected_slides]


def _resources(root, mirror):
    return {
        "lake": DataLakeResource(root=str(root)),
        "gtex_source": GTExSourceResource(source=str(mirror)),
    }


def _all_slides(instance) -> dict[str, str]:
    parts = instance.get_dynamic_partitions("slides")
    return {
        "dagster/asset_partition_range_start": parts[0],
        "dagster/asset_partition_range_end": parts[-1],
    }


def _metadata(result, asset: str) -> dict:
    """The run's metadata for unpartitioned ``asset``, or the first partition's."""
    return _per_partition(result, asset)[0][1]


def _per_partition(result, asset: str) -> list[tuple[str | None, dict]]:
    events = [
        e
        for e in result.get_asset_materialization_events()
        if e.asset_key.to_user_string() == asset
    ]
    assert events
    return [(e.partition, e.materialization.metadata) for e in events]


def _observations(result, asset: str) -> list[dict]:
    return [
        e.event_specific_data.asset_observation.metadata
        for e in result.all_events
        if e.event_type_value == "ASSET_OBSERVATION"
        and e.event_specific_data.asset_observation.asset_key.to_user_string() == asset
    ]


def _read_dir(root: Path, name: str) -> pd.DataFrame:
    return pd.concat(
        [pd.read_parquet(p) for p in sorted((root / "tables" / name).glob("*.parquet"))]
    )


def test_tiles_group_on_a_generated_mirror(tmp_path, tiny_mirror):
    root = tmp_path / "root"
    instance = dg.DagsterInstance.ephemeral()
    res = _resources(root, tiny_mirror)
    assert dg.materialize(INGEST, resources=res, instance=instance).success
    tags = _all_slides(instance)
    assert dg.materialize([raw_slides], resources=res, instance=instance, tags=tags).success
    cfg = {"ops": {"slide_tiles": {"config": {"workers": 1}}}}
    r = dg.materialize(
        [slide_tiles, filtered_tiles], resources=res, instance=instance, tags=tags, run_config=cfg
    )
    assert r.success
    parts = set(instance.get_dynamic_partitions("slides"))
    assert instance.get_materialized_partitions(dg.AssetKey("filtered_tiles")) == parts

    status = _read_dir(root, "tiling_status")
    assert set(status["tissue_sample_id"]) == parts and set(status["status"]) == {"ok"}
    index = _read_dir(root, "slide_tiles")
    assert index["path"].map(lambda p: Path(p).is_file()).all()
    assert status["n_tiles"].sum() == len(index)
    filtered = _read_dir(root, "filtered_tiles")
    assert len(filtered) == len(index)
    assert set(filtered["verdict"]) <= {"kept", "small_file", "half_empty", "dirt", "error"}
    truth = pd.read_csv(tiny_mirror / "truth" / "artefacts.csv")
    hits = truth.rename(columns={"sample_id": "tissue_sample_id"}).merge(
        filtered, on=["tissue_sample_id", "x", "y"]
    )
    assert len(hits) == len(truth) and (hits["verdict"] != "kept").all()

    # Per-slide numbers on each slide's own event; the montage once per run (an observation).
    per_slide = dict(_per_partition(r, "filtered_tiles"))
    assert set(per_slide) == parts
    kept = filtered[filtered["verdict"] == "kept"].groupby("tissue_sample_id").size()
    for sid, md in per_slide.items():
        assert md["verdict_kept"].value == kept.get(sid, 0) and "montage" not in md
    (obs,) = _observations(r, "filtered_tiles")
    assert (
        "data:image/png;base64," in obs["montage"].value and "half_empty" in obs["verdicts"].value
    )
    tiles_md = dict(_per_partition(r, "slide_tiles"))
    per_index = index.groupby("tissue_sample_id").size()
    assert {s: m["tiles"].value for s, m in tiles_md.items()} == per_index.to_dict()
    assert {m["mpp"].value for m in tiles_md.values()} == {0.499}
    assert set(index["read_px"]) == {448} and set(index["mpp"]) == {0.499}

    cfg = {
        "ops": {
            "balanced_tile_sample": {
                "config": {"tiles_per_slide": 1, "tissue_target": 2, "test_fraction": 0.34}
            }
        }
    }
    r = dg.materialize(
        [balanced_tile_sample, balanced_sample_split_is_clean],
        resources=res,
        instance=instance,
        run_config=cfg,
    )
    assert r.success
    (check,) = r.get_asset_check_evaluations()
    assert check.passed
    sample = pd.read_parquet(root / "tables" / "balanced_tile_sample.parquet")
    kept = filtered[filtered["verdict"] == "kept"]
    per_tissue = sample.groupby("tissue").size()
    avail = kept.groupby("tissue").size()
    # Target max(2, 1 x 3 slides) = 3 per tissue, or all kept tiles where fewer.
    assert per_tissue.to_dict() == {t: min(3, n) for t, n in avail.items()}
    assert sample["path"].map(lambda p: Path(p).is_absolute() and Path(p).is_file()).all()
    assert sample.merge(kept, on=["tissue_sample_id", "x", "y"]).shape[0] == len(sample)
    assert (sample.groupby("subject_id")["split"].nunique() == 1).all()
    split = pd.read_parquet(root / "tables" / "donor_split.parquet")
    sel = pd.read_parquet(root / "tables" / "selected_slides.parquet")
    assert set(split["subject_id"]) == set(sel["subject_id"])
    assert set(split["split"]) == {"train", "test"}
    side = dict(zip(split["subject_id"], split["split"], strict=True))
    assert (sample["split"] == sample["subject_id"].map(side)).all()  # the recorded split
    md = _metadata(r, "balanced_tile_sample")
    assert "data:image/png;base64," in md["montage"].value
    assert _metadata(r, "donor_split")["dagster/row_count"].value == len(split)


def test_quarantined_slides_are_recorded_and_done_slides_skipped(tmp_path, mini_mirror):
    mirror, ids, _ = mini_mirror
    root = tmp_path / "root"
    instance = dg.DagsterInstance.ephemeral()
    res = _resources(root, mirror)
    cfg = {"ops": {"selected_slides": {"config": {"slides_per_tissue": 4}}}}
    assert dg.materialize(INGEST, resources=res, instance=instance, run_config=cfg).success
    tags = _all_slides(instance)
    assert dg.materialize([raw_slides], resources=res, instance=instance, tags=tags).success
    cfg = {"ops": {"slide_tiles": {"config": {"workers": 1}}}}
    r = dg.materialize([slide_tiles], resources=res, instance=instance, tags=tags, run_config=cfg)
    assert r.success  # the truncated slide does not fail the backfill
    status = _read_dir(root, "tiling_status").set_index("tissue_sample_id")
    bad = ids[-1]
    assert (
        status.loc[bad, "status"] == "quarantined"
        and "raw slide quarantined" in status.loc[bad, "reason"]
    )
    ok = status[status["status"] == "ok"]
    assert len(ok) == len(status) - 1
    (per_slide,) = set(ok["n_tiles"])  # the CMU slide, every copy: the same tiles
    assert 9 <= per_slide <= 16
    assert pd.read_parquet(root / "tables" / "slide_tiles" / f"{bad}.parquet").empty
    md = dict(_per_partition(r, "slide_tiles"))
    assert md[bad]["status"].value == "quarantined" and md[bad]["tiles"].value == 0
    assert sum(m["tiles"].value for m in md.values()) == per_slide * len(ok)

    # Same parameters: nothing is re-tiled, the index files are untouched.
    first = ok.index[0]
    index_file = root / "tables" / "slide_tiles" / f"{first}.parquet"
    mtime = index_file.stat().st_mtime_ns
    r = dg.materialize([slide_tiles], resources=res, instance=instance, tags=tags, run_config=cfg)
    skipped = [m["skipped_already_done"].value for _, m in _per_partition(r, "slide_tiles")]
    assert sum(skipped) == len(ok)
    assert index_file.stat().st_mtime_ns == mtime
    # New parameters: re-tiled (a different tissue-fraction threshold gives a different grid).
    cfg = {"ops": {"slide_tiles": {"config": {"workers": 1, "min_tissue_fraction": 0.9}}}}
    r = dg.materialize([slide_tiles], resources=res, instance=instance, tags=tags, run_config=cfg)
    assert not any(m["skipped_already_done"].value for _, m in _per_partition(r, "slide_tiles"))
    fewer = pd.read_parquet(index_file)
    assert 0 < len(fewer) < per_slide and (fewer["tissue_fraction"] >= 0.9).all()
    assert sorted(p.name for p in (root / "tiles" / first).glob("*.jpg")) == sorted(
        Path(p).name for p in fewer["path"]
    )


def _files(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_hard_mirror_through_dagster(tmp_path, monkeypatch):
    """Slides and rows as they come (lib.synth.hard): ingest, tiles and the catalog run through
    the runner's Dagster path; every slide ends tiled (with its MPP source) or quarantined with
    a reason naming the fix, bad rows are queryable, nothing is written outside the data root."""
    from gtex_assets.cli.runner import materialize_all
    from gtex_assets.lib.synth.hard import generate_hard_mirror

    mirror, root = tmp_path / "mirror", tmp_path / "root"
    hard = generate_hard_mirror(mirror, tissues=3, slides_per_tissue=4)
    cases = hard["cases"]
    root.mkdir()
    shutil.copy(mirror / "truth" / "mpp_overrides.csv", root / "mpp_overrides.csv")
    monkeypatch.setenv("GTEX_DATA_ROOT", str(root))
    monkeypatch.setenv("GTEX_SOURCE", str(mirror))
    before = _files(mirror)
    outside = {p for p in tmp_path.iterdir()}
    selection = [
        "histology_annotations", "histology_rejected_rows", "sample_attributes",
        "selected_slides", "raw_slides", "slide_tiles", "tiling_status", "filtered_tiles",
        "duckdb_catalog",
    ]  # fmt: skip
    materialize_all(
        selection=selection,
        run_config={"ops": {"slide_tiles": {"config": {"workers": 1}}}},
        instance=dg.DagsterInstance.ephemeral(),
        log=lambda m: None,
    )
    assert _files(mirror) == before and set(tmp_path.iterdir()) == outside

    con = duckdb.connect(str(root / "gtex.duckdb"), read_only=True)
    rejected = con.execute(
        "SELECT raw_id, reason FROM histology_rejected_rows ORDER BY line"
    ).fetchall()
    assert [r[0] for r in rejected] == hard["bad_rows"]
    assert all("line" in r[1] for r in rejected)
    rows = con.execute(
        "SELECT r.tissue_sample_id, r.status, r.reason, r.mpp_source, t.status, t.reason, t.mpp, "
        "t.footprint_px FROM raw_slides r JOIN tiling_status t USING (tissue_sample_id)"
    ).fetchall()
    by_id = {r[0]: r[1:] for r in rows}
    assert len(by_id) == len(rows) == 12
    for sid, (raw, _, source, tiled, reason, mpp, _) in by_id.items():
        if tiled == "ok":  # tiled, with its MPP source and ~224 µm tiles
            assert raw == "ok" and source in ("description", "override"), (sid, source)
            assert mpp == pytest.approx(0.5, abs=0.002), (sid, mpp)
        elif sid in cases.values():
            assert tiled == "quarantined" and reason, sid
        else:  # a generated slide whose tissue is too faint is recorded, not an error
            assert tiled == "no_tissue" and "no tissue" in reason, sid
    expect = {
        "no_mpp": ("quarantined", "fallback_mpp"),
        "truncated": ("quarantined", "truncated"),
        "not_tiff": ("quarantined", "not a TIFF"),
        "missing": ("quarantined", "does not exist"),
        "corrupt": ("quarantined", "max_corrupt_share"),
    }
    for case, (status, fix) in expect.items():
        raw, raw_reason, _, tiled, reason, _, _ = by_id[cases[case]]
        assert tiled == status and fix in reason, (case, reason)
    assert "mpp_overrides.csv" in by_id[cases["no_mpp"]][4]
    assert by_id[cases["no_mpp_override"]][2] == "override"
    assert by_id[cases["no_mpp_override"]][3] == "ok"
    x40 = by_id[cases["x40"]]
    assert x40[3] == "ok" and x40[2] == "description" and x40[5] == 0.5 and x40[6] == 898
    # Quarantined slides feed no tile downstream.
    q = [s for s, r in by_id.items() if r[3] != "ok"]
    n = con.execute(
        "SELECT count(*) FROM filtered_tiles WHERE list_contains(?, tissue_sample_id)", [q]
    ).fetchone()[0]
    assert n == 0
