"""SPEC §3: the three tile quality filters — their measured values and their verdicts.

Measuring and judging are split on purpose. :func:`tile_stats` runs once per tile while the
tile's pixels are in memory (during tiling, so no JPEG is ever re-decoded); the measured values
are stored in the tile index. :func:`apply_filters` then turns stored values into a verdict with
thresholds that are plain config, so re-tuning never touches pixels (and :func:`verdict_sql`
gives the same rule as SQL for the DuckDB catalog).

Filters, in SPEC order; a tile's verdict is the first one that drops it:

1. ``small_file`` — JPEG bytes below its tissue's threshold (a mostly blank tile compresses well).
2. ``half_empty`` — the tile is cut into a ``grid x grid`` set of pieces; if any piece's pixel
   standard deviation (pooled over the channels) is below the threshold, part of the tile is
   background (or flat).
3. ``dirt`` — the standard deviation of each colour channel over the whole tile is below the
   threshold (flat smudges, pen, dust). ``dirt_rule="all"`` (default, SPEC's wording) drops the
   tile when every channel is that flat; ``"any"`` when one is (stricter: stain-dominated tissue
   can have one nearly constant channel, e.g. eosin-rich muscle in the generated slides).

Out-of-focus patches lose their high frequencies, so they compress small: in practice the size
filter is the one that catches them (the measured values are kept to re-tune that).

``error`` marks tiles whose pixels could not be read; ``kept`` the survivors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numba
import numpy as np
import pandas as pd

VERDICTS: tuple[str, ...] = ("kept", "small_file", "half_empty", "dirt", "error")
FILTER_VERDICTS: tuple[str, ...] = ("small_file", "half_empty", "dirt")

# Measured per tile at tiling time (columns of the tile index).
STAT_COLUMNS: tuple[str, ...] = (
    "min_piece_std",
    "std_r",
    "std_g",
    "std_b",
    "mean_r",
    "mean_g",
    "mean_b",
)

# Defaults for 448 x 448 tiles written as JPEG quality 90, tuned on the generated slides and
# checked on the real CMU-1-Small-Region slide (see benchmarks/README_tiling.md):
# - size: planted pen smudges are 4-5 kB and out-of-focus tiles 9-14 kB, while every generated
#   tissue tile that passes the other two filters is >= 20 kB (real CMU tissue >= 31 kB);
# - piece std: glass is 0.2-0.6 (generated) / 0.5-1.5 (CMU), textured tissue pieces >= 6;
# - channel std: flat ink is 0.2-0.3 in every channel, tissue has a channel >= 14.
DEFAULT_MIN_JPEG_BYTES = 15_000
DEFAULT_MIN_PIECE_STD = 4.0
DEFAULT_MIN_CHANNEL_STD = 8.0
DEFAULT_DIRT_RULE = "all"


@dataclass(frozen=True)
class TileStats:
    min_piece_std: float
    std_r: float
    std_g: float
    std_b: float
    mean_r: float
    mean_g: float
    mean_b: float

    def as_row(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in STAT_COLUMNS}


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _stats_kernel(flat: np.ndarray, grid: int, band_h: int, piece_w: int) -> np.ndarray:
    """One pass over a ``(h, w*3)`` uint8 tile -> [min piece variance (pooled over channels),
    var r, var g, var b, mean r, mean g, mean b] (population statistics).

    Column sums of x and x² per horizontal band of pieces in int32 (exact while band_h × 255²
    < 2³¹; the inner loop is contiguous and vectorises), then integer piece and channel sums:
    n·Σx² − (Σx)² is exact in int64, so no rounding before the final division.
    """
    h, n = flat.shape
    c1 = np.zeros(n, np.int32)
    c2 = np.zeros(n, np.int32)
    p1 = np.zeros((grid, grid, 3), np.int64)
    p2 = np.zeros((grid, grid, 3), np.int64)
    for gy in range(grid):
        c1[:] = 0
        c2[:] = 0
        for y in range(gy * band_h, (gy + 1) * band_h):
            row = flat[y]
            for k in range(n):
                v = np.int32(row[k])
                c1[k] += v
                c2[k] += v * v
        for k in range(n):
            px = k // 3
            p1[gy, px // piece_w, k - 3 * px] += c1[k]
            p2[gy, px // piece_w, k - 3 * px] += c2[k]
    n_piece = band_h * piece_w
    out = np.empty(7, np.float64)
    best = np.inf
    for gy in range(grid):
        for gx in range(grid):
            v = 0.0
            for ch in range(3):
                s1 = p1[gy, gx, ch]
                v += float(n_piece * p2[gy, gx, ch] - s1 * s1)
            best = min(best, v / (3.0 * n_piece * n_piece))
    out[0] = best
    n_all = h * (n // 3)
    for ch in range(3):
        s1 = p1[:, :, ch].sum()
        s2 = p2[:, :, ch].sum()
        out[1 + ch] = float(n_all * s2 - s1 * s1) / (float(n_all) * n_all)
        out[4 + ch] = s1 / n_all
    return out


def tile_stats(tile: np.ndarray, grid: int = 4) -> TileStats:
    """Half-empty and dirt statistics of one RGB uint8 tile, from one pass of exact sums.

    Piece std: the pixel std within a piece, pooled over the 3 channels (root of the mean of
    the per-channel variances), so it measures texture, not colour: a flat *coloured* piece
    (ink) is flat too. Channel std: per channel over the whole tile. ~0.06 ms for 448 x 448.
    """
    if tile.ndim != 3 or tile.shape[2] != 3 or tile.dtype != np.uint8:
        raise ValueError(f"tile must be an (h, w, 3) uint8 array, got {tile.shape} {tile.dtype}")
    h, w, c = tile.shape
    if h % grid or w % grid:
        raise ValueError(f"tile {w}x{h} is not divisible into a {grid}x{grid} grid")
    r = _stats_kernel(np.ascontiguousarray(tile).reshape(h, w * c), grid, h // grid, w // grid)
    sd = np.sqrt(np.maximum(r[:4], 0.0))
    return TileStats(
        min_piece_std=float(sd[0]),
        std_r=float(sd[1]),
        std_g=float(sd[2]),
        std_b=float(sd[3]),
        mean_r=float(r[4]),
        mean_g=float(r[5]),
        mean_b=float(r[6]),
    )


@dataclass(frozen=True)
class QualityThresholds:
    """Thresholds of the three filters (SPEC §3 defaults for 448 px, JPEG quality 90)."""

    min_jpeg_bytes: int = DEFAULT_MIN_JPEG_BYTES
    min_jpeg_bytes_by_tissue: Mapping[str, int] = field(default_factory=dict)
    min_piece_std: float = DEFAULT_MIN_PIECE_STD
    min_channel_std: float = DEFAULT_MIN_CHANNEL_STD
    dirt_rule: str = DEFAULT_DIRT_RULE

    def __post_init__(self) -> None:
        if self.dirt_rule not in ("any", "all"):
            raise ValueError(f"dirt_rule must be 'any' or 'all', got {self.dirt_rule!r}")
        for name, v in (
            ("min_jpeg_bytes", self.min_jpeg_bytes),
            *self.min_jpeg_bytes_by_tissue.items(),
        ):
            if v < 0:
                raise ValueError(f"JPEG size threshold for {name!r} must be >= 0, got {v}")
        object.__setattr__(
            self, "min_jpeg_bytes_by_tissue", MappingProxyType(dict(self.min_jpeg_bytes_by_tissue))
        )

    def size_threshold(self, tissue: str | None) -> int:
        return int(self.min_jpeg_bytes_by_tissue.get(tissue or "", self.min_jpeg_bytes))

    def as_dict(self) -> dict:
        return {
            "min_jpeg_bytes": self.min_jpeg_bytes,
            "min_jpeg_bytes_by_tissue": dict(sorted(self.min_jpeg_bytes_by_tissue.items())),
            "min_piece_std": self.min_piece_std,
            "min_channel_std": self.min_channel_std,
            "dirt_rule": self.dirt_rule,
        }


def filter_flags(index: pd.DataFrame, thresholds: QualityThresholds) -> pd.DataFrame:
    """Each filter on its own: boolean columns ``small_file``, ``half_empty``, ``dirt``.

    ``index`` needs ``tissue``, ``jpeg_bytes`` and the stat columns. Useful to see every reason a
    tile would be dropped (the verdict names only the first, in SPEC order).
    """
    missing = {"tissue", "jpeg_bytes", *STAT_COLUMNS} - set(index.columns)
    if missing:
        raise ValueError(f"tile index lacks columns {sorted(missing)}")
    size_thr = index["tissue"].fillna("").map(thresholds.size_threshold).astype("int64")
    flat = index[["std_r", "std_g", "std_b"]].to_numpy(dtype=float) < thresholds.min_channel_std
    return pd.DataFrame(
        {
            "small_file": (index["jpeg_bytes"] < size_thr).to_numpy(),
            "half_empty": (index["min_piece_std"] < thresholds.min_piece_std).to_numpy(),
            "dirt": flat.any(axis=1) if thresholds.dirt_rule == "any" else flat.all(axis=1),
        },
        index=index.index,
    )


def apply_filters(index: pd.DataFrame, thresholds: QualityThresholds) -> pd.DataFrame:
    """The tile index with ``size_threshold`` and ``verdict`` added (filters in SPEC order).

    ``index`` needs ``tissue``, ``status`` (ok|error), ``jpeg_bytes`` and the stat columns.
    """
    if "status" not in index.columns:
        raise ValueError("tile index lacks columns ['status']")
    flags = filter_flags(index, thresholds)
    out = index.copy()
    out["size_threshold"] = out["tissue"].fillna("").map(thresholds.size_threshold).astype("int64")
    conditions = [(out["status"] != "ok").to_numpy()] + [
        flags[f].to_numpy() for f in FILTER_VERDICTS
    ]
    out["verdict"] = np.select(conditions, ["error", *FILTER_VERDICTS], "kept")
    return out


def verdict_counts(filtered: pd.DataFrame, by: str | None = None) -> pd.DataFrame:
    """Tiles per verdict (columns in :data:`VERDICTS` order), optionally per ``by`` value."""
    if by is None:
        counts = filtered["verdict"].value_counts().reindex(list(VERDICTS), fill_value=0)
        return counts.rename("tiles").to_frame().T.reset_index(drop=True)
    table = pd.crosstab(filtered[by], filtered["verdict"]).reindex(
        columns=list(VERDICTS), fill_value=0
    )
    table["total"] = table.sum(axis=1)
    return table.reset_index()


def verdict_sql(thresholds: QualityThresholds, table: str = "slide_tiles") -> str:
    """A SELECT giving the same verdicts as :func:`apply_filters`, for re-tuning in DuckDB."""

    def q(s: str) -> str:
        return "'" + s.replace("'", "''") + "'"

    size = "CASE tissue " + " ".join(
        f"WHEN {q(t)} THEN {int(v)}" for t, v in sorted(thresholds.min_jpeg_bytes_by_tissue.items())
    )
    size = (
        f"{size} ELSE {int(thresholds.min_jpeg_bytes)} END"
        if thresholds.min_jpeg_bytes_by_tissue
        else str(int(thresholds.min_jpeg_bytes))
    )
    c = float(thresholds.min_channel_std)
    join = " OR " if thresholds.dirt_rule == "any" else " AND "
    dirt = join.join(f"std_{ch} < {c}" for ch in "rgb")
    return (
        f"SELECT *, {size} AS size_threshold, CASE "
        f"WHEN status <> 'ok' THEN 'error' "
        f"WHEN jpeg_bytes < {size} THEN 'small_file' "
        f"WHEN min_piece_std < {float(thresholds.min_piece_std)} THEN 'half_empty' "
        f"WHEN {dirt} THEN 'dirt' ELSE 'kept' END AS verdict FROM {table}"
    )


def judge_slide(
    index: pd.DataFrame, tiling_status: str | None, thresholds: QualityThresholds
) -> pd.DataFrame:
    """The filtered tiles of one slide: its index judged by :func:`apply_filters`, or no rows
    when the slide was not tiled ``ok`` (a slide quarantined for corrupt tiles keeps its index
    as a record, but none of its tiles may feed the sample). ``filter_hash`` names the
    thresholds that judged it."""
    from gtex_assets.core.atomic import params_hash

    if tiling_status != "ok":
        index = index.iloc[0:0]
    out = apply_filters(index, thresholds)
    out["filter_hash"] = params_hash(thresholds.as_dict())
    return out
