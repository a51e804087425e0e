"""Tiling on generated slides: grid, tissue mask, outcomes, resume after kill -9, bounded memory."""

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from gtex_assets.lib.tiles import tiling
from gtex_assets.lib.tiles.tiling import (
    SlideJob,
    TilingParams,
    block_tiles_for,
    open_reader,
    tile_grid,
    tile_slides,
    tissue_fractions,
)

T = 448
REPO = Path(__file__).resolve().parents[3]


# ------------------------------------------------------------------ generated Aperio-like slides


def _texture(seed: int = 0, size: int = 512) -> np.ndarray:
    """An H&E-like texture (pink stroma with purple nuclei), strongly varying at every scale."""
    rng = np.random.default_rng(seed)
    coarse = np.asarray(
        Image.fromarray(rng.integers(0, 255, (size // 16, size // 16), np.uint8)).resize(
            (size, size), Image.BICUBIC
        ),
        np.float32,
    )
    fine = rng.normal(0, 18, (size, size)).astype(np.float32)
    nuclei = (rng.random((size, size)) < 0.01).astype(np.float32)
    nuclei = np.asarray(
        Image.fromarray((nuclei * 255).astype(np.uint8)).resize((size, size)), np.float32
    )
    from scipy import ndimage

    nuclei = ndimage.maximum_filter(nuclei, 7) / 255
    base = np.array([222, 140, 190], np.float32) - 0.25 * coarse[..., None] + fine[..., None]
    purple = np.array([90, 50, 140], np.float32)
    rgb = base * (1 - nuclei[..., None]) + purple * nuclei[..., None]
    return np.clip(rgb, 0, 255).astype(np.uint8)


TEXTURE = _texture()


def tissue_fn(rects, background=(243, 242, 245)):
    """region_fn painting TEXTURE inside level-0 rectangles (x0, y0, x1, y1), glass elsewhere."""

    def fn(x, y, w, h, ds):
        out = np.empty((h, w, 3), np.uint8)
        out[:] = background
        xs = (np.arange(x, x + w) * ds).astype(np.int64)
        ys = (np.arange(y, y + h) * ds).astype(np.int64)
        for x0, y0, x1, y1 in rects:
            cx = (xs >= x0) & (xs < x1)
            cy = (ys >= y0) & (ys < y1)
            if cx.any() and cy.any():
                sub = TEXTURE[np.ix_(ys[cy] % TEXTURE.shape[0], xs[cx] % TEXTURE.shape[1])]
                out[np.ix_(cy, cx)] = sub
        return out

    return fn


def array_fn(rgb):
    def fn(x, y, w, h, ds):
        return np.ascontiguousarray(
            rgb[y * ds : (y + h) * ds : ds, x * ds : (x + w) * ds : ds][:h, :w]
        )

    return fn


def write_svs(path, width, height, region_fn, tile=256, levels=(4, 16), thumbnail=True, quality=90):
    """An Aperio-style tiled, pyramidal JPEG TIFF written tile by tile (bounded memory)."""
    path = Path(path)
    head = (
        f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile})"
    )
    meta = "|AppMag = 20|MPP = 0.4990"
    jpeg = {"compression": "jpeg", "compressionargs": {"level": quality, "outcolorspace": "rgb"}}

    def tiles(w, h, ds):
        for ty in range(0, h, tile):
            for tx in range(0, w, tile):
                t = np.full((tile, tile, 3), 255, np.uint8)
                bw, bh = min(tile, w - tx), min(tile, h - ty)
                t[:bh, :bw] = region_fn(tx, ty, bw, bh, ds)
                yield t

    big = width * height * 3 > 2**31
    with tifffile.TiffWriter(path, bigtiff=big) as tw:
        common = {"photometric": "rgb", "subsampling": (1, 1), "metadata": None, **jpeg}
        tw.write(
            tiles(width, height, 1), shape=(height, width, 3), dtype=np.uint8, tile=(tile, tile),
            description=f"{head} JPEG/RGB Q={quality}{meta}", **common,
        )  # fmt: skip
        if thumbnail:
            ds = max(4, max(width, height) // 768)
            tw_, th_ = width // ds, height // ds
            tw.write(
                region_fn(0, 0, tw_, th_, ds), photometric="rgb", rowsperstrip=16,
                description=f"Aperio Image Library v12.0.15 \r\n{width}x{height} -> {tw_}x{th_} - {meta}",
                metadata=None, **jpeg,
            )  # fmt: skip
        for ds in levels:
            lw, lh = width // ds, height // ds
            if min(lw, lh) < 16:
                break
            tw.write(
                tiles(lw, lh, ds), shape=(lh, lw, 3), dtype=np.uint8, tile=(tile, tile),
                description=f"{head} -> {lw}x{lh} JPEG/RGB Q={quality}", **common,
            )  # fmt: skip
    return path


def job_for(tmp: Path, slide: Path, sid: str = "GTEX-1117F-0126", tissue: str = "Lung") -> SlideJob:
    return SlideJob(
        sample_id=sid,
        tissue=tissue,
        slide_path=str(slide),
        tiles_dir=tmp / "tiles" / sid,
        index_path=tmp / "tables" / "slide_tiles" / f"{sid}.parquet",
        status_path=tmp / "tables" / "tiling_status" / f"{sid}.parquet",
    )


def run_one(job, params=None, workers=1, force=False):
    params = params or TilingParams()
    ((_, out),) = list(tile_slides([job], params, workers=workers, force=force))
    return out


def tile_set(job) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(job.tiles_dir).glob("*.jpg"))}


