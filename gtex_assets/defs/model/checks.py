"""Quality gate of the tissue classifier: a broken model never feeds the embeddings."""

import json

import dagster as dg
import pandas as pd
import polars as pl

from gtex_assets.core.errors import InputError
from gtex_assets.core.lake import Lake
from gtex_assets.defs import settings
from gtex_assets.defs.execution import GPU_POOL
from gtex_assets.defs.model.assets import MODEL_DIR
from gtex_assets.defs.model.configs import BeatsChanceConfig
from gtex_assets.lib.model.backbones import load_checkpoint
from gtex_assets.lib.model.results import CHECKPOINTS_TABLE, selected_checkpoint
from gtex_assets.lib.model.training import beats_chance, evaluate_checkpoint
from gtex_assets.resources import DataLakeResource


def _fail(description: str, **metadata) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=False, description=description, metadata=metadata)


def selected_classifier_beats_chance(
    lk: Lake, margin: float = 0.2, max_tiles: int = 5000, device: str = "auto", n_workers: int = 0
) -> dg.AssetCheckResult:
    """Load the selected checkpoint exactly as downstream stages will and re-evaluate it on its
    run's test tiles: passes when tile accuracy >= chance + margin, where chance is the best
    constant guess (max of 1/K and the majority class share)."""
    path = lk.table(CHECKPOINTS_TABLE)
    if not path.is_file():
        return _fail(f"{path} missing: tissue_classifier has not written its checkpoints")
    try:
        row = selected_checkpoint(pl.read_parquet(path), str(path))
        model, card = load_checkpoint(row["path"])
    except InputError as e:
        return _fail(str(e))
    except (OSError, ValueError, RuntimeError) as e:
        return _fail(f"selected checkpoint {row['path']} does not load: {e}")
    split = pd.read_parquet(lk.models / MODEL_DIR / row["run_id"] / "split.parquet")
    metrics, labels, _ = evaluate_checkpoint(
        model, split, card["classes"], int(card["input_size"]), device=device,
        max_tiles=max_tiles, num_workers=n_workers,
    )  # fmt: skip
    passed, chance, threshold = beats_chance(metrics["acc"], labels, len(card["classes"]), margin)
    return dg.AssetCheckResult(
        passed=passed,
        description=(
            f"{row['model_id']}: test accuracy {metrics['acc']:.3f} "
            f"{'>=' if passed else '<'} chance {chance:.3f} + margin {margin:.2f}"
        ),
        metadata={
            "model_id": str(row["model_id"]),
            "test_acc": round(metrics["acc"], 4),
            "slide_test_acc": round(metrics["slide_acc"], 4),
            "recorded_test_acc": round(float(row["test_acc"]), 4),
            "chance": round(chance, 4),
            "threshold": round(threshold, 4),
            "tiles_evaluated": int(metrics["n_tiles"]),
            "classes": json.dumps(card["classes"]),
        },
    )


@dg.asset_check(asset="tissue_classifier", blocking=True, pool=GPU_POOL)
def tissue_classifier_beats_chance(
    context: dg.AssetCheckExecutionContext, config: BeatsChanceConfig, lake: DataLakeResource
) -> dg.AssetCheckResult:
    """The selected checkpoint, reloaded from disk, classifies the held-out donors' tiles
    better than chance by a clear margin (default 0.2); blocking, so a broken or degenerate
    model (e.g. one predicting a single tissue) never feeds the embeddings."""
    config = settings.resolve(context, config, lake)
    return selected_classifier_beats_chance(
        lake.lake(), config.margin, config.max_tiles, config.device, config.n_workers
    )
