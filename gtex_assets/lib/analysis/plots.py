"""PNG plots of the analysis stage (SPEC §7–§8), written atomically, shown in the asset metadata.

Uses matplotlib's object API (``Figure``, Agg canvas): no pyplot global state, safe in threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gtex_assets.core.atomic import atomic_path


def label_colors(labels: Sequence[str]) -> dict[str, tuple]:
    """A stable colour per label (sorted): tab20 → tab20b → tab20c covers 60 tissues."""
    uniq = sorted({str(x) for x in labels})
    palette = [colormaps[name](i) for name in ("tab20", "tab20b", "tab20c") for i in range(20)]
    if len(uniq) > len(palette):
        extra = colormaps["hsv"](np.linspace(0, 1, len(uniq) - len(palette), endpoint=False))
        palette += [tuple(c) for c in extra]
    return {lab: palette[i] for i, lab in enumerate(uniq)}


def _save(fig: Figure, dest: str | Path, dpi: int = 110) -> Path:
    FigureCanvasAgg(fig)
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(dest)


def _scatter(ax, xy: np.ndarray, labels: np.ndarray, colors: dict, s: float) -> None:
    for lab in sorted(colors):
        m = labels == lab
        if m.any():
            ax.scatter(xy[m, 0], xy[m, 1], s=s, color=colors[lab], label=lab, linewidths=0)


def _legend(fig: Figure, ax, n: int) -> None:
    ncol = 1 if n <= 20 else 2 if n <= 40 else 3
    ax.legend(
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=7,
        markerscale=2.0,
        frameon=False,
        ncol=ncol,
    )


def scatter_by_label(
    xy: np.ndarray,
    labels: Sequence[str],
    dest: str | Path,
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    point_size: float | None = None,
) -> Path:
    """A 2-D scatter coloured by label (tissue) with a legend outside the axes."""
    xy = np.asarray(xy, dtype=np.float64)
    labels = np.asarray([str(x) for x in labels])
    ok = np.isfinite(xy).all(1)
    xy, labels = xy[ok], labels[ok]
    colors = label_colors(labels)
    s = point_size or float(np.clip(3000 / max(len(xy), 1), 1.0, 30.0))
    fig = Figure(figsize=(7.5, 6))
    ax = fig.add_subplot()
    _scatter(ax, xy, labels, colors, s)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.set_xticks([])
    ax.set_yticks([])
    _legend(fig, ax, len(colors))
    return _save(fig, dest)


def view_panels(
    coords: pd.DataFrame,
    dest: str | Path,
    *,
    title: str = "",
    silhouette: dict[str, float] | None = None,
) -> Path:
    """PC1/PC2, UMAP and t-SNE side by side (whichever ``coords`` has), silhouette in titles.

    ``coords`` is ``projection.ViewResult.coords`` (columns label, pc1, pc2, umap_x, ...).
    """
    panels = [("pca", "pc1", "pc2")] + [
        (m, f"{m}_x", f"{m}_y") for m in ("umap", "tsne") if f"{m}_x" in coords
    ]
    labels = coords["label"].astype(str).to_numpy()
    colors = label_colors(labels)
    fig = Figure(figsize=(5 * len(panels) + 2.5, 5))
    for i, (space, cx, cy) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        if cy not in coords:  # a 1-component PCA
            continue
        xy = coords[[cx, cy]].to_numpy(dtype=np.float64)
        ok = np.isfinite(xy).all(1)
        s = float(np.clip(3000 / max(ok.sum(), 1), 1.0, 30.0))
        _scatter(ax, xy[ok], labels[ok], colors, s)
        name = {"pca": "PCA (PC1/PC2)", "umap": "UMAP", "tsne": "t-SNE"}[space]
        if silhouette and space in silhouette and np.isfinite(silhouette[space]):
            name += f" — silhouette {silhouette[space]:.3f}"
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    _legend(fig, fig.axes[-1], len(colors))
    return _save(fig, dest)


def r2_ranking_figure(
    table: pd.DataFrame,
    *,
    highlight: Sequence[str] | None = None,
    top_labels: int = 20,
    title: str = "Per-gene R² (held-out donors)",
) -> Figure:
    """Left: R² against rank for all genes; right: the top genes by name (``symbol`` or id).

    ``table`` is a ``GeneR2Result.table()``; ``highlight`` (gene ids, e.g. the planted
    image-linked genes of the demo) are drawn in red in both panels.
    """
    t = table.sort_values("rank")
    r2 = t["r2"].to_numpy(dtype=np.float64)
    rank = t["rank"].to_numpy()
    hl = t["gene"].isin(set(highlight or ())).to_numpy()
    fig = Figure(figsize=(11, 5))
    ax, bx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax.plot(rank, r2, color="0.3", lw=1.2, label=f"all genes ({len(t):,})")
    ax.axhline(0, color="0.6", lw=0.8, ls="--")
    if highlight is not None:
        ax.scatter(
            rank[hl], r2[hl], s=12, color="tab:red", zorder=3, label=f"highlighted ({hl.sum()})"
        )
    ax.set(xlabel="rank", ylabel="R²", title=title)
    if len(t) > 200:
        ax.set_xscale("log")
    ax.legend(frameon=False, fontsize=8)
    k = min(top_labels, len(t))
    names = t["symbol"].where(t["symbol"].notna(), t["gene"]).astype(str).to_numpy()[:k]
    colors = np.where(hl[:k], "tab:red", "tab:blue")
    bx.barh(np.arange(k)[::-1], r2[:k], color=colors)
    bx.set_yticks(np.arange(k)[::-1], names, fontsize=7)
    bx.set(xlabel="R²", title=f"top {k} recoverable genes")
    return fig


def r2_ranking_plot(table: pd.DataFrame, dest: str | Path, **kw) -> Path:
    """:func:`r2_ranking_figure` saved as a PNG at ``dest``."""
    return _save(r2_ranking_figure(table, **kw), dest)


def r2_scatter_figure(
    x: np.ndarray,
    y: np.ndarray,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    highlight: np.ndarray | None = None,
    highlight_label: str = "significant",
) -> Figure:
    """Per-gene R² of two methods against each other with the y = x line (ridge vs cluster,
    off-the-shelf vs fine-tuned); ``highlight`` is a boolean mask drawn in red."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    fig = Figure(figsize=(6, 6))
    ax = fig.add_subplot()
    ok = np.isfinite(x) & np.isfinite(y)
    ax.scatter(x[ok], y[ok], s=5, color="0.55", linewidths=0, label="genes")
    if highlight is not None:
        h = ok & np.asarray(highlight, bool)
        ax.scatter(
            x[h], y[h], s=9, color="tab:red", linewidths=0, label=f"{highlight_label} ({h.sum()})"
        )
    lo = float(min(x[ok].min(initial=0), y[ok].min(initial=0)))
    hi = float(max(x[ok].max(initial=1), y[ok].max(initial=1)))
    ax.plot([lo, hi], [lo, hi], color="0.2", lw=0.8, ls="--")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(frameon=False, fontsize=8)
    return fig


