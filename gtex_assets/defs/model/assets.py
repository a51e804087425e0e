"""Model: the tissue classifier, fine-tuned on the balanced tile sample (group ``model``; SPEC §6).
Science in ``lib/models`` (backbones, weights, checkpoints), ``lib/training`` (loop, metrics,
resume) and ``lib/plots_model``."""

import json
import time

import dagster as dg
import pandas as pd
import torch
from pydantic import Field

from gtex_assets.core.atomic import write_json, write_parquet
from gtex_assets.core.lake import Lake
from gtex_assets.defs.execution import GPU_OP_TAGS, GPU_POOL
from gtex_assets.defs.metadata import plot_metadata
from gtex_assets.lib.model.backbones import BACKBONES, WeightsUnavailable
from gtex_assets.lib.model.plots import plot_confusion, plot_learning_curves, plot_sweep
from gtex_assets.lib.model.training import (
    TrainConfig,
    TrainResult,
    predictions_confusion,
    predictions_path,
    run_sweep,
    train_classifier,
)
from gtex_assets.resources import DataLakeResource

GROUP = "model"
MODEL_DIR = "tissue_classifier"  # under lk.models
SELECTED_POINTER = "selected.json"  # lk.models/tissue_classifier/selected.json


class TissueClassifierConfig(dg.Config):
    """SPEC §6 defaults. On a CPU-only demo pass a small input size, few epochs and offline
    weights (see README: backbone efficientnet_lite0 + weights package)."""

    backbone: str = Field(
        default="efficientnet_b0", description=f"Backbone, one of {sorted(BACKBONES)}"
    )
    weights: str = Field(
        default="imagenet",
        description="'imagenet' (torchvision weights API), 'package' (offline ImageNet weights "
        "of efficientnet_lite0), a local state_dict path, or 'none' (random init)",
    )
    allow_random_init: bool = Field(
        default=False,
        description="If the requested weights cannot be had, train from random init instead "
        "of failing",
    )
    lr: float = Field(default=1e-4, description="AdamW learning rate")
    weight_decay: float = Field(default=0.01, description="AdamW weight decay")
    batch_size: int = Field(default=32, description="Training batch size")
    epochs: int = Field(
        default=30, description="Train up to this epoch (continues a shorter run of the config)"
    )
    checkpoint_epochs: list[int] = Field(
        default=[5, 10, 20, 30], description="Epochs whose checkpoints are kept (plus the last)"
    )
    selected_epoch: int = Field(
        default=0, description="Checkpoint downstream assets use; 0 = the last epoch"
    )
    input_size: int = Field(default=224, description="Tiles are resized to this many pixels")
    augment: bool = Field(default=True, description="Flips / 90° rotations / colour jitter")
    jitter: float = Field(default=0.1, description="Colour jitter strength (factors 1 ± jitter)")
    dropout: float = Field(default=0.2, description="Dropout before the new head")
    seed: int = Field(default=0, description="Seed of init, loader order, augmentation")
    device: str = Field(default="auto", description="auto (CUDA, MPS, CPU), cpu, cuda[:N], mps")
    mixed_precision: bool = Field(default=True, description="bf16/fp16 autocast on CUDA")
    num_workers: int = Field(default=2, description="DataLoader workers decoding JPEGs")
    cache: str = Field(
        default="auto",
        description="'memory' decodes tiles once into RAM, 'stream' re-reads JPEGs each epoch, "
        "'auto' caches when they fit in cache_max_gb",
    )
    cache_max_gb: float = Field(default=4.0, description="RAM budget of the tile cache")
    num_threads: int = Field(default=0, description="torch CPU threads; 0 = torch's default")
    retrain: bool = Field(
        default=False, description="Ignore a finished/partial run of this config; train again"
    )
    sweep_lrs: list[float] = Field(
        default=[], description="Learning-rate sweep (e.g. [1e-3, 3e-4, 1e-4, 3e-5]); empty = none"
    )
    sweep_backbones: list[str] = Field(
        default=[], description="Backbone comparison (e.g. all four); empty = none"
    )
    sweep_epochs: int = Field(default=0, description="Epochs per sweep run; 0 = epochs")

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            backbone=self.backbone,
            weights=self.weights,
            allow_random_init=self.allow_random_init,
            lr=self.lr,
            weight_decay=self.weight_decay,
            batch_size=self.batch_size,
            epochs=self.epochs,
            input_size=self.input_size,
            augment=self.augment,
            jitter=self.jitter,
            dropout=self.dropout,
            seed=self.seed,
            checkpoint_epochs=tuple(self.checkpoint_epochs),
            selected_epoch=self.selected_epoch or None,
            device=self.device,
            mixed_precision=self.mixed_precision,
            num_workers=self.num_workers,
            cache=self.cache,
            cache_max_gb=self.cache_max_gb,
        )


