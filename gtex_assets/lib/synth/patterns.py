"""Drawing primitives and the morphology pattern families of the synthetic H&E renderer.

Everything paints *stain concentrations* on a :class:`Canvas`, not colours: hematoxylin (H,
nuclei, blue-purple), eosin (E, cytoplasm and collagen, pink), red cells (R) and "clear" (C,
empty space: fat vacuoles, alveoli, lumens). ``slide.compose`` turns them into RGB with the
Beer-Lambert law, so overlapping structures mix like real stains. Fields are numpy (no
per-pixel Python), discrete objects (nuclei, fibres, vessels) are Pillow polygons/lines drawn
into 8-bit layers; per-object Python loops run over at most a few thousand objects.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

F32 = np.float32
Params = Mapping[str, float | str]
AngleFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class Canvas:
    """Stain accumulators for one slide at level-0 resolution (h × w)."""

    w: int
    h: int
    mpp: float
    nuc_gain: float = 1.0  # multiplies every nuclei density (the nuclear_density factor)
    fib_gain: float = 1.0  # multiplies collagen fibre density (the fibrosis factor)
    ring: tuple[float, float, float] | None = None  # (cx, cy, r_mid) for vessel rings
    depth: np.ndarray | None = None  # 0..1 depth inside the surface layer, else 1+
    counts: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape = (self.h, self.w)
        self.H = np.zeros(shape, F32)
        self.E = np.zeros(shape, F32)
        self.R = np.zeros(shape, F32)
        self.C = np.zeros(shape, F32)
        # where collagen can be: families mark their interstitium here; the fibrosis factor's
        # extra fibres are drawn with this weight (so never inside colloid or hepatocytes)
        self.stroma = np.zeros(shape, F32)
        # 8-bit layers for drawn objects: nuclei (H), fibres (E), clear, red, dense eosin.
        self.layers = {
            k: Image.new("L", (self.w, self.h), 0) for k in ("nuc", "fib", "clr", "red", "eos")
        }
        self.draw = {k: ImageDraw.Draw(v) for k, v in self.layers.items()}

    def px(self, um: float) -> float:
        """Micrometres to level-0 pixels."""
        return um / self.mpp

    @property
    def mm2_per_px(self) -> float:
        return (self.mpp * 1e-3) ** 2

    def bump(self, key: str, n: float) -> None:
        self.counts[key] = self.counts.get(key, 0.0) + float(n)


# ---------------------------------------------------------------- fields


def smoothstep(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """Hermite ramp from 0 (x <= a) to 1 (x >= b); in-place arithmetic (fields are 4 M px)."""
    t = np.subtract(x, F32(a), dtype=F32)
    t *= F32(1.0 / (b - a))
    np.maximum(t, 0.0, out=t)
    np.minimum(t, 1.0, out=t)
    out = t * t
    t *= F32(-2.0)
    t += F32(3.0)
    out *= t
    return out


def noise(rng: np.random.Generator, w: int, h: int, scale: float) -> np.ndarray:
    """Smooth Gaussian-like noise (unit std, zero mean) with features of ``scale`` pixels.

    White noise on a coarse grid, bicubically upsampled by Pillow (C speed).
    """
    if scale <= 1.5:  # uniform with unit std: half the cost of normal draws, looks the same
        u = rng.random((h, w), dtype=F32)
        u -= F32(0.5)
        u *= F32(3.4641)
        return u
    gw, gh = int(w / scale) + 4, int(h / scale) + 4
    small = rng.standard_normal((gh, gw), dtype=F32)
    # bilinear is ~30 % cheaper and indistinguishable once features span many pixels
    resample = Image.BICUBIC if scale < 12 else Image.BILINEAR
    img = Image.fromarray(small, "F").resize(
        (w, h), resample, box=(1.0, 1.0, 1.0 + w / scale, 1.0 + h / scale)
    )
    arr = np.asarray(img, dtype=F32)
    std = float(arr[:: max(1, h // 64), :: max(1, w // 64)].std()) or 1.0
    return arr * F32(1.0 / std)


def upsample(arr: np.ndarray, w: int, h: int, resample: int = Image.BILINEAR) -> np.ndarray:
    """Resize a float (or int32 with NEAREST) field to (h, w)."""
    if arr.shape == (h, w):
        return arr
    if arr.dtype == np.int32:
        return np.asarray(Image.fromarray(arr, "I").resize((w, h), Image.NEAREST))
    return np.asarray(Image.fromarray(arr.astype(F32), "F").resize((w, h), resample), dtype=F32)


@dataclass
class Cells:
    """Worley (cellular) field: distances to the nearest/second-nearest seed, in level-0 px."""

    f1: np.ndarray
    f2: np.ndarray
    ids: np.ndarray  # int32 id of the nearest seed
    seeds: np.ndarray  # (n, 2) seed x, y in level-0 px (meaningful without warp/anisotropy)
    n: int

    @property
    def edge(self) -> np.ndarray:
        """Distance-like measure to the cell border (0 on the border)."""
        return self.f2 - self.f1

    @property
    def radial(self) -> np.ndarray:
        """0 at the seed, 1 on the border."""
        return (2.0 * self.f1 / np.maximum(self.f1 + self.f2, 1e-3)).astype(F32)


def worley(
    rng: np.random.Generator,
    w: int,
    h: int,
    cell_px: float,
    *,
    ds: int | None = None,
    aniso: float = 1.0,
    angle: float = 0.0,
    warp: float = 0.0,
) -> Cells:
    """Cellular noise on a jittered grid of seeds.

    The two nearest seeds are searched at 1/``ds`` resolution (cheap), then the distances to
    exactly those two seeds are recomputed at level 0, so cell borders stay crisp (an
    interpolated F2-F1 would break thin rims into dashes). ``aniso`` > 1 stretches cells
    along ``angle`` (tubules); ``warp`` (fraction of a cell) bends borders off the honeycomb.
    """
    ds = ds or (4 if cell_px >= 40 else 2)
    ws, hs = max(2, math.ceil(w / ds)), max(2, math.ceil(h / ds))
    cs = max(cell_px / ds, 2.0)
    ys, xs = np.mgrid[0:hs, 0:ws].astype(F32)
    wx = wy = None
    if warp:
        amp = F32(warp * cs)
        wx = noise(rng, ws, hs, cs * 1.7) * amp
        wy = noise(rng, ws, hs, cs * 1.7) * amp
        xs += wx
        ys += wy
    c, s = F32(math.cos(angle)), F32(math.sin(angle))

    def stretch(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if aniso == 1.0:
            return x, y
        return (x * c + y * s) / F32(aniso), -x * s + y * c

    xs, ys = stretch(xs, ys)
    ox, oy = float(xs.min()), float(ys.min())
    xs -= ox
    ys -= oy
    gx, gy = int(xs.max() / cs) + 3, int(ys.max() / cs) + 3
    sx = ((np.arange(gx, dtype=F32)[None, :] - 1.0) + rng.uniform(0.1, 0.9, (gy, gx))) * cs
    sy = ((np.arange(gy, dtype=F32)[:, None] - 1.0) + rng.uniform(0.1, 0.9, (gy, gx))) * cs
    sx, sy = sx.astype(F32).ravel(), sy.astype(F32).ravel()
    cx = (xs / F32(cs)).astype(np.int32) + 1
    cy = (ys / F32(cs)).astype(np.int32) + 1
    f1 = np.full((hs, ws), np.inf, F32)
    f2 = np.full((hs, ws), np.inf, F32)
    id1 = np.zeros((hs, ws), np.int32)
    id2 = np.zeros((hs, ws), np.int32)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            idc = (cy + dy) * gx + (cx + dx)
            d = (xs - sx[idc]) ** 2 + (ys - sy[idc]) ** 2
            closer = d < f1
            second = ~closer & (d < f2)
            f2 = np.where(closer, f1, np.where(second, d, f2))
            id2 = np.where(closer, id1, np.where(second, idc, id2))
            f1 = np.where(closer, d, f1)
            id1 = np.where(closer, idc, id1)
    del xs, ys, f1, f2
    id1u, id2u = upsample(id1, w, h), upsample(id2, w, h)
    X = ((np.arange(w, dtype=F32) + F32(0.5)) / F32(ds) - F32(0.5))[None, :]
    Y = ((np.arange(h, dtype=F32) + F32(0.5)) / F32(ds) - F32(0.5))[:, None]
    if wx is not None or aniso != 1.0:
        X, Y = np.broadcast_to(X, (h, w)), np.broadcast_to(Y, (h, w))
    if wx is not None:
        X = X + upsample(wx, w, h)
        Y = Y + upsample(wy, w, h)
    X, Y = stretch(X, Y)
    X = X - F32(ox)
    Y = Y - F32(oy)
    d1, d2 = _dist2(X, Y, sx, sy, id1u), _dist2(X, Y, sx, sy, id2u)
    ids = np.where(d1 <= d2, id1u, id2u)
    f1o = np.minimum(d1, d2)
    np.maximum(d1, d2, out=d2)
    f2o = d2
    for f in (f1o, f2o):
        np.sqrt(f, out=f)
        f *= F32(ds)
    seeds = np.stack([(sx + F32(ox)) * ds, (sy + F32(oy)) * ds], axis=1)
    return Cells(f1o, f2o, ids, seeds, gx * gy)


def _dist2(
    X: np.ndarray, Y: np.ndarray, sx: np.ndarray, sy: np.ndarray, ids: np.ndarray
) -> np.ndarray:
    """Squared distance of every pixel to seed ``ids`` (in place, few 4 M-pixel temporaries)."""
    dx = sx[ids]
    np.subtract(X, dx, out=dx)
    dx *= dx
    dy = sy[ids]
    np.subtract(Y, dy, out=dy)
    dy *= dy
    dx += dy
    return dx


def lookup(table: np.ndarray, ids: np.ndarray) -> np.ndarray | np.float32:
    """Per-cell values (``table[id]``, ids wrap around) as a field; a constant table gives a
    scalar (no 4 M-pixel gather for e.g. a zero probability)."""
    table = np.asarray(table, F32)
    if (table == table[0]).all():
        return F32(table[0])
    return np.take(table, ids, mode="wrap")


def sample_at(field_: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    h, w = field_.shape
    return field_[np.clip(ys.astype(np.int64), 0, h - 1), np.clip(xs.astype(np.int64), 0, w - 1)]


# ---------------------------------------------------------------- objects


def place(
    cv: Canvas, rng: np.random.Generator, weight: np.ndarray | None, density_mm2: float
) -> tuple[np.ndarray, np.ndarray]:
    """Random points with ``density_mm2`` per mm² where ``weight`` is 1 (thinned elsewhere)."""
    expected = density_mm2 * cv.w * cv.h * cv.mm2_per_px
    n = int(rng.poisson(max(expected, 0.0)))
    n = min(n, 60_000)  # a safety cap; real densities stay far below it
    xs = rng.uniform(0, cv.w, n).astype(F32)
    ys = rng.uniform(0, cv.h, n).astype(F32)
    if weight is not None and n:
        keep = rng.random(n) < sample_at(weight, xs, ys)
        xs, ys = xs[keep], ys[keep]
    return xs, ys


def ellipses(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    xs: np.ndarray,
    ys: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    angles: np.ndarray,
    fills: np.ndarray,
    k: int = 9,
    wobble: float = 0.07,
) -> None:
    """Rotated, slightly irregular filled ellipses (semi-axes a, b in px) as polygons."""
    n = len(xs)
    if not n:
        return
    t = np.linspace(0, 2 * np.pi, k, endpoint=False, dtype=F32)
    jit = 1.0 + wobble * rng.standard_normal((n, k)).astype(F32)
    px = a[:, None] * np.cos(t) * jit
    py = b[:, None] * np.sin(t) * jit
    c, s = np.cos(angles)[:, None], np.sin(angles)[:, None]
    pts = np.stack([xs[:, None] + px * c - py * s, ys[:, None] + px * s + py * c], axis=-1)
    for poly, fill in zip(pts.reshape(n, -1).tolist(), fills.tolist(), strict=True):
        draw.polygon(poly, fill=int(fill))


def nuclei(
    cv: Canvas,
    rng: np.random.Generator,
    weight: np.ndarray | None,
    density_mm2: float,
    *,
    size_um: float = 7.0,
    elong: float = 1.3,
    angle: float | AngleFn | None = None,
    spread: float = 0.25,
    dark: float = 0.85,
    layer: str = "nuc",
    gain: bool = True,
) -> int:
    """Scatter nuclei (hematoxylin ellipses); density scales with the nuclear_density factor."""
    xs, ys = place(cv, rng, weight, density_mm2 * (cv.nuc_gain if gain else 1.0))
    n = len(xs)
    if not n:
        return 0
    major = cv.px(size_um) / 2 * rng.lognormal(0.0, 0.15, n).astype(F32)
    minor = major / F32(elong) * rng.lognormal(0.0, 0.1, n).astype(F32)
    if angle is None:
        ang = rng.uniform(0, np.pi, n).astype(F32)
    elif callable(angle):
        ang = angle(xs, ys).astype(F32) + rng.normal(0, spread, n).astype(F32)
    else:
        ang = F32(angle) + rng.normal(0, spread, n).astype(F32)
    fills = np.clip(dark * 255 * rng.uniform(0.78, 1.0, n), 0, 255)
    ellipses(cv.draw[layer], rng, xs, ys, major, minor, ang, fills)
    cv.bump("nuclei", n)
    return n


def fibres(
    cv: Canvas,
    rng: np.random.Generator,
    weight: np.ndarray | None,
    density_mm2: float,
    *,
    length_um: float = 200.0,
    width_um: float = 5.0,
    wave: float = 0.3,
    angle: float | AngleFn | None = None,
    spread: float = 0.3,
    value: float = 0.7,
    layer: str = "fib",
    gain: bool = True,
) -> int:
    """Wavy collagen fibres as thick polylines; density scales with the fibrosis factor."""
    xs, ys = place(cv, rng, weight, density_mm2 * (cv.fib_gain if gain else 1.0))
    n = len(xs)
    if not n:
        return 0
    if angle is None:
        ang = rng.uniform(0, np.pi, n)
    elif callable(angle):
        ang = angle(xs, ys) + rng.normal(0, spread, n)
    else:
        ang = angle + rng.normal(0, spread, n)
    length = cv.px(length_um) * rng.uniform(0.5, 1.3, n)
    width = np.maximum(1, np.round(cv.px(width_um) * rng.uniform(0.5, 1.4, n))).astype(int)
    s = np.linspace(-0.5, 0.5, 14)[None, :] * length[:, None]
    lateral = (
        wave
        * length[:, None]
        / 8
        * np.sin(
            2 * np.pi * s / (length[:, None] / rng.uniform(1.0, 2.5, n)[:, None])
            + rng.uniform(0, 2 * np.pi, n)[:, None]
        )
    )
    c, si = np.cos(ang)[:, None], np.sin(ang)[:, None]
    px = xs[:, None] + s * c - lateral * si
    py = ys[:, None] + s * si + lateral * c
    pts = np.stack([px, py], axis=-1).reshape(n, -1).tolist()
    fills = np.clip(value * 255 * rng.uniform(0.6, 1.0, n), 0, 255).astype(int).tolist()
    draw = cv.draw[layer]
    for line, wd, fill in zip(pts, width.tolist(), fills, strict=True):
        draw.line(line, fill=fill, width=wd)
    cv.bump("fibres", n)
    return n


def discs(
    cv: Canvas,
    rng: np.random.Generator,
    weight: np.ndarray,
    density_mm2: float,
    radius_um: float,
    *,
    var: float = 0.25,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Centres and radii (px) of round structures (glomeruli, veins ...) plus their mask."""
    xs, ys = place(cv, rng, weight, density_mm2)
    r = cv.px(radius_um) * rng.lognormal(0.0, var, len(xs))
    img = Image.new("L", (cv.w, cv.h), 0)
    d = ImageDraw.Draw(img)
    for x, y, rr in zip(xs.tolist(), ys.tolist(), r.tolist(), strict=True):
        d.ellipse((x - rr, y - rr, x + rr, y + rr), fill=255)
    return xs, ys, r, np.asarray(img, dtype=F32) * F32(1 / 255)


