"""Materialise the ingest assets and the catalog on a small mirror built from the fixtures."""

import logging

import dagster as dg
import duckdb
import pandas as pd
import pytest

from gtex_assets.defs.catalog.assets import duckdb_catalog
from gtex_assets.defs.ingest.assets import (
    gtex_histology_annotations,
    gtex_sample_attributes,
    raw_slides,
    selected_slides,
)
from gtex_assets.resources import DataLakeResource, DuckDBCatalogResource, GTExSourceResource

ASSETS = [
    gtex_histology_annotations,
    gtex_sample_attributes,
    selected_slides,
    raw_slides,
    duckdb_catalog,
]


def _resources(root, mirror):
    return {
        "lake": DataLakeResource(root=str(root)),
        "gtex_source": GTExSourceResource(source=str(mirror)),
        "duckdb": DuckDBCatalogResource(),
    }


def test_ingest_end_to_end(tmp_path, mini_mirror):
    mirror, ids, rna = mini_mirror
    root = tmp_path / "root"
    instance = dg.DagsterInstance.ephemeral()
    res = _resources(root, mirror)
    cfg = {"ops": {"selected_slides": {"config": {"slides_per_tissue": 3}}}}
    r = dg.materialize(ASSETS[:3], resources=res, instance=instance, run_config=cfg)
    assert r.success
    sel = pd.read_parquet(root / "tables" / "selected_slides.parquet")
    assert sel["tissue"].value_counts().to_dict() == {"Lung": 3, "Thyroid": 3, "Spleen": 3}
    # Every RNA sample of a tissue is chosen before any sample without RNA.
    for _, g in sel.groupby("tissue"):
        assert list(g["has_rna"]) == sorted(g["has_rna"], reverse=True)
    parts = instance.get_dynamic_partitions("slides")
    assert sorted(parts) == sorted(sel["tissue_sample_id"])

    attrs = pd.read_parquet(root / "tables" / "sample_attributes.parquet")
    assert set(attrs["tissue_sample_id"]) == rna  # the K-562 control row is not a tissue sample

    # Add the truncated slide as a partition too, then run all slides in one batched run.
    instance.add_dynamic_partitions("slides", [ids[-1]])
    parts = instance.get_dynamic_partitions("slides")
    tags = {
        "dagster/asset_partition_range_start": parts[0],
        "dagster/asset_partition_range_end": parts[-1],
    }
    r = dg.materialize([raw_slides], resources=res, instance=instance, tags=tags)
    assert r.success  # a bad slide does not fail the run
    assert instance.get_materialized_partitions(dg.AssetKey("raw_slides")) == set(parts)

    r = dg.materialize([duckdb_catalog], resources=res, instance=instance)
    assert r.success
    con = duckdb.connect(str(root / "gtex.duckdb"), read_only=True)
    ok = con.execute(
        "SELECT count(*), min(magnification), round(min(mpp_x), 3), any_value(mpp_source) "
        "FROM raw_slides WHERE status='ok'"
    ).fetchone()
    assert ok == (len(parts) - 1, 20.0, 0.499, "description")
    q = con.execute("SELECT tissue_sample_id, reason FROM slide_quarantine").fetchall()
    assert [x[0] for x in q] == [ids[-1]]
    assert any(w in q[0][1] for w in ("cannot", "decoded", "truncated"))
    tables = {t for (t,) in con.execute("SHOW TABLES").fetchall()}
    assert {
        "histology_annotations",
        "sample_attributes",
        "selected_slides",
        "raw_slides",
        "slide_quarantine",
        "histology_rejected_rows",
    } <= tables


def test_rerun_is_idempotent_and_skips_done_slides(tmp_path, mini_mirror):
    mirror, ids, _ = mini_mirror
    root = tmp_path / "root"
    instance = dg.DagsterInstance.ephemeral()
    res = _resources(root, mirror)
    dg.materialize(ASSETS[:3], resources=res, instance=instance)
    key = ids[0]
    dg.materialize([raw_slides], resources=res, instance=instance, partition_key=key)
    part = root / "tables" / "raw_slides" / f"{key}.parquet"
    first = part.read_bytes()
    mtime = part.stat().st_mtime_ns
    dg.materialize([raw_slides], resources=res, instance=instance, partition_key=key)
    assert part.read_bytes() == first and part.stat().st_mtime_ns == mtime  # untouched
    sel1 = (root / "tables" / "selected_slides.parquet").read_bytes()
    dg.materialize(ASSETS[:3], resources=res, instance=instance)
    assert pd.read_parquet(root / "tables" / "selected_slides.parquet").equals(
        pd.read_parquet(pd.io.common.BytesIO(sel1))
    )