def _merge_table(lk: Lake, name: str, new: pd.DataFrame, run_id: str) -> pd.DataFrame:
    """Replace this run's rows of a cross-run table (idempotent re-materialisation)."""
    path = lk.table(name)
    if path.is_file():
        old = pd.read_parquet(path)
        old = old[old["run_id"] != run_id]
        if name == "classifier_checkpoints":
            old = old.assign(selected=False)  # exactly one selected checkpoint overall
        new = pd.concat([old, new], ignore_index=True) if len(old) else new
    write_parquet(new, path)
    return new


def _confusion(result: TrainResult) -> pd.DataFrame:
    parts = []
    for _, ck in result.checkpoints.iterrows():
        pred = pd.read_parquet(predictions_path(result.run_dir, int(ck["epoch"])))
        conf = predictions_confusion(pred, result.classes)
        parts.append(
            conf.assign(run_id=result.run_id, model_id=ck["model_id"], epoch=int(ck["epoch"]))
        )
    cols = ["run_id", "model_id", "epoch", "level", "true_tissue", "pred_tissue", "count"]
    return pd.concat(parts, ignore_index=True)[cols]


def _float(v: float) -> dg.MetadataValue:
    return dg.MetadataValue.float(round(float(v), 4))


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch"},
    deps=[dg.AssetKey("balanced_tile_sample")],
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    code_version="1",
)
def tissue_classifier(
    context: dg.AssetExecutionContext, config: TissueClassifierConfig, lake: DataLakeResource
) -> dg.MaterializeResult:
    """SPEC §6: a torchvision backbone (EfficientNet-B0 default; ResNet50, DenseNet121,
    ConvNeXt-Tiny, or the offline-pretrained EfficientNet-Lite0) fine-tuned with AdamW on the
    balanced tile sample's donor split; reproducible (saved split and loader order, seeded
    augmentation) and resumable. Keeps checkpoints (state_dict + JSON card) at the configured
    epochs, marks the selected one for downstream stages, and writes per-epoch metrics, tile-
    and slide-level confusion tables and plots (`classifier_*` tables)."""
    lk = lake.lake()
    src = lk.table("balanced_tile_sample")
    if not src.is_file():
        raise dg.Failure(description=f"{src} missing: materialise balanced_tile_sample first")
    tiles = pd.read_parquet(src)
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    try:
        cfg = config.train_config()
        t0 = time.perf_counter()
        result = train_classifier(
            tiles, cfg, lk.models / MODEL_DIR, retrain=config.retrain, log=context.log.info
        )
        seconds = time.perf_counter() - t0
    except (WeightsUnavailable, ValueError) as e:
        raise dg.Failure(description=str(e)) from e

    hist = result.history
    ckpts = result.checkpoints
    sel = result.selected
    srow = hist.loc[hist["epoch"] == sel["epoch"]].iloc[0]
    _merge_table(lk, "classifier_epochs", hist, result.run_id)
    ck_all = _merge_table(lk, "classifier_checkpoints", ckpts, result.run_id)
    conf = _confusion(result)
    _merge_table(lk, "classifier_confusion", conf, result.run_id)
    write_json(
        {**sel.to_dict(), "classes": result.classes, "input_size": cfg.input_size},
        lk.models / MODEL_DIR / SELECTED_POINTER,
    )

    sel_conf = conf[conf["model_id"] == sel["model_id"]]
    cm_png = plot_confusion(
        sel_conf, result.classes, lk.plot(f"{MODEL_DIR}/{sel['model_id']}_confusion.png"),
        title=f"{sel['model_id']}: test confusion",
    )  # fmt: skip
    curves_png = plot_learning_curves(
        hist, lk.plot(f"{MODEL_DIR}/{result.run_id}_curves.png"), title=f"{result.run_id}"
    )
    metadata = {
        "run_id": dg.MetadataValue.text(result.run_id),
        "model_id": dg.MetadataValue.text(str(sel["model_id"])),
        "backbone": dg.MetadataValue.text(cfg.backbone),
        "weights_source": dg.MetadataValue.text(result.weights_source),
        "device": dg.MetadataValue.text(result.device),
        "selected_checkpoint": dg.MetadataValue.path(str(sel["path"])),
        "selected_epoch": dg.MetadataValue.int(int(sel["epoch"])),
        "epochs": dg.MetadataValue.int(cfg.epochs),
        "resumed_after_epoch": dg.MetadataValue.int(result.resumed_from),
        "num_classes": dg.MetadataValue.int(len(result.classes)),
        "train_tiles": dg.MetadataValue.int(len(result.split.train_index)),
        "test_tiles": dg.MetadataValue.int(len(result.split.test_index)),
        "test_acc": _float(srow["test_acc"]),
        "slide_test_acc": _float(srow["slide_test_acc"]),
        "test_balanced_acc": _float(srow["test_balanced_acc"]),
        "test_macro_f1": _float(srow["test_macro_f1"]),
        "test_loss": _float(srow["test_loss"]),
        "train_acc": _float(srow["train_acc"]),
        "train_loss": _float(srow["train_loss"]),
        "seconds": _float(seconds),
        "epoch_metrics": dg.MetadataValue.md(
            hist.drop(columns=["run_id"]).round(4).to_markdown(index=False)
        ),
        "checkpoints": dg.MetadataValue.md(
            ckpts[["epoch", "model_id", "selected", "test_acc", "slide_test_acc"]]
            .round(4)
            .to_markdown(index=False)
        ),
        "confusion": plot_metadata(cm_png),
        "learning_curves": plot_metadata(curves_png),
        "runs_in_table": dg.MetadataValue.int(int(ck_all["run_id"].nunique())),
    }
    if config.sweep_lrs or config.sweep_backbones:
        sweep = run_sweep(
            tiles, cfg, config.sweep_lrs, config.sweep_backbones, config.sweep_epochs or None,
            log=context.log.info,
        )  # fmt: skip
        out = write_parquet(sweep, lk.table("classifier_sweep"))
        last = sweep.loc[sweep.groupby(["backbone", "lr"])["epoch"].idxmax()]
        metadata.update(
            {
                "sweep": dg.MetadataValue.md(
                    last[["backbone", "lr", "test_acc", "slide_test_acc", "test_loss"]]
                    .round(4)
                    .to_markdown(index=False)
                ),
                "sweep_table": dg.MetadataValue.path(str(out)),
                "sweep_plot": plot_metadata(
                    plot_sweep(sweep, lk.plot(f"{MODEL_DIR}/sweep_{sweep['sweep_id'].iloc[0]}.png"))
                ),
            }
        )
    context.log.info(
        f"{sel['model_id']}: test acc {srow['test_acc']:.3f}, slide acc "
        f"{srow['slide_test_acc']:.3f} ({json.dumps(result.classes)})"
    )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": dg.MetadataValue.int(len(hist)),
            "path": dg.MetadataValue.path(str(lk.table("classifier_epochs"))),
            **metadata,
        },
        data_version=dg.DataVersion(str(sel["model_id"])),
    )