def vessels(cv: Canvas, rng: np.random.Generator, weight: np.ndarray, density_mm2: float) -> None:
    """Small vessels: a pink wall ring around a lumen with a few red cells."""
    xs, ys = place(cv, rng, weight, density_mm2)
    for x, y in zip(xs.tolist(), ys.tolist(), strict=True):
        r = cv.px(rng.uniform(8, 30))
        ry = r * rng.uniform(0.5, 1.0)
        wall = max(2.0, r * 0.35)
        cv.draw["eos"].ellipse((x - r - wall, y - ry - wall, x + r + wall, y + ry + wall), fill=170)
        cv.draw["clr"].ellipse((x - r, y - ry, x + r, y + ry), fill=235)
        if rng.random() < 0.6:
            cv.draw["red"].ellipse((x - r * 0.6, y - ry * 0.5, x + r * 0.3, y + ry * 0.4), fill=150)
        k = int(rng.integers(3, 7))
        t = rng.uniform(0, 2 * np.pi, k)
        nx, ny = x + (r + wall / 2) * np.cos(t), y + (ry + wall / 2) * np.sin(t)
        ellipses(
            cv.draw["nuc"], rng, nx.astype(F32), ny.astype(F32),
            np.full(k, cv.px(5), F32), np.full(k, cv.px(1.6), F32),
            (t + np.pi / 2).astype(F32), np.full(k, 210),
        )  # fmt: skip


