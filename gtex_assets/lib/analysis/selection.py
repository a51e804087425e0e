"""The analysis stage's decisions, each testable on its own: which models there are and which
one is reported, how many folds the donors allow, which tissues a within-tissue fit must leave out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from gtex_assets.core.errors import InputError
from gtex_assets.lib.analysis.regression import donor_folds, strata_too_small

OFF_THE_SHELF = "off_the_shelf"
CHECKPOINT = "checkpoint"


def model_table(
    model_ids: list[str], cards: pl.DataFrame | None, checkpoints: pl.DataFrame | None
) -> pl.DataFrame:
    """model_id, kind, epoch, selected for every model of the slide table.

    ``cards``: the ``embedding_models`` table (may be missing or lack columns). A model without
    a card is a checkpoint when it has an epoch, else off the shelf. When no card marks a model
    selected, ``classifier_checkpoints``' selected rows decide.
    """
    base = pl.DataFrame({"model_id": model_ids}, schema={"model_id": pl.String})
    m = base
    if cards is not None and "model_id" in cards.columns:
        keep = [c for c in ("model_id", "kind", "epoch", "selected") if c in cards.columns]
        m = base.join(
            cards.select(keep).unique("model_id", keep="first"), on="model_id", how="left"
        )
    for col, dtype in (("kind", pl.String), ("epoch", pl.Int64), ("selected", pl.Boolean)):
        m = m.with_columns(
            pl.col(col).cast(dtype) if col in m.columns else pl.lit(None, dtype).alias(col)
        )
    m = m.with_columns(
        pl.col("kind").fill_null(
            pl.when(pl.col("epoch").is_not_null())
            .then(pl.lit(CHECKPOINT))
            .otherwise(pl.lit(OFF_THE_SHELF))
        ),
        pl.col("selected").fill_null(False),
    )
    has_sel = checkpoints is not None and {"selected", "model_id"} <= set(checkpoints.columns)
    if not m["selected"].any() and has_sel:
        sel = checkpoints.filter(pl.col("selected").fill_null(False))["model_id"].cast(pl.String)
        m = m.with_columns(pl.col("model_id").is_in(sel.to_list()).alias("selected"))
    return m.select("model_id", "kind", "epoch", "selected")


@dataclass(frozen=True)
class ModelChoice:
    selected: str  # the fine-tuned (or only) model
    off_the_shelf: str | None
    how: str  # why this one


def pick_models(models: pl.DataFrame, selected: str = "", off_the_shelf: str = "") -> ModelChoice:
    """The selected model and the off-the-shelf one. An explicit id wins; else the checkpoint
    marked selected, else the latest checkpoint, else the off-the-shelf model."""
    ids = models["model_id"].to_list()
    for name, val in (("selected_model_id", selected), ("off_the_shelf_model_id", off_the_shelf)):
        if val and val not in ids:
            raise InputError(
                "slide_embeddings", f"{name} {val!r} is not embedded", f"have {sorted(ids)}"
            )
    ots = sorted(models.filter(pl.col("kind") == OFF_THE_SHELF)["model_id"].to_list())
    ots_id = off_the_shelf or (ots[0] if ots else None)
    if selected:
        return ModelChoice(selected, ots_id, "config")
    ck = models.filter(pl.col("kind") == CHECKPOINT)
    sel = ck.filter(pl.col("selected"))
    if sel.height:
        return ModelChoice(sel["model_id"][0], ots_id, "selected checkpoint")
    if ck.height:  # no selection recorded: the last epoch
        last = ck.sort("epoch", nulls_last=False)["model_id"][-1]
        return ModelChoice(last, ots_id, "latest checkpoint (none marked selected)")
    if ots_id is None:
        raise InputError("slide_embeddings", "has no models", "materialise slide_embeddings")
    return ModelChoice(ots_id, ots_id, "off-the-shelf (no fine-tuned checkpoint embedded)")


def model_label(models: pl.DataFrame, model_id: str) -> tuple[str, int | None]:
    """('epoch N', N) for a checkpoint with an epoch, ('off-the-shelf', None) otherwise."""
    r = models.filter(pl.col("model_id") == model_id)
    if r.height == 0 or r["kind"][0] == OFF_THE_SHELF or r["epoch"][0] is None:
        return "off-the-shelf", None
    return f"epoch {int(r['epoch'][0])}", int(r["epoch"][0])


def best_model(sum_positive_r2: dict[str, float]) -> str:
    """The model explaining the most held-out variance, Σ over genes of max(R², 0): the mean
    over all genes would be decided by the many unpredictable genes (their R² is noise).
    Ties go to the first model in order."""
    if not sum_positive_r2:
        raise ValueError("no models to choose from")
    return max(sum_positive_r2, key=lambda m: sum_positive_r2[m])


@dataclass(frozen=True)
class FoldPlan:
    n_splits: int
    inner_splits: int
    n_donors: int
    lowered: bool  # fewer folds than asked for
    folds: np.ndarray  # outer fold id per sample


def fold_plan(
    groups: np.ndarray,
    n_splits: int,
    inner_splits: int,
    random_state: int,
    strata: np.ndarray | None = None,
) -> FoldPlan:
    """Outer/inner fold counts lowered to what the donors allow, and the outer donor folds
    (stratified by tissue when ``strata`` is given). Needs >= 4 donors: with 3, an inner
    training fold holds one donor and nothing is left within a tissue."""
    n_donors = len(np.unique(groups))
    if n_donors < 4:
        raise InputError(
            "slide_embeddings × gene_log_tpm",
            f"{n_donors} donor(s) have both a slide and expression",
            "donor-grouped nested CV needs >= 4",
        )
    k = max(2, min(n_splits, n_donors))
    outer = donor_folds(groups, k, random_state, strata)
    min_train = min(len(np.unique(groups[outer != f])) for f in range(k))
    # as many inner folds as allowed (<= training donors): keeps >= 2 donors per inner fit
    inner = max(2, min(inner_splits, min_train))
    return FoldPlan(k, inner, n_donors, k != n_splits or inner != inner_splits, outer)


def tissues_to_keep(subjects: np.ndarray, tissues: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(row mask, tissues left out): tissues with < 3 donors cannot have a training donor in
    every outer and inner split of a within-tissue fit (stratified donor folds guarantee it
    from 3)."""
    small = strata_too_small(np.asarray(subjects).astype(str), np.asarray(tissues).astype(str))
    keep = ~np.isin(np.asarray(tissues).astype(str), small)
    return keep, list(small)