# Tissue in tiles (col, row) = (1, 1), (2, 1), (3, 2) of a 5 x 4 grid; 100 px of spare margin.
TISSUE_TILES = [(1, 1), (2, 1), (3, 2)]
RECTS = [(c * T, r * T, (c + 1) * T, (r + 1) * T) for c, r in TISSUE_TILES]


@pytest.fixture(scope="module")
def grid_slide(tmp_path_factory) -> Path:
    return write_svs(
        tmp_path_factory.mktemp("s") / "grid.svs", 5 * T + 100, 4 * T + 100, tissue_fn(RECTS)
    )


# ------------------------------------------------------------------ grid and mask


def test_tile_grid_is_full_non_overlapping_tiles():
    xs, ys = tile_grid(1000, 900, T)
    assert list(zip(xs.tolist(), ys.tolist(), strict=True)) == [
        (0, 0),
        (448, 0),
        (0, 448),
        (448, 448),
    ]
    assert tile_grid(447, 5000, T)[0].size == 0


def test_tissue_fractions_are_area_weighted():
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True  # level-0 [0, 100) x [0, 100) with scale 100
    fr = tissue_fractions(mask, 100.0, 100.0, np.array([0, 50, 100]), np.array([0, 0, 0]), 100)
    np.testing.assert_allclose(fr, [1.0, 0.5, 0.0])
    fr = tissue_fractions(mask, 100.0, 100.0, np.array([50]), np.array([50]), 100)
    np.testing.assert_allclose(fr, [0.25])


def test_block_size_follows_the_slide_tiles():
    assert block_tiles_for((256, 256), 448) == 4  # 4 x 448 = 7 x 256: no stored tile cut twice
    assert (4 * 448) % 256 == 0


