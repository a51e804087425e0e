"""Model: the tissue classifier, fine-tuned on the balanced tile sample (group ``model``; SPEC §6).
Science in ``lib/model`` (training loop and resume, backbones, results tables, plots)."""

import time

import dagster as dg
import pandas as pd
import polars as pl
import torch

from gtex_assets.core.atomic import write_parquet
from gtex_assets.core.errors import InputError
from gtex_assets.core.lake import Lake
from gtex_assets.defs import settings
from gtex_assets.defs.execution import GPU_OP_TAGS, GPU_POOL
from gtex_assets.defs.metadata import input_failure, md_table, plot_metadata, table_metadata
from gtex_assets.defs.model.configs import TissueClassifierConfig
from gtex_assets.lib.model import results as R
from gtex_assets.lib.model.backbones import WeightsUnavailable
from gtex_assets.lib.model.plots import plot_confusion, plot_learning_curves, plot_sweep
from gtex_assets.lib.model.training import run_sweep, train_classifier
from gtex_assets.resources import DataLakeResource

GROUP = "model"
MODEL_DIR = "tissue_classifier"  # under lk.models
SAMPLE = dg.AssetKey("balanced_tile_sample")
TABLES = (R.EPOCHS_TABLE, R.CHECKPOINTS_TABLE, R.CONFUSION_TABLE)


def _spec(key: str, description: str, **kw) -> dg.AssetSpec:
    return dg.AssetSpec(key, group_name=GROUP, description=description, **kw)


def _specs() -> list[dg.AssetSpec]:
    # A function, not a module-level list: the defs loader would take bare specs as assets.
    return [
        _spec(
            "tissue_classifier",
            "SPEC §6: a torchvision backbone (EfficientNet-B0 default) fine-tuned with AdamW on the "
            "balanced tile sample's donor split; reproducible and resumable. Checkpoints "
            "(state_dict + JSON card) under models/tissue_classifier/<run>/; its data version is "
            "the selected model id.",
            deps=[SAMPLE],
            kinds={"pytorch"},
            code_version="2",
        ),
        *(
            _spec(name, desc, deps=["tissue_classifier"], kinds={"parquet"})
            for name, desc in (
                (R.EPOCHS_TABLE, "Per-epoch train/test metrics of every run."),
                (R.CHECKPOINTS_TABLE, "Kept checkpoints; exactly one `selected` over all runs."),
                (R.CONFUSION_TABLE, "Tile- and slide-level test confusion of every checkpoint."),
            )
        ),
        _spec(
            R.SWEEP_TABLE,
            "Learning-rate x backbone sweep (only when sweep_lrs / sweep_backbones are set).",
            deps=[SAMPLE],
            kinds={"parquet"},
            skippable=True,
        ),
    ]


def _read(lk: Lake, name: str) -> pl.DataFrame | None:
    return pl.read_parquet(lk.table(name)) if lk.table(name).is_file() else None


@dg.multi_asset(name="tissue_classifier", specs=_specs(), pool=GPU_POOL, op_tags=GPU_OP_TAGS)
def tissue_classifier(
    context: dg.AssetExecutionContext, config: TissueClassifierConfig, lake: DataLakeResource
):
    config = settings.resolve(context, config, lake)
    lk = lake.lake()
    if not lk.table("balanced_tile_sample").is_file():
        raise dg.Failure(
            allow_retries=False, description="balanced_tile_sample missing: materialise it first"
        )
    tiles = pd.read_parquet(lk.table("balanced_tile_sample"))
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    try:
        cfg, t0 = config.train_config(), time.perf_counter()
        result = train_classifier(tiles, cfg, lk.models / MODEL_DIR, retrain=config.retrain,
                                  log=context.log.info)  # fmt: skip
    except (WeightsUnavailable, InputError, ValueError) as e:
        raise input_failure(e) from e
    summary = R.run_summary(result, time.perf_counter() - t0)
    tables = R.run_tables(result, {name: _read(lk, name) for name in TABLES})
    for name, df in tables.items():
        write_parquet(df, lk.table(name))
    yield dg.MaterializeResult(
        asset_key="tissue_classifier",
        metadata={**summary, **_model_plots(lk, result, tables[R.CONFUSION_TABLE])},
        data_version=dg.DataVersion(summary["model_id"]),
    )
    for name, df in tables.items():
        yield dg.MaterializeResult(asset_key=name, metadata=table_metadata(df, lk.table(name)))
    if config.sweep_lrs or config.sweep_backbones:
        yield _sweep(lk, tiles, cfg, config, context.log.info)


def _model_plots(lk: Lake, result, confusion: pl.DataFrame) -> dict:
    sel = result.selected
    cm = confusion.filter(pl.col("model_id") == sel["model_id"]).to_pandas()
    cm_png = plot_confusion(
        cm, result.classes, lk.plot(f"{MODEL_DIR}/{sel['model_id']}_confusion.png"),
        title=f"{sel['model_id']}: test confusion",
    )  # fmt: skip
    curves_png = plot_learning_curves(
        result.history, lk.plot(f"{MODEL_DIR}/{result.run_id}_curves.png"), title=result.run_id
    )
    return {
        "epoch_metrics": md_table(pl.from_pandas(result.history).drop("run_id")),
        "checkpoints": md_table(
            pl.from_pandas(result.checkpoints).select(
                "epoch", "model_id", "selected", "test_acc", "slide_test_acc"
            )
        ),
        "confusion": plot_metadata(cm_png),
        "learning_curves": plot_metadata(curves_png),
    }


def _sweep(lk: Lake, tiles, cfg, config: TissueClassifierConfig, log) -> dg.MaterializeResult:
    sweep = pl.from_pandas(
        run_sweep(
            tiles,
            cfg,
            config.sweep_lrs,
            config.sweep_backbones,
            config.sweep_epochs or None,
            log=log,
        )  # fmt: skip
    )
    out = write_parquet(sweep, lk.table(R.SWEEP_TABLE))
    png = plot_sweep(sweep.to_pandas(), lk.plot(f"{MODEL_DIR}/sweep_{sweep['sweep_id'][0]}.png"))
    return dg.MaterializeResult(
        asset_key=R.SWEEP_TABLE,
        metadata={
            **table_metadata(sweep, out),
            "sweep": md_table(R.sweep_summary(sweep)),
            "sweep_plot": plot_metadata(png),
        },
    )
