"""Slides and portal rows as they come from the field, for tests and benchmarks.

* :func:`write_aperio`: an Aperio-style SVS of an in-memory image: JPEG or JPEG-2000 tiles
  (Aperio's compression 33005, through imagecodecs), any MPP (or none) and magnification.
* :func:`write_sparse_slide`: a huge pyramid (100,000 x 80,000 px and more) written tile by
  tile in bounded memory: glass tiles share one pre-encoded JPEG, tissue only in islands.
* :func:`corrupt_level0_tiles`: damage a share of a slide's stored level-0 tiles.
* :func:`generate_hard_mirror`: :func:`generate_mirror` plus a JPEG-2000 slide without MPP, a
  40x slide, slides with corrupt tiles, a truncated and a non-TIFF ``.svs``, a row without a
  slide file, and malformed portal rows. ``truth/hard_cases.json`` says what each should become.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from gtex_assets.lib.synth.mirror import PORTAL_CSV_NAME, SLIDES_DIR, TRUTH_DIR, generate_mirror

SVS_TILE = 256
GLASS = (243, 242, 245)
JPEG2000_APERIO_RGB = 33005  # Aperio's JPEG-2000 (RGB) compression tag value
HARD_CASES_NAME = "hard_cases.json"


def _head(w: int, h: int, tile: int) -> str:
    return f"Aperio Image Library v12.0.15 \r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile})"


def _meta(mpp: float | None, app_mag: int | None) -> str:
    parts = ["|ScanScope ID = SYNTH02"]
    if app_mag is not None:
        parts.append(f"|AppMag = {app_mag}")
    if mpp is not None:
        parts.append(f"|MPP = {mpp:.4f}")
    return "".join(parts)


def _codec(compression: str, quality: int) -> dict:
    if compression == "jpeg":
        return {
            "compression": "jpeg",
            "compressionargs": {"level": quality, "outcolorspace": "rgb"},
            "subsampling": (1, 1),
        }
    if compression == "jpeg2000":
        # A raw J2K codestream per tile, as Aperio scanners store it (not a JP2 file).
        return {
            "compression": JPEG2000_APERIO_RGB,
            "compressionargs": {"level": quality, "codecformat": "J2K"},
        }
    raise ValueError(f"compression {compression!r}: expected 'jpeg' or 'jpeg2000'")


def _shrink(rgb: np.ndarray, factor: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    size = (max(1, round(w / factor)), max(1, round(h / factor)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BOX))


def write_aperio(
    path: str | Path,
    rgb: np.ndarray,
    *,
    mpp: float | None,
    app_mag: int | None = 20,
    compression: str = "jpeg",
    level_downsamples: Sequence[int] = (4,),
    quality: int = 80,
    tile: int = SVS_TILE,
) -> int:
    """Write ``rgb`` as a tiled Aperio SVS with pyramid levels ``level_downsamples`` (atomic);
    ``mpp=None`` leaves the MPP out of the description. Returns the file size."""
    path = Path(path)
    h, w = rgb.shape[:2]
    codec = _codec(compression, quality)
    kind = "J2K/RGB" if compression == "jpeg2000" else "JPEG/RGB"
    common = {"tile": (tile, tile), "photometric": "rgb", "metadata": None, **codec}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tifffile.TiffWriter(tmp) as tw:
            desc = f"{_head(w, h, tile)} {kind} Q={quality}{_meta(mpp, app_mag)}"
            tw.write(rgb, description=desc, **common)
            for ds in level_downsamples:
                level = _shrink(rgb, ds)
                if min(level.shape[:2]) < 16:
                    break
                lh, lw = level.shape[:2]
                tw.write(level, description=f"{_head(w, h, tile)} -> {lw}x{lh} {kind}", **common)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


def tissue_texture(size: int = 512, seed: int = 0) -> np.ndarray:
    """An H&E-like texture (pink stroma, purple nuclei) that varies at every scale."""
    rng = np.random.default_rng(seed)
    coarse = np.asarray(
        Image.fromarray(rng.integers(0, 255, (size // 16, size // 16), np.uint8)).resize(
            (size, size), Image.BICUBIC
        ),
        np.float32,
    )
    fine = rng.normal(0, 18, (size, size)).astype(np.float32)
    nuclei = rng.random((size, size)) < 0.004
    from scipy import ndimage

    nuclei = ndimage.maximum_filter(nuclei, 5).astype(np.float32)
    base = np.array([222, 140, 190], np.float32) - 0.25 * coarse[..., None] + fine[..., None]
    purple = np.array([90, 50, 140], np.float32)
    rgb = base * (1 - nuclei[..., None]) + purple * nuclei[..., None]
    return np.clip(rgb, 0, 255).astype(np.uint8)


def write_jp2k_slide(
    path: str | Path, *, size: tuple[int, int] = (1344, 896), seed: int = 0
) -> int:
    """A JPEG-2000 Aperio slide whose description has no MPP (like many TCGA/GTEx J2K scans):
    a tissue band over glass."""
    w, h = size
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[:] = GLASS
    tex = tissue_texture(512, seed)
    y0, y1, x0, x1 = h // 6, h - h // 6, w // 8, w - w // 8
    ys, xs = np.arange(y0, y1) % 512, np.arange(x0, x1) % 512
    rgb[y0:y1, x0:x1] = tex[np.ix_(ys, xs)]
    return write_aperio(path, rgb, mpp=None, app_mag=20, compression="jpeg2000")


def _encode_jpeg(tile: np.ndarray, quality: int) -> bytes:
    import imagecodecs

    return bytes(
        imagecodecs.jpeg8_encode(tile, level=quality, outcolorspace="rgb", subsampling=(1, 1))
    )


def write_sparse_slide(
    path: str | Path,
    width: int,
    height: int,
    islands: Sequence[tuple[int, int, int, int]],
    *,
    levels: Sequence[int] = (4, 16, 64),
    mpp: float = 0.4990,
    app_mag: int = 20,
    quality: int = 80,
    tile: int = SVS_TILE,
    seed: int = 0,
    texel_px: float = 1.0,
) -> int:
    """A pyramidal Aperio JPEG SVS of ``width x height`` with tissue only inside ``islands``
    (level-0 rectangles x0, y0, x1, y1), written tile by tile: memory is a few tiles whatever
    the size, and every glass tile is the same pre-encoded JPEG. ``texel_px`` level-0 px per
    texture pixel: 2 on a 40x slide shows the same tissue as 1 on a 20x one. Returns the file
    size."""
    path = Path(path)
    tex = tissue_texture(1024, seed)
    glass = np.empty((tile, tile, 3), np.uint8)
    glass[:] = GLASS
    glass_jpeg = _encode_jpeg(glass, quality)

    def tiles(w: int, h: int, ds: int) -> Iterator[bytes]:
        scaled = [(x0 / ds, y0 / ds, x1 / ds, y1 / ds) for x0, y0, x1, y1 in islands]
        for ty in range(0, h, tile):
            for tx in range(0, w, tile):
                hits = [r for r in scaled if r[0] < tx + tile and tx < r[2] and r[1] < ty + tile and ty < r[3]]  # fmt: skip
                if not hits:
                    yield glass_jpeg
                    continue
                out = glass.copy()
                xs = np.arange(tx, tx + tile)
                ys = np.arange(ty, ty + tile)
                for x0, y0, x1, y1 in hits:
                    cx = (xs >= x0) & (xs < x1) & (xs < w)
                    cy = (ys >= y0) & (ys < y1) & (ys < h)
                    # Texture sampled at level-0 coordinates, so every level shows the same field.
                    ty_ = (ys[cy] * ds / texel_px).astype(np.int64) % 1024
                    tx_ = (xs[cx] * ds / texel_px).astype(np.int64) % 1024
                    sub = tex[np.ix_(ty_, tx_)]
                    out[np.ix_(cy, cx)] = sub
                yield _encode_jpeg(out, quality)

    codec = _codec("jpeg", quality)
    big = width * height * 3 > 2**31
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=big) as tw:
            for i, ds in enumerate((1, *levels)):
                lw, lh = width // ds, height // ds
                if min(lw, lh) < 16:
                    break
                desc = _head(width, height, tile) + (
                    f" JPEG/RGB Q={quality}{_meta(mpp, app_mag)}" if i == 0 else f" -> {lw}x{lh} JPEG/RGB"
                )  # fmt: skip
                tw.write(
                    tiles(lw, lh, ds), shape=(lh, lw, 3), dtype=np.uint8, tile=(tile, tile),
                    photometric="rgb", metadata=None, description=desc, **codec,
                )  # fmt: skip
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


def corrupt_level0_tiles(path: str | Path, fraction: float, *, seed: int = 0) -> list[int]:
    """Overwrite the entropy-coded data of ``fraction`` of the stored level-0 tiles that hold
    tissue-coloured pixels (zeros after the JPEG header, so decoders fail, not paint garbage).
    Returns the damaged tile indices."""
    path = Path(path)
    with tifffile.TiffFile(str(path)) as tif:
        page = tif.pages[0]
        offsets, counts = list(page.dataoffsets), list(page.databytecounts)
        # Tissue tiles compress to more bytes than glass: damage among the larger half.
        order = np.argsort(counts)[::-1]
        candidates = [int(i) for i in order[: max(1, len(order) // 2)]]
    rng = np.random.default_rng(seed)
    n = max(1, round(fraction * len(candidates)))
    chosen = sorted(rng.choice(candidates, size=min(n, len(candidates)), replace=False).tolist())
    with open(path, "r+b") as f:
        for i in chosen:
            f.seek(offsets[i])
            f.write(b"\x00" * counts[i])
    return chosen


def _append_portal_rows(csv_path: Path, rows: Sequence[Sequence[str]]) -> None:
    with open(csv_path, "a", newline="", encoding="utf-8") as f:
        csv.writer(f, quoting=csv.QUOTE_ALL).writerows(rows)


def generate_hard_mirror(
    out_dir: str | Path,
    *,
    tissues: int = 3,
    slides_per_tissue: int = 5,
    seed: int = 0,
    slide_size: tuple[int, int] = (1344, 896),
    n_genes: int = 300,
) -> dict:
    """A small generated mirror whose slides and rows are as hard as real ones.

    Of the slides (spread over the tissues): two JPEG-2000 slides without MPP (``no_mpp``; the
    second has an override row in ``truth/mpp_overrides.csv`` a test copies under the data
    root), one 40x (0.25 µm/px, twice the pixels, 4x pyramid), one with 40% of its tissue
    tiles damaged (``corrupt``: quarantined by ``max_corrupt_share``), one truncated, one not a
    TIFF at all and one whose file is missing. Malformed portal rows are appended to ``GTEx Portal.csv``.
    Returns (and writes to ``truth/hard_cases.json``) case -> sample id, plus the bad rows.
    """
    out = Path(out_dir)
    summary = generate_mirror(
        out, tissues=tissues, slides_per_tissue=slides_per_tissue, seed=seed,
        slide_size=slide_size, n_genes=n_genes,
    )  # fmt: skip
    doc = json.loads((summary.truth_dir / "summary.json").read_text())
    by_tissue: dict[str, list[str]] = {}
    with open(summary.portal_csv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            by_tissue.setdefault(row["Tissue"], []).append(row["Tissue Sample ID"])
    # Round-robin over tissues so no tissue loses all its good slides.
    order = [s for group in zip(*by_tissue.values(), strict=False) for s in group]
    order = [s for s in order if s in set(doc["slides"])]
    cases = ["no_mpp", "no_mpp_override", "x40", "corrupt", "truncated", "not_tiff", "missing"]
    if len(order) < len(cases) + 2:
        raise ValueError(f"{len(order)} slides: need at least {len(cases) + 2} for the hard cases")
    ids = dict(zip(cases, order, strict=False))
    slides = out / SLIDES_DIR

    def svs(case: str) -> Path:
        return slides / f"{ids[case]}.svs"

    for case in ("no_mpp", "no_mpp_override"):
        rgb = tifffile.imread(svs(case), key=0)
        write_aperio(svs(case), rgb, mpp=None, app_mag=20, compression="jpeg2000")
    rgb = tifffile.imread(svs("x40"), key=0)
    up = np.asarray(
        Image.fromarray(rgb).resize((rgb.shape[1] * 2, rgb.shape[0] * 2), Image.BICUBIC)
    )
    write_aperio(svs("x40"), up, mpp=0.2495, app_mag=40, level_downsamples=(4, 16))
    corrupt_level0_tiles(svs("corrupt"), 0.4, seed=seed)
    data = svs("truncated").read_bytes()
    svs("truncated").write_bytes(data[:5000])
    svs("not_tiff").write_bytes(b"<html><body>503 Service Unavailable</body></html>\n")
    svs("missing").unlink()

    first = order[-1]
    bad_rows = [
        ["../../x", "Lung", "GTEX-1117F", "male", "60-69", "", "", ""],
        ["GTEX-1117F-0126/../../etc", "Lung", "", "", "", "", "", ""],
        [first, "Lung", "", "", "", "", "", "repeated id"],
        ["GTEX-ZZZZZ-0126", "", "GTEX-ZZZZZ", "", "", "", "", "empty tissue"],
    ]
    _append_portal_rows(summary.portal_csv, bad_rows)
    truth = out / TRUTH_DIR
    (truth / "mpp_overrides.csv").write_text(
        f"tissue_sample_id,mpp\n{ids['no_mpp_override']},0.4990\n"
    )
    result = {"cases": ids, "bad_rows": [r[0] for r in bad_rows], "portal_csv": PORTAL_CSV_NAME}
    (truth / HARD_CASES_NAME).write_text(json.dumps(result, indent=2) + "\n")
    return result
