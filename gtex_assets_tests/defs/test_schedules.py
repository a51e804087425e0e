import dagster as dg
import pytest

from gtex_assets.cli.runner import load_definitions
from gtex_assets.defs.schedules import DEFAULT_CRON


def test_weekly_refresh_selects_only_aggregates(monkeypatch):
    monkeypatch.delenv("GTEX_REFRESH_CRON", raising=False)
    defs = load_definitions()
    sched = defs.resolve_schedule_def("weekly_aggregates_refresh")
    assert sched.cron_schedule == DEFAULT_CRON
    assert sched.default_status == dg.DefaultScheduleStatus.RUNNING
    job = defs.resolve_job_def("refresh_aggregates")
    keys = {k.to_user_string() for k in job.asset_layer.selected_asset_keys}
    assert {
        "balanced_tile_sample",
        "tissue_classifier",
        "slide_embeddings",
        "gene_r2",
        "duckdb_catalog",
    } <= keys
    assert not keys & {"slide_tiles", "filtered_tiles", "tile_embeddings", "raw_slides"}
    # Every selected asset is unpartitioned: one run over all slides done so far.
    graph = defs.resolve_asset_graph()
    assert all(graph.get(dg.AssetKey(k)).partitions_def is None for k in keys)


def test_cron_is_configurable(monkeypatch):
    monkeypatch.setenv("GTEX_REFRESH_CRON", "0 4 * * *")
    assert (
        load_definitions().resolve_schedule_def("weekly_aggregates_refresh").cron_schedule
        == "0 4 * * *"
    )


@pytest.mark.parametrize("sensor", ["gtex_source_sensor", "new_slides_sensor"])
def test_sensors_ship_running(sensor):
    assert (
        load_definitions().resolve_sensor_def(sensor).default_status
        == dg.DefaultSensorStatus.RUNNING
    )
