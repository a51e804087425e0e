"""`gtex-assets`: the command a newcomer runs.

gtex-assets synth --out DIR [--tissues N --slides-per-tissue M --seed S]
gtex-assets demo [--source DIR] [--config FILE] [--data-root DIR]
gtex-assets sql "SELECT ..." [--csv | --json]
gtex-assets nearest SAMPLE_ID | --slide FILE | --tile IMAGE [-k 10] [--tiles] [--json]
gtex-assets nearest SAMPLE_ID --transcriptome [--top 20] [--json] [--out FILE.parquet|.csv]
gtex-assets ui
gtex-assets cluster up|down|status|env [--workers N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from gtex_assets.core.lake import DATA_ROOT_ENV, resolve_root


def _data_root(arg: str | None) -> Path:
    root = resolve_root(arg).root
    os.environ[DATA_ROOT_ENV] = str(root)  # the resources read it at run time
    return root


def _parse_size(s: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"slide size {s!r}: expected WIDTHxHEIGHT, e.g. 2240x1792"
        ) from None
    return w, h


def cmd_synth(args: argparse.Namespace) -> int:
    from gtex_assets.lib.synth import generate_mirror

    s = generate_mirror(
        args.out,
        tissues=args.tissues,
        slides_per_tissue=args.slides_per_tissue,
        seed=args.seed,
        slide_size=args.slide_size,
        n_genes=args.genes,
    )
    print(
        f"synthetic GTEx mirror at {Path(args.out).resolve()}: {s.n_rows} portal rows, "
        f"{s.n_slides} slides, {len(s.tissues)} tissues, GCT {s.n_genes} genes x "
        f"{s.n_rna_samples} samples ({s.seconds:.1f}s)"
    )
    return 0


DEMO_CONFIG = Path(__file__).parents[1] / "demo_config.yaml"


def _load_run_config(path: str | Path | None) -> dict:
    if not path:
        return {}
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SystemExit(f"run config {path}: {e.strerror}") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            cfg = yaml.safe_load(text)
        else:
            cfg = json.loads(text)
    except Exception as e:  # yaml/json errors carry line and column
        raise SystemExit(f"run config {path}: not valid YAML/JSON ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("ops", {}), dict):
        raise SystemExit(f"run config {path}: must be a mapping with an 'ops:' section")
    return cfg


def cmd_demo(args: argparse.Namespace) -> int:
    from gtex_assets.cli.runner import ensure_dagster_home, materialize_all
    from gtex_assets.core.settings import write_settings
    from gtex_assets.lib.catalog.views import connect_readonly

    t0 = time.time()
    root = _data_root(args.data_root)
    source = args.source or os.environ.get("GTEX_SOURCE")
    run_config = _load_run_config(args.config)
    if not source:
        # The demo's CPU settings go to the settings file every run reads, so runs from the UI
        # and the daemon reproduce the demo; what a user already set there is kept.
        settings = write_settings(root, _load_run_config(DEMO_CONFIG))
        print(f"[demo] CPU settings in {settings} (read by every run)", flush=True)
        from gtex_assets.lib.synth import generate_mirror

        mirror = root / "demo_mirror"
        print(f"[demo] generating a synthetic GTEx mirror in {mirror} ...", flush=True)
        s = generate_mirror(
            mirror,
            tissues=args.tissues,
            slides_per_tissue=args.slides_per_tissue,
            seed=args.seed,
            slide_size=args.slide_size,
        )
        print(
            f"[demo]   {s.n_slides} slides, {len(s.tissues)} tissues, {s.n_genes} genes ({s.seconds:.1f}s)"
        )
        source = str(mirror)
    os.environ["GTEX_SOURCE"] = source
    home = ensure_dagster_home(root)
    print(
        f"[demo] source {source}\n[demo] data root {root}\n[demo] dagster home {home}", flush=True
    )
    try:
        materialize_all(
            selection=args.select or None,
            run_config=run_config,
            log=lambda m: print(f"[demo] {m}", flush=True),
        )
    except Exception as e:  # a failed step: say which and why, not a wall of traceback
        cause = getattr(e, "user_exception", None) or e.__cause__ or e
        msg = getattr(cause, "description", None) or str(cause)
        print(f"\n[demo] failed: {msg}", file=sys.stderr)
        print(f"[demo] the run, its logs and the full traceback are in the UI: "
              f"gtex-assets ui --data-root {root}", file=sys.stderr)  # fmt: skip
        return 1
    print(f"\n[demo] finished in {time.time() - t0:.0f}s. Summary:")
    if not (root / "gtex.duckdb").is_file():
        print("  (no DuckDB catalog yet: include duckdb_catalog in --select to query results)")
        return 0
    con = connect_readonly(root / "gtex.duckdb")
    for label, sql in _SUMMARY:
        try:
            value = con.execute(sql).fetchone()[0]
        except Exception:
            continue  # that stage is not in this run's selection
        print(f"  {label:<34} {value}")
    truth = Path(source) / "truth" / "image_linked_genes.csv"
    if truth.is_file():
        _print_planted_recall(con, truth)
    print(
        f'\n  DuckDB catalog: {root / "gtex.duckdb"}  (gtex-assets sql "SHOW TABLES")\n'
        f"  Plots:          {root / 'plots'}\n"
        f"  Open the UI:    gtex-assets ui   (or DAGSTER_HOME={home} dagster dev -w workspace.yaml)"
    )
    return 0


_SUMMARY = [
    ("samples in histology CSV", "SELECT count(*) FROM histology_annotations"),
    ("tissues", "SELECT count(DISTINCT tissue) FROM histology_annotations"),
    ("RNA-seq samples", "SELECT count(*) FROM sample_attributes"),
    ("selected slides", "SELECT count(*) FROM selected_slides"),
    ("slides ok", "SELECT count(*) FROM raw_slides WHERE status = 'ok'"),
    ("slides quarantined", "SELECT count(*) FROM slide_quarantine"),
    ("tiles cut", "SELECT count(*) FROM slide_tiles"),
    ("tiles kept by the filters", "SELECT count(*) FROM filtered_tiles WHERE verdict = 'kept'"),
    ("tiles in the balanced sample", "SELECT count(*) FROM balanced_tile_sample"),
    ("genes kept (of all)", "SELECT sum(kept::INT) || ' of ' || count(*) FROM expression_genes"),
    (
        "classifier test acc (tile/slide)",
        "SELECT round(test_acc, 3) || ' / ' || round(slide_test_acc, 3) FROM classifier_checkpoints WHERE selected",
    ),
    (
        "slide embeddings (models)",
        "SELECT count(*) || ' (' || count(DISTINCT model_id) || ')' FROM slide_embeddings",
    ),
    ("gene_r2 model (most R2 explained)", "SELECT any_value(model_id) FROM gene_r2"),
    (
        "top genes by R2",
        "SELECT string_agg(symbol || ' ' || round(r2, 2), ', ') FROM (SELECT * FROM gene_r2 ORDER BY r2 DESC LIMIT 5)",
    ),
]


def _print_planted_recall(con, truth: Path) -> None:
    """On a generated mirror: how many planted image-linked genes (that survived the
    expression filters) gene_r2 ranks in its top K, K = their number."""
    try:
        k, hits = con.execute(
            "WITH planted AS (SELECT gene_id FROM read_csv(?) "
            "WHERE gene_id IN (SELECT gene FROM gene_r2)), "
            "top AS (SELECT gene FROM gene_r2 ORDER BY rank LIMIT (SELECT count(*) FROM planted)) "
            "SELECT (SELECT count(*) FROM planted), count(*) FROM top "
            "WHERE gene IN (SELECT gene_id FROM planted)",
            [str(truth)],
        ).fetchone()
    except Exception:
        return  # gene_r2 not in this run's selection
    if k:
        print(f"  {'planted genes in R2 top K':<34} {hits} of K={k} (recall {hits / k:.2f})")
    try:  # every model on the same folds (gene_r2 model: best)
        rows = con.execute(
            "WITH planted AS (SELECT gene_id FROM read_csv(?)) "
            "SELECT model_id, count(*) FILTER (WHERE gene IN (SELECT gene_id FROM planted) "
            "AND rank <= (SELECT count(*) FROM planted WHERE gene_id IN (SELECT gene FROM gene_r2))) "
            "FROM gene_r2_by_model GROUP BY 1 ORDER BY 1",
            [str(truth)],
        ).fetchall()
    except Exception:
        return
    if k and len(rows) > 1:
        per = ", ".join(f"{m} {h / k:.2f}" for m, h in rows)
        print(f"  {'  recall per model':<34} {per}")


def cmd_sql(args: argparse.Namespace) -> int:
    from gtex_assets.lib.catalog.views import connect_readonly

    root = _data_root(args.data_root)
    try:
        con = connect_readonly(root / "gtex.duckdb")
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        df = con.execute(args.query).df()
    except Exception as e:  # duckdb's messages already name the table/column at fault
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(df.to_json(orient="records", indent=1))
    elif args.csv:
        df.to_csv(sys.stdout, index=False)
    else:
        print(df.to_markdown(index=False) if len(df) else "(no rows)")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from gtex_assets.cli.runner import ensure_dagster_home, start_services, stop_services

    root = _data_root(args.data_root)
    home = ensure_dagster_home(root)
    if args.screenshot:
        from gtex_assets.cli.ui_check import screenshot_asset_graph

        out = Path(
            args.screenshot if args.screenshot != "-" else root / "plots" / "ui_asset_graph.png"
        )
        png, _ = screenshot_asset_graph(home, out.resolve(), group=args.group)
        print(f"screenshot of the '{args.group}' asset graph: {png}")
        return 0
    # The webserver and the daemon (automation, backfills, run queue) on the data root's
    # instance; both stopped by pid when this command ends (Ctrl-C or SIGTERM).
    procs = start_services(home, port=args.port, host=args.host)
    print(
        f"Dagster UI on http://{args.host}:{args.port} and the daemon on {home} "
        f"(pids {procs[0].pid}, {procs[1].pid}); Ctrl-C stops both",
        flush=True,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        return next(p.returncode for p in procs if p.poll() is not None) or 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop_services(procs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gtex-assets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write a synthetic GTEx-like mirror (demo and test data)")
    s.add_argument("--out", required=True, help="mirror directory to write")
    s.add_argument("--tissues", type=int, default=6, help="number of tissues (default 6)")
    s.add_argument("--slides-per-tissue", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--slide-size", type=_parse_size, default=(2240, 1792), help="WxH level-0 pixels"
    )
    s.add_argument("--genes", type=int, default=2000, help="genes in the GCT")
    s.set_defaults(fn=cmd_synth)

    d = sub.add_parser(
        "demo", help="materialise the whole pipeline (on a generated mirror by default)"
    )
    d.add_argument(
        "--source",
        help="an existing mirror (path or URI); default: $GTEX_SOURCE, else generate one",
    )
    d.add_argument("--config", help="run config file (YAML/JSON, Dagster 'ops:' layout)")
    d.add_argument("--data-root", help="default: $GTEX_DATA_ROOT or ./gtex_data")
    d.add_argument("--tissues", type=int, default=6, help="generated mirror: tissues")
    d.add_argument(
        "--slides-per-tissue",
        type=int,
        default=24,
        help="generated mirror: slides per tissue (24 give per-gene R² enough slides to rank planted genes first)",
    )
    d.add_argument("--seed", type=int, default=0, help="generated mirror: seed")
    d.add_argument(
        "--slide-size", type=_parse_size, default=(2240, 1792),
        help="generated mirror: WxH level-0 pixels per slide",
    )  # fmt: skip
    d.add_argument("--select", nargs="*", help="only these assets (default: all)")
    d.set_defaults(fn=cmd_demo)

    q = sub.add_parser("sql", help="query the DuckDB catalog (read-only)")
    q.add_argument("query")
    q.add_argument("--data-root")
    fmt = q.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true")
    fmt.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_sql)

    from gtex_assets.cli.nearest import add_nearest_subcommand

    add_nearest_subcommand(sub)

    from gtex_assets.cli.cluster import add_cluster_subcommand

    add_cluster_subcommand(sub)

    u = sub.add_parser(
        "ui", help="serve the Dagster UI and run the daemon (automation) on this data root"
    )
    u.add_argument("--data-root")
    u.add_argument("--port", type=int, default=3000)
    u.add_argument("--host", default="127.0.0.1", help="webserver address (default loopback)")
    u.add_argument(
        "--screenshot", nargs="?", const="-", metavar="PNG",
        help="instead of serving: start the UI on a free port, screenshot an asset group with "
        "headless Chromium (default <data root>/plots/ui_asset_graph.png), stop",
    )  # fmt: skip
    u.add_argument(
        "--group", default="ingest", help='asset group for --screenshot ("" = the whole graph)'
    )
    u.set_defaults(fn=cmd_ui)
    return p


def main(argv: list[str] | None = None) -> int:
    # With few cores shared by torch's and numpy's thread pools, busy-waiting OpenMP threads
    # steal each other's cores; passive waiting keeps training and embedding at full speed.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
