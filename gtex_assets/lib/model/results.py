"""What a training run leaves behind in the cross-run tables, and which checkpoint is selected.

``classifier_checkpoints.selected`` is the one source of truth for the model downstream stages
use: exactly one row is selected over all runs (the latest run's selected epoch).
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd
import polars as pl

from gtex_assets.core.errors import InputError
from gtex_assets.lib.model.training import TrainResult, predictions_confusion, predictions_path

EPOCHS_TABLE = "classifier_epochs"
CHECKPOINTS_TABLE = "classifier_checkpoints"
CONFUSION_TABLE = "classifier_confusion"
SWEEP_TABLE = "classifier_sweep"
CONFUSION_COLUMNS = ("run_id", "model_id", "epoch", "level", "true_tissue", "pred_tissue", "count")


def merge_run_rows(
    old: pl.DataFrame | None, new: pl.DataFrame, run_id: str, *, one_selected: bool = False
) -> pl.DataFrame:
    """Replace ``run_id``'s rows of a cross-run table with ``new`` (re-materialising a run is
    idempotent). ``one_selected``: older runs' rows lose ``selected`` so one row stays selected."""
    if old is None or old.is_empty():
        return new
    kept = old.filter(pl.col("run_id") != run_id)
    if one_selected:
        kept = kept.with_columns(selected=pl.lit(False))
    return pl.concat([kept, new], how="diagonal_relaxed")


def confusion_table(result: TrainResult) -> pl.DataFrame:
    """Tile- and slide-level test confusion of every kept checkpoint of the run."""
    parts = []
    for ck in result.checkpoints.itertuples():
        pred = pd.read_parquet(predictions_path(result.run_dir, int(ck.epoch)))
        conf = pl.from_pandas(predictions_confusion(pred, result.classes))
        parts.append(
            conf.with_columns(
                run_id=pl.lit(result.run_id), model_id=pl.lit(ck.model_id), epoch=int(ck.epoch)
            )
        )
    return pl.concat(parts).select(CONFUSION_COLUMNS)


def run_tables(result: TrainResult, previous: Mapping[str, pl.DataFrame | None]) -> dict:
    """The classifier tables after this run: ``previous`` (name -> the table as stored, or None)
    with this run's rows replaced."""
    new = {
        EPOCHS_TABLE: pl.from_pandas(result.history),
        CHECKPOINTS_TABLE: pl.from_pandas(result.checkpoints),
        CONFUSION_TABLE: confusion_table(result),
    }
    return {
        name: merge_run_rows(
            previous.get(name), df, result.run_id, one_selected=name == CHECKPOINTS_TABLE
        )
        for name, df in new.items()
    }


def selected_checkpoint(checkpoints: pl.DataFrame, source: str = CHECKPOINTS_TABLE) -> dict:
    """The selected checkpoint's row; an :class:`InputError` unless exactly one is selected."""
    sel = checkpoints.filter(pl.col("selected"))
    if sel.height != 1:
        raise InputError(
            source,
            f"{sel.height} selected checkpoints (need exactly 1)",
            "re-materialise tissue_classifier",
        )
    return sel.row(0, named=True)


def selected_epoch_metrics(result: TrainResult) -> dict:
    """The selected epoch's row of the run's history (test/train accuracy, loss ...)."""
    epoch = int(result.selected["epoch"])
    return pl.from_pandas(result.history).filter(pl.col("epoch") == epoch).row(0, named=True)


SUMMARY_METRICS = (
    "test_acc",
    "slide_test_acc",
    "test_balanced_acc",
    "test_macro_f1",
    "test_loss",
    "train_acc",
    "train_loss",
)


def run_summary(result: TrainResult, seconds: float) -> dict:
    """The numbers the asset reports: the run, its selected checkpoint and that epoch's metrics."""
    sel, row = result.selected, selected_epoch_metrics(result)
    return {
        "run_id": result.run_id,
        "model_id": str(sel["model_id"]),
        "backbone": result.config.backbone,
        "weights_source": result.weights_source,
        "device": result.device,
        "selected_checkpoint": str(sel["path"]),
        "selected_epoch": int(sel["epoch"]),
        "epochs": result.config.epochs,
        "resumed_after_epoch": result.resumed_from,
        "num_classes": len(result.classes),
        "train_tiles": len(result.split.train_index),
        "test_tiles": len(result.split.test_index),
        **{m: round(float(row[m]), 4) for m in SUMMARY_METRICS},
        "seconds": round(seconds, 2),
    }


def sweep_summary(sweep: pl.DataFrame) -> pl.DataFrame:
    """Last epoch of each (backbone, lr) sweep run: the comparison users read."""
    return (
        sweep.sort("epoch")
        .group_by(["backbone", "lr"], maintain_order=True)
        .last()
        .select("backbone", "lr", "test_acc", "slide_test_acc", "test_loss")
        .sort("backbone", "lr")
    )
