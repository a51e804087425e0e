"""`gtex-assets cluster up|down|status|env`: the production engine on one machine.

`up` starts, under ``<data root>/cluster/``: PostgreSQL (initdb once, 127.0.0.1, a free port)
holding Dagster's runs, event log and schedules; Redis as the Celery broker and result backend;
N general Celery workers on dagster-celery's default queue plus one single-slot worker on the
exclusive writers' queue (`defs/execution.py`: DuckDB catalog, LanceDB, GPU); the Dagster
webserver and daemon, all with ``GTEX_EXECUTOR=celery`` and a DAGSTER_HOME whose dagster.yaml
uses dagster-postgres. Every pid goes into ``cluster.json``; `down` stops each by its pid and
leaves the data (Postgres keeps the run history; `up` again reuses it).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pkgutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from gtex_assets.core import services as S

REPO_ROOT = Path(__file__).resolve().parents[2]
STATE = "cluster.json"
CREDENTIALS = "credentials.json"
# Order in which `down` stops things: what uses a service goes before the service.
_STOP_ORDER = ("webserver", "daemon", "worker", "redis", "postgres")


def cluster_dir(root: Path) -> Path:
    return Path(root) / "cluster"


def _credentials(cdir: Path) -> dict:
    path = cdir / CREDENTIALS
    if path.is_file():
        return json.loads(path.read_text())
    creds = {"postgres": S.new_password(), "redis": S.new_password()}
    cdir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(creds))
    os.chmod(path, 0o600)
    return creds


def instance_yaml(pg_port: int, pg_password: str, max_concurrent_runs: int) -> dict:
    """dagster.yaml of the cluster's instance: Postgres storage, queued runs, exclusive pools."""
    return {
        "storage": {
            "postgres": {
                "postgres_db": {
                    "hostname": "127.0.0.1",
                    "port": pg_port,
                    "username": S.PG_USER,
                    "password": pg_password,
                    "db_name": S.PG_DB,
                    # SQLAlchemy 2.1 defaults to psycopg 3; dagster-postgres ships psycopg2.
                    "scheme": "postgresql+psycopg2",
                }
            }
        },
        "run_coordinator": {
            "module": "dagster.core.run_coordinator",
            "class": "QueuedRunCoordinator",
        },
        "concurrency": {
            "runs": {"max_concurrent_runs": max_concurrent_runs},
            # The same rule as the embedded default: every pool is exclusive.
            "pools": {"default_limit": 1},
        },
        "run_monitoring": {"enabled": True, "start_timeout_seconds": 180},
        "telemetry": {"enabled": False},
    }


def celery_config_module(broker: str, backend: str) -> str:
    """The workers' `dagster_celery_config` module (dagster_celery.app reads it on start)."""
    from gtex_assets.defs.execution import CELERY_SETTINGS

    lines = [f"broker_url = {broker!r}", f"result_backend = {backend!r}"]
    lines += [f"{k} = {v!r}" for k, v in CELERY_SETTINGS.items()]
    return "\n".join(lines) + "\n"


def _defs_modules() -> list[str]:
    """Every module of gtex_assets/defs: the workers import them before forking their pool
    processes, so no step pays for importing torch, timm and the definitions."""
    import gtex_assets.defs as defs_pkg

    return sorted(
        m.name
        for m in pkgutil.walk_packages(defs_pkg.__path__, prefix="gtex_assets.defs.")
        if not m.ispkg
    )


def cluster_env(state: dict) -> dict[str, str]:
    """What a process needs to use the cluster (`gtex-assets cluster env` prints it)."""
    from gtex_assets.defs.execution import CELERY_BACKEND_ENV, CELERY_BROKER_ENV

    return {
        "DAGSTER_HOME": state["dagster_home"],
        "GTEX_DATA_ROOT": state["data_root"],
        "GTEX_EXECUTOR": "celery",
        CELERY_BROKER_ENV: state["broker"],
        CELERY_BACKEND_ENV: state["backend"],
        **({"GTEX_SOURCE": state["source"]} if state.get("source") else {}),
    }


def read_state(root: Path) -> dict | None:
    path = cluster_dir(root) / STATE
    return json.loads(path.read_text()) if path.is_file() else None


def _write_state(cdir: Path, state: dict) -> None:
    path = cdir / STATE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.chmod(tmp, 0o600)  # holds the broker URL with its password
    os.replace(tmp, path)


