"""The refresh sensors request exactly what changed, and nothing when nothing changed."""

import dagster as dg

from gtex_assets.cli.runner import load_definitions
from gtex_assets.defs.ingest.assets import (
    gtex_histology_annotations,
    gtex_sample_attributes,
    raw_slides,
    selected_slides,
)
from gtex_assets.defs.ingest.sensors import gtex_source_sensor, new_slides_sensor

INGEST = [gtex_histology_annotations, gtex_sample_attributes, selected_slides]


def _tick(sensor, instance, defs, cursor=None):
    ctx = dg.build_sensor_context(
        instance=instance, definitions=defs, cursor=cursor, resources=defs.resources
    )
    result = sensor(ctx)
    if isinstance(result, dg.SkipReason):
        return []
    return result if isinstance(result, list) else [result]


def test_source_sensor_requests_only_changed_sources(tmp_path, monkeypatch, mini_mirror):
    mirror, ids, _ = mini_mirror
    monkeypatch.setenv("GTEX_SOURCE", str(mirror))
    monkeypatch.setenv("GTEX_DATA_ROOT", str(tmp_path / "root"))
    defs = load_definitions()
    instance = dg.DagsterInstance.ephemeral()

    # Nothing materialised yet: everything that reads a source is requested.
    (req,) = _tick(gtex_source_sensor, instance, defs)
    names = {k.to_user_string() for k in req.asset_selection}
    assert {"gtex_histology_annotations", "gtex_sample_attributes", "selected_slides"} <= names
    assert "raw_slides" not in names  # per-slide work belongs to the new-slides sensor

    dg.materialize(INGEST, resources=defs.resources, instance=instance)
    unchanged = [
        r for r in _tick(gtex_source_sensor, instance, defs)
        if {"gtex_histology_annotations", "gtex_sample_attributes"} & {k.to_user_string() for k in r.asset_selection}
    ]  # fmt: skip
    assert unchanged == []

    # The portal CSV gains rows: only the histology branch is requested.
    with open(mirror / "GTEx Portal.csv", "a") as f:
        f.write('"GTEX-1117F-9926","Lung","GTEX-1117F","female","60-69","","",""\n')
    reqs = _tick(gtex_source_sensor, instance, defs)
    assert len(reqs) == 1
    names = {k.to_user_string() for k in reqs[0].asset_selection}
    assert "gtex_histology_annotations" in names and "selected_slides" in names
    assert "gtex_sample_attributes" not in names
    # Asking again gives the same run key, so the daemon launches it once.
    assert _tick(gtex_source_sensor, instance, defs)[0].run_key == reqs[0].run_key


def test_new_slides_sensor_batches_only_missing_slides(tmp_path, monkeypatch, mini_mirror):
    mirror, ids, _ = mini_mirror
    monkeypatch.setenv("GTEX_SOURCE", str(mirror))
    monkeypatch.setenv("GTEX_DATA_ROOT", str(tmp_path / "root"))
    defs = load_definitions()
    instance = dg.DagsterInstance.ephemeral()
    assert _tick(new_slides_sensor, instance, defs) == []  # no partitions yet

    dg.materialize(INGEST, resources=defs.resources, instance=instance)
    keys = instance.get_dynamic_partitions("slides")
    (req,) = _tick(new_slides_sensor, instance, defs)
    assert req.tags["dagster/asset_partition_range_start"] == keys[0]
    assert req.tags["dagster/asset_partition_range_end"] == keys[-1]
    assert dg.AssetKey("raw_slides") in req.asset_selection

    # Fetch the first 3 slides; the next tick asks only for the rest.
    tags = {
        "dagster/asset_partition_range_start": keys[0],
        "dagster/asset_partition_range_end": keys[2],
    }
    dg.materialize([raw_slides], resources=defs.resources, instance=instance, tags=tags)
    (req,) = _tick(new_slides_sensor, instance, defs)
    assert req.tags["dagster/asset_partition_range_start"] == keys[3]
    assert req.tags["dagster/asset_partition_range_end"] == keys[-1]

    # A new slide added later becomes its own request; done slides are never requested again.
    assert set(ids) == set(keys)
    instance.add_dynamic_partitions("slides", ["GTEX-1117F-9926"])
    tags = {
        "dagster/asset_partition_range_start": keys[3],
        "dagster/asset_partition_range_end": keys[-1],
    }
    dg.materialize([raw_slides], resources=defs.resources, instance=instance, tags=tags)
    (req,) = _tick(new_slides_sensor, instance, defs)
    assert req.tags["dagster/asset_partition_range_start"] == "GTEX-1117F-9926"
    assert req.tags["dagster/asset_partition_range_end"] == "GTEX-1117F-9926"


def test_source_sensor_rewritten_gct_requests_expression_and_its_aggregates(
    tmp_path, monkeypatch, tiny_mirror
):
    import gzip
    import shutil

    from gtex_assets.defs.expression.assets import gene_log_tpm
    from gtex_assets.lib.ingest.sources import GENE_TPM_GCT

    mirror = tmp_path / "mirror"
    shutil.copytree(tiny_mirror, mirror)
    monkeypatch.setenv("GTEX_SOURCE", str(mirror))
    monkeypatch.setenv("GTEX_DATA_ROOT", str(tmp_path / "root"))
    defs = load_definitions()
    instance = dg.DagsterInstance.ephemeral()
    dg.materialize([*INGEST, gene_log_tpm], resources=defs.resources, instance=instance)
    assert _tick(gtex_source_sensor, instance, defs) == []  # nothing changed

    # Rewrite the GCT (same content, new bytes): only the expression branch is requested.
    gct = mirror / GENE_TPM_GCT
    text = gzip.decompress(gct.read_bytes())
    gct.write_bytes(gzip.compress(text, compresslevel=1))
    (req,) = _tick(gtex_source_sensor, instance, defs)
    names = {k.to_user_string() for k in req.asset_selection}
    assert "gene_log_tpm" in names
    assert {"gene_r2", "embedding_views", "duckdb_catalog"} <= names  # its aggregates follow
    assert not names & {
        "gtex_histology_annotations",
        "selected_slides",
        "raw_slides",
        "slide_tiles",
    }
