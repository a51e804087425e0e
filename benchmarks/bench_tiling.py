"""Tiling throughput against the hardware limit and a naive baseline, measured in one run.

    .venv/bin/python benchmarks/bench_tiling.py [--slides 3] [--size 6720] [--repeat 3]

On the same machine, same tiles, same run:

(a) the limit: Pillow JPEG decode + encode of the 448 x 448 tiles, one core (what any tiler
    must at least do per tile: decode the slide's pixels, encode the tile);
(b) a naive baseline, one process: slideio ``read_block`` per tile, ``PIL.Image.save``,
    float64 numpy std per 4 x 4 piece and per channel;
(c) this project's tiler (``gtex_assets.lib.tiles.tiling.tile_slides``) with the filter statistics,
    end to end (mask, reads, stats, JPEG writes, index and status files), 1 and 2 workers
    (the 2-worker pool is started once outside the timing, as a run does once per batch of
    slides; its start-up time is printed separately).

Prints tiles/s and the ratios (c)/(a) per core and (c)/(b). Slides are generated once with
``gtex_assets.lib.synth.generate_mirror`` and cached in ``benchmarks/.cache/``. Each timing is
the best of ``--repeat`` runs (other processes share the machine; the load average is printed).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gtex_assets.lib.tiles.tiling import SlideJob, TilingParams, start_pool, tile_slides  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache"
# Where the tiles are written while timing (--out). A directory under a file watcher (an IDE,
# a sync tool, a sandbox's monitor) makes every file create cost 10x more; the run prints the
# create cost of --out and of the system temp dir so a slow directory is visible.
OUT = Path(tempfile.gettempdir()) / "gtex_bench_tiling"
T = 448


def file_create_ms(directory: Path, n: int = 200, size: int = 40_000) -> float:
    """Mean ms to create, write and rename one tile-sized file in ``directory`` (as the tiler)."""
    d = Path(tempfile.mkdtemp(dir=directory, prefix="create_probe_"))
    data = os.urandom(size)
    t0 = time.perf_counter()
    for i in range(n):
        tmp = d / f".{i}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.close(fd)
        os.replace(tmp, d / f"{i}.jpg")
    ms = (time.perf_counter() - t0) / n * 1e3
    shutil.rmtree(d)
    return ms


def make_slides(n_slides: int, size: int, quality: int = 85) -> list[tuple[str, str, Path]]:
    """(sample id, tissue, path) of cached generated slides, generating them if needed."""
    from gtex_assets.lib.synth import generate_mirror

    mirror = CACHE / (f"mirror_{n_slides}x{size}" + ("" if quality == 85 else f"_q{quality}"))
    if not (mirror / "truth" / "summary.json").is_file():
        print(
            f"generating {n_slides} slides of {size}x{size} px in {mirror} (once) ...", flush=True
        )
        generate_mirror(
            mirror, tissues=n_slides, slides_per_tissue=1, seed=11, slide_size=(size, size),
            n_genes=50, workers=1, pen_fraction=0.0, blur_fraction=0.0, jpeg_quality=quality,
        )  # fmt: skip
    import pandas as pd

    portal = pd.read_csv(mirror / "GTEx Portal.csv")
    return [
        (r["Tissue Sample ID"], r["Tissue"], mirror / "slides" / f"{r['Tissue Sample ID']}.svs")
        for _, r in portal.iterrows()
    ]


def make_mosaic(slides, grid: int, quality: int) -> list[tuple[str, str, Path]]:
    """One large slide (``grid x grid`` copies of the generated slides side by side), closer to a
    GTEx slide's size (~thousands of tissue tiles), written tile by tile like an Aperio SVS:
    level 0 plus the same 4x/16x/64x levels. Cached."""
    import tifffile

    from gtex_assets.lib.tiles.tiling import SlideReader, _TiffPageReader

    path = CACHE / f"mosaic_{grid}x{grid}_{Path(slides[0][2]).parent.parent.name}.svs"
    if path.is_file():
        return [("GTEX-MOSAI-0001", "Mosaic", path)]
    readers = [SlideReader(p) for _, _, p in slides]
    side = readers[0].width
    levels = [(1.0, None)] + sorted(
        ((ds, page) for ds, page in readers[0]._lowres if page.is_tiled), key=lambda t: t[0]
    )
    seg = 256
    print(
        f"writing a {grid}x{grid} mosaic slide ({grid * side} px square) in {path} (once) ...",
        flush=True,
    )

    def tiles(level_index: int, size: int):
        srcs = []
        for r in readers:
            ds, _ = levels[level_index]
            if level_index == 0:
                srcs.append(r.level0)
            else:
                page = [p for d, p in r._lowres if p.is_tiled and abs(d - ds) < 0.5][0]
                srcs.append(_TiffPageReader(page, r._fd, "src"))
        src_side = srcs[0].width
        for ty in range(0, size, seg):
            for tx in range(0, size, seg):
                out = np.full((seg, seg, 3), 255, np.uint8)
                h, w = min(seg, size - ty), min(seg, size - tx)
                y = ty
                while y < ty + h:  # the output tile may straddle source images
                    sy, y0 = divmod(y, src_side)
                    hh = min(ty + h - y, src_side - y0)
                    x = tx
                    while x < tx + w:
                        sx, x0 = divmod(x, src_side)
                        ww = min(tx + w - x, src_side - x0)
                        src = srcs[(sy * grid + sx) % len(srcs)]
                        px = src.read_region(x0, y0, ww, hh).pixels
                        out[y - ty : y - ty + hh, x - tx : x - tx + ww] = px
                        x += ww
                    y += hh
                yield out

    head = f"Aperio Image Library v12.0.15 \r\n{grid * side}x{grid * side} [0,0 {grid * side}x{grid * side}] ({seg}x{seg})"
    kw = {
        "photometric": "rgb", "compression": "jpeg", "subsampling": (1, 1), "metadata": None,
        "compressionargs": {"level": quality, "outcolorspace": "rgb"}, "tile": (seg, seg),
    }  # fmt: skip
    tmp = path.with_name(path.name + ".tmp")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for i, (ds, _) in enumerate(levels):
            size = grid * (side // int(ds))
            desc = (
                f"{head} JPEG/RGB Q={quality}|AppMag = 20|MPP = 0.4990"
                if i == 0
                else f"{head} -> {size}x{size} JPEG/RGB Q={quality}"
            )
            tw.write(tiles(i, size), shape=(size, size, 3), dtype=np.uint8, description=desc, **kw)
    os.replace(tmp, path)
    for r in readers:
        r.close()
    return [("GTEX-MOSAI-0001", "Mosaic", path)]


def jobs_in(out: Path, slides) -> list[SlideJob]:
    return [
        SlideJob(
            sid,
            tissue,
            str(path),
            out / "tiles" / sid,
            out / "idx" / f"{sid}.parquet",
            out / "st" / f"{sid}.parquet",
        )  # fmt: skip
        for sid, tissue, path in slides
    ]


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a live process, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Best:
    """Best (minimum) wall and CPU seconds of one method over interleaved rounds."""

    out_dir: Path = OUT
    written: list[Path] = []  # every run's output, removed at the end (see run)

    def __init__(self) -> None:
        self.wall = float("inf")
        self.cpu = float("inf")

    def run(self, fn, pids=()) -> None:
        """Time ``fn(out_dir)`` writing into a fresh output dir. The dirs are removed only at
        the end: deleting thousands of just-written files between timed runs makes the next
        run's file creates several times dearer on ext4 (freed inodes still in the journal),
        a cost a real tiling run, which only writes, never pays."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out = Path(tempfile.mkdtemp(prefix="bench_out_", dir=self.out_dir))
        Best.written.append(out)
        c0 = time.process_time() + sum(_proc_cpu(p) for p in pids)
        w0 = time.perf_counter()
        fn(out)
        w = time.perf_counter() - w0
        c = time.process_time() + sum(_proc_cpu(p) for p in pids) - c0
        self.wall, self.cpu = min(self.wall, w), min(self.cpu, c)

    @classmethod
    def cleanup(cls) -> None:
        for d in cls.written:
            shutil.rmtree(d, ignore_errors=True)
        cls.written.clear()


