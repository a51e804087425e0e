"""Render one synthetic H&E slide and write it as an Aperio-style SVS.

Layout follows a real Aperio file (cf. CMU-1-Small-Region.svs): page 0 is level 0, tiled
256×256, JPEG with RGB photometric (no YCbCr, as Aperio writes it) and an ImageDescription
``Aperio Image Library ...|AppMag = 20|MPP = 0.4990|...`` that slideio's SVS driver parses
for magnification and resolution; page 1 is a stripped thumbnail (slideio lists it as the
auxiliary image "Thumbnail"); then one tiled page per 4× downsampled pyramid level.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np
import tifffile
from PIL import Image, ImageDraw, ImageFilter

from gtex_assets.lib.synth import patterns as pt
from gtex_assets.lib.synth._rng import rng_for
from gtex_assets.lib.synth.tissues import PROFILES, TissueProfile

F32 = np.float32
TILE = 448  # the pipeline's tile size at level 0; artefacts are placed on this grid
SVS_TILE = 256
FACTORS: tuple[str, ...] = ("nuclear_density", "fat_fraction", "fibrosis")
# How strongly each standard-normal factor moves the pixels (see render_slide).
NUCLEI_PER_Z = 0.4  # nuclei density × exp(0.4 z)
FAT_LOGIT_PER_Z = 1.0  # fat area fraction = sigmoid(logit(base) + 1.0 z)
FIBRES_PER_Z = 0.5  # collagen fibre density × exp(0.5 z)
# Fibrosis also replaces patches of parenchyma with dense collagen, in every tissue (as real
# interstitial fibrosis does): area fraction = sigmoid(logit(0.10) + 1.0 z), patches ~120 µm,
# small enough that every 448 px tile samples the slide's fraction.
FIBROSIS_BASE, FIBROSIS_LOGIT_PER_Z, FIBROSIS_PATCH_UM = 0.10, 1.0, 120.0
SCAR = MappingProxyType(  # dense collagen: pink, fibrillar, few spindle nuclei
    {"e": 0.8, "h": 0.02, "fibres": 2500, "fibre_len_um": 160, "fibre_w_um": 4, "nuc": 350}
)

# Optical density per unit stain (R, G, B): Beer-Lambert colour model of H&E.
HEMATOXYLIN = np.array([0.65, 0.72, 0.32], F32)
EOSIN = np.array([0.12, 0.83, 0.46], F32)
BLOOD = np.array([0.19, 1.39, 1.20], F32)
PEN_INKS = ((38, 92, 64), (40, 58, 132), (52, 52, 62))  # green, blue, black marker


@dataclass(frozen=True)
class SlideSpec:
    """Everything that determines one slide's pixels (order-independent, picklable)."""

    sample_id: str
    tissue: str
    width: int
    height: int
    mpp: float
    app_mag: int
    factors: tuple[tuple[str, float], ...]
    seed: int
    pen: bool = False
    blur: bool = False
    quality: int = 85


@dataclass
class SlideResult:
    sample_id: str
    path: str
    file_bytes: int
    tissue_fraction: float
    fat_fraction: float
    n_nuclei: int
    n_fibres: int
    fibrosis_fraction: float = 0.0
    artefacts: list[dict] = field(default_factory=list)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


# ---------------------------------------------------------------- tissue geometry


def _soft_threshold(field_low: np.ndarray, thr: float, w: int, h: int, ds: int) -> np.ndarray:
    """Upsample a low-res field and threshold it at level 0 with a ~2 px anti-aliased edge."""
    gy, gx = np.gradient(field_low)
    near = np.abs(field_low - thr) < (np.abs(field_low - thr).std() * 0.2 + 1e-6)
    g = float(np.median(np.hypot(gx, gy)[near])) if near.any() else 0.01
    eps = max(g / ds, 1e-6) * 1.2
    return pt.smoothstep(pt.upsample(field_low, w, h), thr - eps, thr + eps)


