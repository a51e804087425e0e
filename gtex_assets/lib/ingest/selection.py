"""SPEC §1: choose N slides per tissue, preferring samples that have RNA-seq."""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence

import polars as pl


def _rank_key(seed: int, sample_id: str) -> str:
    # A seeded hash instead of id order: id order would favour the oldest donors.
    return hashlib.sha256(f"{seed}:{sample_id}".encode()).hexdigest()


def select_slides(
    annotations: pl.DataFrame,
    rna_sample_ids: Collection[str],
    *,
    slides_per_tissue: int = 50,
    tissues: Sequence[str] | None = None,
    prefer_rna: bool = True,
    seed: int = 0,
) -> pl.DataFrame:
    """Pick ``slides_per_tissue`` slides per tissue; tissues with fewer take all of theirs.

    Samples with expression come first (when ``prefer_rna``), then a seeded hash order, so the
    choice is deterministic and stable when unrelated rows are added to the CSV.
    Returns the chosen annotation rows plus ``has_rna`` and ``rank_in_tissue``.
    """
    if slides_per_tissue < 1:
        raise ValueError(f"slides_per_tissue must be >= 1, got {slides_per_tissue}")
    df = annotations
    if tissues:
        known = set(df["tissue"].to_list())
        unknown = sorted(set(tissues) - known)
        if unknown:
            raise ValueError(
                f"tissue(s) {unknown} not in the histology annotations; known: {sorted(known)}"
            )
        df = df.filter(pl.col("tissue").is_in(list(tissues)))
    df = df.with_columns(
        pl.col("tissue_sample_id").is_in(list(set(rna_sample_ids))).alias("has_rna"),
        pl.col("tissue_sample_id")
        .map_elements(lambda s: _rank_key(seed, s), return_dtype=pl.String)
        .alias("_key"),
    )
    by, descending = ["tissue", "_key"], [False, False]
    if prefer_rna:
        by.insert(1, "has_rna")
        descending.insert(1, True)
    df = df.sort(by, descending=descending, maintain_order=True)
    df = df.with_columns(
        pl.int_range(pl.len()).over("tissue").cast(pl.Int64).alias("rank_in_tissue")
    )
    return (
        df.filter(pl.col("rank_in_tissue") < slides_per_tissue)
        .drop("_key")
        .sort(["tissue", "rank_in_tissue"])
    )
