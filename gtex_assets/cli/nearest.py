"""`gtex-assets nearest`: the k nearest stored slides (or tiles) to a sample, slide file or tile.

    gtex-assets nearest GTEX-1117F-0126 [-k 10] [--model-id ID] [--tiles] [--json]
    gtex-assets nearest --slide path/to/slide.svs
    gtex-assets nearest --tile path/to/tile.jpg --tiles

Predicted transcriptome (the mean expression of the nearest cluster of `cluster_transcriptome`):

    gtex-assets nearest GTEX-1117F-0126 --transcriptome [--top 20] [--json] [--out FILE.parquet|.csv]

prints the top genes by predicted log TPM; --json and --out give every gene.

Spatial map of one gene over a new slide (needs the tile_gene_predictions asset):

    gtex-assets nearest --slide path/to/slide.svs --map GENE --out map.png [--tissue TISSUE]

tiles the slide, embeds every kept tile and colours each by its predicted log TPM.

Wired into ``gtex_assets.cli`` with :func:`add_nearest_subcommand` (argparse only).
"""

from __future__ import annotations

import argparse
import json
import sys


def add_nearest_subcommand(subparsers) -> argparse.ArgumentParser:
    """Add ``nearest`` to the CLI's subparsers; returns its parser."""
    p = subparsers.add_parser(
        "nearest",
        help="k nearest slides (or tiles) to a sample id, a slide file or a tile image",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sample_id", nargs="?", help="a stored tissue sample id, e.g. GTEX-1117F-0126")
    p.add_argument("--slide", metavar="FILE", help="a slide file (.svs/.tif) to tile and embed")
    p.add_argument("--tile", metavar="IMAGE", help="a tile image (JPEG/PNG) to embed")
    p.add_argument("-k", type=int, default=10, help="number of neighbours (default 10)")
    p.add_argument("--model-id", help="embedding model (default: the selected checkpoint)")
    p.add_argument("--tiles", action="store_true", help="search tiles instead of slides")
    p.add_argument("--exact", action="store_true", help="exact search (ignore the vector index)")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.add_argument(
        "--transcriptome",
        action="store_true",
        help="predict the whole transcriptome: the mean expression of the nearest cluster "
        "(needs the cluster_transcriptome asset)",
    )
    p.add_argument(
        "--top", type=int, default=20, metavar="N", help="--transcriptome: genes shown (default 20)"
    )
    p.add_argument(
        "--out",
        metavar="FILE",
        help="--transcriptome: write every gene to FILE (.parquet or .csv); --map: the PNG",
    )
    p.add_argument(
        "--map",
        metavar="GENE",
        help="with --slide: map GENE's predicted expression over the slide (gene id or symbol)",
    )
    p.add_argument(
        "--tissue",
        help="--map: the slide's tissue (default: the majority tissue of its nearest slides)",
    )
    p.add_argument("--data-root", help="default: $GTEX_DATA_ROOT or ./gtex_data")
    p.set_defaults(fn=cmd_nearest)
    return p


def _describe(q: dict) -> str:
    what = {
        "sample_id": f"sample {q.get('sample_id')}",
        "slide_file": f"slide file {q.get('slide')}",
        "tile_image": f"tile image {q.get('tile')}",
    }[q["kind"]]
    bits = [f"{what} ({q.get('source', '')}", f"model {q['model_id']}"]
    if q.get("n_tiles"):
        bits.append(f"{q['n_tiles']} tiles")
    if q.get("precision"):
        bits.append(q["precision"])
    head = ", ".join(bits) + ")"
    tail = []
    if q.get("predicted_cluster") is not None:
        tail.append(f"predicted cluster {q['predicted_cluster']}")
    if q.get("majority_tissue"):
        tail.append(f"neighbours' majority tissue: {q['majority_tissue']}")
    return head + ("\n" + "; ".join(tail) if tail else "")


def _write_transcriptome(df, out: str) -> str:
    from pathlib import Path

    from gtex_assets.core.atomic import atomic_open, write_parquet

    path = Path(out)
    if path.suffix == ".parquet":
        write_parquet(df, path)
    else:
        with atomic_open(path, "w", newline="") as f:
            df.to_csv(f, index=False)
    return str(path)


def cmd_transcriptome(args: argparse.Namespace) -> int:
    if args.tiles:
        print("error: --tiles does not apply to --transcriptome", file=sys.stderr)
        return 2
    if args.top < 1:
        print(f"error: --top must be >= 1, got {args.top}", file=sys.stderr)
        return 2
    if args.out and not args.out.endswith((".parquet", ".csv")):
        print(f"error: --out {args.out}: use a .parquet or .csv file name", file=sys.stderr)
        return 2
    from gtex_assets.core.lake import resolve_root
    from gtex_assets.lib.lookup.nearest import NearestError, predict_transcriptome

    root = resolve_root(args.data_root).root
    try:
        res = predict_transcriptome(
            args.sample_id, slide=args.slide, tile=args.tile, model_id=args.model_id, data_root=root
        )
    except (NearestError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    wrote = None
    if args.out:
        try:
            wrote = _write_transcriptome(res.transcriptome, args.out)
        except OSError as e:
            print(f"error: --out {args.out}: {e}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(res.to_dict(), indent=1, default=str))
        return 0
    q = res.query
    head = {k: v for k, v in q.items() if k not in ("predicted_cluster", "majority_tissue")}
    print(f"query: {_describe(head)}")
    member = ""
    if q.get("member"):
        member = " (the sample is one of its slides: its own expression is in the mean)"
    print(
        f"nearest cluster {q['cluster']}: {q['n_slides']} slides, majority tissue "
        f"{q['majority_tissue']}, distance {q['distance']:.4f}{member}"
    )
    n = min(args.top, len(res.transcriptome))
    print(f"predicted transcriptome: top {n} of {q['n_genes']} genes by log TPM\n")
    print(res.top(args.top).to_markdown(index=False, floatfmt=".3f"))
    if wrote:
        print(f"\nwrote {len(res.transcriptome)} genes to {wrote}")
    return 0


def cmd_map(args: argparse.Namespace) -> int:
    if not args.slide or args.transcriptome or args.tiles:
        print("error: --map takes --slide FILE (no --transcriptome or --tiles)", file=sys.stderr)
        return 2
    if not args.out or not args.out.endswith(".png"):
        print("error: --map needs --out FILE.png", file=sys.stderr)
        return 2
    from gtex_assets.core.lake import resolve_root
    from gtex_assets.lib.lookup.maps import slide_map
    from gtex_assets.lib.lookup.nearest import NearestError

    root = resolve_root(args.data_root).root
    try:
        res = slide_map(args.slide, args.map, args.out, model_id=args.model_id,
                        tissue=args.tissue, data_root=root)  # fmt: skip
    except (NearestError, ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        rows = res.tiles.select("x", "y", "predicted_log_tpm").to_dicts()
        print(json.dumps({**res.query, "tiles": rows}, indent=1, default=str))
        return 0
    q = res.query
    v = res.tiles["predicted_log_tpm"]
    print(f"map of {q['symbol']} ({q['gene']}) over {q['slide']}: {q['n_tiles']} tiles "
          f"({q['how']}), model {q['model_id']}, tissue effect {q['tissue'] or 'overall mean'}")  # fmt: skip
    print(
        f"predicted log TPM: slide {q['slide_prediction']:.3f}, tiles {v.min():.3f} .. {v.max():.3f}"
    )
    print(f"wrote {q['png']}")
    return 0


def cmd_nearest(args: argparse.Namespace) -> int:
    given = [v for v in (args.sample_id, args.slide, args.tile) if v]
    if len(given) != 1:
        print("error: give exactly one of SAMPLE_ID, --slide FILE or --tile IMAGE", file=sys.stderr)
        return 2
    if args.map:
        return cmd_map(args)
    if args.transcriptome:
        return cmd_transcriptome(args)
    if args.out:
        print("error: --out needs --transcriptome or --map", file=sys.stderr)
        return 2
    if args.k < 1:
        print(f"error: -k must be >= 1, got {args.k}", file=sys.stderr)
        return 2
    from gtex_assets.core.lake import resolve_root
    from gtex_assets.lib.lookup.nearest import NearestError, nearest

    root = resolve_root(args.data_root).root
    try:
        res = nearest(
            args.sample_id,
            slide=args.slide,
            tile=args.tile,
            k=args.k,
            model_id=args.model_id,
            tiles=args.tiles,
            data_root=root,
            exact=args.exact,
        )
    except (NearestError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res.to_dict(), indent=1, default=str))
        return 0
    df = res.neighbours
    noun = "tiles" if args.tiles else "slides"
    print(f"query: {_describe(res.query)}")
    print(f"{len(df)} nearest {noun} (cosine distance):\n")
    print(df.to_markdown(index=False, floatfmt=".4f") if len(df) else "(no rows)")
    return 0
