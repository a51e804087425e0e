"""SPEC §1: choose N slides per tissue, preferring samples that have RNA-seq."""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence

import pandas as pd


def _rank_key(seed: int, sample_id: str) -> str:
    # A seeded hash instead of id order: id order would favour the oldest donors.
    return hashlib.sha256(f"{seed}:{sample_id}".encode()).hexdigest()


def select_slides(
    annotations: pd.DataFrame,
    rna_sample_ids: Collection[str],
    *,
    slides_per_tissue: int = 50,
    tissues: Sequence[str] | None = None,
    prefer_rna: bool = True,
    seed: int = 0,
) -> pd.DataFrame:
    """Pick ``slides_per_tissue`` slides per tissue; tissues with fewer take all of theirs.

    Samples with expression come first (when ``prefer_rna``), then a seeded hash order, so the
    choice is deterministic and stable when unrelated rows are added to the CSV.
    Returns the chosen annotation rows plus ``has_rna`` and ``rank_in_tissue``.
    """
    if slides_per_tissue < 1:
        raise ValueError(f"slides_per_tissue must be >= 1, got {slides_per_tissue}")
    df = annotations.copy()
    if tissues:
        known = set(df["tissue"])
        unknown = sorted(set(tissues) - known)
        if unknown:
            raise ValueError(
                f"tissue(s) {unknown} not in the histology annotations; known: {sorted(known)}"
            )
        df = df[df["tissue"].isin(list(tissues))]
    rna = set(rna_sample_ids)
    df["has_rna"] = df["tissue_sample_id"].isin(rna)
    df["_key"] = [_rank_key(seed, s) for s in df["tissue_sample_id"]]
    sort_cols, ascending = ["tissue", "_key"], [True, True]
    if prefer_rna:
        sort_cols.insert(1, "has_rna")
        ascending.insert(1, False)
    df = df.sort_values(sort_cols, ascending=ascending, kind="mergesort")
    df["rank_in_tissue"] = df.groupby("tissue").cumcount()
    out = df[df["rank_in_tissue"] < slides_per_tissue].drop(columns="_key")
    return out.sort_values(["tissue", "rank_in_tissue"]).reset_index(drop=True)
