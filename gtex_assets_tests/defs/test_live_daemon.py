"""End to end under a real `dagster-daemon run` (own DAGSTER_HOME in a temp dir, SQLite storage,
this repo's workspace): the automation sensor keeps a tiny generated mirror's results current.

1. two slides added to the mirror (CSV rows + files): their tiles and embeddings appear in the
   catalog, and the analysis re-ran;
2. the GCT rewritten: expression and analysis re-ran, no per-slide asset did;
3. a retrained classifier that fails its blocking check: nothing downstream runs.

Slow on 2 cores (each run is a process that imports torch): it prints its phases' wall times.
Opt-in for now (GTEX_LIVE_DAEMON_TEST=1): on this 2-core machine, loaded, phase 1 alone took
548-600+ s, which does not fit the suite's 12-minute budget; making it fit (fewer, lighter
automated runs) is open work, see issue #13.
"""

import csv
import gzip
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import duckdb
import pytest
import yaml

from gtex_assets.cli.runner import REPO_ROOT, materialize_all, start_services, stop_services
from gtex_assets.cli.ui_check import free_port
from gtex_assets.core.settings import write_settings
from gtex_assets.lib.ingest.sources import GENE_TPM_GCT, HISTOLOGY_CSV

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("GTEX_LIVE_DAEMON_TEST") != "1",
        reason="opt-in (GTEX_LIVE_DAEMON_TEST=1): 10+ minutes on 2 cores, over the suite budget",
    ),
    pytest.mark.timeout(1500),
]

# Tiny CPU settings, in the settings file every run reads (automated runs carry no run config).
SETTINGS = {
    "ops": {
        "tissue_classifier": {
            "config": {
                "backbone": "efficientnet_lite0", "weights": "package", "input_size": 64,
                "epochs": 5, "batch_size": 16, "lr": 0.001, "checkpoint_epochs": [5],
                "n_workers": 0,
            }
        },
        "tissue_classifier_tissue_classifier_beats_chance": {
            "config": {"margin": 0.0, "n_workers": 0}
        },
        "tile_embeddings": {"config": {"decode_workers": 1}},
        "embedding_views": {"config": {"methods": ["tsne"], "max_iter": 250, "tiles": False}},
        "feature_comparison": {"config": {"n_repeats": 2}},
    }
}  # fmt: skip
PER_SLIDE = ["raw_slides", "slide_tiles", "filtered_tiles", "tile_embeddings"]
ANALYSIS = ["gene_r2", "embedding_views", "cluster_transcriptome", "feature_comparison"]
BOUND_S = 600  # per phase


def _log(msg: str) -> None:
    print(f"[live-daemon {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _last_storage_id(instance, key: str) -> int:
    recs = instance.fetch_materializations(dg.AssetKey(key), limit=1).records
    return recs[0].storage_id if recs else -1


def _storage_ids(instance, keys) -> dict[str, int]:
    return {k: _last_storage_id(instance, k) for k in keys}


def _partitions_after(instance, key: str, after: int) -> set[str]:
    recs = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), after_storage_id=after), limit=1000
    ).records
    return {r.partition_key for r in recs}


def _failed_runs(instance) -> list[str]:
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))
    out = []
    for run in runs:
        errors = [
            e.dagster_event.event_specific_data.error.message
            for e in instance.all_logs(run.run_id)
            if e.dagster_event and e.dagster_event.is_step_failure
        ]
        out.append(f"{run.run_id[:8]} {sorted(run.asset_selection or [])}: {errors[:1]}")
    return out


def _wait(instance, what: str, done, bound: float = BOUND_S) -> float:
    t0 = time.time()
    while not done():
        failed = _failed_runs(instance)
        assert not failed, f"{what}: runs failed: {failed}"
        assert time.time() - t0 < bound, f"{what}: not within {bound:.0f}s"
        time.sleep(3)
    _log(f"{what}: {time.time() - t0:.0f}s")
    return time.time() - t0


