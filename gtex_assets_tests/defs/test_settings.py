"""Every run reads <data root>/settings.yaml: a run without config (as automation launches
them) takes the file's values; a run's explicit config still wins."""

import os

import dagster as dg
import pandas as pd

from gtex_assets.cli.runner import load_definitions
from gtex_assets.core.settings import write_settings
from gtex_assets.defs.ingest.assets import (
    gtex_histology_annotations,
    gtex_sample_attributes,
    selected_slides,
)


def test_settings_file_applies_to_runs_without_config(tmp_path, monkeypatch, mini_mirror):
    mirror, ids, _ = mini_mirror
    root = tmp_path / "root"
    monkeypatch.setenv("GTEX_SOURCE", str(mirror))
    monkeypatch.setenv("GTEX_DATA_ROOT", str(root))
    defs = load_definitions()
    instance = dg.DagsterInstance.ephemeral()
    assets = [gtex_histology_annotations, gtex_sample_attributes, selected_slides]
    write_settings(root, {"ops": {"selected_slides": {"config": {"slides_per_tissue": 1}}}})

    def selected() -> int:
        return len(pd.read_parquet(os.path.join(root, "tables", "selected_slides.parquet")))

    assert dg.materialize(assets, resources=defs.resources, instance=instance).success
    assert selected() == 3  # 3 tissues x 1 from the settings file (default 50 would take 12)
    explicit = {"ops": {"selected_slides": {"config": {"slides_per_tissue": 2}}}}
    dg.materialize(
        [selected_slides], resources=defs.resources, instance=instance, run_config=explicit
    )
    assert selected() == 6  # the run's own config wins


def test_bad_settings_fail_the_step_naming_the_file(tmp_path, monkeypatch, mini_mirror):
    mirror, _, _ = mini_mirror
    root = tmp_path / "root"
    monkeypatch.setenv("GTEX_SOURCE", str(mirror))
    monkeypatch.setenv("GTEX_DATA_ROOT", str(root))
    defs = load_definitions()
    write_settings(root, {"ops": {"selected_slides": {"config": {"slides_per_tisue": 1}}}})
    result = dg.materialize(
        [gtex_histology_annotations, gtex_sample_attributes, selected_slides],
        resources=defs.resources,
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    message = failure.step_failure_data.user_failure_data.description
    assert "settings.yaml ops.selected_slides.config" in message and "slides_per_tisue" in message