def gland_rings(
    cv: Canvas,
    rng: np.random.Generator,
    xs: np.ndarray,
    ys: np.ndarray,
    radius_px: np.ndarray,
    *,
    elong: np.ndarray | None = None,
    angle: np.ndarray | None = None,
    lumen: float = 0.35,
    lumen_fill: str = "clear",
    epi: int = 120,
    goblet: float = 0.0,
    nuc_step_um: float = 6.0,
    mask: ImageDraw.ImageDraw | None = None,
) -> None:
    """Glands/crypts: an eosinophilic epithelial ring, a lumen, basal nuclei on the rim.

    ``mask`` (optional) receives the glands' outlines, e.g. to keep stroma cells out of them.
    """
    n = len(xs)
    if not n:
        return
    elong = np.ones(n, F32) if elong is None else elong
    angle = rng.uniform(0, np.pi, n).astype(F32) if angle is None else angle
    a, b = radius_px * elong, radius_px
    ellipses(cv.draw["eos"], rng, xs, ys, a, b, angle, np.full(n, epi), k=16, wobble=0.04)
    if mask is not None:
        ellipses(mask, rng, xs, ys, a * 1.08, b * 1.08, angle, np.full(n, 255), k=16, wobble=0.0)
    lumen_layer, lumen_val = ("clr", 250) if lumen_fill == "clear" else ("clr", 170)
    ellipses(
        cv.draw[lumen_layer], rng, xs, ys, a * lumen, b * lumen, angle,
        np.full(n, lumen_val), k=12, wobble=0.1,
    )  # fmt: skip
    if lumen_fill == "mucin":
        ellipses(cv.draw["nuc"], rng, xs, ys, a * lumen, b * lumen, angle, np.full(n, 40), k=12)
    step = cv.px(nuc_step_um)
    for x, y, aa, bb, an in zip(
        xs.tolist(), ys.tolist(), a.tolist(), b.tolist(), angle.tolist(), strict=True
    ):
        circ = 2 * np.pi * math.sqrt((aa * aa + bb * bb) / 2)
        k = max(6, int(circ / step))
        t = np.linspace(0, 2 * np.pi, k, endpoint=False) + rng.uniform(0, 1)
        rr = 0.82 + 0.06 * rng.standard_normal(k)
        ex, ey = aa * rr * np.cos(t), bb * rr * np.sin(t)
        c, s = math.cos(an), math.sin(an)
        nx, ny = (x + ex * c - ey * s).astype(F32), (y + ex * s + ey * c).astype(F32)
        radial = (np.arctan2(ey, ex) + an).astype(F32)
        ellipses(
            cv.draw["nuc"], rng, nx, ny, np.full(k, cv.px(4.2), F32), np.full(k, cv.px(2.2), F32),
            radial, np.clip(rng.normal(215, 15, k), 0, 255),
        )  # fmt: skip
        if goblet > 0:
            m = int(k * goblet)
            t2 = rng.uniform(0, 2 * np.pi, m)
            r2 = rng.uniform(0.5, 0.68, m)
            gx, gy = aa * r2 * np.cos(t2), bb * r2 * np.sin(t2)
            for px_, py_ in zip(
                (x + gx * c - gy * s).tolist(), (y + gx * s + gy * c).tolist(), strict=True
            ):
                g = cv.px(3.2)
                cv.draw["clr"].ellipse((px_ - g, py_ - g, px_ + g, py_ + g), fill=200)
    cv.bump("glands", n)


