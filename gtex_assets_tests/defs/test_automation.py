"""The automation conditions, evaluated tick by tick the way the daemon's automation sensor does
(`dg.evaluate_automation_conditions` with the cursor carried across ticks) on a real instance.

Source files are observed for real (`dg.observe`, the observation path the sensor launches);
the state of the other assets is recorded as their materialisation and check events, so each
case tests exactly which assets and slide partitions the next ticks request.
"""

import gzip
import os

import dagster as dg
import pytest

from gtex_assets.cli.runner import load_definitions
from gtex_assets.defs.automation import DEFAULT_OBSERVE_CRON, OBSERVE_CRON_ENV, _op_keys
from gtex_assets.lib.ingest.sources import GENE_TPM_GCT, HISTOLOGY_CSV, SAMPLE_ATTRIBUTES

SOURCES = ["gtex_portal_csv", "gtex_sample_attributes_file", "gtex_gene_tpm_gct"]
# Ops (a multi-asset's outputs run together); the automation requests an op's outputs.
PER_SLIDE = {"raw_slides", "slide_tiles", "filtered_tiles", "tile_embeddings"}
ANALYSIS = {"gene_r2", "joint_pca", "embedding_views", "cluster_transcriptome",
            "feature_comparison", "tile_gene_predictions"}  # fmt: skip
ROOTS = {"histology_annotations", "sample_attributes", "selected_slides", "gene_log_tpm"}
SLIDES = ["GTEX-1117F-0126", "GTEX-1117F-0226", "GTEX-111CU-0126"]
NEW = ["GTEX-111FC-0126", "GTEX-111FC-0226"]
CHECK = dg.AssetCheckKey(dg.AssetKey("tissue_classifier"), "tissue_classifier_beats_chance")


@pytest.fixture(scope="module")
def defs():
    return load_definitions()


class World:
    """An instance, a mirror with the three GTEx files, and the automation cursor."""

    def __init__(self, defs, tmp_path):
        self.defs, self.graph = defs, defs.resolve_asset_graph()
        self.ops = {k: op for k, (op, _) in _op_keys(defs).items()}
        self.instance = dg.DagsterInstance.ephemeral()
        self.mirror = tmp_path / "mirror"
        self.mirror.mkdir()
        for name in (HISTOLOGY_CSV, SAMPLE_ATTRIBUTES):
            (self.mirror / name).write_text(f"{name}\n")
        self.write_gct(b"#1.2\n")
        os.environ["GTEX_SOURCE"] = str(self.mirror)
        self.cursor = None

    def write_gct(self, payload: bytes) -> None:
        (self.mirror / GENE_TPM_GCT).write_bytes(gzip.compress(payload))

    def observe(self) -> None:
        # The observation job the automation sensor launches for the source assets.
        sources = [a for a in self.defs.assets if isinstance(a, dg.SourceAsset)]
        job = dg.define_asset_job("observe", selection=dg.AssetSelection.assets(*self.source_keys))
        defs = dg.Definitions(assets=sources, jobs=[job], resources=self.defs.resources)
        result = defs.resolve_job_def("observe").execute_in_process(instance=self.instance)
        assert result.success

    @property
    def source_keys(self) -> set:
        return {dg.AssetKey(s) for s in SOURCES}

    def materialized(self, *ops: str, partitions=None) -> None:
        """Record every output of these ops as materialised (per slide when partitioned), and
        their checks as passed."""
        for key in [k for k, op in self.ops.items() if op in ops]:
            parts = partitions if self.graph.get(key).partitions_def else None
            for p in parts or [None]:
                self.instance.report_runless_asset_event(
                    dg.AssetMaterialization(asset_key=key, partition=p)
                )
            for check in self.graph.get(key).check_keys:
                self.check(check, passed=True)

    def check(self, key: dg.AssetCheckKey, passed: bool) -> None:
        self.instance.report_runless_asset_event(
            dg.AssetCheckEvaluation(
                asset_key=key.asset_key, check_name=key.name, passed=passed, blocking=True
            )
        )

    def tick(self) -> dict[str, set]:
        """One evaluation of every condition; returns op -> requested partitions ({None})."""
        result = dg.evaluate_automation_conditions(
            defs=self.defs, instance=self.instance, cursor=self.cursor
        )
        self.cursor = result.cursor
        out: dict[str, set] = {}
        for r in result.results:
            if r.true_subset.size and isinstance(r.key, dg.AssetKey):
                op = self.ops.get(r.key, r.key.to_user_string())
                out.setdefault(op, set()).update(result.get_requested_partitions(r.key))
        return out

    def steady(self) -> None:
        """Every source observed and every asset materialised for SLIDES; the first ticks have
        seen that state, so the next tick starts from a converged graph."""
        self.instance.add_dynamic_partitions("slides", SLIDES)
        self.observe()
        self.materialized(*set(self.ops.values()), partitions=SLIDES)
        self.tick()
        assert self.tick() == {}


