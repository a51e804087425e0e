"""SPEC §2: cut a slide at level 0 into non-overlapping tiles over tissue only, fast and resumable.

How a slide is tiled
--------------------
1. **Tissue mask from a low-resolution image.** The coarsest pyramid level or thumbnail not
   coarser than ``mask_downsample`` (16 level-0 px per mask px) is decoded region by region; its
   HSV saturation is max-pooled to that scale (thin tissue such as fat-cell membranes survives),
   thresholded with Otsu clipped to a sane range, closed, its enclosed holes up to a few tiles
   filled (fat cells, alveoli) and its specks removed. Background is therefore never decoded at
   full resolution on a pyramidal slide. A slide without any pyramid level or thumbnail is
   scanned once in bounded regions (recorded as ``mask_source = level0-scan``).
2. **Grid.** Tiles are a physical size: ``tile_size`` px at ``target_mpp`` µm/px (448 px at
   0.5 = 224 µm). Their level-0 footprint is ``F = tile_size * target_mpp / slide MPP`` (448 on
   a 20x slide, 896 on a 40x one), read from a pyramid level whose pixels are within
   ``mpp_tolerance`` of the target (no resampling), else from the finest level and resized
   (:func:`plan_read`). Full tiles only, at ``x, y = 0, F, 2F ...`` (level-0 coordinates); a
   tile is kept when the area-weighted tissue fraction of its footprint is
   ``>= min_tissue_fraction``. Each tile records the ``level`` read, ``read_px``,
   ``footprint_px`` and its ``mpp``; ``x, y`` are level-0 pixels (openslide's convention).
3. **Blocks.** Tissue tiles are grouped in blocks of k x k tiles (k chosen so block edges fall
   on the slide's own JPEG tile edges where possible). A worker reads a block by decoding each
   stored slide tile (e.g. 240 or 256 px) that touches a tissue tile exactly once (tifffile
   segments + libjpeg-turbo), so memory per worker is one block (10-40 MB: 4-8 tiles square)
   whatever the slide size, and no slide tile is decoded twice within a block. Slides tifffile
   cannot decode are read through slideio ``read_block`` instead.
4. **Per tile, in memory:** the quality statistics (:func:`tile_quality.tile_stats`), one JPEG
   encode (libjpeg-turbo via imagecodecs; byte-identical to ``PIL.Image.save(quality=q)``), an
   atomic write (temp name + rename). A tile whose slide data cannot be decoded is recorded as
   ``status = error`` and the slide goes on; a slide where more than ``max_corrupt_share`` of
   its tissue tiles are unreadable is ``quarantined`` with that reason (:func:`corrupt_verdict`).

Resume
------
Each finished block leaves a small JSON sidecar (``.progress/<params hash>/``) written after its
JPEGs; a re-run after a kill reuses finished blocks and recomputes the rest (same pixels + same
encoder -> identical bytes, so the final set equals an uninterrupted run's). The slide's index
Parquet is written next, then its one-row status (the *done* marker, with the params hash);
then the sidecars and any JPEG not in the index (a previous parameter set's) are removed. A slide
whose status carries the same params hash is skipped. Temp files of killed writers are removed
when the slide is next worked on; a temp file is never counted.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from gtex_assets.core.atomic import clean_stale_temps, params_hash, write_parquet
from gtex_assets.lib.tiles.quality import STAT_COLUMNS, tile_stats

# Bump when the tiler's output for the same parameters changes (part of the params hash).
TILER_VERSION = "2"
LEVEL = 0  # x, y are always level-0 pixels; a tile's ``level`` is the pyramid level read

TILE_INDEX_COLUMNS: list[str] = [
    "tissue_sample_id", "tissue", "x", "y", "level", "tile_size", "path", "status", "error",
    "jpeg_bytes", "tissue_fraction", *STAT_COLUMNS, "read_px", "footprint_px", "mpp",
    "params_hash",
]  # fmt: skip

TILING_STATUS_COLUMNS: list[str] = [
    "tissue_sample_id", "tissue", "status", "reason", "slide_path", "width", "height",
    "n_grid_tiles", "n_tissue_tiles", "n_tiles", "n_errors", "mask_source", "mask_downsample",
    "mask_threshold", "reader", "slide_mpp", "mpp", "read_level", "read_px", "footprint_px",
    "params_hash", "seconds", "tiled_at",
]  # fmt: skip

# Slide-level outcomes. ``ok`` may still contain error tiles (n_errors, at most
# max_corrupt_share of the tissue tiles); ``quarantined`` = too many unreadable tiles.
DONE_STATUSES = ("ok", "no_tissue", "too_small", "quarantined")


class TilingError(RuntimeError):
    """A slide that cannot be tiled at all; the message is the recorded reason."""


@dataclass(frozen=True)
class TilingParams:
    """What decides a slide's tiles (hashed: a change re-tiles the slide)."""

    tile_size: int = 448
    jpeg_quality: int = 90
    min_tissue_fraction: float = 0.25
    piece_grid: int = 4
    mask_downsample: float = 16.0  # level-0 px per tissue-mask px
    mask_max_source_downsample: float = 64.0  # coarsest level/thumbnail still used for the mask
    mask_min_saturation: float = 0.05  # Otsu threshold is clipped into [min, max]
    mask_max_saturation: float = 0.15
    mask_min_brightness: int = 30  # near-black (scanner border, black ink) is not tissue
    mask_close_px: int = 3  # mask-px radius of the closing (joins membranes, fills gaps)
    mask_min_object_px: int = 16  # smaller connected pieces of mask are specks, not tissue
    mask_max_hole_px: int = 3000  # enclosed holes up to this many mask px (~4 tiles) are filled
    target_mpp: float = 0.5  # µm per tile pixel (SPEC §2: GTEx 20x): 448 px = 224 µm
    mpp_tolerance: float = 0.05  # a level within 5% of target_mpp is read as is, not resized
    # A slide with more of its tissue tiles unreadable is quarantined, not "ok": a tenth lost
    # already biases its slide mean and per-tissue sample.
    max_corrupt_share: float = 0.1

    def __post_init__(self) -> None:
        if self.tile_size < 16 or self.tile_size % self.piece_grid:
            raise ValueError(
                f"tile_size {self.tile_size} must be >= 16 and divisible by piece_grid {self.piece_grid}"
            )
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if not 0.0 <= self.min_tissue_fraction <= 1.0:
            raise ValueError(
                f"min_tissue_fraction must be in [0, 1], got {self.min_tissue_fraction}"
            )
        if self.target_mpp <= 0 or not 0.0 <= self.mpp_tolerance < 1.0:
            raise ValueError(
                f"target_mpp must be > 0 and mpp_tolerance in [0, 1), got {self.target_mpp}, "
                f"{self.mpp_tolerance}"
            )
        if not 0.0 <= self.max_corrupt_share <= 1.0:
            raise ValueError(f"max_corrupt_share must be in [0, 1], got {self.max_corrupt_share}")

    def hash(self, slide_version: str = "", slide_mpp: float | None = None) -> str:
        return params_hash(
            {**asdict(self), "tiler": TILER_VERSION, "level": LEVEL, "slide": slide_version,
             "slide_mpp": slide_mpp}
        )  # fmt: skip