# ---------------------------------------------------------------- helpers for families


def _f(p: Params, key: str, default: float) -> float:
    return float(p.get(key, default))


def _s(p: Params, key: str, default: str) -> str:
    return str(p.get(key, default))


def _const_angle(theta: float) -> AngleFn:
    return lambda xs, ys: np.full(len(xs), theta, F32)


def _field_angle(field_: np.ndarray) -> AngleFn:
    return lambda xs, ys: sample_at(field_, xs, ys)


def _texture(
    cv: Canvas, rng: np.random.Generator, fine: float = 0.12, coarse: float = 0.18
) -> np.ndarray:
    """Multiplicative stain texture around 1: fine grain plus slow variation."""
    t = noise(rng, cv.w, cv.h, cv.px(2.0)) * F32(fine)
    t += noise(rng, cv.w, cv.h, cv.px(60)) * F32(coarse)
    t += F32(1.0)
    return t


# ---------------------------------------------------------------- families


def fat(
    cv: Canvas, rng: np.random.Generator, region: np.ndarray, cell_um: float, rim_um: float
) -> None:
    """Adipocytes: empty polygonal vacuoles with thin pink rims and a few flat nuclei."""
    cells = worley(rng, cv.w, cv.h, cv.px(cell_um), warp=0.25)
    rim = 1.0 - smoothstep(cells.edge, cv.px(rim_um) * 0.5, cv.px(rim_um) * 1.5)
    cv.C += region * (1.0 - rim) * F32(0.97)
    cv.stroma += region
    cv.E += region * rim * F32(0.85)
    edge_w = region * rim
    nuclei(cv, rng, edge_w, 900, size_um=9, elong=3.5, angle=None, dark=0.75)
    cv.bump("fat_px", float(region.sum()))


def stroma(cv: Canvas, rng: np.random.Generator, region: np.ndarray, p: Params) -> None:
    """Connective tissue: collagen fibres, spindle nuclei, vessels (+ optional glands)."""
    theta = noise(rng, cv.w, cv.h, cv.px(500)) * F32(np.pi * (1.2 if _f(p, "whorl", 0) else 0.6))
    cv.E += region * F32(_f(p, "e", 0.5)) * _texture(cv, rng)
    cv.H += region * F32(_f(p, "h", 0.03))
    cv.stroma += region
    fibres(
        cv, rng, region, _f(p, "fibres", 1500), length_um=_f(p, "fibre_len_um", 200),
        width_um=_f(p, "fibre_w_um", 5), wave=_f(p, "wave", 0.35), angle=_field_angle(theta),
        spread=0.25, value=0.75,
    )  # fmt: skip
    elastosis = _f(p, "elastosis", 0.0)
    if elastosis and cv.depth is not None:
        upper = region * smoothstep(cv.depth, 1.0, 1.3) * (1.0 - smoothstep(cv.depth, 3.5, 5.0))
        cv.H += upper * F32(0.08 * elastosis) * (1.0 + 0.5 * noise(rng, cv.w, cv.h, cv.px(6)))
        cv.E -= upper * F32(0.15 * elastosis)
        fibres(
            cv, rng, upper, 900 * elastosis, length_um=40, width_um=3, wave=1.2,
            value=0.2, layer="nuc", gain=False,
        )  # fmt: skip
    nuclei(
        cv, rng, region, _f(p, "nuc", 1200), size_um=_f(p, "nuc_um", 9), elong=_f(p, "elong", 3.0),
        angle=_field_angle(theta), spread=0.3, dark=0.8,
    )  # fmt: skip
    if _f(p, "vessels", 0):
        vessels(cv, rng, region, _f(p, "vessels", 0))
    if _f(p, "glands", 0):
        xs, ys = place(cv, rng, region, _f(p, "glands", 0))
        for x, y in zip(xs.tolist(), ys.tolist(), strict=True):  # lobules: clusters of acini
            k = int(rng.integers(3, 9))
            spread_px = cv.px(70)
            gx = (x + rng.normal(0, spread_px, k)).astype(F32)
            gy = (y + rng.normal(0, spread_px, k)).astype(F32)
            r = (cv.px(22) * rng.lognormal(0, 0.25, k)).astype(F32)
            gland_rings(
                cv, rng, gx, gy, r, lumen=0.4, lumen_fill=_s(p, "gland_lumen", "clear"),
                epi=110, nuc_step_um=5.5,
            )  # fmt: skip
    if _f(p, "hyaline", 0):
        _, _, _, m = discs(cv, rng, region, _f(p, "hyaline", 0), 140, var=0.3)
        cv.E += region * m * F32(0.25)
        cv.C += region * m * F32(0.25)


def _fibre_coords(
    cv: Canvas, rng: np.random.Generator, p: Params
) -> tuple[np.ndarray, np.ndarray, AngleFn, np.ndarray | None]:
    """Across-fibre (v) and along-fibre (s) coordinates for the chosen orientation mode."""
    yy = np.arange(cv.h, dtype=F32)[:, None]
    xx = np.arange(cv.w, dtype=F32)[None, :]
    mode = _s(p, "orient", "global")
    septa = None
    if mode == "ring" and cv.ring is not None:
        cx, cy, _ = cv.ring
        v = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        s = np.arctan2(yy - cy, xx - cx) * v
        return v, s, lambda xs, ys: np.arctan2(ys - cy, xs - cx) + np.pi / 2, None
    if mode == "patches":
        cells = worley(rng, cv.w, cv.h, cv.px(_f(p, "patch_um", 380)), warp=0.3)
        table = rng.uniform(0, np.pi, cells.n).astype(F32)
        theta = lookup(table, cells.ids)
        septa = 1.0 - smoothstep(cells.edge, cv.px(4), cv.px(12))
        c, si = np.cos(theta), np.sin(theta)
        v = -xx * si + yy * c
        s = xx * c + yy * si
        return v, s, _field_angle(theta), septa
    theta0 = float(rng.uniform(0, np.pi))
    c, si = F32(math.cos(theta0)), F32(math.sin(theta0))
    return -xx * si + yy * c, xx * c + yy * si, _const_angle(theta0), None