def _warm(_: int = 0) -> int:
    import gtex_assets.lib.tiles.tiling  # noqa: F401  (imports numpy, tifffile, imagecodecs ...)

    return os.getpid()


def tiler(slides, workers: int, pool, result: dict):
    def once(out: Path):
        jobs = jobs_in(out, slides)
        outcomes = list(
            tile_slides(jobs, TilingParams(), workers=workers, force=True, executor=pool)
        )
        result["n"] = sum(int(o.status["n_tiles"]) for _, o in outcomes)
        result["index"] = [(j.slide_path, o.index) for j, o in outcomes]

    return once


def pillow_codec(tiles: list[np.ndarray], source_quality: int | None = None):
    """(decode all, encode all) with Pillow: the limit (a). Decodes the tiles as Pillow writes
    them at quality 90 (4:2:0 YCbCr) or, with ``source_quality``, as the slide stores its
    pixels (RGB without colour transform, 4:4:4, that quality): a limit for this input."""
    from PIL import Image

    encoded = []
    for a in tiles:
        buf = io.BytesIO()
        if source_quality is None:
            Image.fromarray(a).save(buf, "JPEG", quality=90)
        else:
            Image.fromarray(a).save(
                buf, "JPEG", quality=source_quality, subsampling=0, keep_rgb=True
            )
        encoded.append(buf.getvalue())

    def dec(_out=None):
        for b in encoded:
            with Image.open(io.BytesIO(b)) as im:
                np.asarray(im)

    def enc(_out=None):
        for a in tiles:
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, "JPEG", quality=90)

    return dec, enc


