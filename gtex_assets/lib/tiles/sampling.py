"""SPEC §4: the balanced tile sample, and the train/test split by donor.

* Quotas: each tissue aims at ``max(tissue_target, tiles_per_slide x n_slides)`` tiles
  (50 slides x 100 = 5,000), spread evenly over its slides; a slide with fewer kept tiles than
  its share gives the shortfall to the tissue's other slides (water-filling), so a tissue with
  few slides takes proportionally more per slide (Kidney - Medulla: 4 x 1,250).
* Draws: per slide with a generator seeded by (seed, sample id), over the slide's tiles in
  (y, x) order: the draw of one slide never depends on which other slides are present.
* Split: donors (subject ids), never slides, are assigned to train or test, so a donor's tiles
  are never on both sides. The assignment is stratified: every tissue with >= 2 donors gets
  test donors (about ``test_fraction`` of its slides) and keeps at least one train donor.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl

from gtex_assets.core.ids import subject_of

SAMPLE_COLUMNS: list[str] = [
    "tile_id", "tissue_sample_id", "subject_id", "tissue", "x", "y", "level", "tile_size",
    "path", "split",
]  # fmt: skip
DONOR_SPLIT_COLUMNS: list[str] = ["subject_id", "split", "n_slides", "n_tiles", "tissues"]
_INT = ("x", "y", "level", "tile_size", "n_slides", "n_tiles")
SAMPLE_SCHEMA = {c: pl.Int64 if c in _INT else pl.String for c in SAMPLE_COLUMNS}
DONOR_SPLIT_SCHEMA = {c: pl.Int64 if c in _INT else pl.String for c in DONOR_SPLIT_COLUMNS}


def _key(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def slide_quotas(
    available: Mapping[str, int],
    tiles_per_slide: int = 100,
    tissue_target: int = 5000,
    redistribute: bool = True,
) -> dict[str, int]:
    """Tiles to draw from each slide of ONE tissue, given its kept tiles per slide.

    Even shares of ``max(tissue_target, tiles_per_slide * n)``, capped by availability; with
    ``redistribute`` a capped slide's shortfall goes to the others (water-filling).
    """
    if tiles_per_slide < 0 or tissue_target < 0:
        raise ValueError("tiles_per_slide and tissue_target must be >= 0")
    n = len(available)
    if n == 0:
        return {}
    total = max(tissue_target, tiles_per_slide * n)
    if not redistribute:
        share = math.ceil(total / n)
        return {s: int(min(a, share)) for s, a in available.items()}
    quotas: dict[str, int] = {}
    remaining = total
    # Smallest first: each takes min(available, even share of what is left).
    order = sorted(available.items(), key=lambda kv: (kv[1], kv[0]))
    for i, (sid, avail) in enumerate(order):
        share = math.ceil(remaining / (n - i)) if remaining > 0 else 0
        quotas[sid] = int(min(avail, share))
        remaining -= quotas[sid]
    return quotas


def draw_slide_tiles(tiles: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """``n`` tiles of one slide (all if fewer), seeded by (seed, sample id), in (y, x) order."""
    tiles = tiles.sort_values(["y", "x"], kind="mergesort")
    if n >= len(tiles):
        return tiles
    sid = str(tiles["tissue_sample_id"].iloc[0])
    rng = np.random.default_rng([seed, _key(0, sid)])
    pick = np.sort(rng.choice(len(tiles), size=n, replace=False))
    return tiles.iloc[pick]


def balanced_sample(
    kept: pd.DataFrame,
    tiles_per_slide: int = 100,
    tissue_target: int = 5000,
    seed: int = 0,
    redistribute: bool = True,
    slides: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The balanced sample of kept tiles (``tissue_sample_id, tissue, x, y`` ... per row).

    ``slides`` (tissue_sample_id, tissue) lists every slide of the tissues, including slides
    without kept tiles, so that a tissue's target counts them (50 slides -> 5,000 even if some
    slides had no usable tile; their share goes to the others). Default: the slides in ``kept``.
    """
    if slides is None:
        slides = kept[["tissue_sample_id", "tissue"]]
    slides = slides.drop_duplicates("tissue_sample_id")
    by_slide = dict(tuple(kept.groupby("tissue_sample_id", sort=False)))
    parts = []
    for _tissue, t_slides in slides.groupby("tissue", sort=True):
        available = {
            s: len(by_slide[s]) if s in by_slide else 0 for s in t_slides["tissue_sample_id"]
        }
        quotas = slide_quotas(available, tiles_per_slide, tissue_target, redistribute)
        for sid in sorted(available):
            if quotas[sid] > 0:
                parts.append(
                    draw_slide_tiles(kept[kept["tissue_sample_id"] == sid], quotas[sid], seed)
                )
    if not parts:
        return kept.iloc[0:0].copy()
    out = pd.concat(parts, ignore_index=True)
    return out.sort_values(["tissue", "tissue_sample_id", "y", "x"], kind="mergesort").reset_index(
        drop=True
    )


