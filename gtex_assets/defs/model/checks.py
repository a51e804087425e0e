"""Quality gate of the tissue classifier: a broken model never feeds the embeddings."""

import json

import dagster as dg
import pandas as pd
from pydantic import Field

from gtex_assets.core.lake import Lake
from gtex_assets.defs.execution import GPU_POOL
from gtex_assets.defs.model.assets import MODEL_DIR, tissue_classifier
from gtex_assets.lib.model.backbones import load_checkpoint
from gtex_assets.lib.model.training import beats_chance, evaluate_checkpoint
from gtex_assets.resources import DataLakeResource


class BeatsChanceConfig(dg.Config):
    margin: float = Field(
        default=0.2, description="Required test accuracy above chance (best constant guess)"
    )
    max_tiles: int = Field(
        default=5000, description="Evaluate at most this many test tiles (0 = all)"
    )
    device: str = Field(default="auto", description="auto (CUDA, MPS, CPU), cpu, cuda[:N], mps")
    num_workers: int = Field(default=2, description="DataLoader workers decoding JPEGs")


def _fail(description: str, **metadata) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=False, description=description, metadata=metadata)


def selected_classifier_beats_chance(
    lk: Lake, margin: float = 0.2, max_tiles: int = 5000, device: str = "auto", num_workers: int = 0
) -> dg.AssetCheckResult:
    """Load the selected checkpoint exactly as downstream stages will and re-evaluate it on its
    run's test tiles: passes when tile accuracy >= chance + margin, where chance is the best
    constant guess (max of 1/K and the majority class share)."""
    path = lk.table("classifier_checkpoints")
    if not path.is_file():
        return _fail(f"{path} missing: tissue_classifier has not written its checkpoints")
    ckpts = pd.read_parquet(path)
    sel = ckpts[ckpts["selected"]]
    if len(sel) != 1:
        return _fail(f"{path}: {len(sel)} selected checkpoints (need exactly 1)")
    row = sel.iloc[0]
    try:
        model, card = load_checkpoint(row["path"])
    except (OSError, ValueError, RuntimeError) as e:
        return _fail(f"selected checkpoint {row['path']} does not load: {e}")
    split_path = lk.models / MODEL_DIR / row["run_id"] / "split.parquet"
    split = pd.read_parquet(split_path)
    metrics, labels, _ = evaluate_checkpoint(
        model, split, card["classes"], int(card["input_size"]), device=device,
        max_tiles=max_tiles, num_workers=num_workers,
    )  # fmt: skip
    passed, chance, threshold = beats_chance(metrics["acc"], labels, len(card["classes"]), margin)
    return dg.AssetCheckResult(
        passed=passed,
        description=(
            f"{row['model_id']}: test accuracy {metrics['acc']:.3f} "
            f"{'>=' if passed else '<'} chance {chance:.3f} + margin {margin:.2f}"
        ),
        metadata={
            "model_id": dg.MetadataValue.text(str(row["model_id"])),
            "test_acc": dg.MetadataValue.float(round(metrics["acc"], 4)),
            "slide_test_acc": dg.MetadataValue.float(round(metrics["slide_acc"], 4)),
            "recorded_test_acc": dg.MetadataValue.float(round(float(row["test_acc"]), 4)),
            "chance": dg.MetadataValue.float(round(chance, 4)),
            "threshold": dg.MetadataValue.float(round(threshold, 4)),
            "tiles_evaluated": dg.MetadataValue.int(metrics["n_tiles"]),
            "classes": dg.MetadataValue.text(json.dumps(card["classes"])),
        },
    )


@dg.asset_check(asset=tissue_classifier, blocking=True, pool=GPU_POOL)
def tissue_classifier_beats_chance(
    config: BeatsChanceConfig, lake: DataLakeResource
) -> dg.AssetCheckResult:
    """The selected checkpoint, reloaded from disk, classifies the held-out donors' tiles
    better than chance by a clear margin (default 0.2); blocking, so a broken or degenerate
    model (e.g. one predicting a single tissue) never feeds the embeddings."""
    return selected_classifier_beats_chance(
        lake.lake(), config.margin, config.max_tiles, config.device, config.num_workers
    )