def imagecodecs_codec(tiles: list[np.ndarray]):
    import imagecodecs

    encoded = [imagecodecs.jpeg8_encode(a, level=90) for a in tiles]

    def dec(_out=None):
        for b in encoded:
            imagecodecs.jpeg8_decode(b)

    def enc(_out=None):
        for a in tiles:
            imagecodecs.jpeg8_encode(a, level=90)

    return dec, enc


def naive(coords: list[tuple[str, int, int]]):
    """The naive baseline (b) over all tiles, one process."""
    import slideio
    from PIL import Image

    def once(out: Path):
        scenes = {}
        for path, x, y in coords:
            if path not in scenes:
                scenes[path] = slideio.open_slide(path, "SVS").get_scene(0)
            tile = scenes[path].read_block((x, y, T, T))
            Image.fromarray(tile).save(out / f"{Path(path).stem}_{x}_{y}.jpg", "JPEG", quality=90)
            f = tile.astype(np.float64)
            _ = [
                f[i * 112 : (i + 1) * 112, j * 112 : (j + 1) * 112].std()
                for i in range(4)
                for j in range(4)
            ]
            _ = [f[..., c].std() for c in range(3)]

    return once


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--slides", type=int, default=4, help="generated slides (one per tissue)")
    ap.add_argument("--size", type=int, default=8960, help="slide side in px (20 tiles = 8960)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds; the best is kept")
    ap.add_argument(
        "--quality", type=int, default=85,
        help="JPEG quality the slides are stored with (generator default 85; Aperio scanners "
        "typically write 70)",
    )  # fmt: skip
    ap.add_argument(
        "--mosaic", type=int, default=3,
        help="tile one GTEx-sized slide made of N x N copies of the generated slides (0: tile the "
        "generated slides themselves, where per-slide costs weigh more)",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=OUT, help="where tiles are written while timing")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    Best.out_dir = args.out
    CACHE.mkdir(parents=True, exist_ok=True)
    slides = make_slides(args.slides, args.size, args.quality)
    if args.mosaic:
        slides = make_mosaic(slides, args.mosaic, args.quality)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    args.out.mkdir(parents=True, exist_ok=True)
    create_out = file_create_ms(args.out)
    create_tmp = file_create_ms(Path(tempfile.gettempdir()))

    t0 = time.perf_counter()
    pool = start_pool(2)
    list(pool.map(_warm, range(8)))
    pids = sorted(pool._processes)  # the workers, for their CPU time
    startup = time.perf_counter() - t0
    r1, r2 = {}, {}
    run1, run2 = tiler(slides, 1, None, r1), tiler(slides, 2, pool, r2)
    for run in (run1, run2):  # warm-up: imports (scipy for the mask), page cache; the tile list
        Best().run(run, ())
    coords = [
        (p, int(x), int(y))
        for p, idx in r1["index"]
        for x, y in zip(idx["x"], idx["y"], strict=True)
    ]
    n = len(coords)
    tiles = _read_tiles(coords[:: max(1, n // 200)])  # the same tiles, <= ~200, for the limit
    pil_dec, pil_enc = pillow_codec(tiles)
    src_dec, _ = pillow_codec(tiles, args.quality)
    ic_dec, ic_enc = imagecodecs_codec(tiles)
    methods = {
        "a_dec": (pil_dec, ()), "a_enc": (pil_enc, ()), "src_dec": (src_dec, ()), "ic_dec": (ic_dec, ()),
        "ic_enc": (ic_enc, ()), "b": (naive(coords), ()), "c1": (run1, ()), "c2": (run2, pids),
    }  # fmt: skip
    best = {k: Best() for k in methods}
    load0 = os.getloadavg()
    for _ in range(args.repeat):
        for k, (fn, p) in methods.items():
            best[k].run(fn, p)
    load1 = os.getloadavg()
    pool.shutdown()
    assert r1["n"] == r2["n"] == n

    m = len(tiles)
    a_wall = 1.0 / ((best["a_dec"].wall + best["a_enc"].wall) / m)
    a_cpu = 1.0 / ((best["a_dec"].cpu + best["a_enc"].cpu) / m)
    ic_cpu = 1.0 / ((best["ic_dec"].cpu + best["ic_enc"].cpu) / m)
    src_cpu = 1.0 / ((best["src_dec"].cpu + best["a_enc"].cpu) / m)
    b_wall, b_cpu = n / best["b"].wall, n / best["b"].cpu
    c1_wall, c1_cpu = n / best["c1"].wall, n / best["c1"].cpu
    c2_wall, c2_cpu = n / best["c2"].wall, n / best["c2"].cpu
    fig = {
        "tiles": n, "slides": len(slides), "mosaic": args.mosaic,
        "slide_size": args.size * max(1, args.mosaic), "slide_jpeg_quality": args.quality,
        "cores": cores,
        "load_before": round(load0[0], 2), "load_after": round(load1[0], 2),
        "a_pillow_decode_ms_cpu": round(best["a_dec"].cpu / m * 1e3, 3),
        "a_pillow_encode_ms_cpu": round(best["a_enc"].cpu / m * 1e3, 3),
        "a_limit_tiles_per_cpu_s": round(a_cpu, 1), "a_limit_tiles_per_s_wall": round(a_wall, 1),
        "a_imagecodecs_tiles_per_cpu_s": round(ic_cpu, 1),
        "a_source_format_tiles_per_cpu_s": round(src_cpu, 1),
        "a_source_format_decode_ms_cpu": round(best["src_dec"].cpu / m * 1e3, 3),
        "c1_over_a_source_format_cpu": round(c1_cpu / src_cpu, 3),
        "b_naive_tiles_per_s_wall": round(b_wall, 1), "b_naive_tiles_per_cpu_s": round(b_cpu, 1),
        "c1_tiles_per_s_wall": round(c1_wall, 1), "c1_tiles_per_cpu_s": round(c1_cpu, 1),
        "c2_tiles_per_s_wall": round(c2_wall, 1), "c2_tiles_per_cpu_s": round(c2_cpu, 1),
        "c1_over_a_per_core_cpu": round(c1_cpu / a_cpu, 3), "c2_over_a_per_core_cpu": round(c2_cpu / a_cpu, 3),
        "c1_over_a_per_core_wall": round(c1_wall / a_wall, 3),
        "c2_over_a_per_core_wall": round(c2_wall / 2 / a_wall, 3),
        "c1_over_b_wall": round(c1_wall / b_wall, 2), "c2_over_b_wall": round(c2_wall / b_wall, 2),
        "c1_over_b_cpu": round(c1_cpu / b_cpu, 2),
        "scaling_2_workers_wall": round(c2_wall / c1_wall, 2),
        "pool_startup_s": round(startup, 2),
        "out_dir": str(args.out), "file_create_ms_out": round(create_out, 3),
        "file_create_ms_tmp": round(create_tmp, 3),
    }  # fmt: skip
    print()
    what = (f"1 mosaic slide of {args.mosaic}x{args.mosaic} generated slides ({args.mosaic * args.size} px square)"
            if args.mosaic else f"{len(slides)} generated slides of {args.size}x{args.size} px")  # fmt: skip
    print(f"{n} tissue tiles from {what} (stored as JPEG RGB Q={args.quality}); "
          f"{cores} cores; best of {args.repeat} interleaved rounds")  # fmt: skip
    print(f"load average {load0[0]:.2f} -> {load1[0]:.2f} (other processes share these cores: wall "
          "figures are what we got, CPU-time figures are per core of our own processes)")  # fmt: skip
    print(f"tiles written to {args.out}: create+write+rename {create_out:.3f} ms per file "
          f"(system temp dir: {create_tmp:.3f} ms)")  # fmt: skip
    print(f"{'':52s} {'tiles/s (wall)':>15s} {'tiles/CPU-s':>12s}")
    print(f"{'(a)  limit: Pillow decode + encode, 1 core':52s} {a_wall:15.1f} {a_cpu:12.1f}"
          f"   (decode {best['a_dec'].cpu / m * 1e3:.2f} + encode {best['a_enc'].cpu / m * 1e3:.2f} ms CPU)")  # fmt: skip
    print(f"{'(a2) same with libjpeg-turbo via imagecodecs':52s} {'':15s} {ic_cpu:12.1f}")
    print(f"{'(a3) Pillow, decoding the format the slide stores':52s} {'':15s} {src_cpu:12.1f}"
          f"   (RGB 4:4:4 Q={args.quality}: decode {best['src_dec'].cpu / m * 1e3:.2f} ms CPU)")  # fmt: skip
    print(f"{'(b)  naive baseline, 1 process':52s} {b_wall:15.1f} {b_cpu:12.1f}")
    print(f"{'(c)  tiler + filter statistics, 1 worker':52s} {c1_wall:15.1f} {c1_cpu:12.1f}")
    print(f"{'(c)  tiler + filter statistics, 2 workers':52s} {c2_wall:15.1f} {c2_cpu:12.1f}")
    print(f"(c)/(a) per core: 1 worker {c1_cpu / a_cpu:.2f} (CPU) / {c1_wall / a_wall:.2f} (wall); "
          f"2 workers {c2_cpu / a_cpu:.2f} (CPU) / {c2_wall / 2 / a_wall:.2f} (wall)   target >= 0.60")  # fmt: skip
    print(f"(c)/(a3) per core: 1 worker {c1_cpu / src_cpu:.2f} (CPU)")
    print(f"(c)/(b): 1 worker {c1_wall / b_wall:.2f}x, 2 workers {c2_wall / b_wall:.2f}x (wall); "
          f"{c1_cpu / b_cpu:.2f}x per CPU-second   target >= 5x")  # fmt: skip
    print(
        f"scaling 1 -> 2 workers: {c2_wall / c1_wall:.2f}x (wall); pool start-up {startup:.2f} s once per run"
    )
    if args.json:
        args.json.write_text(json.dumps(fig, indent=2) + "\n")


def _read_tiles(coords) -> list[np.ndarray]:
    from gtex_assets.lib.tiles.tiling import open_reader

    readers, tiles = {}, []
    for p, x, y in coords:
        if p not in readers:
            readers[p] = open_reader(p)
        tiles.append(np.ascontiguousarray(readers[p].read_region(x, y, T, T).pixels))
    for r in readers.values():
        r.close()
    return tiles


if __name__ == "__main__":
    try:
        main()
    finally:
        Best.cleanup()