def fibres_family(cv: Canvas, rng: np.random.Generator, region: np.ndarray, p: Params) -> None:
    """Aligned fibres: skeletal/cardiac/smooth muscle, nerve fascicles, arterial media."""
    v, s, angle_fn, septa = _fibre_coords(cv, rng, p)
    width = cv.px(_f(p, "width_um", 10))
    amp, lam = cv.px(_f(p, "wave_amp_um", 5)), cv.px(_f(p, "wave_len_um", 150))
    v = (
        v
        + F32(amp) * np.sin(s * F32(2 * np.pi / lam))
        + noise(rng, cv.w, cv.h, lam) * F32(amp * 0.6)
    )
    band = v / F32(width)
    fid = np.floor(band).astype(np.int32)
    frac = band - fid
    del v, band
    table = rng.uniform(0.8, 1.2, 4096).astype(F32)
    e = F32(_f(p, "e", 0.6)) * lookup(table, fid)
    edge = 1.0 - smoothstep(np.minimum(frac, 1.0 - frac), 0.0, max(0.08, 1.5 / width))
    gap = F32(_f(p, "gap", 0.2))
    e *= _texture(cv, rng, fine=0.1, coarse=0.12)
    stri = _f(p, "striation", 0.0)
    if stri:
        e *= 1.0 - F32(stri * 0.5) * (0.5 + 0.5 * np.sin(s * F32(2 * np.pi / cv.px(2.5))))
    lam_e = _f(p, "lamellae", 0.0)
    clear = edge * gap
    if lam_e:
        e += F32(lam_e * 0.55) * edge
        clear = edge * F32(0.02)
    fasc = None
    if _f(p, "fascicles", 0):  # nerve: wavy pale fascicles inside an epineurium
        cells = worley(rng, cv.w, cv.h, cv.px(420), warp=0.35)
        fasc = smoothstep(cells.edge, cv.px(25), cv.px(40))
        peri = smoothstep(cells.edge, cv.px(12), cv.px(20)) * (1.0 - fasc)
        myelin = smoothstep(noise(rng, cv.w, cv.h, cv.px(2.5)), 0.7, 1.3)
        clear = clear * fasc + myelin * fasc * F32(0.45)
        e = e * fasc + (1.0 - fasc) * F32(0.62) + peri * F32(0.3)
    if septa is not None:
        e = e * (1.0 - septa) + septa * F32(0.35)
        clear = clear * (1.0 - septa) + septa * F32(0.15)
    cv.E += region * e
    cv.C += region * clear
    cv.stroma += region * (edge * F32(0.5) + (septa if septa is not None else F32(0.0)))
    if fasc is not None:
        cv.stroma += region * (1.0 - fasc)
    cv.H += region * F32(_f(p, "h", 0.04))
    pos = _s(p, "nuc_pos", "any")
    weight = region
    if pos == "edge":
        weight = region * (1.0 - smoothstep(np.minimum(frac, 1.0 - frac), 0.05, 0.12))
    elif pos == "centre":
        weight = region * (1.0 - smoothstep(np.abs(frac - 0.5), 0.08, 0.2))
    if fasc is not None:
        weight = weight * (0.3 + 0.7 * fasc)
        fibres(
            cv, rng, region * (1.0 - fasc), 4000, length_um=180, width_um=6, value=0.7, gain=False
        )
    nuclei(
        cv, rng, weight, _f(p, "nuc", 2000), size_um=_f(p, "nuc_len_um", 14),
        elong=_f(p, "nuc_elong", 3.5), angle=angle_fn, spread=0.12, dark=0.85,
    )  # fmt: skip


def alveolar(cv: Canvas, rng: np.random.Generator, region: np.ndarray, p: Params) -> None:
    """Lung: thin cellular septa around large empty alveoli, collapsed patches, pigment."""
    cells = worley(rng, cv.w, cv.h, cv.px(_f(p, "cell_um", 130)), warp=0.4)
    thick = cv.px(_f(p, "septa_um", 8)) * (1.0 + 0.45 * noise(rng, cv.w, cv.h, cv.px(200)))
    wall = 1.0 - smoothstep(cells.edge - thick, -cv.px(1.5), cv.px(1.5))
    collapsed = smoothstep(noise(rng, cv.w, cv.h, cv.px(350)), 1.0, 1.5)
    wall = np.maximum(wall, collapsed)
    cv.C += region * (1.0 - wall)
    cv.E += region * wall * F32(0.5) * _texture(cv, rng, fine=0.15)
    cv.H += region * wall * F32(0.1)
    cv.stroma += region * wall
    cv.R += region * wall * F32(0.2) * smoothstep(noise(rng, cv.w, cv.h, cv.px(40)), 0.3, 1.2)
    nuclei(cv, rng, region * wall, _f(p, "nuc", 9000), size_um=7, elong=1.6, dark=0.85)
    # alveolar macrophages floating in the air spaces
    nuclei(cv, rng, region * (1.0 - wall), 120, size_um=14, elong=1.1, dark=0.35, layer="eos")
    if _f(p, "pigment", 0):
        xs, ys = place(cv, rng, region * wall, 40 * _f(p, "pigment", 0))
        for x, y in zip(xs.tolist(), ys.tolist(), strict=True):
            k = int(rng.integers(4, 14))
            px_ = (x + rng.normal(0, cv.px(6), k)).astype(F32)
            py_ = (y + rng.normal(0, cv.px(6), k)).astype(F32)
            r = (cv.px(2.2) * rng.lognormal(0, 0.3, k)).astype(F32)
            ellipses(cv.draw["nuc"], rng, px_, py_, r, r, np.zeros(k, F32), np.full(k, 255))
            ellipses(cv.draw["eos"], rng, px_, py_, r, r, np.zeros(k, F32), np.full(k, 255))
    vessels(cv, rng, region, 6)