@dataclass(frozen=True)
class ReadPlan:
    """How a slide's tiles are read: ``read_px`` square at pyramid ``level`` (downsample
    ``level_downsample``), covering ``footprint_px`` level-0 px, resized to ``tile_size`` when
    ``read_px`` differs; ``mpp`` is the resulting tile's µm/px (None: slide MPP unknown)."""

    level: int
    level_downsample: float
    read_px: int
    footprint_px: int
    tile_size: int
    mpp: float | None

    @property
    def resized(self) -> bool:
        return self.read_px != self.tile_size


def plan_read(
    slide_mpp: float | None,
    level_downsamples: Sequence[float],
    params: TilingParams = TilingParams(),
) -> ReadPlan:
    """Which level to read and how many pixels, so a tile covers ``tile_size * target_mpp`` µm.

    ``level_downsamples[0]`` is level 0 (1.0). A level whose pixel size is within
    ``mpp_tolerance`` of ``target_mpp`` is read as is (a 20x slide at 0.499 µm/px reads 448 px
    of level 0; a 40x slide with a 2x level reads that level). Otherwise the coarsest level
    still at least as fine as the target is read (``footprint / downsample`` px) and resized.
    Without a slide MPP the tile is ``tile_size`` px of level 0 (the pre-MPP behaviour).
    """
    t = params.tile_size
    if slide_mpp is None or slide_mpp <= 0:
        return ReadPlan(0, 1.0, t, t, t, None)
    scale = params.target_mpp / slide_mpp  # level-0 px per target px
    tol = params.mpp_tolerance
    matching = [(i, ds) for i, ds in enumerate(level_downsamples) if abs(scale / ds - 1.0) <= tol]
    if matching:
        i, ds = min(matching, key=lambda m: abs(scale / m[1] - 1.0))
        return ReadPlan(i, ds, t, int(round(t * ds)), t, round(slide_mpp * ds, 6))
    footprint = max(1, int(round(t * scale)))
    finer = [(i, ds) for i, ds in enumerate(level_downsamples) if ds <= scale]
    i, ds = max(finer, key=lambda m: m[1]) if finer else (0, 1.0)
    read_px = max(1, int(round(footprint / ds)))
    return ReadPlan(i, ds, read_px, footprint, t, round(params.target_mpp, 6))


def corrupt_verdict(
    n_tissue_tiles: int, n_errors: int, max_corrupt_share: float, first_error: str = ""
) -> str | None:
    """The quarantine reason when more than ``max_corrupt_share`` of a slide's tissue tiles are
    unreadable, else None."""
    if n_tissue_tiles <= 0 or n_errors / n_tissue_tiles <= max_corrupt_share:
        return None
    share = n_errors / n_tissue_tiles
    return (
        f"{n_errors} of {n_tissue_tiles} tissue tiles ({share:.0%}) unreadable, more than "
        f"max_corrupt_share {max_corrupt_share:.0%} (first: {first_error}); re-scan or "
        "re-download the slide, or raise slide_tiles config max_corrupt_share to keep its "
        f"{n_tissue_tiles - n_errors} readable tiles"
    )


# ----------------------------------------------------------------------------------------------
# Reading slides: regions of level 0 and a low-resolution image for the mask
# ----------------------------------------------------------------------------------------------