def up(
    root: Path,
    *,
    workers: int = 2,
    concurrency: int = 1,
    source: str | None = None,
    webserver: bool = True,
    daemon: bool = True,
    webserver_port: int | None = None,
    max_concurrent_runs: int = 4,
    log: Callable[[str], None] = print,
) -> dict:
    """Start the cluster under ``<root>/cluster``; returns the state written to cluster.json."""
    from gtex_assets.defs.execution import DEFAULT_QUEUE, EXCLUSIVE_QUEUE

    root = Path(root).resolve()
    cdir = cluster_dir(root)
    old = read_state(root)
    if old and any(S.pid_alive(s["pid"]) for s in old["services"]):
        raise S.ServiceError(f"a cluster is already up under {cdir}: gtex-assets cluster down")
    cdir.mkdir(parents=True, exist_ok=True)
    creds = _credentials(cdir)
    state: dict = {
        "data_root": str(root),
        "source": source or os.environ.get("GTEX_SOURCE") or "",
        "services": [],
        "started": time.time(),
    }

    def record(svc: S.Service, **extra) -> S.Service:
        svc.extra.update(extra)
        state["services"].append(svc.as_dict())
        _write_state(cdir, state)  # written after every start: `down` can stop a partial up
        log(f"  {svc.name:<9} pid {svc.pid}" + (f"  127.0.0.1:{svc.port}" if svc.port else ""))
        return svc

    try:
        S.init_postgres(cdir / "postgres" / "data", creds["postgres"])
        pg = record(S.start_postgres(cdir / "postgres" / "data", S.free_port(), creds["postgres"]))
        rd = record(S.start_redis(cdir / "redis", S.free_port(), creds["redis"]))
        state["postgres_url"] = S.postgres_url(pg.port, creds["postgres"])
        state["broker"] = S.redis_url(rd.port, creds["redis"], 0)
        state["backend"] = S.redis_url(rd.port, creds["redis"], 1)

        home = cdir / "dagster_home"
        home.mkdir(exist_ok=True)
        os.chmod(home, 0o700)  # dagster.yaml holds the database password
        (home / "dagster.yaml").write_text(
            yaml.safe_dump(instance_yaml(pg.port, creds["postgres"], max_concurrent_runs))
        )
        state["dagster_home"] = str(home)
        _set_pool_limits(home)
        conf_dir = cdir / "celery_config"
        conf_dir.mkdir(exist_ok=True)
        (conf_dir / "dagster_celery_config.py").write_text(
            celery_config_module(state["broker"], state["backend"])
        )
        os.chmod(conf_dir / "dagster_celery_config.py", 0o600)

        env = {**os.environ, **cluster_env(state)}
        env["PYTHONPATH"] = os.pathsep.join(
            [str(conf_dir), str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        includes = ",".join(["gtex_assets.cli.celery_worker", *_defs_modules()])
        queues = [(f"w{i + 1}", DEFAULT_QUEUE, concurrency) for i in range(workers)]
        queues.append(("exclusive", EXCLUSIVE_QUEUE, 1))  # one slot: one writer at a time
        for name, queue, conc in queues:
            cmd = [
                sys.executable, "-m", "celery", "-A", "dagster_celery.app", "worker",
                "-Q", queue, "-c", str(conc), "--prefetch-multiplier=1", "-n", f"{name}@%h",
                "-I", includes, "--loglevel", "INFO", "--without-gossip", "--without-mingle",
            ]  # fmt: skip
            record(
                S.start_process(
                    "worker", cmd, log=cdir / "logs" / f"worker-{name}.log", env=env, cwd=REPO_ROOT
                ),
                node=name,
                queue=queue,
                concurrency=conc,
            )
        bindir = Path(sys.executable).parent
        workspace = str(REPO_ROOT / "workspace.yaml")
        if daemon:
            record(
                S.start_process(
                    "daemon",
                    [str(bindir / "dagster-daemon"), "run", "-w", workspace],
                    log=cdir / "logs" / "daemon.log",
                    env=env,
                    cwd=REPO_ROOT,
                )  # fmt: skip
            )
        if webserver:
            port = webserver_port or S.free_port()
            ws = record(
                S.start_process(
                    "webserver",
                    [
                        str(bindir / "dagster-webserver"),
                        "-h",
                        "127.0.0.1",
                        "-p",
                        str(port),
                        "-w",
                        workspace,
                    ],
                    log=cdir / "logs" / "webserver.log",
                    env=env,
                    cwd=REPO_ROOT,
                    port=port,
                )  # fmt: skip
            )
            state["webserver_url"] = f"http://127.0.0.1:{port}"
            S.wait_port(port, 180, pid=ws.pid, log=ws.log)
        wait_workers(state, timeout=180)
    except BaseException:
        down(root, log=log)
        raise
    _write_state(cdir, state)
    env_sh = cdir / "env.sh"
    env_sh.write_text("".join(f"export {k}='{v}'\n" for k, v in cluster_env(state).items()))
    os.chmod(env_sh, 0o600)
    return state


def _set_pool_limits(home: Path) -> None:
    """Create each exclusive pool's limit (1 slot) before any run: left to the first runs,
    two runs creating the default limit at once race in PostgreSQL and one fails."""
    import dagster as dg

    from gtex_assets.defs.execution import EXCLUSIVE_POOLS

    with dg.DagsterInstance.from_config(str(home)) as instance:
        for pool in EXCLUSIVE_POOLS:
            instance.event_log_storage.set_concurrency_slots(pool, 1)


def wait_workers(state: dict, timeout: float) -> None:
    """Until every worker answers a ping through the broker (its pool processes are up)."""
    from celery import Celery

    nodes = {s["extra"]["node"] for s in state["services"] if s["name"] == "worker"}
    app = Celery("gtex-cluster-ping", broker=state["broker"], backend=state["backend"])
    deadline = time.time() + timeout
    seen: set[str] = set()
    while time.time() < deadline:
        for s in state["services"]:
            if s["name"] == "worker" and not S.pid_alive(s["pid"]):
                raise S.ServiceError(
                    f"celery worker {s['extra']['node']} (pid {s['pid']}) exited{S._tail(s['log'])}"
                )
        replies = app.control.ping(timeout=1.0) or []
        seen = {name.split("@")[0] for r in replies for name in r}
        if nodes <= seen:
            return
        time.sleep(1)
    raise S.ServiceError(f"celery workers {sorted(nodes - seen)} did not answer in {timeout:.0f}s")


def down(root: Path, *, log: Callable[[str], None] = print) -> list[dict]:
    """Stop every recorded process by its pid (users of a service first); keep the data."""
    state = read_state(root)
    if not state:
        return []
    stopped = []
    order = {n: i for i, n in enumerate(_STOP_ORDER)}
    for svc in sorted(state["services"], key=lambda s: order.get(s["name"], -1)):
        # Postgres: SIGINT is its "fast" shutdown (SIGTERM waits for clients to leave);
        # Celery: SIGTERM is a warm shutdown that lets a running step finish first.
        sig = signal.SIGINT if svc["name"] == "postgres" else signal.SIGTERM
        if S.stop_pid(svc["pid"], sig=sig, timeout=60 if svc["name"] == "worker" else 20):
            log(f"  stopped {svc['name']:<9} pid {svc['pid']}")
            stopped.append(svc)
    state["services"] = []
    state["stopped"] = time.time()
    _write_state(cluster_dir(root), state)
    return stopped


# -- running the asset graph on the cluster --------------------------------------------------


def asset_job():
    """The implicit asset job as a reconstructable pointer: the Celery workers rebuild it from
    the module path, as they would for a run launched from the UI."""
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    repo = ReconstructableRepository.for_module(
        "gtex_assets.definitions", "defs", working_directory=str(REPO_ROOT)
    )
    return repo.get_reconstructable_job("__ASSET_JOB")


def materialize_distributed(
    *,
    instance,
    selection: Sequence[str] | None = None,
    run_config: dict | None = None,
    batch_size: int = 50,
    parallel_batches: int = 1,
    log: Callable[[str], None] = print,
) -> list:
    """`materialize_all` through the definitions' executor (GTEX_EXECUTOR) instead of in one
    process: the same stages, one run per slide batch, ``parallel_batches`` batch runs at once
    (each submits its steps to the workers). Raises if a run fails; returns the runs' results."""
    from dagster._core.storage.tags import (
        ASSET_PARTITION_RANGE_END_TAG,
        ASSET_PARTITION_RANGE_START_TAG,
    )

    from gtex_assets.cli.runner import _config_for, _stages, load_definitions

    defs = load_definitions()
    results = []
    for is_part, keys in _stages(defs, selection):
        sel = [k.to_user_string() for k in keys]
        cfg = _config_for(run_config, sel, "INFO")
        t0 = time.time()
        if not is_part:
            log(f"→ {', '.join(sel)}")
            results.append(_run_one(keys, cfg, {}, instance))
        else:
            pdef = defs.resolve_asset_graph().get(keys[0]).partitions_def
            part_keys = pdef.get_partition_keys(dynamic_partitions_store=instance)
            batches = [part_keys[i : i + batch_size] for i in range(0, len(part_keys), batch_size)]
            log(f"→ {', '.join(sel)}: {len(part_keys)} slides in {len(batches)} runs")
            tagsets = [
                {ASSET_PARTITION_RANGE_START_TAG: b[0], ASSET_PARTITION_RANGE_END_TAG: b[-1]}
                for b in batches
            ]
            if parallel_batches <= 1 or len(tagsets) == 1:
                results += [_run_one(keys, cfg, t, instance) for t in tagsets]
            else:
                results += _run_forked(keys, cfg, tagsets, parallel_batches)
        log(f"  done in {time.time() - t0:.1f}s")
    return results


def _run_forked(keys, cfg: dict, tagsets: list[dict], parallel: int) -> list[str]:
    """One orchestrating process per concurrent run, as the daemon's run launcher does: runs
    in threads of one process, or in processes forked from a busy one, hang (locks and sockets
    held at fork). Children come from a fork server that imported the definitions once (a
    clean, single-threaded process), so a run starts in a second, not after a fresh import.
    Not a process pool: its daemonic processes may not start the children a run may need."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["gtex_assets.cli.cluster", "gtex_assets.cli.runner",
                                "gtex_assets.definitions", *_defs_modules()])  # fmt: skip
    out = ctx.Queue()
    pending = list(enumerate(tagsets))
    running: dict = {}
    run_ids: dict[int, str] = {}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                i, tags = pending.pop(0)
                p = ctx.Process(target=_run_child, args=(i, keys, cfg, tags, out))
                p.start()
                running[i] = p
            i, run_id, err = out.get()
            running.pop(i).join()
            if err:
                raise RuntimeError(err)
            run_ids[i] = run_id
    finally:  # a failed or interrupted backfill leaves no orchestrator behind
        for p in running.values():
            p.terminate()
            p.join(30)
    return [run_ids[i] for i in sorted(run_ids)]


def _run_child(i: int, keys, cfg: dict, tags: dict, out) -> None:
    try:
        out.put((i, _run_one(keys, cfg, tags), None))
    except BaseException as e:  # reported to the parent, which raises it
        out.put((i, None, f"{type(e).__name__}: {e}"))


def _run_one(keys, cfg: dict, tags: dict, instance=None) -> str:
    """One run of ``keys`` through the definitions' executor; its run id (raises if it fails)."""
    import dagster as dg

    instance = instance or dg.DagsterInstance.get()
    with dg.execute_job(asset_job(), instance=instance, run_config=cfg, tags=tags,
                        asset_selection=list(keys)) as res:  # fmt: skip
        if not res.success:
            raise RuntimeError(f"run {res.run_id} failed ({', '.join(map(str, keys))})")
        return res.run_id


# -- command line ----------------------------------------------------------------------------


def cmd_cluster(args: argparse.Namespace) -> int:
    from gtex_assets.cli.main import _data_root

    root = _data_root(args.data_root)
    if args.action == "up":
        print(f"starting the cluster under {cluster_dir(root)} ...", flush=True)
        try:
            state = up(
                root,
                workers=args.workers,
                concurrency=args.concurrency,
                source=args.source,
                webserver_port=args.port,
            )
        except S.ServiceError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(
            f"up: UI {state.get('webserver_url', '-')}; runs launched from the UI run their steps "
            f"on the workers.\nFrom a shell: source {cluster_dir(root) / 'env.sh'}"
        )
    elif args.action == "down":
        stopped = down(root)
        print(f"stopped {len(stopped)} processes; data kept under {cluster_dir(root)}")
    elif args.action == "env":
        state = read_state(root)
        if not state or "broker" not in state:
            print(f"no cluster under {cluster_dir(root)}", file=sys.stderr)
            return 2
        print("".join(f"export {k}='{v}'\n" for k, v in cluster_env(state).items()), end="")
    else:
        state = read_state(root) or {"services": []}
        if not state["services"]:
            print(f"no cluster running under {cluster_dir(root)}")
            return 1
        for s in state["services"]:
            alive = "running" if S.pid_alive(s["pid"]) else "exited"
            where = f"127.0.0.1:{s['port']}" if s.get("port") else s["extra"].get("queue", "")
            print(f"{s['name']:<9} pid {s['pid']:<7} {alive:<8} {where}")
        return 0 if all(S.pid_alive(s["pid"]) for s in state["services"]) else 1
    return 0


def add_cluster_subcommand(sub) -> None:
    c = sub.add_parser(
        "cluster",
        help="start/stop Postgres + Redis + Celery workers + webserver + daemon (GTEX_EXECUTOR=celery)",
    )
    c.add_argument("action", choices=["up", "down", "status", "env"])
    c.add_argument("--data-root")
    c.add_argument("--workers", type=int, default=2, help="general Celery workers (default 2)")
    c.add_argument("--concurrency", type=int, default=1, help="pool processes per worker")
    c.add_argument("--source", help="GTEx source for the workers (default $GTEX_SOURCE)")
    c.add_argument("--port", type=int, help="webserver port (default: a free one)")
    c.set_defaults(fn=cmd_cluster)
