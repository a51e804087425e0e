"""Materialise the whole asset graph from the shell (what `gtex-assets demo` runs).

Assets run in dependency order, in as few runs as the partitioning allows: unpartitioned assets
together; per-slide assets in batches of slides (one run per batch, the same batching the UI's
backfills use), so the run history in the UI looks like a user's own backfill.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def load_definitions() -> dg.Definitions:
    from gtex_assets.defs.automation import apply_automation

    return apply_automation(dg.load_from_defs_folder(path_within_project=Path(__file__).parents[1]))


def ensure_dagster_home(data_root: Path) -> Path:
    """Use $DAGSTER_HOME, else ``<data root>/dagster_home`` seeded with the repo's dagster.yaml,
    so runs from the shell and `dagster dev` share one instance (and the UI shows them)."""
    home = os.environ.get("DAGSTER_HOME")
    if home:
        Path(home).mkdir(parents=True, exist_ok=True)
        return Path(home)
    path = (data_root / "dagster_home").resolve()
    path.mkdir(parents=True, exist_ok=True)
    template = REPO_ROOT / "dagster.yaml"
    if template.is_file() and not (path / "dagster.yaml").exists():
        shutil.copyfile(template, path / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(path)
    return path


def _stages(defs: dg.Definitions, selection: Sequence[str] | None) -> list[tuple[bool, list]]:
    """Dependency-ordered stages ``(partitioned?, [asset keys])``: each stage takes every asset
    of one kind (per-slide or not) whose parents are done, so stages alternate and stay few."""
    graph = defs.resolve_asset_graph()
    keys = sorted(
        (k for k in graph.get_all_asset_keys() if graph.get(k).is_materializable), key=str
    )
    if selection:
        # A multi_asset runs whole: selecting one of its tables selects its siblings too.
        chosen = dg.AssetSelection.assets(*(dg.AssetKey.from_user_string(s) for s in selection))
        wanted = chosen.required_multi_asset_neighbors().resolve(graph)
        keys = [k for k in keys if k in wanted]
    parents = {k: set(graph.get(k).parent_keys) & set(keys) for k in keys}
    partitioned = {k: graph.get(k).partitions_def is not None for k in keys}
    done: set = set()
    stages: list[tuple[bool, list]] = []
    kind = False
    while len(done) < len(keys):
        stage: list = []
        grew = True
        while grew:
            grew = False
            for k in keys:
                if (
                    k not in done
                    and k not in stage
                    and partitioned[k] == kind
                    and parents[k] <= done | set(stage)
                ):
                    stage.append(k)
                    grew = True
        if stage:
            stages.append((kind, stage))
            done |= set(stage)
        kind = not kind
    return stages


def materialize_all(
    *,
    selection: Sequence[str] | None = None,
    run_config: dict | None = None,
    batch_size: int = 50,
    instance: dg.DagsterInstance | None = None,
    log: Callable[[str], None] = print,
    log_level: str = "INFO",
) -> list[dg.ExecuteInProcessResult]:
    """Materialise every asset (or ``selection``) in order; raises if a run fails."""
    defs = load_definitions()
    instance = instance or dg.DagsterInstance.get()
    # Checks ride along with their assets (blocking checks stop bad models feeding later stages).
    assets = [*(defs.assets or []), *(defs.asset_checks or [])]
    results = []
    for is_part, keys in _stages(defs, selection):
        names = ", ".join(k.to_user_string() for k in keys)
        sel = [k.to_user_string() for k in keys]
        cfg = _config_for(run_config, sel, log_level)
        if not is_part:
            t0 = time.time()
            log(f"→ {names}")
            results.append(_run(assets, defs, sel, cfg, instance, tags={}))
            log(f"  done in {time.time() - t0:.1f}s")
            continue
        pdef = defs.resolve_asset_graph().get(keys[0]).partitions_def
        part_keys = pdef.get_partition_keys(dynamic_partitions_store=instance)
        if not part_keys:
            log(f"→ {names}: no partitions yet, skipped")
            continue
        for i in range(0, len(part_keys), batch_size):
            batch = part_keys[i : i + batch_size]
            t0 = time.time()
            log(f"→ {names} [{i + 1}-{i + len(batch)} of {len(part_keys)} slides]")
            tags = {
                ASSET_PARTITION_RANGE_START_TAG: batch[0],
                ASSET_PARTITION_RANGE_END_TAG: batch[-1],
            }
            results.append(_run(assets, defs, sel, cfg, instance, tags=tags))
            log(f"  done in {time.time() - t0:.1f}s")
    return results


def _config_for(run_config: dict | None, selection: list[str], log_level: str) -> dict:
    """The run config of one stage: the user's op config for the selected assets only."""
    cfg: dict = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    # An asset's op is named after it; its checks' ops are "<asset>_<check>".
    ops = {
        k: v
        for k, v in (run_config or {}).get("ops", {}).items()
        if k in selection or any(k.startswith(f"{s}_") for s in selection)
    }
    if ops:
        cfg["ops"] = ops
    return cfg


def _run(assets, defs, sel, cfg, instance, tags) -> dg.ExecuteInProcessResult:
    result = dg.materialize(
        assets,
        selection=sel,
        resources=defs.resources,
        run_config=cfg,
        instance=instance,
        tags=tags,
        raise_on_error=True,
    )
    return result


def _bin(name: str) -> str:
    """A console script of the running interpreter's environment (dagster-daemon, ...)."""
    return str(Path(sys.executable).parent / name)


def start_services(
    dagster_home: Path,
    *,
    port: int,
    host: str = "127.0.0.1",
    workspace: Path | None = None,
    env: dict | None = None,
    stdout=None,
) -> list[subprocess.Popen]:
    """Start `dagster-webserver` and `dagster-daemon run` on one instance (``dagster_home``)
    and this repo's workspace; stop them with :func:`stop_services` (by pid)."""
    ws = str(workspace or REPO_ROOT / "workspace.yaml")
    full_env = {**os.environ, **(env or {}), "DAGSTER_HOME": str(dagster_home)}
    cmds = [
        [_bin("dagster-webserver"), "-w", ws, "-h", host, "-p", str(port)],
        [_bin("dagster-daemon"), "run", "-w", ws],
    ]
    return [
        subprocess.Popen(c, cwd=REPO_ROOT, env=full_env, stdout=stdout, stderr=subprocess.STDOUT)
        for c in cmds
    ]


def stop_services(procs: Sequence[subprocess.Popen], timeout: float = 20) -> None:
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
