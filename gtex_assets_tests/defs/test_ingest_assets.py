"""Materialise the ingest assets and the catalog on a small mirror built from the fixtures."""

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
from gtex_assets.resources import DataLakeResource, GTExSourceResource

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
        "SELECT count(*), min(magnification), round(min(mpp_x), 3) FROM raw_slides WHERE status='ok'"
    ).fetchone()
    assert ok == (len(parts) - 1, 20.0, 0.499)
    q = con.execute("SELECT tissue_sample_id, reason FROM slide_quarantine").fetchall()
    assert [x[0] for x in q] == [ids[-1]]
    assert "cannot" in q[0][1] or "decoded" in q[0][1]
    tables = {t for (t,) in con.execute("SHOW TABLES").fetchall()}
    assert {
        "histology_annotations",
        "sample_attributes",
        "selected_slides",
        "raw_slides",
        "slide_quarantine",
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


def test_bad_portal_csv_fails_with_row_and_keeps_previous_output(tmp_path, mini_mirror):
    mirror, _, _ = mini_mirror
    root = tmp_path / "root"
    res = _resources(root, mirror)
    dg.materialize(
        [gtex_histology_annotations], resources=res, instance=dg.DagsterInstance.ephemeral()
    )
    before = (root / "tables" / "histology_annotations.parquet").read_bytes()
    with open(mirror / "GTEx Portal.csv", "a") as f:
        f.write('"GTEX-1117F/../x","Lung","GTEX-1117F","male","60-69","","",""\n')
    with pytest.raises(
        Exception, match=r"line 14: 'GTEX-1117F/\.\./x' is not a GTEx tissue sample id"
    ):
        dg.materialize(
            [gtex_histology_annotations], resources=res, instance=dg.DagsterInstance.ephemeral()
        )
    assert (root / "tables" / "histology_annotations.parquet").read_bytes() == before