def cords(cv: Canvas, rng: np.random.Generator, region: np.ndarray, p: Params) -> None:
    """Polygonal epithelial cells with central nuclei: liver plates, adrenal cortex, pituitary."""
    cell_px = cv.px(_f(p, "cell_um", 25))
    veins = _f(p, "veins", 0)
    portal = _f(p, "portal", 0)
    holes = np.zeros_like(region)
    if veins:
        _, _, _, vmask = discs(cv, rng, region, veins, 35, var=0.3)
        cv.C += region * vmask
        holes = np.maximum(holes, vmask)
    if portal:
        _, _, _, pmask = discs(cv, rng, region * (1.0 - holes), portal, 70, var=0.3)
        preg = region * pmask
        cv.stroma += preg
        cv.E += preg * F32(0.5)
        nuclei(cv, rng, preg, 12000, size_um=6, elong=1.2, dark=0.9)
        fibres(cv, rng, preg, 3000, length_um=80, width_um=4, value=0.7, gain=False)
        holes = np.maximum(holes, pmask)
    region = region * (1.0 - holes)
    cells = worley(rng, cv.w, cv.h, cell_px, warp=0.0)
    border = 1.0 - smoothstep(cells.edge, cv.px(0.8), cv.px(2.2))
    e = F32(_f(p, "e", 0.55)) * lookup(rng.uniform(0.85, 1.15, 4096).astype(F32), cells.ids)
    e *= _texture(cv, rng, fine=0.18, coarse=0.1)
    h = np.full_like(region, F32(_f(p, "h", 0.05)))
    if _f(p, "multicolour", 0):  # pituitary: acidophils (pink), basophils (purple), chromophobes
        kind = rng.integers(0, 3, 4096)
        e *= lookup(np.array([1.55, 1.0, 0.55], F32)[kind], cells.ids)
        h += lookup(np.array([0.0, 0.22, 0.02], F32)[kind], cells.ids)
    foamy = _f(p, "foamy", 0.0)
    clear = border * F32(_f(p, "border_clear", 0.4))
    if foamy:
        bubbles = smoothstep(noise(rng, cv.w, cv.h, cv.px(2.2)), 0.2, 0.9)
        clear = np.maximum(clear, bubbles * F32(foamy) * (1.0 - border))
    cv.E += region * e * (1.0 - border * 0.5)
    cv.stroma += region * border * F32(0.5)
    cv.H += region * h
    cv.C += region * clear
    sx, sy = cells.seeds[:, 0].astype(F32), cells.seeds[:, 1].astype(F32)
    inside = (sx >= 0) & (sx < cv.w) & (sy >= 0) & (sy < cv.h)
    sx, sy = sx[inside], sy[inside]
    keep = rng.random(len(sx)) < 0.85 * sample_at(region, sx, sy)
    sx, sy = sx[keep], sy[keep]
    n = len(sx)
    r = (cv.px(_f(p, "nuc_um", 8)) / 2 * rng.lognormal(0, 0.12, n)).astype(F32)
    ellipses(cv.draw["nuc"], rng, sx, sy, r, r * F32(0.9), rng.uniform(0, np.pi, n).astype(F32),
             np.clip(rng.normal(190, 20, n), 0, 255))  # fmt: skip
    cv.bump("nuclei", n)
    nuclei(cv, rng, region, 700, size_um=6, elong=1.1, dark=0.95)  # lymphocytes, Kupffer cells


def follicles(cv: Canvas, rng: np.random.Generator, region: np.ndarray, p: Params) -> None:
    """Round units with an epithelial ring: thyroid follicles, tubules, acini, seminiferous tubules."""
    cell_um = _f(p, "cell_um", 100)
    holes = np.zeros_like(region)
    if _f(p, "glomeruli", 0):
        gx, gy, gr, gmask = discs(cv, rng, region, _f(p, "glomeruli", 0), 85, var=0.12)
        greg = region * gmask
        _, _, _, inner = _inner_discs(cv, gx, gy, gr * 0.82)
        cv.C += greg * (1.0 - inner)
        cv.E += greg * inner * F32(0.55)
        nuclei(cv, rng, greg * inner, 26000, size_um=6, elong=1.2, dark=0.9)
        holes = gmask
    if _f(p, "islets", 0):
        _, _, _, imask = discs(cv, rng, region, _f(p, "islets", 0), 70, var=0.3)
        ireg = region * imask
        cv.E += ireg * F32(0.32)
        nuclei(cv, rng, ireg, 9000, size_um=7, elong=1.1, dark=0.7)
        holes = np.maximum(holes, imask)
    region = region * (1.0 - holes)
    cells = worley(
        rng, cv.w, cv.h, cv.px(cell_um), aniso=_f(p, "aniso", 1.0),
        angle=float(rng.uniform(0, np.pi)), warp=0.2,
    )  # fmt: skip
    gap = cv.px(_f(p, "gap_um", 4))
    border = cv.px(_f(p, "border_um", 8))
    edge, q = cells.edge, cells.radial
    inter = 1.0 - smoothstep(edge, gap * 0.5, gap * 0.5 + cv.px(1.5))
    ring_frac = _f(p, "ring_frac", 0.0)
    epi = (1.0 - smoothstep(edge, gap + border * 0.8, gap + border * 1.2)) * (1.0 - inter)
    if ring_frac:
        epi = np.maximum(epi, smoothstep(q, 1.0 - ring_frac, 1.05 - ring_frac) * (1.0 - inter))
    stroma_cells = lookup((rng.random(4096) < _f(p, "stroma_p", 0.0)).astype(F32), cells.ids)
    size = lookup(rng.uniform(1 - _f(p, "size_var", 0.2), 1.0, 4096).astype(F32), cells.ids)
    lumen = 1.0 - smoothstep(
        q, _f(p, "lumen_frac", 0.4) * size - 0.05, _f(p, "lumen_frac", 0.4) * size + 0.02
    )
    lumen = lumen * (1.0 - epi) * (1.0 - inter)
    cyto = (1.0 - epi) * (1.0 - inter) * (1.0 - lumen)
    kind = _s(p, "lumen", "clear")
    empty = lookup((rng.random(4096) < _f(p, "empty_p", 0.0)).astype(F32), cells.ids)
    tex = _texture(cv, rng, fine=0.1, coarse=0.12)
    e = epi * F32(_f(p, "border_e", 0.5)) + cyto * F32(_f(p, "border_e", 0.5) * 0.8)
    h = (epi + cyto) * F32(_f(p, "border_h", 0.08))
    clear = np.zeros_like(region)
    if kind == "colloid":
        shade = lookup(rng.uniform(0.75, 1.15, 4096).astype(F32), cells.ids)
        retract = smoothstep(q, 0.8 * size, 0.86 * size) * lookup(
            (rng.random(4096) < 0.4).astype(F32), cells.ids
        )
        e += lumen * (1.0 - empty) * (F32(0.7) * shade) * (1.0 - retract)
        clear += lumen * (empty + (1.0 - empty) * retract * F32(0.8))
    elif kind == "purple":
        e += lumen * F32(0.45)
        h += lumen * F32(0.28)
    elif kind == "pale":
        clear += lumen * F32(0.6)
        h += lumen * F32(0.1)
    else:
        clear += lumen
    istyle = _s(p, "interstitium", "thin")
    ie = {"thin": 0.45, "leydig": 0.62, "muscle": 0.58}.get(istyle, 0.45)
    inter_all = np.maximum(inter, stroma_cells)
    e = e * (1.0 - stroma_cells) + inter_all * F32(ie)
    h = h * (1.0 - stroma_cells)
    clear = clear * (1.0 - stroma_cells)
    cv.E += region * e * tex
    cv.stroma += region * inter_all
    cv.H += region * h
    cv.C += region * clear
    ring_um = _f(p, "ring_nuc_um", 7.0)
    nuclei(cv, rng, region * epi * (1.0 - stroma_cells), _f(p, "ring_nuc", 8000), size_um=ring_um,
           elong=1.3, dark=0.88)  # fmt: skip
    idens = {"thin": 1500, "leydig": 5000, "muscle": 2600}.get(istyle, 1500)
    ielong = 4.0 if istyle == "muscle" else 1.4
    nuclei(
        cv,
        rng,
        region * inter_all,
        idens,
        size_um=9 if istyle != "thin" else 7,
        elong=ielong,
        dark=0.8,
    )
    if _f(p, "amylacea", 0):
        xs, ys = place(cv, rng, region * lumen * (1.0 - stroma_cells), 25 * _f(p, "amylacea", 0))
        r = (cv.px(12) * rng.lognormal(0, 0.3, len(xs))).astype(F32)
        ellipses(cv.draw["eos"], rng, xs, ys, r, r, np.zeros(len(xs), F32), np.full(len(xs), 200))
    cv.bump("follicles", cells.n)


