"""The distributed engine for real: PostgreSQL + Redis + 2 Celery workers (+ the single-slot
exclusive worker) started by `gtex_assets.cli.cluster.up` on 127.0.0.1, a backfill of the tiny
mirror's slides and the aggregates through the celery executor, two slide batches at once.

Asserts: every step ran in a worker's pool process; the runs and their event logs are rows in
PostgreSQL; the tile index and the embeddings equal an in-process run's; the exclusive writers'
steps never overlapped although their runs did; a worker process killed (SIGKILL, with its
children) in the middle of `slide_tiles` gives a retried step, a successful run, no temp file.

Skipped with the reason where PostgreSQL, Redis or dagster-celery are missing. Wall time: see
the module's timeout; on 2 cores shared with other jobs most of it is importing the
definitions (each worker once) and the in-process reference run, not the steps.
"""

import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from gtex_assets.core import services as S

pytest.importorskip("dagster_celery", reason="dagster-celery not installed (.[cluster])")
pytest.importorskip("dagster_postgres", reason="dagster-postgres not installed (.[cluster])")
try:
    S.postgres_bin("initdb")
    S.postgres_bin("postgres")
    if shutil.which("redis-server") is None:
        raise S.ServiceError("redis-server not on PATH (apt-get install redis-server)")
except S.ServiceError as e:
    pytest.skip(f"cannot start the services: {e}", allow_module_level=True)

from dagster._core.events import DagsterEventType  # noqa: E402
from dagster._serdes import deserialize_value  # noqa: E402

from gtex_assets.cli import cluster as C  # noqa: E402
from gtex_assets.cli.runner import materialize_all  # noqa: E402
from gtex_assets.core.lake import Lake  # noqa: E402
from gtex_assets.defs.execution import EXCLUSIVE_POOLS, EXCLUSIVE_QUEUE  # noqa: E402

SELECTION = [
    "histology_annotations", "sample_attributes", "selected_slides",
    "raw_slides", "slide_tiles", "filtered_tiles", "balanced_tile_sample",
    "tile_embeddings", "slide_embeddings",
]  # fmt: skip
RUN_CONFIG = {
    "ops": {
        # Offline weights shipped in a package; no classifier in this selection.
        "tile_embeddings": {
            "config": {
                "checkpoints": "none",
                "backbone": "efficientnet_lite0",
                "off_the_shelf_weights": "package",
                "decode_workers": 1,
            }
        }
    }
}
KILL_STEP = "slide_tiles"
# The whole module shares one cluster and one backfill; under load that takes minutes.
pytestmark = pytest.mark.timeout(1200)
BATCH = 5  # 9 slides: two batch runs, run at the same time


def _step_pool(step_key: str) -> str | None:
    return {"tile_embeddings": "gpu", "slide_embeddings": "lancedb_writer"}.get(step_key)


@pytest.fixture(scope="module")
def reference(tiny_mirror, tmp_path_factory):
    """The same selection in one process on a SQLite-free ephemeral instance."""
    root = tmp_path_factory.mktemp("inproc")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GTEX_DATA_ROOT", str(root))
        mp.setenv("GTEX_SOURCE", str(tiny_mirror))
        materialize_all(
            selection=SELECTION,
            run_config=RUN_CONFIG,
            batch_size=BATCH,
            instance=dg.DagsterInstance.ephemeral(),
            log=lambda m: None,
        )
    return root


class Killer(threading.Thread):
    """Waits for the first STEP_START of ``step`` in PostgreSQL, then SIGKILLs that step's
    process and its children: only pool processes of the workers this test started."""

    def __init__(self, state: dict, step: str):
        super().__init__(daemon=True)
        self.state, self.step = state, step
        self.killed: dict | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        import psycopg2

        workers = {s["pid"] for s in self.state["services"] if s["name"] == "worker"}
        con = psycopg2.connect(self.state["postgres_url"])
        con.autocommit = True
        while not self.stop.is_set():
            with con.cursor() as cur:
                cur.execute(
                    "SELECT run_id, event FROM event_logs WHERE dagster_event_type = %s "
                    "AND step_key = %s ORDER BY id LIMIT 1",
                    ("STEP_START", self.step),
                )
                row = cur.fetchone()
            if row:
                pid = deserialize_value(row[1], dg.EventLogEntry).dagster_event.pid
                if S.parent_pid(pid) in workers:
                    tree = _descendants(pid)
                    for p in [pid, *tree]:
                        os.kill(p, signal.SIGKILL)
                    self.killed = {"run_id": row[0], "pid": pid, "children": tree}
                break
            time.sleep(0.1)
        con.close()