@dataclass
class Region:
    """Pixels of a level-0 rectangle; ``bad`` lists (x0, y0, x1, y1, message) that failed."""

    x: int
    y: int
    pixels: np.ndarray
    bad: list[tuple[int, int, int, int, str]] = field(default_factory=list)

    def bad_reason(self, x: int, y: int, w: int, h: int) -> str | None:
        for bx0, by0, bx1, by1, msg in self.bad:
            if bx0 < x + w and x < bx1 and by0 < y + h and y < by1:
                return msg
        return None

    def crop(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self.pixels[y - self.y : y - self.y + h, x - self.x : x - self.x + w]


class _TiffPageReader:
    """Random access to one TIFF page (a pyramid level or thumbnail), segment by segment."""

    def __init__(self, page, fd: int, name: str):
        self.page = page
        self.name = name
        self._fd = fd
        self.width = int(page.imagewidth)
        self.height = int(page.imagelength)
        if page.dtype != np.uint8 or page.samplesperpixel < 3 or page.planarconfig != 1:
            raise TilingError(
                f"{name}: unsupported pixel layout (dtype {page.dtype}, "
                f"{page.samplesperpixel} samples, planar config {page.planarconfig})"
            )
        if page.is_tiled:
            self.seg_h, self.seg_w = int(page.tilelength), int(page.tilewidth)
        else:
            self.seg_h, self.seg_w = int(page.rowsperstrip), self.width
        self.seg_h = min(self.seg_h, self.height)
        self.cols = math.ceil(self.width / self.seg_w)
        self.rows = math.ceil(self.height / self.seg_h)
        self._offsets = page.dataoffsets
        self._counts = page.databytecounts
        if len(self._offsets) < self.rows * self.cols:
            raise TilingError(
                f"{name}: {len(self._offsets)} segments for a {self.cols}x{self.rows} grid"
            )
        self._decode = page.decode  # tifffile's codec closure (JPEG tables, colour space ...)
        self._tables = getattr(page, "jpegtables", None)
        self._header = getattr(page, "jpegheader", None)

    def segment(self, row: int, col: int) -> np.ndarray:
        """Decoded pixels of one stored segment, cropped to the image (raises on bad data)."""
        i = row * self.cols + col
        count, offset = int(self._counts[i]), int(self._offsets[i])
        if count == 0 or offset == 0:
            raise ValueError("segment has no data")
        data = os.pread(self._fd, count, offset)
        if len(data) != count:
            raise ValueError(f"file truncated ({len(data)} of {count} bytes)")
        kwargs = {"jpegtables": self._tables}
        if self._header is not None:
            kwargs["jpegheader"] = self._header
        seg, _, _ = self._decode(data, i, **kwargs)
        if seg is None:
            raise ValueError("segment decodes to nothing")
        seg = seg.reshape(seg.shape[-3:]) if seg.ndim > 3 else seg
        h = min(self.seg_h, self.height - row * self.seg_h)
        w = min(self.seg_w, self.width - col * self.seg_w)
        if seg.shape[0] < h or seg.shape[1] < w:
            raise ValueError(f"segment decodes to {seg.shape[:2]}, expected at least {(h, w)}")
        return seg[:h, :w, :3]

    def read_region(
        self,
        x: int,
        y: int,
        w: int,
        h: int,
        rects: Sequence[tuple[int, int, int, int]] | None = None,
    ) -> Region:
        """Pixels of [x, x+w) x [y, y+h); only segments touching ``rects`` (default: all)."""
        # Not filled: only pixels under ``rects`` are ever used, and those all come from
        # segments (or are marked bad below and filled white).
        out = (
            np.empty((h, w, 3), dtype=np.uint8)
            if rects is not None
            else np.full((h, w, 3), 255, np.uint8)
        )
        region = Region(x, y, out)
        wanted: set[tuple[int, int]] = set()
        for rx, ry, rw, rh in rects if rects is not None else [(x, y, w, h)]:
            r0, r1 = ry // self.seg_h, (ry + rh - 1) // self.seg_h
            c0, c1 = rx // self.seg_w, (rx + rw - 1) // self.seg_w
            wanted.update((r, c) for r in range(r0, r1 + 1) for c in range(c0, c1 + 1))
        for r, c in sorted(wanted):
            sx, sy = c * self.seg_w, r * self.seg_h
            try:
                seg = self.segment(r, c)
            except Exception as e:  # corrupt/missing slide data: recorded, never fatal
                out[
                    max(sy - y, 0) : max(sy + self.seg_h - y, 0),
                    max(sx - x, 0) : max(sx + self.seg_w - x, 0),
                ] = 255
                msg = " ".join(str(e).split())[:160] or type(e).__name__
                region.bad.append(
                    (sx, sy, sx + self.seg_w, sy + self.seg_h,
                     f"slide data unreadable in stored tile (col {c}, row {r}) at x={sx}, y={sy}: {msg}")
                )  # fmt: skip
                continue
            # Intersection of the segment with the output region.
            ix0, iy0 = max(sx, x), max(sy, y)
            ix1, iy1 = min(sx + seg.shape[1], x + w), min(sy + seg.shape[0], y + h)
            if ix0 < ix1 and iy0 < iy1:
                out[iy0 - y : iy1 - y, ix0 - x : ix1 - x] = seg[
                    iy0 - sy : iy1 - sy, ix0 - sx : ix1 - sx
                ]
        return region

    def read_all(self) -> np.ndarray:
        return self.read_region(0, 0, self.width, self.height).pixels


class SlideReader:
    """Level-0 regions and low-resolution images of a whole-slide TIFF (Aperio SVS)."""

    kind = "tifffile"

    def __init__(self, path: str | Path):
        import tifffile

        self.path = Path(path)
        self.name = self.path.name
        try:
            self._tif = tifffile.TiffFile(str(self.path))
        except Exception as e:
            raise TilingError(f"{self.name}: tifffile cannot parse it ({_short(e)})") from None
        self._fd = os.open(str(self.path), os.O_RDONLY)
        try:
            pages = list(self._tif.pages)
            self.level0 = _TiffPageReader(pages[0], self._fd, f"{self.name} level 0")
            self.width, self.height = self.level0.width, self.level0.height
            # Lower-resolution images of the same field: pyramid levels and the thumbnail
            # (label and macro images have other aspect ratios and are skipped).
            self._lowres: list[tuple[float, object]] = []
            self._pages0 = pages[0]
            for p in pages[1:]:
                desc = (getattr(p, "description", "") or "").lower()
                if "label" in desc or "macro" in desc or p.samplesperpixel < 3:
                    continue
                w, h = int(p.imagewidth), int(p.imagelength)
                ds_x, ds_y = self.width / w, self.height / h
                if abs(ds_x - ds_y) / ds_x < 0.03:
                    self._lowres.append(((ds_x + ds_y) / 2, p))
        except TilingError:
            self.close()
            raise
        except Exception as e:
            self.close()
            raise TilingError(f"{self.name}: unreadable TIFF structure ({_short(e)})") from None

    @property
    def segment_size(self) -> tuple[int, int]:
        return self.level0.seg_w, self.level0.seg_h

    @property
    def level_downsamples(self) -> list[float]:
        """Level 0 (1.0), then the lower-resolution pages, finest first."""
        return [1.0, *sorted(ds for ds, _ in self._lowres)]

    def level(self, i: int) -> _TiffPageReader:
        """Reader of pyramid level ``i`` (index into :attr:`level_downsamples`)."""
        if i == 0:
            return self.level0
        cache = self.__dict__.setdefault("_levels", {})
        if i not in cache:
            page = sorted(self._lowres, key=lambda t: t[0])[i - 1][1]
            cache[i] = _TiffPageReader(page, self._fd, f"{self.name} level {i}")
        return cache[i]

    def read_region(self, x, y, w, h, rects=None, level: int = 0) -> Region:
        return self.level(level).read_region(x, y, w, h, rects)

    def saturation(self, params: TilingParams) -> tuple[np.ndarray, float, float, str]:
        """Pooled saturation map for the tissue mask: (map, level-0 px per map px in x, in y,
        source name). See :func:`pooled_saturation`.

        Source: the coarsest pyramid level or thumbnail not coarser than ``mask_downsample``
        (fine enough to see thin tissue such as fat-cell membranes), else the finest one up to
        ``mask_max_source_downsample``; without any, level 0 itself (``level0-scan``).
        """
        target = params.mask_downsample
        fine = [(ds, p) for ds, p in self._lowres if ds <= target * 1.05]
        coarse = [
            (ds, p)
            for ds, p in self._lowres
            if target * 1.05 < ds <= params.mask_max_source_downsample
        ]
        if fine:
            ds, page = max(fine, key=lambda t: t[0])
        elif coarse:
            ds, page = min(coarse, key=lambda t: t[0])
        else:
            ds, page = 1.0, None
        if page is None:
            reader, source = self.level0, "level0-scan"
        else:
            reader = _TiffPageReader(
                page, self._fd, f"{self.name} ({page.imagewidth}x{page.imagelength})"
            )
            source = f"lowres-{reader.width}x{reader.height}"
        factor = max(1, int(round(target / ds)) if ds <= target * 1.05 else 1)
        sat = pooled_saturation(
            reader.read_region, reader.width, reader.height, factor, params.mask_min_brightness
        )
        # Exact scale (the map drops the last partial block; the grid treats that as glass).
        scale_x = self.width / reader.width * factor
        scale_y = self.height / reader.height * factor
        return sat, scale_x, scale_y, source

    def close(self) -> None:
        try:
            self._tif.close()
        finally:
            if getattr(self, "_fd", None) is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SlideioReader:
    """Fallback reader through slideio (any format it opens), same interface as SlideReader."""

    kind = "slideio"

    def __init__(self, path: str | Path):
        from gtex_assets.lib.slides.reader import SlideReadError, open_scene

        self.path = Path(path)
        self.name = self.path.name
        try:
            self._scene = open_scene(path)
            self.width, self.height = (int(v) for v in self._scene.size)
        except SlideReadError as e:
            raise TilingError(str(e)) from None

    segment_size = (256, 256)
    seg_w = seg_h = 256
    level_downsamples = [1.0]  # level 0 only; other scales are resized from it

    def level(self, i: int):
        return self

    def read_region(self, x, y, w, h, rects=None, level: int = 0) -> Region:
        try:
            return Region(x, y, np.ascontiguousarray(self._scene.read_block((x, y, w, h))[..., :3]))
        except Exception:
            pass
        # Isolate the unreadable part: read each requested rectangle on its own.
        region = Region(x, y, np.full((h, w, 3), 255, np.uint8))
        for rx, ry, rw, rh in rects if rects is not None else [(x, y, w, h)]:
            try:
                block = self._scene.read_block((rx, ry, rw, rh))[..., :3]
                region.pixels[ry - y : ry - y + rh, rx - x : rx - x + rw] = block
            except Exception as e:
                region.bad.append(
                    (rx, ry, rx + rw, ry + rh, f"slideio cannot read x={rx}, y={ry}: {_short(e)}")
                )
        return region

    def saturation(self, params: TilingParams) -> tuple[np.ndarray, float, float, str]:
        ds = params.mask_downsample
        w, h = max(1, round(self.width / ds)), max(1, round(self.height / ds))
        img = np.ascontiguousarray(
            self._scene.read_block((0, 0, self.width, self.height), size=(w, h))[..., :3]
        )
        sat = pooled_saturation(
            lambda x, y, ww, hh: Region(x, y, img[y : y + hh, x : x + ww]),
            w,
            h,
            1,
            params.mask_min_brightness,
        )
        return sat, self.width / w, self.height / h, "slideio-scaled"

    def close(self) -> None:
        self._scene = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_reader(path: str | Path) -> SlideReader | SlideioReader:
    """tifffile reader when the slide is a TIFF it can decode, else slideio."""
    try:
        return SlideReader(path)
    except TilingError as first:
        try:
            return SlideioReader(path)
        except TilingError as second:
            raise TilingError(f"{first}; {second}") from None


def saturation_of(rgb: np.ndarray, min_brightness: int = 30) -> np.ndarray:
    """HSV saturation (float32), lightly smoothed against JPEG chroma noise; near-black -> 0."""
    from scipy import ndimage

    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx = np.maximum(np.maximum(r, g), b)  # elementwise: much faster than .max(axis=-1)
    mn = np.minimum(np.minimum(r, g), b)
    sat = (mx - mn).astype(np.float32) / np.maximum(mx, 1).astype(np.float32)
    sat[mx < min_brightness] = 0.0  # scanner borders and black ink are not tissue
    return ndimage.uniform_filter(sat, size=3, mode="nearest")


def pooled_saturation(
    read_region: Callable[..., Region],
    width: int,
    height: int,
    factor: int,
    min_brightness: int = 30,
) -> np.ndarray:
    """Saturation of an image max-pooled over ``factor x factor`` blocks, read in bounded regions.

    Max-pooling (after the 3x3 smoothing) keeps thin coloured structures — fat-cell membranes,
    tissue edges — that averaging the pixels first would wash out toward glass.
    """
    out_w, out_h = max(1, width // factor), max(1, height // factor)
    out = np.zeros((out_h, out_w), dtype=np.float32)
    step = factor * max(1, 2048 // factor)
    for y in range(0, out_h * factor, step):
        for x in range(0, out_w * factor, step):
            w, h = min(step, out_w * factor - x), min(step, out_h * factor - y)
            sat = saturation_of(read_region(x, y, w, h).pixels, min_brightness)
            small = sat.reshape(h // factor, factor, w // factor, factor).max(axis=(1, 3))
            out[y // factor : (y + h) // factor, x // factor : (x + w) // factor] = small
    return out


# ----------------------------------------------------------------------------------------------
# Tissue mask and grid
# ----------------------------------------------------------------------------------------------


def otsu_threshold(
    values: np.ndarray, bins: int = 256, value_range: tuple[float, float] = (0.0, 1.0)
) -> float:
    """Otsu's threshold of a 1-D sample (between-class variance maximised)."""
    hist, edges = np.histogram(values, bins=bins, range=value_range)
    hist = hist.astype(np.float64)
    if hist.sum() == 0:
        return float(value_range[0])
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1e-12)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def tissue_mask(sat: np.ndarray, params: TilingParams = TilingParams()) -> tuple[np.ndarray, float]:
    """Boolean tissue mask from a (pooled) saturation map, and the threshold used.

    H&E tissue is coloured, glass is near-white: threshold with Otsu, clipped into
    ``[mask_min_saturation, mask_max_saturation]`` so that a blank slide (where Otsu splits
    noise) gives no tissue and a slide full of tissue keeps its pale parts; then a closing
    (joins membranes, fills small gaps) and the removal of specks of dust.
    """
    from scipy import ndimage

    thr = float(
        np.clip(otsu_threshold(sat), params.mask_min_saturation, params.mask_max_saturation)
    )
    mask = sat >= thr
    if params.mask_close_px > 0:
        # Closing with a square (separable max/min filters: fast); padded so that it does not
        # erode at the border.
        r = params.mask_close_px
        size = 2 * r + 1
        closed = ndimage.minimum_filter(
            ndimage.maximum_filter(np.pad(mask, r), size=size), size=size
        )
        mask = closed[r:-r, r:-r]
    if params.mask_max_hole_px > 0:
        # Fill enclosed holes up to a few tiles in area (fat cells, alveoli, small lumens): their
        # membranes are tissue, and the quality filters judge the tiles; large lumens stay out.
        holes, n = ndimage.label(~mask)
        if n:
            sizes = np.bincount(holes.ravel(), minlength=n + 1)
            fill = sizes <= params.mask_max_hole_px
            fill[0] = False
            border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
            fill[border] = False
            mask |= fill[holes]
        del holes  # 4 bytes per mask px; the object labels below need as much again
    if params.mask_min_object_px > 0:
        # Drop specks (dust, debris) but keep thin connected structures such as fat membranes,
        # which an opening would erase.
        labels, n = ndimage.label(mask)
        if n:
            sizes = np.bincount(labels.ravel(), minlength=n + 1)
            small = sizes < params.mask_min_object_px
            small[0] = False
            mask[small[labels]] = False
    return mask, thr


def tile_grid(width: int, height: int, tile_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 (x, y) of every full, non-overlapping tile, row-major (y, then x)."""
    xs = np.arange(0, width - tile_size + 1, tile_size, dtype=np.int64)
    ys = np.arange(0, height - tile_size + 1, tile_size, dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys)
    return gx.ravel(), gy.ravel()


def tissue_fractions(
    mask: np.ndarray, scale_x: float, scale_y: float, xs: np.ndarray, ys: np.ndarray, tile_size: int
) -> np.ndarray:
    """Area-weighted fraction of each tile footprint covered by the mask.

    ``scale_*`` = level-0 px per mask px. Exact for a mask of constant-value cells: the integral
    image of a piecewise-constant function is bilinear within a cell.
    """
    h, w = mask.shape
    # Integer counts (exact; int32 holds any mask up to 2**31 px): half the memory of float64,
    # which matters on a 100,000 px slide (6,250 x 5,000 mask px).
    count = np.int32 if h * w < 2**31 else np.int64
    integral = np.zeros((h + 1, w + 1), dtype=count)
    np.cumsum(mask, axis=0, dtype=count, out=integral[1:, 1:])
    np.cumsum(integral[1:, 1:], axis=1, out=integral[1:, 1:])

    def at(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        u = np.clip(u, 0, w)
        v = np.clip(v, 0, h)
        u0 = np.minimum(np.floor(u).astype(np.int64), w - 1)
        v0 = np.minimum(np.floor(v).astype(np.int64), h - 1)
        fu, fv = u - u0, v - v0
        i00, i01 = integral[v0, u0].astype(np.float64), integral[v0, u0 + 1].astype(np.float64)
        i10 = integral[v0 + 1, u0].astype(np.float64)
        i11 = integral[v0 + 1, u0 + 1].astype(np.float64)
        return i00 * (1 - fu) * (1 - fv) + i01 * fu * (1 - fv) + i10 * (1 - fu) * fv + i11 * fu * fv

    u0, u1 = xs / scale_x, (xs + tile_size) / scale_x
    v0, v1 = ys / scale_y, (ys + tile_size) / scale_y
    area = (u1 - u0) * (v1 - v0)
    covered = at(u1, v1) - at(u0, v1) - at(u1, v0) + at(u0, v0)
    return np.clip(covered / area, 0.0, 1.0)


def block_tiles_for(
    segment: tuple[int, int], tile_size: int, choices: Iterable[int] = range(4, 9)
) -> int:
    """Tiles per block side minimising the re-decoding of stored tiles cut by block edges."""

    def cost(k: int) -> float:
        b = k * tile_size
        ratios = []
        for seg in segment:
            period = seg // math.gcd(b, seg)  # block-offset pattern repeats after this many
            n = np.mean([((i * b + b - 1) // seg - (i * b) // seg + 1) for i in range(period)])
            ratios.append(n * seg / b)
        return float(np.prod(ratios))

    return min(choices, key=lambda k: (round(cost(k), 3), k))


# ----------------------------------------------------------------------------------------------
# Per-block work (runs in worker processes)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockTask:
    sample_id: str
    tissue: str
    slide_path: str
    reader_kind: str
    tiles_dir: str
    progress_path: str
    params_hash: str
    tile_size: int
    jpeg_quality: int
    piece_grid: int
    tiles: tuple[tuple[int, int, float], ...]  # (x, y, tissue fraction), level-0 px
    read: ReadPlan = ReadPlan(0, 1.0, 448, 448, 448, None)


_READERS: dict[str, SlideReader | SlideioReader] = {}


def _cache_reader(reader) -> None:
    key = f"{reader.kind}:{reader.path}"
    if key in _READERS:
        if _READERS[key] is not reader:
            reader.close()
        return
    while len(_READERS) >= 2:  # a worker moves from slide to slide; keep few handles open
        _READERS.pop(next(iter(_READERS))).close()
    _READERS[key] = reader


def _cached_reader(path: str, kind: str):
    reader = _READERS.get(f"{kind}:{Path(path)}")
    if reader is None:
        reader = SlideReader(path) if kind == "tifffile" else SlideioReader(path)
        _cache_reader(reader)
    return reader


def _close_readers() -> None:
    while _READERS:
        _READERS.popitem()[1].close()


def encode_jpeg(tile: np.ndarray, quality: int) -> bytes:
    """Baseline JPEG of an RGB uint8 tile (libjpeg-turbo, 4:2:0; same bytes as Pillow)."""
    try:
        import imagecodecs

        return bytes(imagecodecs.jpeg8_encode(tile, level=quality))
    except ImportError:  # pragma: no cover - imagecodecs is a dependency
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(tile).save(buf, "JPEG", quality=quality)
        return buf.getvalue()


def _write_file_atomic(path: str, data: bytes) -> None:
    """Temp name + rename: a reader (or a resumed run) never sees a partial file. No fsync per
    tile (too slow); crash-safety against kill -9, which is what the resume logic needs."""
    head, tail = os.path.split(path)
    tmp = f"{head}/.{tail}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    os.replace(tmp, path)


def tile_file_name(x: int, y: int) -> str:
    return f"{x}_{y}.jpg"


def _level_xy(x: int, y: int, read: ReadPlan) -> tuple[int, int]:
    return int(round(x / read.level_downsample)), int(round(y / read.level_downsample))


def resize_tile(pixels: np.ndarray, size: int) -> np.ndarray:
    """A read region resampled to ``size`` px square: area averaging when shrinking (no
    aliasing of nuclei), bicubic when enlarging."""
    from PIL import Image

    h = pixels.shape[0]
    method = Image.Resampling.BOX if h > size else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(np.ascontiguousarray(pixels)).resize((size, size), method))


def run_block(task: BlockTask) -> list[dict]:
    """Read, measure, encode and write the tiles of one block; write its progress sidecar."""
    read = task.read
    r = read.read_px  # side read at the read level
    reader = _cached_reader(task.slide_path, task.reader_kind)
    at_level = [(*_level_xy(x, y, read), x, y, f) for x, y, f in task.tiles]
    rects = [(lx, ly, r, r) for lx, ly, *_ in at_level]
    x0 = min(lx for lx, *_ in at_level)
    y0 = min(ly for _, ly, *_ in at_level)
    x1 = max(lx for lx, *_ in at_level) + r
    y1 = max(ly for _, ly, *_ in at_level) + r
    region = reader.read_region(x0, y0, x1 - x0, y1 - y0, rects, level=read.level)
    rows = []
    tiles_dir = os.fspath(task.tiles_dir)  # once per block, not per tile
    for lx, ly, x, y, frac in at_level:
        path = os.path.join(tiles_dir, tile_file_name(x, y))
        row = {"x": x, "y": y, "tissue_fraction": frac, "path": path}
        bad = region.bad_reason(lx, ly, r, r)
        if bad is None:
            try:
                tile = region.crop(lx, ly, r, r)
                tile = resize_tile(tile, read.tile_size) if read.resized else tile
                tile = np.ascontiguousarray(tile)
                stats = tile_stats(tile, task.piece_grid)
                data = encode_jpeg(tile, task.jpeg_quality)
                _write_file_atomic(path, data)
                row.update(status="ok", error="", jpeg_bytes=len(data), **stats.as_row())
            except OSError as e:  # disk full / permissions: the run must fail, not mark tiles
                raise OSError(f"slide {task.sample_id}: cannot write tile {path}: {e}") from e
            except Exception as e:
                bad = f"tile x={x}, y={y} failed: {_short(e)}"
        if bad is not None:
            row.update(
                status="error", error=bad, jpeg_bytes=0, **dict.fromkeys(STAT_COLUMNS, np.nan)
            )
        rows.append(row)
    # Sidecar after every JPEG of the block is in place: a resumed run trusts it. Renamed into
    # place but not fsynced: it only saves work, and a lost one means the block is redone.
    os.makedirs(os.path.dirname(task.progress_path), exist_ok=True)
    blob = json.dumps({"params_hash": task.params_hash, "rows": rows}).encode()
    _write_file_atomic(task.progress_path, blob)
    return rows


# ----------------------------------------------------------------------------------------------
# Per-slide planning, resume and finishing
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlideJob:
    """One slide to tile and where its outputs go."""

    sample_id: str
    tissue: str
    slide_path: str
    tiles_dir: Path
    index_path: Path
    status_path: Path
    slide_version: str = ""  # raw slide's source version: a new file re-tiles the slide
    mpp: float | None = None  # the slide's µm/px (raw_slides, by the MPP policy); None = as is


@dataclass
class SlideOutcome:
    status: dict
    index: pd.DataFrame
    skipped: bool = False  # already done with the same parameters


@dataclass
class _Plan:
    job: SlideJob
    phash: str
    tile_size: int
    status: dict
    tasks: list[BlockTask]
    done_rows: list[dict]
    started: float
    read: ReadPlan | None = None
    max_corrupt_share: float = 1.0


def read_done(job: SlideJob, phash: str) -> SlideOutcome | None:
    """The slide's recorded outcome if it was finished with the same params hash, else None."""
    try:
        if not job.status_path.is_file():
            return None
        status = pd.read_parquet(job.status_path).iloc[0].to_dict()
        if status.get("params_hash") != phash or status.get("status") not in DONE_STATUSES:
            return None
        if not job.index_path.is_file():
            return None
        index = pd.read_parquet(job.index_path)
    except Exception:  # an unreadable marker means "not done"
        return None
    return SlideOutcome(status=status, index=index, skipped=True)


def _status_row(job: SlideJob, phash: str, **kw) -> dict:
    row = dict.fromkeys(TILING_STATUS_COLUMNS)
    row.update(
        tissue_sample_id=job.sample_id, tissue=job.tissue, slide_path=str(job.slide_path),
        reason="", params_hash=phash, n_grid_tiles=0, n_tissue_tiles=0, n_tiles=0, n_errors=0,
    )  # fmt: skip
    row.update(kw)
    return row


def _progress_dir(job: SlideJob, phash: str) -> Path:
    return job.tiles_dir / ".progress" / phash


def plan_slide(job: SlideJob, params: TilingParams, keep_reader: bool = False) -> _Plan:
    """Mask, grid and blocks of one slide; finished blocks of an interrupted run are reused.

    ``keep_reader``: leave the opened slide in this process's reader cache (the blocks are
    about to be read here too) instead of closing it.
    """
    started = time.perf_counter()
    phash = params.hash(job.slide_version, job.mpp)
    base = _status_row(job, phash, slide_mpp=job.mpp)
    t = params.tile_size

    def outcome(status: str, reason: str) -> _Plan:
        return _Plan(job, phash, t, {**base, "status": status, "reason": reason}, [], [], started)

    try:
        reader = open_reader(job.slide_path)
    except TilingError as e:
        return outcome("unreadable", str(e))
    try:
        w, h = reader.width, reader.height
        read = plan_read(job.mpp, reader.level_downsamples, params)
        f = read.footprint_px
        base.update(
            width=w, height=h, reader=reader.kind, mpp=read.mpp, read_level=read.level,
            read_px=read.read_px, footprint_px=f,
        )  # fmt: skip
        if w < f or h < f:
            return outcome("too_small", f"slide is {w}x{h} px, smaller than one {f}x{f} tile")
        try:
            sat, sx, sy, source = reader.saturation(params)
            mask, thr = tissue_mask(sat, params)
            del sat  # 4 bytes per mask px: freed before the grid's integral image
        except Exception as e:
            reason = (
                f"{reader.name}: low-resolution image for the tissue mask unreadable ({_short(e)})"
            )
            return outcome("unreadable", reason)
        xs, ys = tile_grid(w, h, f)
        frac = tissue_fractions(mask, sx, sy, xs, ys, f)
        keep = frac >= params.min_tissue_fraction if params.min_tissue_fraction > 0 else frac > 0
        if read.level:  # rounding at a coarser level must not run past its edge
            lw, lh = reader.level(read.level).width, reader.level(read.level).height
            lx = np.round(xs / read.level_downsample).astype(np.int64) + read.read_px
            ly = np.round(ys / read.level_downsample).astype(np.int64) + read.read_px
            keep &= (lx <= lw) & (ly <= lh)
        base.update(
            n_grid_tiles=len(xs), n_tissue_tiles=int(keep.sum()), mask_source=source,
            mask_downsample=round(float((sx + sy) / 2), 3), mask_threshold=round(thr, 4),
        )  # fmt: skip
        seg = reader.level(read.level).seg_w, reader.level(read.level).seg_h
        # Blocks of at most ~3,600 read px a side: one block's pixels stay ~40 MB.
        kmax = max(1, 3584 // read.read_px)
        k = block_tiles_for(seg, read.read_px, range(min(4, kmax), kmax + 1))
        reader_kind = reader.kind
    finally:
        if keep_reader:
            _cache_reader(reader)
        else:
            reader.close()
    if not keep.any():
        return outcome(
            "no_tissue",
            f"no tissue: no tile has >= {params.min_tissue_fraction:.0%} tissue "
            f"(saturation threshold {thr:.3f})",
        )

    job.tiles_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(job.tiles_dir)
    progress = _progress_dir(job, phash)
    blocks: dict[tuple[int, int], list[tuple[int, int, float]]] = {}
    for x, y, fr in zip(xs[keep].tolist(), ys[keep].tolist(), frac[keep].tolist(), strict=True):
        blocks.setdefault((y // (k * f), x // (k * f)), []).append((x, y, round(fr, 4)))
    tasks, done_rows = [], []
    for (by, bx), tiles in sorted(blocks.items()):
        prog = progress / f"b{by}_{bx}.json"
        rows = _load_progress(prog, phash, len(tiles))
        if rows is not None:
            done_rows.extend(rows)
            continue
        tasks.append(
            BlockTask(
                sample_id=job.sample_id,
                tissue=job.tissue,
                slide_path=str(job.slide_path),
                reader_kind=reader_kind,
                tiles_dir=str(job.tiles_dir),
                progress_path=str(prog),
                params_hash=phash,
                tile_size=t,
                jpeg_quality=params.jpeg_quality,
                piece_grid=params.piece_grid,
                tiles=tuple(tiles),
                read=read,
            )  # fmt: skip
        )
    return _Plan(
        job, phash, t, {**base, "status": "ok"}, tasks, done_rows, started, read,
        params.max_corrupt_share,
    )  # fmt: skip


def _load_progress(path: Path, phash: str, n_tiles: int) -> list[dict] | None:
    """Rows of a finished block, if its sidecar is valid and every JPEG it lists exists."""
    try:
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        rows = data["rows"]
        if data.get("params_hash") != phash or len(rows) != n_tiles:
            return None
        if any(r["status"] == "ok" and not os.path.isfile(r["path"]) for r in rows):
            return None
        return rows
    except Exception:
        return None


TILE_INDEX_SCHEMA = pa.schema(
    [("tissue_sample_id", pa.string()), ("tissue", pa.string()), ("x", pa.int64()),
     ("y", pa.int64()), ("level", pa.int64()), ("tile_size", pa.int64()), ("path", pa.string()),
     ("status", pa.string()), ("error", pa.string()), ("jpeg_bytes", pa.int64()),
     ("tissue_fraction", pa.float64())]
    + [(c, pa.float64()) for c in STAT_COLUMNS]
    + [("read_px", pa.int64()), ("footprint_px", pa.int64()), ("mpp", pa.float64()),
       ("params_hash", pa.string())]
)  # fmt: skip
TILING_STATUS_SCHEMA = pa.schema(
    [("tissue_sample_id", pa.string()), ("tissue", pa.string()), ("status", pa.string()),
     ("reason", pa.string()), ("slide_path", pa.string()), ("width", pa.int64()),
     ("height", pa.int64()), ("n_grid_tiles", pa.int64()), ("n_tissue_tiles", pa.int64()),
     ("n_tiles", pa.int64()), ("n_errors", pa.int64()), ("mask_source", pa.string()),
     ("mask_downsample", pa.float64()), ("mask_threshold", pa.float64()), ("reader", pa.string()),
     ("slide_mpp", pa.float64()), ("mpp", pa.float64()), ("read_level", pa.int64()),
     ("read_px", pa.int64()), ("footprint_px", pa.int64()),
     ("params_hash", pa.string()), ("seconds", pa.float64()), ("tiled_at", pa.float64())]
)  # fmt: skip
assert TILE_INDEX_SCHEMA.names == TILE_INDEX_COLUMNS
assert TILING_STATUS_SCHEMA.names == TILING_STATUS_COLUMNS


def empty_index() -> pd.DataFrame:
    return TILE_INDEX_SCHEMA.empty_table().to_pandas()


def _write_index(index: pd.DataFrame, path: Path) -> None:
    write_parquet(pa.Table.from_pandas(index, schema=TILE_INDEX_SCHEMA, preserve_index=False), path)


def _write_status(status: dict, path: Path) -> None:
    row = {c: [status.get(c)] for c in TILING_STATUS_COLUMNS}
    write_parquet(pa.Table.from_pydict(row, schema=TILING_STATUS_SCHEMA), path)


def finish_slide(plan: _Plan, rows: list[dict]) -> SlideOutcome:
    """Write the index, then the status (the done marker); drop sidecars and stale JPEGs.

    A slide that could not be tiled at all (``unreadable``/``failed``) gets only its status row:
    it is not done, so the next run tries it again.
    """
    job, status = plan.job, dict(plan.status)
    if rows:
        index = pd.DataFrame(rows)
        index["tissue_sample_id"] = job.sample_id
        index["tissue"] = job.tissue
        read = plan.read or ReadPlan(0, 1.0, plan.tile_size, plan.tile_size, plan.tile_size, None)
        index["level"] = read.level
        index["tile_size"] = plan.tile_size
        index["read_px"] = read.read_px
        index["footprint_px"] = read.footprint_px
        index["mpp"] = read.mpp
        index["params_hash"] = plan.phash
        index = index[TILE_INDEX_COLUMNS]
        index = index.sort_values(["y", "x"], kind="mergesort").reset_index(drop=True)
        status["n_tiles"] = int((index["status"] == "ok").sum())
        status["n_errors"] = int((index["status"] == "error").sum())
        errors = index.loc[index["status"] == "error", "error"]
        reason = corrupt_verdict(
            status.get("n_tissue_tiles") or len(index), status["n_errors"],
            plan.max_corrupt_share, errors.iloc[0] if len(errors) else "",
        )  # fmt: skip
        if status["status"] == "ok" and reason is not None:
            status.update(status="quarantined", reason=f"slide {job.sample_id}: {reason}")
    else:
        index = empty_index()
    status["seconds"] = round(time.perf_counter() - plan.started, 3)
    status["tiled_at"] = time.time()
    done = status["status"] in DONE_STATUSES
    if done:
        _write_index(index, job.index_path)
    _write_status(status, job.status_path)
    if done and job.tiles_dir.exists():
        # Only now is the slide done: clean up what a resumed or re-parameterised run left.
        shutil.rmtree(job.tiles_dir / ".progress", ignore_errors=True)
        keep = set(index.loc[index["status"] == "ok", "path"])
        for p in job.tiles_dir.glob("*.jpg"):
            if str(p) not in keep:
                p.unlink(missing_ok=True)
        clean_stale_temps(job.tiles_dir)
        if not any(job.tiles_dir.iterdir()):
            job.tiles_dir.rmdir()
    return SlideOutcome(status=status, index=index)


def record_outcome(job: SlideJob, status: str, reason: str) -> SlideOutcome:
    """Record a slide that is not tiled (e.g. its raw slide is quarantined): empty index."""
    row = _status_row(job, "", status=status, reason=reason, tiled_at=time.time(), seconds=0.0)
    index = empty_index()
    _write_index(index, job.index_path)
    _write_status(row, job.status_path)
    return SlideOutcome(status=row, index=index)


def _failed(plan: _Plan, error: BaseException) -> SlideOutcome:
    plan.status.update(status="failed", reason=f"slide {plan.job.sample_id}: {_short(error, 300)}")
    return finish_slide(plan, [])


def tile_slides(
    jobs: Sequence[SlideJob],
    params: TilingParams = TilingParams(),
    workers: int = 1,
    force: bool = False,
    executor: ProcessPoolExecutor | None = None,
) -> Iterator[tuple[SlideJob, SlideOutcome]]:
    """Tile several slides, sharing ``workers`` processes across all their blocks.

    Yields (job, outcome) as slides finish (already-done ones first, ``skipped=True``). Slides
    done with the same parameters are skipped unless ``force``. A slide that cannot be tiled
    yields a status row with the reason; only output-side I/O errors (disk full ...) raise.
    ``executor``: an existing process pool to use (and leave running) instead of starting one
    with ``workers`` processes (``workers`` then only sizes the work queue). Workers are
    spawned, so a script calling this with ``workers > 1`` needs the usual
    ``if __name__ == "__main__":`` guard (Dagster's run workers have it).
    """
    pending: list[SlideJob] = []
    for job in jobs:
        done = None if force else read_done(job, params.hash(job.slide_version, job.mpp))
        if done is not None:
            yield job, done
        else:
            pending.append(job)
    if not pending:
        return
    if workers <= 1 and executor is None:
        try:
            for job in pending:
                yield job, _tile_one_inline(job, params)
        finally:
            _close_readers()
    else:
        yield from _tile_parallel(pending, params, max(1, workers), executor)


def _plan_or_fail(job: SlideJob, params: TilingParams, keep_reader: bool) -> _Plan:
    """plan_slide, with an unexpected error recorded as the slide's ``failed`` outcome."""
    try:
        return plan_slide(job, params, keep_reader=keep_reader)
    except OSError:
        raise
    except Exception as e:
        phash = params.hash(job.slide_version, job.mpp)
        plan = _Plan(
            job, phash, params.tile_size, _status_row(job, phash), [], [], time.perf_counter()
        )
        plan.status.update(status="failed", reason=f"slide {job.sample_id}: {_short(e, 300)}")
        return plan


def _tile_one_inline(job: SlideJob, params: TilingParams) -> SlideOutcome:
    plan = _plan_or_fail(job, params, keep_reader=True)
    rows = list(plan.done_rows)
    try:
        for task in plan.tasks:
            rows.extend(run_block(task))
    except OSError:
        raise
    except Exception as e:
        return _failed(plan, e)
    return finish_slide(plan, rows)


def start_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool for :func:`tile_slides` (spawn: never fork a threaded Dagster process;
    workers open the slides themselves, as slide handles do not pickle)."""
    import multiprocessing as mp

    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))


def _tile_parallel(jobs: Sequence[SlideJob], params: TilingParams, workers: int, executor=None):
    pool = executor if executor is not None else start_pool(workers)
    futures: dict[Future, str] = {}
    plans: dict[str, _Plan] = {}
    rows: dict[str, list[dict]] = {}
    left: dict[str, int] = {}
    queue = list(jobs)
    try:
        while queue or futures:
            # Plan (read the mask of) the next slides while the workers tile earlier ones.
            while queue and len(futures) < 4 * workers:
                plan = _plan_or_fail(queue.pop(0), params, keep_reader=False)
                if not plan.tasks:
                    yield plan.job, finish_slide(plan, list(plan.done_rows))
                    continue
                sid = plan.job.sample_id
                plans[sid], rows[sid], left[sid] = plan, list(plan.done_rows), len(plan.tasks)
                for task in plan.tasks:
                    futures[pool.submit(run_block, task)] = sid
            done, _ = wait(list(futures), return_when=FIRST_COMPLETED)
            for fut in done:
                sid = futures.pop(fut)
                if sid not in plans:  # the slide already failed
                    continue
                try:
                    rows[sid].extend(fut.result())
                except OSError:
                    raise
                except BrokenProcessPool:
                    raise
                except Exception as e:
                    plan = plans.pop(sid)
                    for f, s in list(futures.items()):
                        if s == sid:
                            f.cancel()
                    yield plan.job, _failed(plan, e)
                    continue
                left[sid] -= 1
                if left[sid] == 0:
                    plan = plans.pop(sid)
                    yield plan.job, finish_slide(plan, rows.pop(sid))
    finally:
        if executor is None:
            pool.shutdown(wait=True, cancel_futures=True)
        else:
            for f in futures:
                f.cancel()


def _short(e: BaseException, limit: int = 200) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg[:limit]


def plan_jobs(
    sample_ids: Sequence[str], lake, tissue_of: dict[str, str]
) -> tuple[list[SlideJob], list[dict]]:
    """Tiling jobs for the slides whose ``raw_slides`` row is ok (with the MPP the policy chose),
    and the recorded outcome (status row) of every other slide: no raw row (``missing``), raw
    slide quarantined (``quarantined``, its reason), malformed id (``invalid_id``, no path)."""
    from gtex_assets.core.ids import InvalidSampleIdError
    from gtex_assets.lib.slides.raw import previous_row

    jobs: list[SlideJob] = []
    outcomes: list[dict] = []
    for sid in sample_ids:
        try:
            tiles_dir = lake.slide_tiles(sid)
        except InvalidSampleIdError as e:
            outcomes.append({"tissue_sample_id": sid, "status": "invalid_id", "reason": str(e)})
            continue
        raw = previous_row(lake.partition_table("raw_slides", sid)) or {}
        job = SlideJob(
            sample_id=sid,
            tissue=raw.get("tissue") or tissue_of.get(sid) or "",
            slide_path=str(raw.get("path") or ""),
            tiles_dir=tiles_dir,
            index_path=lake.partition_table("slide_tiles", sid),
            status_path=lake.partition_table("tiling_status", sid),
            slide_version=str(raw.get("source_version") or ""),
            mpp=raw.get("mpp_x"),
        )
        if not raw:
            reason = "no raw_slides row: materialise raw_slides first"
            outcomes.append(record_outcome(job, "missing", reason).status)
        elif raw.get("status") != "ok":
            reason = f"raw slide quarantined: {raw.get('reason')}"
            outcomes.append(record_outcome(job, "quarantined", reason).status)
        else:
            jobs.append(job)
    return jobs, outcomes