def tissue_mask(
    rng: np.random.Generator, prof: TissueProfile, w: int, h: int
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float] | None]:
    """Level-0 alpha (0..1) of tissue, its low-res binary mask, and the ring geometry if any.

    Coverage is set exactly by thresholding a smooth random field at a quantile: one to three
    rounded pieces (or an annulus for vessels) covering 40-68 % of the slide.
    """
    ds = 8
    wl, hl = max(4, w // ds), max(4, h // ds)
    yy, xx = np.mgrid[0:hl, 0:wl].astype(F32)
    coverage = float(rng.uniform(0.42, 0.68))
    bumpy = pt.noise(rng, wl, hl, max(3.0, min(wl, hl) / 5))
    ring = None
    if prof.shape == "ring":
        cx, cy = wl * rng.uniform(0.42, 0.58), hl * rng.uniform(0.42, 0.58)
        r_mid = min(wl, hl) * 0.3
        field_ = -np.abs(np.hypot(xx - cx, yy - cy) - r_mid) / r_mid + 0.12 * bumpy
        ring = (cx * ds, cy * ds, r_mid * ds)
    else:
        field_ = 0.3 * bumpy
        for _ in range(int(rng.integers(1, 4))):
            cx, cy = wl * rng.uniform(0.22, 0.78), hl * rng.uniform(0.22, 0.78)
            sx, sy = min(wl, hl) * rng.uniform(0.22, 0.4, 2)
            field_ = field_ + np.exp(-(((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2) / 2)
    thr = float(np.quantile(field_, 1.0 - coverage))
    alpha = _soft_threshold(field_.astype(F32), thr, w, h, ds)
    return alpha, field_ > thr, ring


def surface_depth(
    rng: np.random.Generator, mask_low: np.ndarray, w: int, h: int, thickness_px: float
) -> np.ndarray:
    """Depth below each piece's top edge, in units of the (wavy) surface-layer thickness."""
    ds_y = h / mask_low.shape[0]
    rows = np.arange(mask_low.shape[0], dtype=F32)[:, None]
    last_bg = np.maximum.accumulate(np.where(~mask_low, rows, -1.0), axis=0)
    depth_low = ((rows - last_bg) * ds_y).astype(F32)
    depth = pt.upsample(depth_low, w, h)
    xx = np.arange(w, dtype=F32)[None, :]
    lam = thickness_px * float(rng.uniform(1.2, 2.0)) + 60
    wave = 1.0 + 0.22 * np.sin(xx * F32(2 * np.pi / lam) + F32(rng.uniform(0, 6.3)))
    thick = F32(thickness_px) * wave * (1.0 + 0.12 * pt.noise(rng, w, h, thickness_px * 3))
    return depth / np.maximum(thick, 1.0)


def fat_mask(
    rng: np.random.Generator,
    mask_low: np.ndarray,
    frac: float,
    w: int,
    h: int,
    bias_low: np.ndarray | None,
) -> np.ndarray:
    """Level-0 mask (0..1) of fat lobules covering ``frac`` of the tissue's low-res pixels."""
    if frac <= 0 or not mask_low.any():
        return np.zeros((h, w), F32)
    hl, wl = mask_low.shape
    field_ = pt.noise(rng, wl, hl, max(2.0, min(wl, hl) / 4))
    if bias_low is not None:
        field_ = field_ + bias_low
    thr = float(np.quantile(field_[mask_low], 1.0 - frac))
    return _soft_threshold(field_, thr, w, h, w // wl)


# ---------------------------------------------------------------- composition


def _layer(cv: pt.Canvas, name: str) -> np.ndarray:
    return np.asarray(cv.layers[name], dtype=F32) * F32(1 / 255)


def compose(
    cv: pt.Canvas, alpha: np.ndarray, prof: TissueProfile, rng: np.random.Generator
) -> np.ndarray:
    """Stain concentrations → RGB (uint8) by Beer-Lambert, over a faintly noisy glass background."""
    clr = _layer(cv, "clr")
    keep_layer = 1.0 - clr
    keep = np.clip(1.0 - cv.C, 0.0, 1.0) * keep_layer
    grain = pt.noise(rng, cv.w, cv.h, 1.0)  # one white-noise field: chromatin and glass grain
    nuc = _layer(cv, "nuc")
    nuc *= F32(0.88) + F32(0.12) * grain
    gh, ge = (s * float(rng.uniform(0.9, 1.1)) for s in prof.stain)
    # nuclei drawn where a lumen/vessel was later cut out fade with it (no blue ghosts on glass)
    H = (np.maximum(cv.H, 0.0) * keep + nuc * F32(1.3) * (1.0 - F32(0.85) * clr)) * (
        alpha * F32(gh)
    )
    fib = _layer(cv, "fib")
    fib *= np.clip(cv.stroma, 0.2, 1.0)  # fibres fade where they leave the interstitium
    E = (np.maximum(cv.E + fib * F32(0.55), 0.0) * keep) + _layer(cv, "eos") * F32(
        0.75
    ) * keep_layer
    E *= alpha * F32(ge)
    R = (np.maximum(cv.R, 0.0) * keep + _layer(cv, "red") * F32(0.9)) * alpha
    tissue_solid = alpha * keep
    bg = 241.0 + float(rng.uniform(-3, 2))
    grain *= F32(1.1)
    out = np.empty((cv.h, cv.w, 3), np.uint8)
    for c, tint_c in enumerate(prof.tint):
        od = H * HEMATOXYLIN[c] + E * EOSIN[c] + R * BLOOD[c] + tissue_solid * F32(tint_c)
        chan = F32(bg + (1.0 if c == 2 else 0.0)) * np.exp(-od) + grain
        out[..., c] = np.clip(chan + 0.5, 0, 255).astype(np.uint8)
    return out


# ---------------------------------------------------------------- artefacts


def _tile_grid(w: int, h: int) -> list[tuple[int, int]]:
    return [(x, y) for y in range(0, h - TILE + 1, TILE) for x in range(0, w - TILE + 1, TILE)]


def _tile_tissue(alpha: np.ndarray, x: int, y: int) -> float:
    return float(alpha[y : y + TILE : 8, x : x + TILE : 8].mean())


def add_blur(
    rgb: np.ndarray, alpha: np.ndarray, rng: np.random.Generator, avoid: set
) -> dict | None:
    """Out-of-focus patch: Gaussian blur over the most tissue-filled 448² tile (and a margin)."""
    grid = [t for t in _tile_grid(rgb.shape[1], rgb.shape[0]) if t not in avoid]
    if not grid:
        return None
    scores = np.array([_tile_tissue(alpha, x, y) for x, y in grid]) + rng.uniform(
        0, 1e-3, len(grid)
    )
    x, y = grid[int(np.argmax(scores))]
    m = 48
    x0, y0 = max(0, x - m), max(0, y - m)
    x1, y1 = min(rgb.shape[1], x + TILE + m), min(rgb.shape[0], y + TILE + m)
    crop = Image.fromarray(rgb[y0:y1, x0:x1])
    blurred = np.asarray(crop.filter(ImageFilter.GaussianBlur(float(rng.uniform(9, 13)))), F32)
    # feather the margin so the patch blends in; the tile itself is fully blurred
    wy = np.clip(np.minimum(np.arange(y0, y1) - y0, y1 - 1 - np.arange(y0, y1)) / m, 0, 1)
    wx = np.clip(np.minimum(np.arange(x0, x1) - x0, x1 - 1 - np.arange(x0, x1)) / m, 0, 1)
    wgt = np.minimum(wy[:, None], wx[None, :]).astype(F32)[..., None]
    wgt[y - y0 : y - y0 + TILE, x - x0 : x - x0 + TILE] = 1.0
    base = rgb[y0:y1, x0:x1].astype(F32)
    rgb[y0:y1, x0:x1] = np.clip(base + (blurred - base) * wgt + 0.5, 0, 255).astype(np.uint8)
    return {"kind": "blur", "x": x, "y": y, "w": TILE, "h": TILE}


def add_pen(
    rgb: np.ndarray, alpha: np.ndarray, rng: np.random.Generator, avoid: set
) -> dict | None:
    """Marker-pen smudge: an irregular flat blob of ink fully covering one 448² tile."""
    grid = [t for t in _tile_grid(rgb.shape[1], rgb.shape[0]) if t not in avoid]
    if not grid:
        return None
    x, y = grid[int(rng.integers(len(grid)))]
    cx, cy = x + TILE / 2 + rng.uniform(-15, 15), y + TILE / 2 + rng.uniform(-15, 15)
    k = 24
    t = np.linspace(0, 2 * np.pi, k, endpoint=False)
    # radius >= 340 px keeps the whole tile (corners at 317 px from its centre) inside
    r = rng.uniform(350, 420) * (1 + 0.03 * np.sin(3 * t + rng.uniform(0, 6)))
    poly = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1).ravel().tolist()
    h, w = rgb.shape[:2]
    x0, y0 = max(0, int(cx - r.max()) - 4), max(0, int(cy - r.max()) - 4)
    x1, y1 = min(w, int(cx + r.max()) + 5), min(h, int(cy + r.max()) + 5)
    mask = Image.new("L", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(mask).polygon(
        [v - (x0 if i % 2 == 0 else y0) for i, v in enumerate(poly)], fill=255
    )
    m = np.asarray(mask.filter(ImageFilter.GaussianBlur(1.2)), F32)[..., None] * F32(1 / 255)
    ink = np.array(PEN_INKS[int(rng.integers(len(PEN_INKS)))], F32)
    ink_px = ink + rng.normal(0, 0.7, (y1 - y0, x1 - x0, 3)).astype(F32)
    crop = rgb[y0:y1, x0:x1].astype(F32)
    rgb[y0:y1, x0:x1] = np.clip(crop * (1 - m) + ink_px * m + 0.5, 0, 255).astype(np.uint8)
    return {"kind": "pen", "x": x, "y": y, "w": TILE, "h": TILE}


# ---------------------------------------------------------------- render


def _regions(
    cv: pt.Canvas,
    rng_geo: np.random.Generator,
    prof: TissueProfile,
    alpha: np.ndarray,
    mask_low: np.ndarray,
    fat_z: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Split the tissue into surface band, fat lobules and main parenchyma (level-0 weights).

    Fat prefers the deep side of surface tissues (subcutis) and the outside of vessel rings.
    """
    w, h = cv.w, cv.h
    band = np.zeros_like(alpha)
    bias = None
    if prof.surface is not None:
        cv.depth = surface_depth(rng_geo, mask_low, w, h, cv.px(prof.surface_um))
        band = alpha * (1.0 - pt.smoothstep(cv.depth, 0.97, 1.03))
        bias = pt.upsample(cv.depth, mask_low.shape[1], mask_low.shape[0]).clip(0, 3) * F32(0.6)
    elif cv.ring is not None:
        hl, wl = mask_low.shape
        yy, xx = np.mgrid[0:hl, 0:wl].astype(F32)
        s = w / wl
        radius = np.hypot(xx * s - cv.ring[0], yy * s - cv.ring[1]) / cv.ring[2]
        bias = radius.astype(F32) * F32(3.0)
    fat_frac = 0.0
    if prof.fat_base > 0:
        fat_frac = _sigmoid(_logit(prof.fat_base) + FAT_LOGIT_PER_Z * fat_z)
    fmask = fat_mask(rng_geo, mask_low, fat_frac, w, h, bias)
    not_band = alpha - band
    return band, not_band * fmask, not_band * (1.0 - fmask), fat_frac


def fibrosis_mask(
    rng: np.random.Generator, region: np.ndarray, mpp: float, z: float
) -> tuple[np.ndarray, float]:
    """Level-0 mask (0..1) of collagen patches covering sigmoid(logit(base) + k z) of ``region``."""
    frac = _sigmoid(_logit(FIBROSIS_BASE) + FIBROSIS_LOGIT_PER_Z * z)
    h, w = region.shape
    ds = 8
    wl, hl = max(4, w // ds), max(4, h // ds)
    field_ = pt.noise(rng, wl, hl, max(2.0, FIBROSIS_PATCH_UM / mpp / ds))
    inside = region[::ds, ::ds][:hl, :wl] > 0.5
    if not inside.any():
        return np.zeros_like(region), frac
    field_ = field_[: inside.shape[0], : inside.shape[1]]
    thr = float(np.quantile(field_[inside], 1.0 - frac))
    full = np.full((hl, wl), thr - 10.0, F32)
    full[: field_.shape[0], : field_.shape[1]] = field_
    return _soft_threshold(full, thr, w, h, ds), frac


def _paint(
    cv: pt.Canvas,
    rng: np.random.Generator,
    prof: TissueProfile,
    band: np.ndarray,
    fat_region: np.ndarray,
    main_region: np.ndarray,
    fibrosis_z: float = 0.0,
) -> float:
    """Run the tissue's pattern families, then the shared fat, fibrosis and congestion layers.

    Returns the fibrotic fraction of the main region."""
    scar, _ = fibrosis_mask(rng, main_region, cv.mpp, fibrosis_z)
    scar *= main_region
    main_region = main_region - scar
    pt.FAMILIES[prof.main.family](cv, rng, main_region, prof.main.params)
    pt.stroma(cv, rng, scar, SCAR)
    if prof.surface is not None:
        pt.FAMILIES[prof.surface.family](cv, rng, band, prof.surface.params)
    if fat_region.any():
        pt.fat(cv, rng, fat_region, prof.fat_cell_um, rim_um=3.0 * cv.fib_gain**0.5)
        pt.fibres(cv, rng, fat_region, 160, length_um=320, width_um=7, wave=0.25, value=0.8)
    if prof.fibre_base:  # the fibrosis factor: more collagen in the interstitium
        weight = np.minimum(cv.stroma, 1.0) * main_region
        pt.fibres(cv, rng, weight, prof.fibre_base * 10, length_um=160, width_um=4, value=0.45)
    if prof.blood:
        congested = pt.smoothstep(
            pt.noise(rng, cv.w, cv.h, cv.px(150)), 1.0 - prof.blood * 2, 1.6 - prof.blood * 2
        )
        cv.R += main_region * congested * F32(0.35)
    return float(scar.sum()) / max(float((main_region + scar).sum()), 1.0)


def render_slide(spec: SlideSpec) -> tuple[np.ndarray, dict]:
    """RGB pixels (h × w × 3, uint8) of one slide and what was planted in it.

    Factor effects: nuclei density × exp(0.4 z_nuclear_density); fat area fraction
    sigmoid(logit(fat_base) + 1.0 z_fat_fraction); collagen fibres × exp(0.5 z_fibrosis) and
    collagen patches over sigmoid(logit(0.10) + 1.0 z_fibrosis) of the parenchyma.
    Geometry, patterns and artefacts use separate random streams keyed by the sample id.
    """
    prof = PROFILES[spec.tissue]
    z = dict(spec.factors)
    w, h = spec.width, spec.height
    rng_geo = rng_for(spec.seed, "slide", spec.sample_id, "geometry")
    rng = rng_for(spec.seed, "slide", spec.sample_id, "pattern")
    alpha, mask_low, ring = tissue_mask(rng_geo, prof, w, h)
    cv = pt.Canvas(
        w, h, spec.mpp,
        nuc_gain=math.exp(NUCLEI_PER_Z * z.get("nuclear_density", 0.0)),
        fib_gain=math.exp(FIBRES_PER_Z * z.get("fibrosis", 0.0)),
        ring=ring,
    )  # fmt: skip
    band, fat_region, main_region, _ = _regions(
        cv, rng_geo, prof, alpha, mask_low, z.get("fat_fraction", 0.0)
    )
    fib_frac = _paint(cv, rng, prof, band, fat_region, main_region, z.get("fibrosis", 0.0))
    rgb = compose(cv, alpha, prof, rng)
    rng_art = rng_for(spec.seed, "slide", spec.sample_id, "artefacts")
    artefacts: list[dict] = []
    used: set[tuple[int, int]] = set()
    for wanted, add in ((spec.blur, add_blur), (spec.pen, add_pen)):
        if wanted and (a := add(rgb, alpha, rng_art, used)) is not None:
            artefacts.append(a)
            used.add((a["x"], a["y"]))
    tissue_px = float(alpha.sum())
    info = {
        "tissue_fraction": tissue_px / (w * h),
        "fat_fraction": float(fat_region.sum()) / max(tissue_px, 1.0),
        "n_nuclei": int(cv.counts.get("nuclei", 0)),
        "n_fibres": int(cv.counts.get("fibres", 0)),
        "fibrosis_fraction": fib_frac,
        "artefacts": artefacts,
        "tissue_alpha": alpha,  # level-0 tissue coverage 0..1 (for tests and tile truth)
    }
    return rgb, info


# ---------------------------------------------------------------- SVS


def _aperio_meta(spec: SlideSpec) -> str:
    return (
        f"|AppMag = {spec.app_mag}|StripeWidth = 2040|ScanScope ID = SYNTH01"
        f"|Filename = {spec.sample_id}|Date = 01/01/20|Time = 00:00:00|Time Zone = GMT+00:00"
        f"|User = synthetic|MPP = {spec.mpp:.4f}|Left = 0.000000|Top = 0.000000"
        f"|LineCameraSkew = 0.000000|LineAreaXOffset = 0.000000|LineAreaYOffset = 0.000000"
        f"|Focus Offset = 0.000000|ImageID = {spec.sample_id}"
        f"|OriginalWidth = {spec.width}|OriginalHeight = {spec.height}"
    )


def _shrink(rgb: np.ndarray, factor: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    size = (max(1, round(w / factor)), max(1, round(h / factor)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BOX))


def write_svs(path: str | Path, rgb: np.ndarray, spec: SlideSpec) -> int:
    """Write ``rgb`` as a pyramidal Aperio SVS at ``path`` (atomically); returns the file size."""
    path = Path(path)
    h, w = rgb.shape[:2]
    head = f"Aperio Image Library v12.0.15 \r\n{w}x{h} [0,0 {w}x{h}] ({SVS_TILE}x{SVS_TILE})"
    q = spec.quality
    tiled = {
        "tile": (SVS_TILE, SVS_TILE),
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": q, "outcolorspace": "rgb"},
        "subsampling": (1, 1),
        "metadata": None,
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=False) as tw:
            tw.write(rgb, description=f"{head} JPEG/RGB Q={q}{_aperio_meta(spec)}", **tiled)
            thumb = _shrink(rgb, max(4.0, max(w, h) / 768))
            tw.write(
                thumb,
                description=f"Aperio Image Library v12.0.15 \r\n{w}x{h} -> {thumb.shape[1]}x{thumb.shape[0]} - {_aperio_meta(spec)}",
                photometric="rgb", compression="jpeg", rowsperstrip=16, metadata=None,
                compressionargs={"level": 90, "outcolorspace": "rgb"}, subsampling=(1, 1),
            )  # fmt: skip
            level = rgb
            while max(level.shape[:2]) >= 512:
                level = _shrink(level, 4)
                tw.write(
                    level,
                    description=f"{head} -> {level.shape[1]}x{level.shape[0]} JPEG/RGB Q={q}",
                    **tiled,
                )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


def make_slide(spec: SlideSpec, path: str) -> SlideResult:
    """Render and write one slide (the unit of work of the process pool)."""
    rgb, info = render_slide(spec)
    size = write_svs(path, rgb, spec)
    return SlideResult(
        sample_id=spec.sample_id,
        path=str(path),
        file_bytes=size,
        tissue_fraction=info["tissue_fraction"],
        fat_fraction=info["fat_fraction"],
        n_nuclei=info["n_nuclei"],
        n_fibres=info["n_fibres"],
        fibrosis_fraction=info["fibrosis_fraction"],
        artefacts=[{"sample_id": spec.sample_id, **a} for a in info["artefacts"]],
    )
