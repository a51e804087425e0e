"""Throughput of the distributed engine vs the in-process executor, same slides, same run.

    python benchmarks/bench_scaleout.py [--tissues 3 --slides-per-tissue 4 --slide-size 4480x3584]
                                        [--workers 2] [--work DIR]

Generates one synthetic mirror, then materialises the per-slide stages (raw_slides,
slide_tiles, filtered_tiles) and tile_embeddings (off-the-shelf EfficientNet-Lite0, offline
weights) twice on fresh data roots:
  (a) baseline: `materialize_all` in this process (dg.materialize: the in-process executor; a
      batch of all slides per run; inside a step the tiler uses every core);
  (b) `gtex-assets cluster up` (PostgreSQL + Redis + N Celery workers) and
      `materialize_distributed`: one batch run per worker, all at once.
The ingest assets run first in both, untimed. Prints both wall times, the ratio (a)/(b), and the
per-stage step times from each run's event log (the per-stage costs the projection in
benchmarks/README_scaleout.md uses).
"""

import argparse
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import dagster as dg

INGEST = ["histology_annotations", "sample_attributes", "selected_slides"]
SLIDE_STAGES = ["raw_slides", "slide_tiles", "filtered_tiles", "balanced_tile_sample",
                "tile_embeddings"]  # fmt: skip
RUN_CONFIG = {
    "ops": {
        "tile_embeddings": {
            "config": {
                "checkpoints": "none",
                "backbone": "efficientnet_lite0",
                "off_the_shelf_weights": "package",
            }
        }
    }
}


def step_seconds(instance, run_ids) -> dict[str, float]:
    """Sum of STEP_START → STEP_SUCCESS per step key over ``run_ids``."""
    out: dict[str, float] = {}
    for rid in run_ids:
        start = {}
        for r in instance.get_records_for_run(rid).records:
            e = r.event_log_entry
            if not e.dagster_event or not e.step_key:
                continue
            if e.dagster_event.event_type == dg.DagsterEventType.STEP_START:
                start[e.step_key] = e.timestamp
            elif e.dagster_event.event_type == dg.DagsterEventType.STEP_SUCCESS:
                out[e.step_key] = out.get(e.step_key, 0.0) + e.timestamp - start[e.step_key]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tissues", type=int, default=3)
    p.add_argument("--slides-per-tissue", type=int, default=4)
    p.add_argument("--slide-size", default="4480x3584")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", help="scratch directory (default: a new temp dir, removed after)")
    args = p.parse_args()

    from gtex_assets.cli import cluster as C
    from gtex_assets.cli.runner import materialize_all
    from gtex_assets.lib.synth import generate_mirror

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scaleout-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o755)  # PostgreSQL may run as another OS user
    w, h = (int(v) for v in args.slide_size.split("x"))
    mirror = work / "mirror"
    s = generate_mirror(mirror, tissues=args.tissues, slides_per_tissue=args.slides_per_tissue,
                        seed=0, slide_size=(w, h), n_genes=300)  # fmt: skip
    n = s.n_slides
    print(f"mirror: {n} slides of {w}x{h} px; machine: {os.cpu_count()} cores; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    os.environ["GTEX_SOURCE"] = str(mirror)

    # (a) in-process
    root_a = work / "inproc"
    os.environ["GTEX_DATA_ROOT"] = str(root_a)
    inst_a = dg.DagsterInstance.ephemeral()
    materialize_all(selection=INGEST, instance=inst_a, log=lambda m: None)
    t0 = time.time()
    res_a = materialize_all(selection=SLIDE_STAGES, run_config=RUN_CONFIG, batch_size=n,
                            instance=inst_a, log=lambda m: None)  # fmt: skip
    t_a = time.time() - t0
    steps_a = step_seconds(inst_a, [r.run_id for r in res_a])
    print(f"(a) in-process: {t_a:.1f}s  ({n / t_a * 3600:.0f} slides/h)", flush=True)

    # (b) Celery workers
    root_b = work / "cluster"
    t0 = time.time()
    state = C.up(root_b, workers=args.workers, source=str(mirror), webserver=False,
                 daemon=False, log=lambda m: None)  # fmt: skip
    print(f"cluster up in {time.time() - t0:.0f}s (not counted)", flush=True)
    try:
        os.environ.update(C.cluster_env(state))
        inst_b = dg.DagsterInstance.get()
        C.materialize_distributed(instance=inst_b, selection=INGEST, log=lambda m: None)
        t0 = time.time()
        ids_b = C.materialize_distributed(
            instance=inst_b, selection=SLIDE_STAGES, run_config=RUN_CONFIG,
            batch_size=math.ceil(n / args.workers), parallel_batches=args.workers,
            log=lambda m: None,
        )  # fmt: skip
        t_b = time.time() - t0
        steps_b = step_seconds(inst_b, ids_b)
        inst_b.dispose()
    finally:
        C.down(root_b, log=lambda m: None)
    print(f"(b) celery, {args.workers} workers: {t_b:.1f}s  ({n / t_b * 3600:.0f} slides/h)")
    print(f"ratio (a)/(b): {t_a / t_b:.2f}x")
    print("\nstep seconds (sum over runs; per slide)")
    print(f"{'step':<22} {'(a) in-process':>16} {'(b) celery':>16}")
    for k in SLIDE_STAGES:
        a, b = steps_a.get(k, float("nan")), steps_b.get(k, float("nan"))
        print(f"{k:<22} {a:8.1f} ({a / n:5.2f}) {b:8.1f} ({b / n:5.2f})")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