def donor_split(
    slides: pd.DataFrame,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> pd.DataFrame:
    """Train/test by donor, stratified by tissue. ``slides``: tissue_sample_id, subject_id, tissue.

    Tissues are served fewest-donors first; each takes test donors (seeded order, preferring
    donors whose other slides sit in tissues that still need test slides, to limit overshoot)
    until about ``test_fraction`` of its slides are test, never its last train donor. Tissues
    with a single donor stay train. Returns one row per donor: subject_id, split.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    df = slides[["tissue_sample_id", "subject_id", "tissue"]].drop_duplicates("tissue_sample_id")
    donors = sorted(df["subject_id"].unique())
    test: set[str] = set()
    if test_fraction > 0 and len(donors) > 1:
        tissues_of = df.groupby("subject_id")["tissue"].apply(list).to_dict()
        slides_by_tissue = df.groupby("tissue")["subject_id"].apply(list).to_dict()
        donors_by_tissue = {t: sorted(set(s)) for t, s in slides_by_tissue.items()}
        n_slides = {t: len(s) for t, s in slides_by_tissue.items()}
        target = {
            t: (
                min(max(1, round(test_fraction * n_slides[t])), n_slides[t] - 1)
                if len(d) > 1
                else 0
            )
            for t, d in donors_by_tissue.items()
        }
        test_slides = dict.fromkeys(n_slides, 0)
        train_donors = {t: len(d) for t, d in donors_by_tissue.items()}

        def allowed(donor: str) -> bool:
            # Moving the donor must leave every one of its tissues a train donor.
            return all(train_donors[t] > 1 for t in set(tissues_of[donor]))

        def overshoot(donor: str) -> int:
            return sum(1 for t in tissues_of[donor] if test_slides[t] >= target[t])

        for t in sorted(donors_by_tissue, key=lambda t: (len(donors_by_tissue[t]), t)):
            while test_slides[t] < target[t]:
                cands = [d for d in donors_by_tissue[t] if d not in test and allowed(d)]
                if not cands:
                    break
                d = min(cands, key=lambda d: (overshoot(d), _key(seed, d)))
                test.add(d)
                for tt in tissues_of[d]:
                    test_slides[tt] += 1
                for tt in set(tissues_of[d]):
                    train_donors[tt] -= 1
    return pd.DataFrame(
        {"subject_id": donors, "split": ["test" if d in test else "train" for d in donors]}
    )


def assign_split(sample: pd.DataFrame, split: pd.DataFrame) -> pd.DataFrame:
    """Add each tile's donor's split; raises if a donor is missing from the split table."""
    out = sample.merge(split[["subject_id", "split"]], on="subject_id", how="left", validate="m:1")
    missing = out.loc[out["split"].isna(), "subject_id"].unique()
    if len(missing):
        raise ValueError(f"donors without a train/test assignment: {sorted(missing)[:10]}")
    return out


def donors_on_both_sides(sample: pd.DataFrame) -> list[str]:
    """Subject ids whose tiles appear in both train and test (must be empty)."""
    sides = sample.groupby("subject_id")["split"].nunique()
    return sorted(sides[sides > 1].index)


def donor_split_table(
    split: pd.DataFrame, slides: pd.DataFrame, sample: pd.DataFrame
) -> pd.DataFrame:
    """The recorded split: per donor its side, slides, sampled tiles and tissues."""
    per_slides = slides.groupby("subject_id").agg(
        n_slides=("tissue_sample_id", "nunique"),
        tissues=("tissue", lambda s: "; ".join(sorted(set(s)))),
    )
    per_tiles = sample.groupby("subject_id").size().rename("n_tiles")
    out = split.set_index("subject_id").join(per_slides).join(per_tiles)
    out["n_tiles"] = out["n_tiles"].fillna(0).astype("int64")
    out["n_slides"] = out["n_slides"].fillna(0).astype("int64")
    return out.reset_index()[DONOR_SPLIT_COLUMNS]


def read_filtered(partition_dir: str | Path, selected: Sequence[str] | None = None) -> pd.DataFrame:
    """The per-slide ``filtered_tiles`` files as one frame, read with polars ``scan_parquet``
    (the selection pushed down, so unselected slides' rows are never materialised)."""
    files = sorted(Path(partition_dir).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"no filtered tiles under {partition_dir}: materialise slide_tiles and filtered_tiles first"
        )
    lf = pl.scan_parquet(files, missing_columns="insert", extra_columns="ignore")
    if selected is not None:
        lf = lf.filter(pl.col("tissue_sample_id").is_in(list(selected)))
    return lf.collect().to_pandas()


@dataclass(frozen=True)
class SampleResult:
    sample: pd.DataFrame  # SAMPLE_COLUMNS
    split_table: pd.DataFrame  # DONOR_SPLIT_COLUMNS
    per_tissue: pd.DataFrame  # tissue, train, test, tiles, slides, target
    left_out: list[str]  # tiled slides no longer selected


def build_sample(
    filtered: pd.DataFrame,
    selected: pd.DataFrame | None,
    *,
    tiles_per_slide: int = 100,
    tissue_target: int = 5000,
    seed: int = 0,
    redistribute: bool = True,
    test_fraction: float = 0.2,
) -> SampleResult:
    """SPEC §4 end to end: donor split over slides with kept tiles (other donors go to train so
    the split covers every donor), the balanced draw, the split per tile and the split table.

    ``selected`` (tissue_sample_id, subject_id, tissue): only these slides are used (a slide
    tiled earlier but no longer selected is left out); None = every filtered slide.
    """
    left_out: list[str] = []
    subject: dict[str, str] = {}
    if selected is not None:
        left_out = sorted(set(filtered["tissue_sample_id"]) - set(selected["tissue_sample_id"]))
        filtered = filtered[filtered["tissue_sample_id"].isin(selected["tissue_sample_id"])]
        subject = dict(zip(selected["tissue_sample_id"], selected["subject_id"], strict=True))
    filtered = filtered.assign(
        subject_id=[subject.get(s) or subject_of(s) for s in filtered["tissue_sample_id"]]
    )
    slides = filtered.drop_duplicates("tissue_sample_id")[
        ["tissue_sample_id", "subject_id", "tissue"]
    ]
    kept = filtered[filtered["verdict"] == "kept"]
    with_tiles = slides[slides["tissue_sample_id"].isin(kept["tissue_sample_id"])]
    split = donor_split(with_tiles, test_fraction=test_fraction, seed=seed)
    others = sorted(set(slides["subject_id"]) - set(split["subject_id"]))
    split = pd.concat(
        [split, pd.DataFrame({"subject_id": others, "split": "train"})], ignore_index=True
    )
    sample = balanced_sample(
        kept, tiles_per_slide=tiles_per_slide, tissue_target=tissue_target, seed=seed,
        redistribute=redistribute, slides=slides,
    )  # fmt: skip
    sample = assign_split(sample, split)
    sample["tile_id"] = (
        sample["tissue_sample_id"] + "_" + sample["x"].astype(str) + "_" + sample["y"].astype(str)
    )
    sample = sample[SAMPLE_COLUMNS]
    both = donors_on_both_sides(sample)
    if both:  # impossible by construction; never write a leaky split
        raise ValueError(f"donors on both sides of the split: {both[:10]}")
    per_tissue = (
        sample.groupby(["tissue", "split"]).size().unstack(fill_value=0)
        .reindex(columns=["train", "test"], fill_value=0)
    )  # fmt: skip
    per_tissue["tiles"] = per_tissue.sum(axis=1)
    per_tissue["slides"] = sample.groupby("tissue")["tissue_sample_id"].nunique()
    per_tissue["target"] = [
        max(tissue_target, tiles_per_slide * int((slides["tissue"] == t).sum()))
        for t in per_tissue.index
    ]
    return SampleResult(
        sample=sample,
        split_table=donor_split_table(split, slides, sample),
        per_tissue=per_tissue.reset_index(),
        left_out=left_out,
    )
