"""SPEC §5 plots of the expression filters (matplotlib, Agg backend; PNG files).

* per-gene max logTPM histogram with the threshold line,
* per-gene std histogram (all genes, and genes that pass the expression filter) with its line,
* the distribution of all logTPM values before vs after filtering.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_DPI = 110


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI, format="png")
    plt.close(fig)
    return path


def plot_max_log_tpm(max_log: np.ndarray, threshold: float, path: Path) -> Path:
    """Histogram of each gene's max logTPM over samples, threshold line, counts either side."""
    max_log = np.asarray(max_log, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(7, 4))
    hi = max(float(max_log.max(initial=0.0)), threshold) + 0.5
    ax.hist(max_log, bins=np.arange(0, hi + 0.25, 0.25), color="#4C72B0")
    ax.axvline(threshold, color="#C44E52", lw=2, ls="--")
    above = int((max_log > threshold).sum())
    ax.text(
        threshold,
        ax.get_ylim()[1] * 0.95,
        f"  > {threshold:g}: {above:,} genes\n  <= {threshold:g}: {len(max_log) - above:,}",
        va="top",
        color="#C44E52",
    )
    ax.set_xlabel("max log2(1+TPM) over samples")
    ax.set_ylabel("genes")
    ax.set_title(f"Per-gene max logTPM ({len(max_log):,} genes)")
    return _save(fig, path)


def plot_std_log_tpm(std: np.ndarray, expressed: np.ndarray, threshold: float, path: Path) -> Path:
    """Histogram of each gene's logTPM std: all genes, and those passing the expression filter."""
    std = np.asarray(std, dtype=np.float64)
    expressed = np.asarray(expressed, dtype=bool)
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(0, max(float(std.max(initial=0.0)), threshold) + 0.1, 80)
    ax.hist(std, bins=bins, color="#BBBBBB", label=f"all genes ({len(std):,})")
    ax.hist(
        std[expressed],
        bins=bins,
        color="#4C72B0",
        alpha=0.8,
        label=f"max logTPM filter passed ({int(expressed.sum()):,})",
    )
    ax.axvline(threshold, color="#C44E52", lw=2, ls="--", label=f"std threshold {threshold:g}")
    ax.set_yscale("log")
    ax.set_xlabel("std of log2(1+TPM) over samples")
    ax.set_ylabel("genes (log scale)")
    ax.set_title("Per-gene logTPM standard deviation")
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def plot_value_distribution(
    edges: np.ndarray,
    hist_before: np.ndarray,
    hist_after: np.ndarray,
    n_before: tuple[int, int],
    n_after: tuple[int, int],
    path: Path,
) -> Path:
    """All logTPM values before vs after filtering, as densities (bin 0 of the histograms =
    exact zeros, shown as the zero fraction in the legend; then one bin per ``edges`` step)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for hist, (g, s), color, label in (
        (hist_before, n_before, "#BBBBBB", "before"),
        (hist_after, n_after, "#4C72B0", "after"),
    ):
        total = max(int(hist.sum()), 1)
        width = np.diff(edges)
        density = hist[1:] / total / width
        zeros = hist[0] / total
        ax.stairs(
            density,
            edges,
            fill=label == "before",
            color=color,
            lw=2,
            label=f"{label}: {g:,} genes x {s:,} samples, {zeros:.0%} zeros",
        )
    ax.set_yscale("log")
    ax.set_xlabel("log2(1+TPM)  (values > 0)")
    ax.set_ylabel("density of all values")
    ax.set_title("logTPM values before vs after gene filtering")
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


PLOT_FILES = {
    "max_log_tpm": "expression_max_log_tpm.png",
    "std_log_tpm": "expression_std_log_tpm.png",
    "values_before_after": "expression_values_before_after.png",
}


class PlotWriters(dict):
    """``dest -> writer(tmp_path)`` for ``write_outputs`` (written with the tables, atomically);
    ``paths`` names each plot's final file."""

    def __init__(self, writers: dict, paths: dict[str, Path]) -> None:
        super().__init__(writers)
        self.paths = paths


def plot_writers(result, plots_dir: Path) -> PlotWriters:
    """The three SPEC §5 plots of an ``ExpressionResult``, as writers into ``plots_dir``."""
    from gtex_assets.lib.expression.log_tpm import HIST_EDGES

    g, p = result.genes, result.params
    max_log, std_log = g["max_log_tpm"].to_numpy(), g["std_log_tpm"].to_numpy()
    expressed = max_log > p.min_max_log_tpm
    shapes = ((g.height, len(result.sample_ids)), (result.n_kept, len(result.sample_ids)))
    paths = {key: Path(plots_dir) / name for key, name in PLOT_FILES.items()}
    writers = {
        paths["max_log_tpm"]: lambda t: plot_max_log_tpm(max_log, p.min_max_log_tpm, t),
        paths["std_log_tpm"]: lambda t: plot_std_log_tpm(std_log, expressed, p.min_std, t),
        paths["values_before_after"]: lambda t: plot_value_distribution(
            HIST_EDGES, result.hist_before, result.hist_after, *shapes, t
        ),
    }
    return PlotWriters(writers, paths)