@pytest.fixture
def world(defs, tmp_path):
    old = os.environ.get("GTEX_SOURCE")
    w = World(defs, tmp_path)
    yield w
    if old is None:
        os.environ.pop("GTEX_SOURCE", None)
    else:
        os.environ["GTEX_SOURCE"] = old


def test_every_op_is_automated_and_the_sensor_ships_running(defs):
    graph = defs.resolve_asset_graph()
    automated_ops = {
        op for k, (op, _) in _op_keys(defs).items() if graph.get(k).automation_condition
    }
    assert automated_ops == {op for op, _ in _op_keys(defs).values()}
    for key in SOURCES:
        assert graph.get(dg.AssetKey(key)).automation_condition is not None
    sensor = defs.resolve_sensor_def("gtex_automation")
    assert isinstance(sensor, dg.AutomationConditionSensorDefinition)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert {dg.AssetKey(s) for s in SOURCES} <= sensor.asset_selection.resolve(graph)
    # Each table that reads a GTEx file depends on its source asset.
    assert dg.AssetKey("gtex_gene_tpm_gct") in graph.get(dg.AssetKey("gene_log_tpm")).parent_keys


def test_sources_are_observed_on_the_cron(world, monkeypatch):
    label = world.graph.get(dg.AssetKey("gtex_gene_tpm_gct")).automation_condition.get_label()
    assert DEFAULT_OBSERVE_CRON in label
    monkeypatch.setenv(OBSERVE_CRON_ENV, "*/5 * * * *")
    cond = load_definitions().resolve_asset_graph().get(dg.AssetKey("gtex_portal_csv"))
    assert "*/5 * * * *" in cond.automation_condition.get_label()


def _then(world, requested: dict, partitions=SLIDES) -> dict:
    """Record what was requested as done, and evaluate the next tick."""
    world.materialized(*requested, partitions=partitions)
    return world.tick()


def test_an_empty_platform_builds_itself_in_order(world):
    world.observe()
    tick = world.tick()
    # The tables that read the GTEx files; nothing over slides while there is no slide.
    assert set(tick) == ROOTS
    world.instance.add_dynamic_partitions("slides", SLIDES)  # what selected_slides does
    tick = _then(world, tick)
    assert tick == {name: set(SLIDES) for name in ("raw_slides", "slide_tiles", "filtered_tiles")}
    tick = _then(world, tick)
    assert "balanced_tile_sample" in tick and not set(tick) & {*PER_SLIDE, "tissue_classifier"}
    tick = _then(world, tick)  # the classifier after the sample's run and its blocking check
    assert "tissue_classifier" in tick and "tile_embeddings" not in tick
    tick = _then(world, tick)
    assert tick.get("tile_embeddings") == set(SLIDES)
    for _ in range(4):  # slide embeddings, then analysis and catalog, as their parents finish
        if not tick:
            break
        tick = _then(world, tick)
    assert tick == {}
    done = {op for k, op in world.ops.items() if world.instance.get_latest_materialization_event(k)}
    assert {"slide_embeddings", *ANALYSIS, "duckdb_catalog"} <= done


def test_nothing_unchanged_reruns(world):
    world.steady()
    world.observe()  # same files, same versions: observations, but no updates
    assert world.tick() == {}
    assert world.tick() == {}


