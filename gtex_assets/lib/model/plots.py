"""Plots of the tissue classifier (SPEC §6): confusion matrices with tissue names, learning
curves, and the learning-rate / backbone sweep. PNGs written atomically; matplotlib is used
through the object API on an Agg canvas (no global pyplot state, safe in worker processes)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from gtex_assets.core.atomic import atomic_path


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path


def confusion_matrix_array(
    conf: pd.DataFrame, classes: Sequence[str], level: str = "tile"
) -> np.ndarray:
    """(K, K) counts (rows = true tissue, columns = predicted) from the long table."""
    sub = conf[conf["level"] == level]
    cm = (
        sub.pivot_table(index="true_tissue", columns="pred_tissue", values="count", aggfunc="sum")
        .reindex(index=list(classes), columns=list(classes))
        .fillna(0)
    )
    return cm.to_numpy(dtype=np.int64)


def plot_confusion(
    conf: pd.DataFrame,
    classes: Sequence[str],
    path: str | Path,
    title: str = "Tissue classifier: test confusion",
    levels: Sequence[str] = ("tile", "slide"),
) -> Path:
    """One panel per level (tile, slide): colour = share of the true tissue's items (row
    normalised), numbers = counts; tissue names on both axes."""
    levels = [lv for lv in levels if (conf["level"] == lv).any()]
    k = len(classes)
    side = max(4.0, 0.32 * k + 2.5)
    fig = _figure(side * len(levels) + 1.5, side)
    for i, level in enumerate(levels):
        ax = fig.add_subplot(1, len(levels), i + 1)
        cm = confusion_matrix_array(conf, classes, level)
        rows = cm.sum(1, keepdims=True)
        share = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
        im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(k), labels=list(classes), rotation=90, fontsize=7)
        # Tissue names on the first panel's y axis only; the panels share rows.
        ax.set_yticks(range(k), labels=list(classes) if i == 0 else [], fontsize=7)
        ax.set_xlabel("predicted tissue")
        if i == 0:
            ax.set_ylabel("true tissue")
        acc = np.trace(cm) / max(cm.sum(), 1)
        ax.set_title(f"{level} level: accuracy {acc:.1%} (n={cm.sum()})", fontsize=9)
        if k <= 20:
            for (r, c), v in np.ndenumerate(cm):
                if v:
                    ax.text(c, r, str(v), ha="center", va="center", fontsize=6,
                            color="white" if share[r, c] > 0.5 else "black")  # fmt: skip
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true tissue")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_learning_curves(
    history: pd.DataFrame, path: str | Path, title: str = "Tissue classifier: learning curves"
) -> Path:
    """Loss (train/test) and accuracy (train, test tile, test slide) per epoch."""
    fig = _figure(10, 3.8)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    e = history["epoch"]
    ax1.plot(e, history["train_loss"], "o-", label="train")
    ax1.plot(e, history["test_loss"], "s-", label="test")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy loss")
    ax1.legend()
    ax2.plot(e, history["train_acc"], "o-", label="train (tile)")
    ax2.plot(e, history["test_acc"], "s-", label="test (tile)")
    ax2.plot(e, history["slide_test_acc"], "^-", label="test (slide)")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy")
    ax2.set_ylim(0, 1.02)
    ax2.legend()
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_sweep(sweep: pd.DataFrame, path: str | Path, metric: str = "test_acc") -> Path:
    """``metric`` per epoch, one line per (backbone, lr)."""
    fig = _figure(6.5, 4)
    ax = fig.add_subplot(1, 1, 1)
    for (bb, lr), g in sweep.groupby(["backbone", "lr"], sort=True):
        ax.plot(g["epoch"], g[metric], "o-", label=f"{bb} lr={lr:g}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"Sweep: {metric} per epoch", fontsize=10)
    return _save(fig, path)