def _inner_discs(cv: Canvas, xs: np.ndarray, ys: np.ndarray, r: np.ndarray) -> tuple:
    img = Image.new("L", (cv.w, cv.h), 0)
    d = ImageDraw.Draw(img)
    for x, y, rr in zip(xs.tolist(), ys.tolist(), r.tolist(), strict=True):
        d.ellipse((x - rr, y - rr, x + rr, y + rr), fill=255)
    return xs, ys, r, np.asarray(img, dtype=F32) * F32(1 / 255)


def squamous(cv: Canvas, rng: np.random.Generator, region: np.ndarray, p: Params) -> None:
    """Stratified epithelium in the surface band: basal row of dark nuclei, flattening upwards,
    glycogenated pale middle layers (mucosa) or a keratin layer on top (skin)."""
    d = np.clip(cv.depth if cv.depth is not None else np.ones_like(region), 0.0, 1.0)
    keratin = _f(p, "keratin", 0) * (1.0 - smoothstep(d, 0.12, 0.2))
    living = region * (1.0 - keratin)
    cv.E += living * (F32(0.32) + F32(0.18) * d) * _texture(cv, rng, fine=0.12, coarse=0.1)
    cv.H += living * (F32(0.04) + F32(0.12) * smoothstep(d, 0.8, 0.95))
    gly = _f(p, "glycogen", 0.0)
    if gly:
        cells = worley(rng, cv.w, cv.h, cv.px(13))
        mid = smoothstep(d, 0.1, 0.3) * (1.0 - smoothstep(d, 0.6, 0.8))
        cv.C += living * mid * F32(gly * 0.55) * smoothstep(cells.edge, cv.px(1.0), cv.px(2.5))
    if _f(p, "keratin", 0):
        yy = np.arange(cv.h, dtype=F32)[:, None]
        lam = 0.5 + 0.5 * np.sin(
            yy * F32(2 * np.pi / cv.px(4)) + noise(rng, cv.w, cv.h, cv.px(20)) * 3
        )
        cv.E += region * keratin * F32(0.55) * lam
        cv.C += region * keratin * (1.0 - lam) * F32(0.6)
    weight = living * (F32(0.25) + F32(0.75) * d)
    nuclei(cv, rng, weight, _f(p, "nuc", 9000), size_um=7, elong=1.5, angle=_const_angle(0.0),
           spread=0.35, dark=0.85)  # fmt: skip
    basal = living * smoothstep(d, 0.88, 0.97)
    nuclei(cv, rng, basal, 20000, size_um=6.5, elong=1.7, angle=_const_angle(np.pi / 2), dark=0.95)
    if _f(p, "umbrella", 0):
        top = living * (1.0 - smoothstep(d, 0.1, 0.2))
        nuclei(cv, rng, top, 6000, size_um=10, elong=1.2, dark=0.6)


def glands(cv: Canvas, rng: np.random.Generator, region: np.ndarray, p: Params) -> None:
    """Intestinal/gastric mucosa in the surface band: crypts or gastric glands in a cellular
    lamina propria; ileum adds villi and a lymphoid nodule."""
    d = np.clip(cv.depth if cv.depth is not None else np.ones_like(region), 0.0, 1.0)
    kind = _s(p, "kind", "crypts")
    cv.E += region * F32(0.36) * _texture(cv, rng)
    cv.H += region * F32(0.07)
    lp = region
    if kind == "villi":
        xx = np.arange(cv.w, dtype=F32)[None, :]
        wob = noise(rng, cv.w, cv.h, cv.px(120)) * F32(cv.px(25))
        villus = np.abs(np.sin((xx + wob) * F32(np.pi / cv.px(110))))
        gaps = (1.0 - smoothstep(villus, 0.25, 0.45)) * (1.0 - smoothstep(d, 0.4, 0.5))
        cv.C += region * gaps
        lining = (
            region
            * (1.0 - gaps)
            * (1.0 - smoothstep(villus, 0.45, 0.6))
            * (1.0 - smoothstep(d, 0.4, 0.5))
        )
        nuclei(cv, rng, lining, 30000, size_um=8, elong=2.5, angle=_const_angle(0.0), spread=0.2)
        lp = region * (1.0 - gaps)
    if _f(p, "lymphoid", 0):
        _, _, _, nod = discs(cv, rng, region * smoothstep(d, 0.6, 0.8), 3, 160, var=0.15)
        nuclei(cv, rng, region * nod, 30000, size_um=5.5, elong=1.1, dark=0.95)
        lp = lp * (1.0 - nod)
    gland_um = _f(p, "gland_um", 55)
    cover = {"crypts": 0.5, "gastric": 0.6, "villi": 0.45}.get(kind, 0.5)
    dens = cover / (np.pi * (gland_um / 2e3) ** 2 * 1.8)  # glands per mm² (mean elongation 1.8)
    zone = lp * (smoothstep(d, 0.45, 0.55) if kind == "villi" else smoothstep(d, 0.04, 0.12))
    xs, ys = place(cv, rng, zone * (1.0 - smoothstep(d, 0.9, 1.0)), dens)
    n = len(xs)
    outline = Image.new("L", (cv.w, cv.h), 0)
    gastric = kind == "gastric"
    if n:
        r = (cv.px(gland_um / 2) * rng.lognormal(0, 0.12, n)).astype(F32)
        longit = rng.random(n) < 0.45
        elong = np.where(longit, rng.uniform(2.0, 3.5, n), rng.uniform(1.0, 1.25, n)).astype(F32)
        angle = np.where(
            longit, np.pi / 2 + rng.normal(0, 0.15, n), rng.uniform(0, np.pi, n)
        ).astype(F32)
        gland_rings(
            cv, rng, xs, ys, r, elong=elong, angle=angle, lumen=0.22 if gastric else 0.3,
            epi=175 if gastric else 115, goblet=0.0 if gastric else 0.7, nuc_step_um=5.5,
            mask=ImageDraw.Draw(outline),
        )  # fmt: skip
    in_gland = np.asarray(outline, dtype=F32) * F32(1 / 255)
    if gastric:  # parietal cells: pink cells with a central round nucleus inside the glands
        nuclei(cv, rng, zone * in_gland, 3000, size_um=5, elong=1.0, dark=0.85)
    lp = lp * (1.0 - in_gland)
    nuclei(cv, rng, lp, _f(p, "lp_nuc", 8000), size_um=5.5, elong=1.2, dark=0.9)
    cv.stroma += lp * F32(0.5)