def test_grid_coordinates_and_pixels(tmp_path, grid_slide):
    job = job_for(tmp_path, grid_slide)
    out = run_one(job)
    st, idx = out.status, out.index
    assert st["status"] == "ok" and st["n_grid_tiles"] == 20 and st["reason"] == ""
    assert st["mask_source"].startswith("lowres-")
    got = sorted(zip(idx["x"], idx["y"], strict=True))
    assert got == sorted((c * T, r * T) for c, r in TISSUE_TILES)
    assert (
        (idx["level"] == 0).all()
        and (idx["tile_size"] == T).all()
        and (idx["status"] == "ok").all()
    )
    assert (idx["tissue_fraction"] > 0.9).all()
    for r in idx.itertuples():
        assert Path(r.path).is_absolute() and Path(r.path).name == f"{r.x}_{r.y}.jpg"
        data = Path(r.path).read_bytes()
        assert len(data) == r.jpeg_bytes
        tile = np.asarray(Image.open(io.BytesIO(data)))
        assert tile.shape == (T, T, 3)
        src = tissue_fn(RECTS)(r.x, r.y, T, T, 1)
        # Two JPEG generations (slide at q90, tile at q90): close, not identical.
        assert np.abs(tile.astype(int) - src.astype(int)).mean() < 8
    assert sorted(p.name for p in job.tiles_dir.iterdir()) == sorted(
        Path(p).name for p in idx["path"]
    )
    saved = pd.read_parquet(job.index_path)
    assert saved[["x", "y", "jpeg_bytes"]].equals(idx[["x", "y", "jpeg_bytes"]])