def _descendants(pid: int) -> list[int]:
    out = []
    for c in S.child_pids(pid):
        out += [c, *_descendants(c)]
    return out


@pytest.fixture(scope="module")
def cluster_run(tiny_mirror, reference):
    root = Path(tempfile.mkdtemp(prefix="gtex-cluster-test-"))
    os.chmod(root, 0o755)  # the PostgreSQL server may run as another OS user
    t0 = time.time()
    state = C.up(root, workers=2, source=str(tiny_mirror), webserver=False, daemon=False,
                 log=lambda m: None)  # fmt: skip
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in C.cluster_env(state).items():
                mp.setenv(k, v)
            up_s = time.time() - t0
            instance = dg.DagsterInstance.get()
            killer = Killer(state, KILL_STEP)
            killer.start()
            t1 = time.time()
            run_ids = C.materialize_distributed(
                instance=instance, selection=SELECTION, run_config=RUN_CONFIG,
                batch_size=BATCH, parallel_batches=2, log=lambda m: None,
            )  # fmt: skip
            killer.stop.set()
            killer.join(5)
            worker_children = {
                s["extra"]["node"]: set(S.child_pids(s["pid"]))
                for s in state["services"]
                if s["name"] == "worker"
            }
            yield {
                "root": root,
                "state": state,
                "instance": instance,
                "run_ids": run_ids,
                "killed": killer.killed,
                "worker_children": worker_children,
                "seconds": {"up": up_s, "runs": time.time() - t1},
            }
            instance.dispose()
    finally:
        C.down(root, log=lambda m: None)
        assert not any(S.pid_alive(s["pid"]) for s in state["services"])
        shutil.rmtree(root, ignore_errors=True)


def _events(instance, run_id: str, kind: DagsterEventType):
    return [r.event_log_entry for r in instance.get_records_for_run(run_id, of_type=kind).records]


def test_steps_ran_in_the_workers(cluster_run):
    inst, killed = cluster_run["instance"], cluster_run["killed"]
    pool_pids = set().union(*cluster_run["worker_children"].values())
    nodes = {}
    for run_id in cluster_run["run_ids"]:
        for e in _events(inst, run_id, DagsterEventType.ENGINE_EVENT):
            md = e.dagster_event.event_specific_data.metadata
            if "Celery worker" in md:
                nodes.setdefault(e.step_key, []).append(md["Celery worker"].value.split("@")[0])
        for e in _events(inst, run_id, DagsterEventType.STEP_START):
            pid = e.dagster_event.pid
            assert pid != os.getpid()
            if killed and pid == killed["pid"]:
                continue  # that process is gone
            assert pid in pool_pids, (e.step_key, pid, cluster_run["worker_children"])
    assert set(nodes) >= {"raw_slides", "slide_tiles", "tile_embeddings", "slide_embeddings"}
    for step, names in nodes.items():
        if _step_pool(step) in EXCLUSIVE_POOLS:
            assert set(names) == {"exclusive"}, (step, names)  # the single-slot queue's worker
        else:
            assert set(names) <= {"w1", "w2"}, (step, names)
    general = {n for step, ns in nodes.items() if not _step_pool(step) for n in ns}
    assert general == {"w1", "w2"}  # both general workers took steps
    print(f"cluster wall times: {cluster_run['seconds']}; exclusive queue {EXCLUSIVE_QUEUE}")


def test_runs_and_events_are_in_postgres(cluster_run):
    import psycopg2

    con = psycopg2.connect(cluster_run["state"]["postgres_url"])
    with con.cursor() as cur:
        cur.execute(
            "SELECT run_id, status FROM runs WHERE run_id = ANY(%s)", (cluster_run["run_ids"],)
        )
        runs = dict(cur.fetchall())
        cur.execute(
            "SELECT run_id, count(*) FROM event_logs WHERE run_id = ANY(%s) GROUP BY run_id",
            (cluster_run["run_ids"],),
        )
        events = dict(cur.fetchall())
    con.close()
    assert set(runs) == set(cluster_run["run_ids"]) and set(runs.values()) == {"SUCCESS"}
    assert all(events[r] > 5 for r in cluster_run["run_ids"])
    # The pool limits live in the same database, one slot each.
    for pool in ("gpu", "lancedb_writer"):
        info = cluster_run["instance"].event_log_storage.get_concurrency_info(pool)
        assert info.slot_count == 1, (pool, info)


