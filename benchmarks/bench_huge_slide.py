"""Peak memory of tiling a huge, mostly empty slide (issue #14).

Writes a ~100,000 x 80,000 px Aperio-style pyramid (levels 4, 16, 64) sparsely
(lib.synth.hard.write_sparse_slide: glass tiles share one pre-encoded JPEG, tissue in a few
islands), then tiles it in a child process and prints the child's peak RSS beside the slide's
size (file bytes, pixels, and what level 0 would take as RGB), with a baseline child that only
imports the tiler, measured in the same run.

    PYTHONPATH=. python benchmarks/bench_huge_slide.py [--width 100000 --height 80000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from gtex_assets.lib.tiles.tiling import SlideJob, TilingParams, tile_slides
out, slide, run = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "tile"
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
res = {"base_kb": base}
if run:
    job = SlideJob("GTEX-1117F-0126", "Lung", slide, out / "tiles", out / "i.parquet",
                   out / "s.parquet", mpp=0.499)
    t0 = time.perf_counter()
    ((_, o),) = list(tile_slides([job], TilingParams(), workers=1))
    res.update(status=o.status["status"], tiles=int(o.status["n_tiles"]),
               grid=int(o.status["n_grid_tiles"]), mask=o.status["mask_source"],
               seconds=round(time.perf_counter() - t0, 1))
res["peak_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(res))
"""


def child(out: Path, slide: Path, mode: str) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(out), str(slide), mode],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=100_000)
    ap.add_argument("--height", type=int, default=80_000)
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    args = ap.parse_args()
    from gtex_assets.lib.synth.hard import write_sparse_slide

    w, h = args.width, args.height
    # Three tissue islands: ~1.5% of the area (a biopsy's few fragments on a large slide).
    islands = [
        (int(0.10 * w), int(0.15 * h), int(0.18 * w), int(0.25 * h)),
        (int(0.55 * w), int(0.50 * h), int(0.62 * w), int(0.58 * h)),
        (int(0.80 * w), int(0.80 * h), int(0.83 * w), int(0.84 * h)),
    ]
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        work = Path(d)
        slide = work / "huge.svs"
        t0 = time.perf_counter()
        size = write_sparse_slide(slide, w, h, islands, levels=(4, 16, 64))
        gen_s = time.perf_counter() - t0
        small = work / "small.svs"
        f = 25
        write_sparse_slide(small, w // f, h // f, [tuple(v // f for v in r) for r in islands])
        base = child(work / "base", small, "tile")
        run = child(work / "run", slide, "tile")
        rgb = w * h * 3
        peak, base_kb = run["peak_kb"] * 1024, base["peak_kb"] * 1024
        print(f"slide: {w:,} x {h:,} px ({w * h / 1e9:.1f} Gpx), file {size / 2**20:,.0f} MiB, "
              f"level 0 as RGB {rgb / 2**30:,.1f} GiB; written in {gen_s:.0f}s")  # fmt: skip
        print(f"tiling: {run['status']}, {run['tiles']:,} tiles of {run['grid']:,} grid tiles, "
              f"mask from {run['mask']}, {run['seconds']}s (1 worker)")  # fmt: skip
        print(f"peak RSS: {peak / 2**20:,.0f} MiB; baseline (a {w // f:,} x {h // f:,} px slide, "
              f"{base['tiles']} tiles) {base_kb / 2**20:,.0f} MiB: the huge slide adds "
              f"{(peak - base_kb) / 2**20:,.0f} MiB, ratio {peak / base_kb:.2f}x for "
              f"{f * f}x the pixels")  # fmt: skip
        print(f"ratio peak RSS / level-0 RGB: {peak / rgb:.4f} ({rgb / peak:,.0f}x smaller); "
              f"peak / file bytes: {peak / size:.2f}")  # fmt: skip
        print(
            f"(this process, generator: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB peak)"
        )


if __name__ == "__main__":
    main()