def lymphoid(cv: Canvas, rng: np.random.Generator, region: np.ndarray, p: Params) -> None:
    """Spleen: white-pulp follicles of packed lymphocytes within congested red pulp."""
    frac = _f(p, "follicle_frac", 0.3)
    area_mm2 = float(region.sum()) * cv.mm2_per_px
    r_um = _f(p, "follicle_um", 320) / 2
    dens = frac / (np.pi * (r_um * 1e-3) ** 2)  # follicles per mm² for that area fraction
    _, _, _, nod = discs(cv, rng, region, dens, r_um, var=0.2)
    white, red = region * nod, region * (1.0 - nod)
    cv.E += red * F32(0.4) * _texture(cv, rng, fine=0.2)
    cv.R += red * F32(0.45) * (0.7 + 0.3 * noise(rng, cv.w, cv.h, cv.px(25)))
    cv.E += white * F32(0.25)
    cv.stroma += red * F32(0.3)
    nuclei(cv, rng, white, 32000, size_um=5.5, elong=1.1, dark=0.95)
    nuclei(cv, rng, red, _f(p, "nuc", 9000), size_um=6, elong=1.2, dark=0.85)
    fibres(cv, rng, region, 60, length_um=400, width_um=14, wave=0.2, value=0.8, gain=False)
    cv.bump("follicle_area_mm2", float(white.sum()) * cv.mm2_per_px if area_mm2 else 0.0)


def neural(cv: Canvas, rng: np.random.Generator, region: np.ndarray, p: Params) -> None:
    """Brain: fibrillary neuropil; cerebellum adds folia with a granular layer of tiny nuclei."""
    cv.E += region * F32(_f(p, "e", 0.3)) * _texture(cv, rng, fine=0.25, coarse=0.1)
    vac = smoothstep(noise(rng, cv.w, cv.h, cv.px(3)), 1.6, 2.2)
    cv.C += region * vac * F32(0.7)
    if _f(p, "granular", 0):
        u = np.abs(noise(rng, cv.w, cv.h, cv.px(320)))
        white = 1.0 - smoothstep(u, 0.15, 0.22)
        gran = smoothstep(u, 0.15, 0.22) * (1.0 - smoothstep(u, 0.62, 0.68))
        dots = smoothstep(noise(rng, cv.w, cv.h, cv.px(2.6)), 0.35, 0.9)
        cv.H += region * gran * (F32(0.25) + F32(1.1) * dots * F32(min(1.6, cv.nuc_gain)))
        cv.E += region * white * F32(0.15)
        edge = smoothstep(u, 0.6, 0.64) * (1.0 - smoothstep(u, 0.66, 0.72))
        purk = nuclei(
            cv, rng, region * edge, 900, size_um=22, elong=1.4, dark=0.45, layer="eos", gain=False
        )
        cv.bump("purkinje", purk)
        mol = region * smoothstep(u, 0.66, 0.7)
        nuclei(cv, rng, mol, _f(p, "nuc", 1500), size_um=6, elong=1.2, dark=0.85)
        nuclei(cv, rng, region * white, 2500, size_um=6.5, elong=1.3, dark=0.85)
        return
    nuclei(cv, rng, region, _f(p, "nuc", 2200), size_um=6.5, elong=1.2, dark=0.85)
    xs, ys = place(cv, rng, region, _f(p, "neurons", 200) * cv.nuc_gain)
    n = len(xs)
    if n:
        body = (cv.px(11) * rng.lognormal(0, 0.2, n)).astype(F32)
        ang = rng.uniform(0, 2 * np.pi, n).astype(F32)
        ellipses(
            cv.draw["clr"],
            rng,
            xs,
            ys,
            body * 1.35,
            body * 1.2,
            ang,
            np.full(n, 200),
            k=7,
            wobble=0.15,
        )
        ellipses(cv.draw["clr"], rng, xs, ys, body, body * 0.75, ang, np.zeros(n), k=3, wobble=0.1)
        ellipses(
            cv.draw["eos"], rng, xs, ys, body, body * 0.75, ang, np.full(n, 150), k=3, wobble=0.1
        )
        ellipses(cv.draw["nuc"], rng, xs, ys, body * 0.42, body * 0.4, ang, np.full(n, 130))
        cv.bump("neurons", n)


def plicae(cv: Canvas, rng: np.random.Generator, region: np.ndarray, p: Params) -> None:
    """Fallopian tube: branching mucosal folds lined by columnar cells, with lumen between."""
    fold = cv.px(_f(p, "fold_um", 140))
    u = noise(rng, cv.w, cv.h, fold) + F32(0.5) * noise(rng, cv.w, cv.h, fold / 2.5)
    thr = float(np.quantile(u[::8, ::8], 1.0 - _f(p, "lumen", 0.4)))
    lumen = smoothstep(u, thr, thr + 0.05)
    lining = smoothstep(u, thr - 0.22, thr - 0.02) * (1.0 - lumen)
    cv.C += region * lumen
    cv.E += region * (1.0 - lumen) * F32(0.42) * _texture(cv, rng)
    cv.stroma += region * (1.0 - lumen) * (1.0 - lining)
    nuclei(cv, rng, region * lining, _f(p, "lining_nuc", 16000), size_um=8, elong=2.2, dark=0.9)
    nuclei(cv, rng, region * (1.0 - lumen) * (1.0 - lining), _f(p, "nuc", 3800), size_um=8,
           elong=2.5, dark=0.8)  # fmt: skip


FAMILIES: dict[str, Callable[[Canvas, np.random.Generator, np.ndarray, Params], None]] = {
    "stroma": stroma,
    "fibres": fibres_family,
    "alveolar": alveolar,
    "cords": cords,
    "follicles": follicles,
    "squamous": squamous,
    "glands": glands,
    "lymphoid": lymphoid,
    "neural": neural,
    "plicae": plicae,
}