def test_outputs_equal_the_in_process_run(cluster_run, reference):
    got, want = Lake.at(cluster_run["root"]), Lake.at(reference)
    ids = sorted(p.stem for p in want.partition_dir("slide_tiles").glob("*.parquet"))
    assert len(ids) == 9
    for sid in ids:
        a = pd.read_parquet(got.partition_table("slide_tiles", sid))
        b = pd.read_parquet(want.partition_table("slide_tiles", sid))
        cols = [c for c in b.columns if c != "path"]  # paths differ by the data root
        pd.testing.assert_frame_equal(a[cols], b[cols])
    # Slides without tiles in the balanced sample have no embedding file, in either run.
    emb = sorted(p.name for p in want.partition_dir("tile_embeddings").glob("*.parquet"))
    assert emb and emb == sorted(
        p.name for p in got.partition_dir("tile_embeddings").glob("*.parquet")
    )
    for name in emb:
        ea, eb = (
            pd.read_parquet(lk.partition_dir("tile_embeddings") / name).sort_values(
                ["model_id", "tile_id"], ignore_index=True
            )
            for lk in (got, want)
        )
        assert list(ea["tile_id"]) == list(eb["tile_id"]) and len(ea)
        np.testing.assert_array_equal(np.stack(ea["vector"]), np.stack(eb["vector"]))
    sa = pd.read_parquet(got.table("slide_embeddings"))
    sb = pd.read_parquet(want.table("slide_embeddings"))
    assert len(sa) == len(sb) > 0


def test_exclusive_writers_never_overlapped(cluster_run):
    inst = cluster_run["instance"]
    spans: dict[str, list] = {}
    run_spans = []
    for run_id in cluster_run["run_ids"]:
        recs = inst.get_records_for_run(run_id).records
        ts = [r.event_log_entry.timestamp for r in recs]
        run_spans.append((min(ts), max(ts), run_id))
        start = {}
        for r in recs:
            e = r.event_log_entry
            if not e.dagster_event or not _step_pool(e.step_key or ""):
                continue
            if e.dagster_event.event_type == DagsterEventType.STEP_START:
                start[e.step_key] = e.timestamp
            elif e.dagster_event.event_type in (
                DagsterEventType.STEP_SUCCESS,
                DagsterEventType.STEP_FAILURE,
            ):
                spans.setdefault(_step_pool(e.step_key), []).append(
                    (start.pop(e.step_key), e.timestamp, run_id)
                )
    assert len(spans["gpu"]) == 2  # tile_embeddings of both slide batches
    for pool, ivs in spans.items():
        ivs.sort()
        for (_s0, e0, r0), (s1, _e1, r1) in zip(ivs, ivs[1:], strict=False):
            assert e0 <= s1, f"pool {pool}: steps of runs {r0} and {r1} overlapped"
    # ... while the two batch runs holding them did overlap (so the limit had work to do).
    gpu_runs = {r for _s, _e, r in spans["gpu"]}
    a, b = sorted(s for s in run_spans if s[2] in gpu_runs)
    assert b[0] < a[1], "the two tile_embeddings runs did not run at the same time"


def test_killed_worker_step_is_retried(cluster_run):
    killed = cluster_run["killed"]
    assert killed, f"{KILL_STEP} never started in a worker pool process"
    inst = cluster_run["instance"]
    starts = [
        e
        for e in _events(inst, killed["run_id"], DagsterEventType.STEP_START)
        if e.step_key == KILL_STEP
    ]
    assert len(starts) == 2 and starts[0].dagster_event.pid == killed["pid"]
    assert starts[1].dagster_event.pid != killed["pid"]
    ok = _events(inst, killed["run_id"], DagsterEventType.STEP_SUCCESS)
    assert KILL_STEP in {e.step_key for e in ok}
    assert inst.get_run_by_id(killed["run_id"]).status == dg.DagsterRunStatus.SUCCESS
    leftovers = [p for p in cluster_run["root"].rglob(".*.tmp") if "cluster" not in p.parts]
    assert not leftovers, leftovers