@pytest.fixture
def platform(tmp_path, monkeypatch):
    from gtex_assets.lib.synth import generate_mirror

    mirror, root, home = tmp_path / "mirror", tmp_path / "root", tmp_path / "dagster_home"
    home.mkdir()
    generate_mirror(
        mirror, tissues=3, slides_per_tissue=5, seed=11, slide_size=(1344, 1344), n_genes=200
    )
    # Hold back two slides (their CSV rows and files) to add them under the daemon.
    csv_path = mirror / HISTOLOGY_CSV
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    held = [r for r in rows if (mirror / "slides" / f"{r['Tissue Sample ID']}.svs").is_file()][:2]
    _write_csv(csv_path, [r for r in rows if r not in held])
    aside = tmp_path / "aside"
    aside.mkdir()
    for r in held:
        shutil.move(mirror / "slides" / f"{r['Tissue Sample ID']}.svs", aside)
    shutil.copyfile(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    write_settings(root, SETTINGS)
    env = {
        "DAGSTER_HOME": str(home),
        "GTEX_SOURCE": str(mirror),
        "GTEX_DATA_ROOT": str(root),
        "GTEX_EXECUTOR": "in_process",
        "GTEX_OBSERVE_CRON": "* * * * *",  # observe every minute
        "GTEX_AUTOMATION_INTERVAL_S": "5",
        "PYTHONPATH": str(REPO_ROOT),
        "DAGSTER_DISABLE_TELEMETRY": "1",
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return mirror, root, home, rows, held, aside, env


def _write_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), quoting=csv.QUOTE_ALL)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _observe_sources(instance) -> None:
    from gtex_assets.cli.runner import load_definitions

    defs = load_definitions()
    keys = [a.key for a in defs.assets if isinstance(a, dg.SourceAsset)]
    sources = [a for a in defs.assets if isinstance(a, dg.SourceAsset)]
    job = dg.define_asset_job("observe_sources", selection=dg.AssetSelection.assets(*keys))
    obs = dg.Definitions(assets=sources, jobs=[job], resources=defs.resources)
    assert obs.resolve_job_def("observe_sources").execute_in_process(instance=instance).success