def test_bad_portal_rows_are_rejected_and_queryable(tmp_path, mini_mirror):
    mirror, ids, _ = mini_mirror
    root = tmp_path / "root"
    res = _resources(root, mirror)
    with open(mirror / "GTEx Portal.csv", "a") as f:
        f.write('"GTEX-1117F/../x","Lung","GTEX-1117F","male","60-69","","",""\n')
        f.write('"../../x","Lung","","","","","",""\n')
    instance = dg.DagsterInstance.ephemeral()
    r = dg.materialize(
        [gtex_histology_annotations, duckdb_catalog], resources=res, instance=instance
    )
    assert r.success
    ann = pd.read_parquet(root / "tables" / "histology_annotations.parquet")
    assert list(ann["tissue_sample_id"]) == ids  # the 12 good rows go on
    md = {
        e.asset_key.to_user_string(): e.materialization.metadata
        for e in r.get_asset_materialization_events()
    }
    assert md["histology_annotations"]["rejected_rows"].value == 2
    assert md["histology_rejected_rows"]["dagster/row_count"].value == 2
    warnings = [e.message for e in instance.all_logs(r.run_id) if e.level == logging.WARNING]
    assert any("2 row(s) rejected" in w for w in warnings)
    con = duckdb.connect(str(root / "gtex.duckdb"), read_only=True)
    rows = con.execute(
        "SELECT line, raw_id, reason FROM histology_rejected_rows ORDER BY line"
    ).fetchall()
    assert [(line, raw) for line, raw, _ in rows] == [(14, "GTEX-1117F/../x"), (15, "../../x")]
    assert "line 14: 'GTEX-1117F/../x' is not a GTEx tissue sample id" in rows[0][2]
    assert not (root / "x").exists() and not (tmp_path / "x").exists()


def test_slide_without_mpp_quarantined_then_override_and_fallback(tmp_path, mini_mirror):
    """The MPP policy through Dagster: none -> quarantined naming the three fixes; an override
    row -> ok with mpp_source override; a configured fallback -> ok with mpp_source fallback."""
    from gtex_assets.lib.synth.hard import write_jp2k_slide

    mirror, ids, _ = mini_mirror
    root = tmp_path / "root"
    res = _resources(root, mirror)
    no_mpp, other = ids[0], ids[1]
    for sid in (no_mpp, other):
        write_jp2k_slide(mirror / "slides" / f"{sid}.svs", size=(1024, 768), seed=1)
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize(ASSETS[:3], resources=res, instance=instance).success
    tags = {
        "dagster/asset_partition_range_start": no_mpp,
        "dagster/asset_partition_range_end": other,
    }

    def run(cfg=None):
        r = dg.materialize(
            [raw_slides], resources=res, instance=instance, tags=tags, run_config=cfg
        )
        assert r.success
        return {
            sid: pd.read_parquet(root / "tables" / "raw_slides" / f"{sid}.parquet").iloc[0]
            for sid in (no_mpp, other)
        }, r

    rows, r = run()
    for sid in (no_mpp, other):
        assert rows[sid]["status"] == "quarantined"
        reason = rows[sid]["reason"]
        assert "no resolution (MPP)" in reason and "mpp_overrides.csv" in reason
        assert "fallback_mpp" in reason and "re-export" in reason
    events = {e.partition: e.materialization.metadata for e in r.get_asset_materialization_events()}
    assert events[no_mpp]["status"].value == "quarantined"  # per-slide metadata

    (root / "mpp_overrides.csv").write_text(f"tissue_sample_id,mpp\n{no_mpp},0.2520\n../x,0.5\n")
    rows, _ = run()
    assert rows[no_mpp]["status"] == "ok" and rows[no_mpp]["mpp_source"] == "override"
    assert rows[no_mpp]["mpp_x"] == pytest.approx(0.252)
    assert rows[other]["status"] == "quarantined"

    cfg = {"ops": {"raw_slides": {"config": {"fallback_mpp": 0.5}}}}
    rows, _ = run(cfg)
    assert rows[other]["status"] == "ok" and rows[other]["mpp_source"] == "fallback"
    assert rows[other]["mpp_x"] == 0.5 and rows[no_mpp]["mpp_source"] == "override"
