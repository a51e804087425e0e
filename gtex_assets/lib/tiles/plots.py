"""The tile-filter montage: example tiles that were kept and that each filter rejected."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from gtex_assets.core.atomic import atomic_path

MONTAGE_VERDICTS: tuple[str, ...] = ("kept", "small_file", "half_empty", "dirt")

_CAPTION = {
    "kept": lambda r: f"{int(r.jpeg_bytes) // 1000} kB",
    "small_file": lambda r: f"{int(r.jpeg_bytes) // 1000} kB < {int(r.size_threshold) // 1000} kB",
    "half_empty": lambda r: f"piece std {r.min_piece_std:.1f}",
    "dirt": lambda r: f"ch std {min(r.std_r, r.std_g, r.std_b):.1f}",
}


def pick_examples(
    filtered: pd.DataFrame,
    per_verdict: int = 6,
    seed: int = 0,
    verdicts: Sequence[str] = MONTAGE_VERDICTS,
    thresholds=None,
) -> pd.DataFrame:
    """Up to ``per_verdict`` tiles per verdict, seeded, round-robin over slides.

    With ``thresholds`` (a :class:`~gtex_assets.lib.tiles.quality.QualityThresholds`), a filter
    row that has too few tiles with its own verdict (an earlier filter caught them first) is
    filled with tiles that this filter flags too; ``example`` says which.
    """
    from gtex_assets.lib.tiles.quality import filter_flags

    rng = np.random.default_rng(seed)
    ok = filtered[filtered["status"] == "ok"]
    flags = filter_flags(ok, thresholds) if thresholds is not None and len(ok) else None
    parts = []
    for v in verdicts:
        own = ok[ok["verdict"] == v].assign(example="verdict")
        extra = ok.iloc[0:0]
        if flags is not None and v in flags.columns:
            extra = ok[flags[v] & (ok["verdict"] != v)].assign(example="flagged")
        for sub in (own, extra):
            if sub.empty:
                continue
            sub = sub.iloc[rng.permutation(len(sub))]
            sub = sub.assign(_rank=sub.groupby("tissue_sample_id").cumcount())
            sub = sub.sort_values("_rank", kind="mergesort").drop(columns="_rank")
            have = sum(len(p[p["verdict_row"] == v]) for p in parts if "verdict_row" in p)
            parts.append(sub.head(max(0, per_verdict - have)).assign(verdict_row=v))
    return (
        pd.concat(parts, ignore_index=True) if parts else filtered.iloc[0:0].assign(verdict_row="")
    )


def filter_montage(
    examples: pd.DataFrame,
    out_png: str | Path,
    counts: dict[str, int] | None = None,
    per_verdict: int = 6,
    thumb_px: int = 112,
    title: str = "Tile quality filters: examples per verdict",
    verdicts: Sequence[str] = MONTAGE_VERDICTS,
) -> Path:
    """A PNG grid: one row per verdict (with its tile count), example thumbnails with the
    measured value that decided (``[verdict]`` marks a tile this filter flags that an earlier
    filter dropped). Missing JPEGs show as blank cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    n_rows, n_cols = len(verdicts), max(1, per_verdict)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(1.5 * n_cols + 1.2, 1.65 * n_rows), squeeze=False, dpi=100
    )
    for i, v in enumerate(verdicts):
        row_col = "verdict_row" if "verdict_row" in examples.columns else "verdict"
        rows = examples[examples[row_col] == v].head(n_cols)
        label = v if counts is None else f"{v}\n{counts.get(v, 0):,} tiles"
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if j == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
            if j >= len(rows):
                if j == 0:
                    ax.text(0.5, 0.5, "none", ha="center", va="center", fontsize=8, color="grey")
                continue
            r = rows.iloc[j]
            try:
                with Image.open(r["path"]) as im:
                    im.draft("RGB", (thumb_px, thumb_px))  # JPEG DCT scaling: cheap thumbnail
                    thumb = np.asarray(im.convert("RGB").resize((thumb_px, thumb_px)))
            except OSError:
                continue
            ax.imshow(thumb)
            try:
                cap = _CAPTION[v](r)
            except (KeyError, AttributeError, TypeError, ValueError):
                cap = ""
            if r.get("example") == "flagged":  # flagged too, but an earlier filter dropped it
                cap = f"{cap} [{r['verdict']}]"
            ax.set_title(f"{r['tissue_sample_id']}\n{cap}", fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out_png