def test_daemon_keeps_the_platform_current(platform, tmp_path):
    mirror, root, home, rows, held, aside, env = platform
    t_start = time.time()
    instance = dg.DagsterInstance.get()
    # The starting point: everything built once (as `gtex-assets demo` does) and observed.
    materialize_all(instance=instance, log=_log)
    _observe_sources(instance)
    _log(f"initial build: {time.time() - t_start:.0f}s")

    log = open(tmp_path / "services.log", "w")  # noqa: SIM115 (closed in finally)
    procs_port = free_port()
    procs = start_services(home, port=procs_port, env=env, stdout=log)
    try:
        t_live = time.time()
        # (1) two new slides: CSV rows + files.
        before = _storage_ids(instance, ["duckdb_catalog", *ANALYSIS])
        tiles_before = _last_storage_id(instance, "tile_embeddings")
        for r in held:
            shutil.move(aside / f"{r['Tissue Sample ID']}.svs", mirror / "slides")
        _write_csv(mirror / HISTOLOGY_CSV, rows)
        new = {r["Tissue Sample ID"] for r in held}

        def new_slides_done() -> bool:
            embedded = _partitions_after(instance, "tile_embeddings", tiles_before)
            after = _storage_ids(instance, ["duckdb_catalog", *ANALYSIS])
            return (
                new <= embedded
                and all(after[k] > before[k] for k in after)
                and (after["duckdb_catalog"] > _last_storage_id(instance, "slide_embeddings"))
            )

        _wait(instance, "(1) new slides through to the catalog", new_slides_done)
        con = duckdb.connect(str(root / "gtex.duckdb"), read_only=True)
        ids = sorted(new)
        # A new slide with no kept tile (blank, pen) has no sampled tile to embed.
        sampled = con.execute(
            "SELECT count(DISTINCT tissue_sample_id) FROM balanced_tile_sample "
            "WHERE tissue_sample_id IN (?, ?)",
            ids,
        ).fetchone()[0]
        assert sampled >= 1
        for view, want in (
            ("raw_slides", 2),
            ("tile_embeddings", sampled),
            ("slide_embeddings", sampled),
        ):
            got = con.execute(
                f"SELECT count(DISTINCT tissue_sample_id) FROM {view} WHERE tissue_sample_id IN (?, ?)",
                ids,
            ).fetchone()[0]
            assert got == want, view
        con.close()
        _wait_idle(instance)

        # (2) the GCT rewritten (same values, new bytes): expression + analysis, nothing per slide.
        marks = _storage_ids(instance, ["gene_log_tpm", *ANALYSIS, *PER_SLIDE])
        gct = mirror / GENE_TPM_GCT
        gct.write_bytes(gzip.compress(gzip.decompress(gct.read_bytes()), compresslevel=1))

        def expression_done() -> bool:
            now = _storage_ids(instance, ["gene_log_tpm", *ANALYSIS])
            return all(now[k] > marks[k] for k in now)

        _wait(instance, "(2) rewritten GCT through the analysis", expression_done)
        _wait_idle(instance)
        for key in PER_SLIDE:
            assert _partitions_after(instance, key, marks[key]) == set(), key

        # (3) a retrained classifier failing its blocking check: nothing downstream runs.
        marks = _storage_ids(instance, ["tissue_classifier", "slide_embeddings", *ANALYSIS])
        tiles_mark = _last_storage_id(instance, "tile_embeddings")
        impossible = {
            "ops": {
                "tissue_classifier": {"config": {"retrain": True}},
                "tissue_classifier_tissue_classifier_beats_chance": {"config": {"margin": 1.0}},
            }
        }
        settings = root / "settings.yaml"
        data = yaml.safe_load(settings.read_text())
        from gtex_assets.core.settings import merge

        settings.write_text(yaml.safe_dump(merge(data, impossible)))
        # A user retrains from the shell (a real run on the daemon's instance).
        subprocess.run(
            [str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m",
             "gtex_assets.definitions", "--select", "tissue_classifier"],
            cwd=REPO_ROOT, env={**os.environ, **env}, check=False, capture_output=True,
            timeout=600,
        )  # fmt: skip
        assert _last_storage_id(instance, "tissue_classifier") > marks["tissue_classifier"]
        check = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(dg.AssetKey("tissue_classifier"), "tissue_classifier_beats_chance")]
        )
        (record,) = check.values()
        assert record.status.value == "FAILED"
        time.sleep(45)  # several automation ticks
        _wait_idle(instance)
        assert _partitions_after(instance, "tile_embeddings", tiles_mark) == set()
        now = _storage_ids(instance, ["slide_embeddings", *ANALYSIS])
        assert all(now[k] == marks[k] for k in now), now
        _log(f"live phases: {time.time() - t_live:.0f}s; total {time.time() - t_start:.0f}s")
    finally:
        shot = os.environ.get("GTEX_AUTOMATION_SCREENSHOT")
        if shot:  # the UI's automation views with the condition evaluations of these ticks
            try:
                _screenshots(procs_port, Path(shot))
            except Exception as e:  # a screenshot never hides the test's own outcome
                _log(f"screenshot failed: {e}")
        stop_services(procs)
        log.close()


def _wait_idle(instance, bound: float = 120) -> None:
    """No run queued or in progress (the automation may start one more right after)."""
    active = [
        dg.DagsterRunStatus.QUEUED,
        dg.DagsterRunStatus.NOT_STARTED,
        dg.DagsterRunStatus.STARTING,
        dg.DagsterRunStatus.STARTED,
    ]
    t0 = time.time()
    while instance.get_runs_count(filters=dg.RunsFilter(statuses=active)):
        assert time.time() - t0 < bound, "runs still active"
        time.sleep(2)


def _screenshots(port: int, out: Path) -> None:
    from gtex_assets.cli.ui_check import chromium_capture, find_chromium, graphql

    chromium = find_chromium()
    if chromium is None:
        _log("no Chromium: no screenshot")
        return
    graphql(port, "mutation { setNuxSeen }")
    base = f"http://127.0.0.1:{port}"
    pages = {
        out: f"{base}/assets/tile_embeddings?view=automation",
        out.with_name(out.stem + "_sensor.png"): f"{base}/automation",
        out.with_name(out.stem + "_catalog.png"): f"{base}/assets/duckdb_catalog?view=automation",
    }
    for png, url in pages.items():
        chromium_capture(url, png, chromium=chromium, budget_ms=25000)
        _log(f"screenshot {png}")
