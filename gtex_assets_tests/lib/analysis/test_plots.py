"""The analysis plots show what they claim: ranked R², the named top genes, highlighted genes in
red, the y = x line, one line per CV repeat. Checked on the figures' artists and the PNG pixels."""

import numpy as np
import pandas as pd
from matplotlib.colors import to_rgba
from PIL import Image

from gtex_assets.lib.analysis.plots import (
    paired_accuracy_figure,
    paired_accuracy_plot,
    r2_ranking_figure,
    r2_ranking_plot,
    r2_scatter_figure,
)

RED = to_rgba("tab:red")


def _table():
    r2 = np.array([0.9, 0.1, 0.5, -0.05, 0.7, 0.3])
    t = pd.DataFrame({"gene": [f"g{i}" for i in range(6)], "symbol": list("ABCDEF"), "r2": r2})
    t["rank"] = t["r2"].rank(ascending=False).astype(int)
    return t


def test_ranking_figure_orders_names_and_highlights():
    fig = r2_ranking_figure(_table(), highlight=["g2"], top_labels=3, title="T")
    ax, bx = fig.axes
    line = ax.get_lines()[0]
    np.testing.assert_allclose(line.get_ydata(), [0.9, 0.7, 0.5, 0.3, 0.1, -0.05])
    assert ax.get_title() == "T"
    # top 3 named from the top down; the highlighted gene's bar is red, the others are not
    ticks = zip(bx.get_yticks(), (t.get_text() for t in bx.get_yticklabels()), strict=True)
    assert [name for _, name in sorted(ticks, reverse=True)] == ["A", "E", "C"]
    bars = sorted(bx.patches, key=lambda p: -p.get_y())  # top bar first
    np.testing.assert_allclose([b.get_width() for b in bars], [0.9, 0.7, 0.5])
    assert [b.get_facecolor() == RED for b in bars] == [False, False, True]
    assert ax.collections[0].get_offsets().shape == (1, 2)  # one highlighted point


def test_ranking_png_has_red_pixels_only_when_highlighting(tmp_path):
    def red_pixels(path) -> int:
        a = np.asarray(Image.open(path).convert("RGB")).astype(int)
        r, g, b = (int(255 * c) for c in RED[:3])
        return int((np.abs(a - [r, g, b]).sum(-1) < 30).sum())

    with_hl = r2_ranking_plot(_table(), tmp_path / "a.png", highlight=["g0"])
    without = r2_ranking_plot(_table(), tmp_path / "b.png")
    assert red_pixels(with_hl) > 50 and red_pixels(without) == 0


def test_scatter_figure_points_and_identity_line():
    x, y = np.array([0.1, 0.5, np.nan, 0.8]), np.array([0.2, 0.4, 0.3, 0.9])
    fig = r2_scatter_figure(
        x, y, xlabel="across", ylabel="within", highlight=np.array([0, 1, 0, 1], bool)
    )
    (ax,) = fig.axes
    pts, hl = ax.collections
    assert pts.get_offsets().shape == (3, 2) and hl.get_offsets().shape == (2, 2)  # NaN dropped
    (diag,) = ax.get_lines()
    xs, ys = diag.get_data()
    np.testing.assert_allclose(xs, ys)
    assert ax.get_xlabel() == "across" and ax.get_ylabel() == "within"


def test_paired_accuracy_one_line_per_repeat(tmp_path):
    acc = pd.DataFrame({"accuracy_a": [0.8, 0.82, 0.79], "accuracy_b": [0.9, 0.91, 0.93]})
    fig = paired_accuracy_figure(acc, ("ots", "ft"))
    (ax,) = fig.axes
    lines = ax.get_lines()
    assert len(lines) == 3
    np.testing.assert_allclose([ln.get_ydata()[1] for ln in lines], acc["accuracy_b"])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["ots", "ft"]
    with Image.open(paired_accuracy_plot(acc, ("ots", "ft"), tmp_path / "p.png")) as im:
        assert im.format == "PNG" and im.size[0] > 200
