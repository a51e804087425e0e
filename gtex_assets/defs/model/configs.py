"""Run config of the model group. Defaults come from the lib dataclasses (SPEC §6), so the UI's
defaults and the library's are one source of truth."""

import dataclasses

import dagster as dg
from pydantic import Field

from gtex_assets.lib.model.backbones import BACKBONES
from gtex_assets.lib.model.training import TrainConfig

_T = TrainConfig()


class TissueClassifierConfig(dg.Config):
    """SPEC §6 defaults. On a CPU-only demo pass a small input size, few epochs and offline
    weights (see README: backbone efficientnet_lite0 + weights package)."""

    backbone: str = Field(default=_T.backbone, description=f"One of {sorted(BACKBONES)}")
    weights: str = Field(
        default=_T.weights,
        description="'imagenet' (torchvision weights API), 'package' (offline ImageNet weights "
        "of efficientnet_lite0), a local state_dict path, or 'none' (random init)",
    )
    allow_random_init: bool = Field(
        default=_T.allow_random_init,
        description="If the requested weights cannot be had, train from random init instead "
        "of failing",
    )
    lr: float = Field(default=_T.lr, description="AdamW learning rate")
    weight_decay: float = Field(default=_T.weight_decay, description="AdamW weight decay")
    batch_size: int = Field(default=_T.batch_size, description="Training batch size")
    epochs: int = Field(
        default=_T.epochs, description="Train up to this epoch (continues a shorter run)"
    )
    input_size: int = Field(default=_T.input_size, description="Tiles are resized to this size")
    augment: bool = Field(default=_T.augment, description="Flips / 90° rotations / colour jitter")
    jitter: float = Field(default=_T.jitter, description="Colour jitter (factors 1 ± jitter)")
    dropout: float = Field(default=_T.dropout, description="Dropout before the new head")
    random_state: int = Field(
        default=_T.random_state, description="Seed of init, loader order, augmentation"
    )
    checkpoint_epochs: list[int] = Field(
        default=list(_T.checkpoint_epochs),
        description="Epochs whose checkpoints are kept (plus the last)",
    )
    selected_epoch: int | None = Field(
        default=_T.selected_epoch,
        description="Checkpoint downstream assets use; empty = the last epoch",
    )
    device: str = Field(default=_T.device, description="auto (CUDA, MPS, CPU), cpu, cuda[:N], mps")
    mixed_precision: bool = Field(default=_T.mixed_precision, description="bf16/fp16 on CUDA")
    deterministic: bool = Field(
        default=_T.deterministic, description="Deterministic kernels (same run, same weights)"
    )
    n_workers: int = Field(default=_T.n_workers, description="DataLoader workers decoding JPEGs")
    cache: str = Field(
        default=_T.cache,
        description="'memory' decodes tiles once into RAM, 'stream' re-reads JPEGs each epoch, "
        "'auto' caches when they fit in cache_max_gb",
    )
    cache_max_gb: float = Field(default=_T.cache_max_gb, description="RAM budget of the cache")
    eval_batch_size: int = Field(default=_T.eval_batch_size, description="Evaluation batch size")
    # Not part of a run's identity: how this process trains and what else it runs.
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
        """The lib's config from the fields of the same names."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)}
        values["checkpoint_epochs"] = tuple(values["checkpoint_epochs"])
        return TrainConfig(**values)


class BeatsChanceConfig(dg.Config):
    margin: float = Field(
        default=0.2, description="Required test accuracy above chance (best constant guess)"
    )
    max_tiles: int = Field(
        default=5000, description="Evaluate at most this many test tiles (0 = all)"
    )
    device: str = Field(default=_T.device, description="auto (CUDA, MPS, CPU), cpu, cuda[:N], mps")
    n_workers: int = Field(default=_T.n_workers, description="DataLoader workers decoding JPEGs")