def test_changed_gct_reruns_expression_analysis_and_catalog_only(world):
    world.steady()
    world.write_gct(b"#1.2\nnew release\n")
    world.observe()
    tick = world.tick()
    assert "gene_log_tpm" in tick and not set(tick) & {*PER_SLIDE, "selected_slides"}
    seen = set(tick)
    while tick:
        tick = _then(world, tick)
        seen |= set(tick)
    assert {"gene_log_tpm", "gene_r2", "duckdb_catalog"} <= seen
    assert not seen & {*PER_SLIDE, "selected_slides", "balanced_tile_sample", "tissue_classifier",
                       "slide_embeddings"}  # fmt: skip


def test_new_slides_run_per_slide_then_embeddings_after_the_sample(world):
    world.steady()
    (world.mirror / HISTOLOGY_CSV).write_text("two more rows\n")
    world.observe()
    tick = world.tick()
    assert {"histology_annotations", "selected_slides"} <= set(tick)
    assert not set(tick) & {*PER_SLIDE, "balanced_tile_sample", "tissue_classifier"}
    world.instance.add_dynamic_partitions("slides", NEW)  # what selected_slides does
    tick = _then(world, tick)
    # Only the new slides, per slide; the sample and embeddings wait for their tiles.
    assert {k: v for k, v in tick.items() if k in PER_SLIDE} == {
        name: set(NEW) for name in ("raw_slides", "slide_tiles", "filtered_tiles")
    }
    assert "balanced_tile_sample" not in tick
    tick = _then(world, tick, NEW)
    assert "balanced_tile_sample" in tick and not set(tick) & {*PER_SLIDE, "tissue_classifier"}
    tick = _then(world, tick)
    # After the sample includes them: tile embeddings under every model of record (the
    # classifier is not retrained), then slide embeddings, analysis and the catalog.
    assert tick.get("tile_embeddings") == set(SLIDES + NEW)
    assert "tissue_classifier" not in tick
    seen = set()
    tick = _then(world, tick, SLIDES + NEW)
    while tick:
        seen |= set(tick)
        tick = _then(world, tick, SLIDES + NEW)
    assert {"slide_embeddings", *ANALYSIS, "duckdb_catalog"} <= seen
    assert not seen & {*PER_SLIDE, "tissue_classifier", "balanced_tile_sample"}


def test_retrained_classifier_reembeds_every_slide(world):
    world.steady()
    world.materialized("tissue_classifier")
    tick = world.tick()
    assert tick.get("tile_embeddings") == set(SLIDES)
    seen = set()
    while tick:
        tick = _then(world, tick)
        seen |= set(tick)
    assert {"slide_embeddings", *ANALYSIS} <= seen
    assert not seen & {"raw_slides", "slide_tiles", "filtered_tiles", "balanced_tile_sample"}


def test_failing_blocking_check_stops_everything_downstream(world):
    world.steady()
    world.instance.report_runless_asset_event(
        dg.AssetMaterialization(asset_key=dg.AssetKey("tissue_classifier"))
    )
    world.check(CHECK, passed=False)
    for _ in range(3):
        assert not set(world.tick()) & {"tile_embeddings", "slide_embeddings", *ANALYSIS}
    # A passing evaluation (e.g. after retraining) releases the downstream assets.
    world.materialized("tissue_classifier")
    assert "tile_embeddings" in world.tick()


def test_dg_check_defs_passes_without_location_warnings(tmp_path):
    """`dg check defs` (the dg CLI of this environment) loads the project cleanly; with
    `code_location_name` set there is no location-name warning."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from gtex_assets.cli.runner import REPO_ROOT

    dg_exe = Path(sys.executable).parent / "dg"
    if not dg_exe.is_file():
        pytest.skip("dagster-dg-cli is not installed (pip install -e '.[dev]')")
    shutil.copyfile(REPO_ROOT / "dagster.yaml", tmp_path / "dagster.yaml")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(tmp_path),
        "PYTHONPATH": str(REPO_ROOT),
        "PATH": f"{dg_exe.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    proc = subprocess.run(
        [str(dg_exe), "check", "defs"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "All definitions loaded successfully" in out
    assert "WARNING" not in out, out[-3000:]