def test_background_is_never_decoded_at_full_resolution(tmp_path, grid_slide, monkeypatch):
    decoded = []
    orig = tiling._TiffPageReader.segment

    def spy(self, row, col):
        if self.name.endswith("level 0"):
            decoded.append((col, row))
        return orig(self, row, col)

    monkeypatch.setattr(tiling._TiffPageReader, "segment", spy)
    run_one(job_for(tmp_path, grid_slide))
    seg = 256
    needed = {
        (c, r)
        for x0, y0, x1, y1 in RECTS
        for r in range(y0 // seg, (y1 - 1) // seg + 1)
        for c in range(x0 // seg, (x1 - 1) // seg + 1)
    }
    assert decoded and set(decoded) <= needed
    assert len(decoded) == len(set(decoded))  # each stored tile decoded once
    total = -(-(5 * T + 100) // seg) * -(-(4 * T + 100) // seg)
    assert len(decoded) < 0.4 * total


def test_single_level_slide_uses_a_level0_scan(tmp_path):
    slide = write_svs(
        tmp_path / "flat.svs", 3 * T, 2 * T, tissue_fn([(0, 0, T, T)]), levels=(), thumbnail=False
    )
    out = run_one(job_for(tmp_path, slide))
    assert out.status["mask_source"] == "level0-scan"
    assert list(zip(out.index["x"], out.index["y"], strict=True)) == [(0, 0)]


# ------------------------------------------------------------------ outcomes that are not tiles


def test_blank_slide_records_no_tissue(tmp_path):
    slide = write_svs(tmp_path / "blank.svs", 4 * T, 3 * T, tissue_fn([]))
    job = job_for(tmp_path, slide)
    out = run_one(job)
    assert out.status["status"] == "no_tissue" and "no tissue" in out.status["reason"]
    assert out.status["n_tiles"] == 0 and out.index.empty
    assert pd.read_parquet(job.index_path).empty
    assert pd.read_parquet(job.status_path)["status"].tolist() == ["no_tissue"]
    assert run_one(job).skipped  # a recorded outcome is done


def test_tiny_slide_records_too_small(tmp_path):
    slide = write_svs(tmp_path / "tiny.svs", 300, 200, tissue_fn([(0, 0, 300, 200)]), levels=())
    out = run_one(job_for(tmp_path, slide))
    assert out.status["status"] == "too_small"
    assert (
        "300x200" in out.status["reason"]
        and "smaller than one 448x448 tile" in out.status["reason"]
    )


def test_unreadable_region_marks_tiles_as_errors_and_goes_on(tmp_path):
    slide = write_svs(tmp_path / "bad.svs", 4 * T, 2 * T, tissue_fn([(0, 0, 4 * T, 2 * T)]))
    with tifffile.TiffFile(slide) as tf:
        page = tf.pages[0]
        cols = -(-page.imagewidth // 256)
        i = 0 * cols + 0  # stored tile (0, 0): inside grid tile (0, 0) only
        off, n = page.dataoffsets[i], page.databytecounts[i]
    with open(slide, "r+b") as f:
        f.seek(off)
        f.write(b"\x00" * n)
    # 1 of 8 tissue tiles unreadable: above the default max_corrupt_share (10%) ...
    default = run_one(job_for(tmp_path / "default", slide))
    assert default.status["status"] == "quarantined"
    reason = default.status["reason"]
    assert "1 of 8 tissue tiles (12%) unreadable, more than max_corrupt_share 10%" in reason
    assert "(col 0, row 0)" in reason and "raise slide_tiles config max_corrupt_share" in reason
    assert len(default.index) == 8  # the per-tile record is kept
    # ... and tiled "ok" with the error recorded when the slide-level limit allows it.
    out = run_one(job_for(tmp_path, slide), TilingParams(max_corrupt_share=0.2))
    idx = out.index
    assert (
        out.status["status"] == "ok" and out.status["n_errors"] == 1 and out.status["n_tiles"] == 7
    )
    err = idx[idx["status"] == "error"]
    assert list(zip(err["x"], err["y"], strict=True)) == [(0, 0)]
    assert "unreadable" in err["error"].iloc[0] and "x=0, y=0" in err["error"].iloc[0]
    assert not Path(err["path"].iloc[0]).exists()


def test_unreadable_slide_is_recorded_not_raised(tmp_path):
    bad = tmp_path / "junk.svs"
    bad.write_bytes(b"II*\x00" + b"\x00" * 100)
    job = job_for(tmp_path, bad)
    out = run_one(job)
    assert out.status["status"] == "unreadable" and "junk.svs" in out.status["reason"]
    assert not job.index_path.exists()  # not done: tried again next time
    assert pd.read_parquet(job.status_path)["status"].tolist() == ["unreadable"]


# ------------------------------------------------------------------ the real slide


def test_real_cmu_slide(tmp_path, cmu_slide):
    with open_reader(cmu_slide) as r:
        assert (r.width, r.height) == (2220, 2967) and r.kind == "tifffile"
    job = job_for(tmp_path, cmu_slide)
    out = run_one(job)
    st, idx = out.status, out.index
    # 4 x 6 full tiles; the tissue strip covers about half of them.
    assert st["status"] == "ok" and st["n_grid_tiles"] == 24 and st["n_errors"] == 0
    assert 9 <= st["n_tiles"] <= 16, st["n_tiles"]
    assert st["mask_source"] == "lowres-574x768"  # the thumbnail, not level 0
    assert (idx["tissue_fraction"] >= 0.25).all()
    assert idx["jpeg_bytes"].between(20_000, 120_000).all()
    # The left column (x = 0) is glass; the centre column (x = 896) is tissue top to bottom.
    assert 0 not in set(idx["x"]) and set(idx.loc[idx["x"] == 896, "y"]) >= {
        448,
        896,
        1344,
        1792,
        2240,
    }


# ------------------------------------------------------------------ resume and idempotence


def test_done_slide_is_skipped_and_parameter_change_retiles(tmp_path, grid_slide):
    job = job_for(tmp_path, grid_slide)
    first = run_one(job)
    mtime = job.index_path.stat().st_mtime_ns
    again = run_one(job)
    assert again.skipped and job.index_path.stat().st_mtime_ns == mtime
    assert again.index[["x", "y", "jpeg_bytes"]].equals(first.index[["x", "y", "jpeg_bytes"]])
    before = tile_set(job)
    changed = run_one(job, TilingParams(jpeg_quality=70))
    assert not changed.skipped and job.index_path.stat().st_mtime_ns != mtime
    after = tile_set(job)
    assert after.keys() == before.keys()
    assert all(len(after[k]) < len(before[k]) for k in after)
    # A larger tile size: different grid; the old JPEGs are removed, only the new set remains.
    bigger = run_one(job, TilingParams(tile_size=896, min_tissue_fraction=0.2))
    assert sorted(tile_set(job)) == sorted(Path(p).name for p in bigger.index["path"])
    assert (bigger.index["tile_size"] == 896).all()


CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from gtex_assets.lib.tiles import tiling
    from gtex_assets.lib.tiles.tiling import SlideJob, TilingParams, tile_slides

    # Slowed so the parent can kill the run mid-way. Top level: spawned pool workers re-import
    # this file as their main module, so they are slowed too.
    _encode = tiling.encode_jpeg
    def encode(tile, q):
        time.sleep(0.01)
        return _encode(tile, q)
    tiling.encode_jpeg = encode

    if __name__ == "__main__":
        tmp, slide, workers = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
        sid = "GTEX-1117F-0126"
        job = SlideJob(sid, "Lung", slide, tmp / "tiles" / sid, tmp / "idx.parquet", tmp / "st.parquet")
        list(tile_slides([job], TilingParams(), workers=workers))
    """
)


@pytest.fixture(scope="module")
def full_slide(tmp_path_factory) -> Path:
    # 10 x 8 tissue tiles in 5 blocks rows: enough for a kill in the middle.
    return write_svs(
        tmp_path_factory.mktemp("s") / "full.svs", 10 * T, 8 * T, tissue_fn([(0, 0, 10 * T, 8 * T)])
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_killed_run_resumes_to_the_same_tiles(tmp_path, full_slide, workers):
    clean = job_for(tmp_path / "clean", full_slide)
    reference = run_one(clean)
    ref_tiles = tile_set(clean)
    assert len(ref_tiles) == 80

    killed = tmp_path / "killed"
    sid = "GTEX-1117F-0126"
    tiles_dir = killed / "tiles" / sid
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(killed), str(full_slide), str(workers)],
        cwd=REPO, start_new_session=True, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline:
        n = len(list(tiles_dir.glob("*.jpg"))) if tiles_dir.exists() else 0
        if n >= 20:
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the run worker and its pool, like kill -9
    proc.wait()
    partial = len(list(tiles_dir.glob("*.jpg")))
    assert 20 <= partial < 80
    assert not (killed / "idx.parquet").exists() and not (killed / "st.parquet").exists()
    # A writer killed mid-file leaves a temp name; it must never be counted.
    (tiles_dir / ".0_0.jpg.999.tmp").write_bytes(b"\xff\xd8partial")

    job = SlideJob(
        sid, "Lung", str(full_slide), tiles_dir, killed / "idx.parquet", killed / "st.parquet"
    )
    resumed = run_one(job)
    assert resumed.status["status"] == "ok" and resumed.status["n_tiles"] == 80
    assert tile_set(job) == ref_tiles  # same names, same bytes
    assert sorted(p.name for p in tiles_dir.iterdir()) == sorted(ref_tiles)  # no temp, no sidecar
    cols = [c for c in reference.index.columns if c != "path"]
    pd.testing.assert_frame_equal(resumed.index[cols], reference.index[cols])
    pd.testing.assert_frame_equal(
        pd.read_parquet(job.index_path)[cols], pd.read_parquet(clean.index_path)[cols]
    )


def test_parallel_workers_give_the_same_output(tmp_path, grid_slide, cmu_slide):
    jobs1 = [
        job_for(tmp_path / "w1", grid_slide),
        job_for(tmp_path / "w1", cmu_slide, "GTEX-1117F-0226"),
    ]
    jobs2 = [
        job_for(tmp_path / "w2", grid_slide),
        job_for(tmp_path / "w2", cmu_slide, "GTEX-1117F-0226"),
    ]
    out1 = {j.sample_id: o for j, o in tile_slides(jobs1, workers=1)}
    out2 = {j.sample_id: o for j, o in tile_slides(jobs2, workers=2)}
    assert out1.keys() == out2.keys()
    for sid in out1:
        cols = [c for c in out1[sid].index.columns if c != "path"]
        pd.testing.assert_frame_equal(out1[sid].index[cols], out2[sid].index[cols])
    for a, b in zip(jobs1, jobs2, strict=True):
        assert tile_set(a) == tile_set(b)


# ------------------------------------------------------------------ bounded memory

MEM_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    def hwm_mb():
        # VmHWM belongs to this address space (reset by exec); ru_maxrss would carry over the
        # forking parent's peak (a big pytest process).
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024

    from gtex_assets.lib.tiles.tiling import SlideJob, TilingParams, tile_slides
    tmp, slide = Path(sys.argv[1]), sys.argv[2]
    import numpy, pandas, pyarrow, scipy.ndimage, tifffile, imagecodecs  # baseline
    base = hwm_mb()
    sid = "GTEX-1117F-0126"
    job = SlideJob(sid, "Lung", slide, tmp / "tiles" / sid, tmp / "idx.parquet", tmp / "st.parquet")
    ((_, out),) = list(tile_slides([job], TilingParams(), workers=1))
    peak = hwm_mb()
    print(out.status["status"], out.status["n_tiles"], base, peak)
    """
)


def test_memory_stays_bounded_on_a_large_slide(tmp_path):
    # 17,920 x 16,128 px (0.87 GB as RGB): tissue in three separated islands.
    w, h = 40 * T, 36 * T
    rects = [
        (2 * T, 3 * T, 14 * T, 13 * T),
        (30 * T, 25 * T, 37 * T, 32 * T),
        (20 * T, 33 * T, 23 * T, 35 * T),
    ]
    slide = write_svs(tmp_path / "large.svs", w, h, tissue_fn(rects), levels=(4, 16, 64))
    res = subprocess.run(
        [sys.executable, "-c", MEM_CHILD, str(tmp_path / "out"), str(slide)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    status, n_tiles, base_mb, peak_mb = res.stdout.split()
    assert status == "ok" and int(n_tiles) == 12 * 10 + 7 * 7 + 3 * 2
    full_mb = w * h * 3 / 2**20  # 827 MB: what reading level 0 whole would take
    # One block of tiles (<= 8 x 8 tiles, ~50 MB) and the mask on top of the imports.
    assert int(peak_mb) - int(base_mb) < 200, (base_mb, peak_mb)
    assert int(peak_mb) < full_mb / 2, (base_mb, peak_mb)


# ------------------------------------------------------------------ physical tile size (MPP)


def test_plan_read_keeps_the_field_of_view():
    p = TilingParams()  # 448 px at 0.5 µm/px
    twenty = tiling.plan_read(0.499, [1.0, 4.0, 16.0], p)
    assert (twenty.level, twenty.read_px, twenty.footprint_px, twenty.resized) == (
        0,
        448,
        448,
        False,
    )
    assert twenty.mpp == 0.499
    # 40x with a 2x level: that level is read as is.
    forty2 = tiling.plan_read(0.25, [1.0, 2.0, 8.0], p)
    assert (forty2.level, forty2.read_px, forty2.footprint_px, forty2.resized) == (
        1,
        448,
        896,
        False,
    )
    assert forty2.mpp == 0.5
    # 40x with only 4x levels (Aperio): 896 px of level 0, resized to 448.
    forty4 = tiling.plan_read(0.2527, [1.0, 4.0, 16.0], p)
    assert (forty4.level, forty4.read_px, forty4.footprint_px, forty4.resized) == (
        0,
        886,
        886,
        True,
    )
    assert forty4.mpp == 0.5
    # Unknown MPP: level 0 as is; another target: 10x-like tiles from a 20x slide's 4x level.
    assert tiling.plan_read(None, [1.0, 4.0], p) == tiling.ReadPlan(0, 1.0, 448, 448, 448, None)
    coarse = tiling.plan_read(0.5, [1.0, 4.0], TilingParams(target_mpp=2.0))
    assert (coarse.level, coarse.read_px, coarse.footprint_px) == (1, 448, 1792)


def test_corrupt_verdict():
    assert tiling.corrupt_verdict(10, 1, 0.1) is None
    assert tiling.corrupt_verdict(0, 0, 0.1) is None
    reason = tiling.corrupt_verdict(10, 2, 0.1, "bad tile")
    assert reason.startswith("2 of 10 tissue tiles (20%) unreadable") and "bad tile" in reason


@pytest.mark.parametrize("levels, read_level, resized", [((2, 8), 1, False), ((4, 16), 0, True)])
def test_40x_slide_gives_the_20x_field_of_view(tmp_path, levels, read_level, resized):
    """The same tissue scanned at 20x and at 40x (twice the pixels) gives the same tiles:
    same grid in µm, 448 px each, nearly the same pixels."""
    from gtex_assets.lib.synth.hard import write_sparse_slide

    island = [(0, 0, 3 * T, 2 * T)]
    s20 = tmp_path / "x20.svs"
    write_sparse_slide(s20, 4 * T, 3 * T, island, levels=(4,), mpp=0.5, quality=95)
    s40 = tmp_path / "x40.svs"
    island40 = [(0, 0, 6 * T, 4 * T)]
    write_sparse_slide(
        s40, 8 * T, 6 * T, island40, levels=levels, mpp=0.25, app_mag=40, quality=95, texel_px=2.0
    )
    j20 = SlideJob(**{**job_for(tmp_path / "a", s20).__dict__, "mpp": 0.5})
    j40 = SlideJob(**{**job_for(tmp_path / "b", s40).__dict__, "mpp": 0.25})
    o20, o40 = run_one(j20), run_one(j40)
    assert o20.status["status"] == o40.status["status"] == "ok"
    assert o40.status["footprint_px"] == 896 and o40.status["read_level"] == read_level
    assert o40.status["mpp"] == o20.status["mpp"] == 0.5
    i20, i40 = o20.index, o40.index
    assert len(i40) == len(i20) > 0
    assert (i40["x"] // 2).tolist() == i20["x"].tolist()
    assert (i40["y"] // 2).tolist() == i20["y"].tolist()
    assert set(i40["read_px"]) == {896 if resized else 448} and set(i40["mpp"]) == {0.5}
    assert set(i40["level"]) == {read_level} and set(i20["level"]) == {0}
    a = np.asarray(Image.open(i20["path"].iloc[0]), np.float32)
    b = np.asarray(Image.open(i40["path"].iloc[0]), np.float32)
    assert a.shape == b.shape == (T, T, 3)
    # Texture is sampled at level-0 coordinates, so the 40x tile is the 20x tile at twice the
    # resolution: after downsampling they agree far better than two different tiles would.
    c = np.asarray(Image.open(i20["path"].iloc[1]), np.float32)
    assert np.abs(a - b).mean() < 0.5 * np.abs(a - c).mean()


def test_sparse_large_slide_reads_only_its_islands_at_level_0(tmp_path, monkeypatch):
    """A 24,000 x 16,000 px sparse pyramid (the benchmark's huge slide, scaled down): the mask
    comes from a low-resolution level and level 0 is decoded only under the tissue islands."""
    from gtex_assets.lib.synth.hard import write_sparse_slide

    islands = [(2 * T, 3 * T, 6 * T, 6 * T), (40 * T, 25 * T, 43 * T, 27 * T)]
    slide = tmp_path / "sparse.svs"
    write_sparse_slide(slide, 24_000, 16_000, islands, levels=(4, 16, 64))
    decoded = []
    orig = tiling._TiffPageReader.segment

    def spy(self, row, col):
        if self.name.endswith("level 0"):
            decoded.append((col, row))
        return orig(self, row, col)

    monkeypatch.setattr(tiling._TiffPageReader, "segment", spy)
    out = run_one(SlideJob(**{**job_for(tmp_path, slide).__dict__, "mpp": 0.499}))
    assert out.status["status"] == "ok" and out.status["mask_source"].startswith("lowres-1500x")
    assert out.status["n_tiles"] == 4 * 3 + 3 * 2
    seg = 256
    needed = {
        (c, r)
        for x0, y0, x1, y1 in islands
        for r in range(y0 // seg, (y1 - 1) // seg + 1)
        for c in range(x0 // seg, (x1 - 1) // seg + 1)
    }
    assert decoded and set(decoded) <= needed and len(decoded) == len(set(decoded))
    assert len(decoded) < 0.02 * (-(-24_000 // seg) * -(-16_000 // seg))