def r2_scatter(x: np.ndarray, y: np.ndarray, dest: str | Path, **kw) -> Path:
    """:func:`r2_scatter_figure` saved as a PNG at ``dest``."""
    return _save(r2_scatter_figure(x, y, **kw), dest)


def silhouette_trend(
    table: pd.DataFrame,
    dest: str | Path,
    *,
    x: str = "checkpoint",
    hue: Sequence[str] = ("view", "space"),
    title: str = "Silhouette by tissue across training",
) -> Path:
    """Silhouette vs checkpoint (x values in table order of first appearance), a line per hue."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    xs = list(dict.fromkeys(table[x].astype(str)))
    for key, part in table.groupby(list(hue), sort=True):
        pos = [xs.index(v) for v in part[x].astype(str)]
        lab = " / ".join(map(str, key if isinstance(key, tuple) else (key,)))
        ax.plot(pos, part["silhouette"], marker="o", label=lab)
    ax.set_xticks(range(len(xs)), xs)
    ax.set(xlabel=x, ylabel="silhouette (by tissue)", title=title)
    ax.legend(frameon=False, fontsize=8)
    return _save(fig, dest)


def paired_accuracy_figure(
    accuracy: pd.DataFrame, names: tuple[str, str], *, title: str = ""
) -> Figure:
    """Per-repeat tissue accuracy of two feature sets, one line per repeat (a paired design)."""
    a, b = accuracy["accuracy_a"].to_numpy(), accuracy["accuracy_b"].to_numpy()
    fig = Figure(figsize=(4.5, 5))
    ax = fig.add_subplot()
    for i in range(len(a)):
        ax.plot([0, 1], [a[i], b[i]], color="0.7", lw=0.8)
    ax.scatter(np.zeros(len(a)), a, color="tab:blue", s=12, zorder=3)
    ax.scatter(np.ones(len(b)), b, color="tab:orange", s=12, zorder=3)
    ax.set_xticks([0, 1], list(names))
    ax.set_xlim(-0.4, 1.4)
    ax.set(ylabel="tissue accuracy (per repeat)", title=title or "Linear classifier, repeated CV")
    return fig


def paired_accuracy_plot(
    accuracy: pd.DataFrame, names: tuple[str, str], dest: str | Path, **kw
) -> Path:
    """:func:`paired_accuracy_figure` saved as a PNG at ``dest``."""
    return _save(paired_accuracy_figure(accuracy, names, **kw), dest)
