"""Fine-tuning the tissue classifier (SPEC §6): data, loaders, the train/eval loop, metrics, resume.

Reproducibility is by construction, not by luck (the study saw first-epoch accuracy swing from
3 % to 70 % between runs without it):

- the split is the input table's donor split, saved with the run (``split.parquet``);
- the order of epoch ``e`` is a permutation drawn from ``(seed, e)`` only (saved as
  ``loader_order.parquet``), each batch's augmentation from ``(seed, e, batch)``, dropout from a
  generator reseeded at every epoch from ``(seed, e)``. So resuming at epoch ``k`` replays
  exactly what a continuous run does, and on CPU two runs give bit-identical metrics;
- tiles are decoded by Pillow in DataLoader workers (or once into a uint8 cache in memory when
  it fits) and augmented on the device with those seeded generators, so the number of workers
  never changes a result;
- ``state.pt`` after every epoch holds the model, optimiser, AMP scaler, RNG state and the
  metric history; a run continues from it (``train_classifier`` called with more epochs).

A run lives in ``<models_dir>/<run_id>/`` where ``run_id = <backbone>-<hash8>`` hashes the
config fields that shape the trajectory (not ``epochs``: 5 x 1 epoch and 5 epochs are one run)
and the data hash. Checkpoints ``epoch_NNN.pt`` + ``.json`` model card + the test predictions
``epoch_NNN.predictions.parquet`` are kept at the configured epochs and the last one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from gtex_assets.core.atomic import atomic_path, params_hash, write_json, write_parquet
from gtex_assets.lib.model.backbones import (
    BACKBONES,
    TissueNet,
    build_model,
    load_tile,
    normalize,
    resolve_device,
    save_checkpoint,
)

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("tissue_sample_id", "subject_id", "tissue", "path", "split")
SPLITS = ("train", "test")
EPOCH_COLUMNS = (
    "run_id",
    "model_id",
    "epoch",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "test_balanced_acc",
    "test_macro_f1",
    "slide_test_acc",
    "lr",
    "seconds",
)

Log = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Everything a fine-tuning run needs; defaults are SPEC §6's."""

    backbone: str = "efficientnet_b0"
    weights: str = "imagenet"
    allow_random_init: bool = False
    lr: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 32
    epochs: int = 30
    input_size: int = 224
    augment: bool = True
    jitter: float = 0.1
    dropout: float = 0.2
    random_state: int = 0
    checkpoint_epochs: tuple[int, ...] = (5, 10, 20, 30)
    selected_epoch: int | None = None
    device: str = "auto"
    mixed_precision: bool = True
    deterministic: bool = True
    n_workers: int = 2  # DataLoader processes decoding JPEGs (0 = in the training process)
    cache: str = "auto"
    cache_max_gb: float = 4.0
    eval_batch_size: int = 128

    # The fields that shape the training trajectory (the run id hashes these + the data).
    TRAJECTORY_FIELDS = (
        "backbone",
        "weights",
        "allow_random_init",
        "lr",
        "weight_decay",
        "batch_size",
        "input_size",
        "augment",
        "jitter",
        "dropout",
        "random_state",
    )

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone {self.backbone!r}: choose one of {sorted(BACKBONES)}")
        for name in ("epochs", "batch_size", "input_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (batch norm needs 2 samples)")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.cache not in ("auto", "memory", "stream"):
            raise ValueError(f"cache {self.cache!r}: use auto, memory or stream")
        if self.selected_epoch is not None and self.selected_epoch not in self.kept_epochs():
            raise ValueError(
                f"selected_epoch {self.selected_epoch} is not a kept checkpoint "
                f"{self.kept_epochs()} (checkpoint_epochs up to epochs, plus the last epoch)"
            )

    def kept_epochs(self) -> list[int]:
        """Epochs whose checkpoints are kept: configured ones within the run, plus the last."""
        return sorted({e for e in self.checkpoint_epochs if 1 <= e <= self.epochs} | {self.epochs})

    def selected(self) -> int:
        return self.selected_epoch if self.selected_epoch is not None else self.epochs

    def trajectory(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.TRAJECTORY_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["checkpoint_epochs"] = list(self.checkpoint_epochs)
        return d


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, purpose, batch): independent streams."""
    blob = ",".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & (2**63 - 1)


_ORDER, _DROPOUT, _AUGMENT, _INIT = 1, 2, 3, 4


def run_id_for(cfg: TrainConfig, data_hash: str) -> str:
    return f"{cfg.backbone}-{params_hash({**cfg.trajectory(), 'data_hash': data_hash})[:8]}"


def finetuned_model_id(run_id: str, epoch: int) -> str:
    """``<backbone>-ft-e<NNN>-<hash8>``: a stable id for a fine-tuned checkpoint."""
    backbone, _, h = run_id.rpartition("-")
    return f"{backbone}-ft-e{epoch:03d}-{h}"


# --------------------------------------------------------------------------------------------
# Data: the split
# --------------------------------------------------------------------------------------------


@dataclass
class SplitData:
    """Tiles with integer labels: ``frame`` has tile_index, path, tissue_sample_id, subject_id,
    tissue, label, split (tile_index = row position); ``classes`` in label order."""

    frame: pd.DataFrame
    classes: list[str]

    @property
    def train_index(self) -> np.ndarray:
        return np.flatnonzero(self.frame["split"].to_numpy() == "train")

    @property
    def test_index(self) -> np.ndarray:
        return np.flatnonzero(self.frame["split"].to_numpy() == "test")

    @property
    def labels(self) -> np.ndarray:
        return self.frame["label"].to_numpy(np.int64)


def prepare_split(tiles: pd.DataFrame, classes: Sequence[str] | None = None) -> SplitData:
    """Validate a balanced tile sample (SPEC §4) and attach labels; errors name the rows.

    Classes are the sorted tissue names unless given. Donors must not cross the split.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in tiles.columns]
    if missing:
        raise ValueError(f"tile table: missing column(s) {missing}; has {list(tiles.columns)}")
    df = tiles.reset_index(drop=True)
    bad = df[~df["split"].isin(SPLITS) | df["tissue"].isna() | df["path"].isna()]
    if len(bad):
        r = bad.iloc[0]
        raise ValueError(
            f"tile table: {len(bad)} row(s) with split not in {SPLITS} or no tissue/path, "
            f"e.g. row {bad.index[0]} ({r['tissue_sample_id']}, split={r['split']!r})"
        )
    dup = df["path"].duplicated()
    if dup.any():
        raise ValueError(f"tile table: duplicate tile path {df.loc[dup, 'path'].iloc[0]}")
    donor_splits = df.groupby("subject_id")["split"].nunique()
    leaking = donor_splits[donor_splits > 1]
    if len(leaking):
        raise ValueError(
            f"tile table: donor(s) {list(leaking.index[:5])} are in both train and test; the "
            "split must be by donor"
        )
    for s in SPLITS:
        if not (df["split"] == s).any():
            raise ValueError(f"tile table: no {s!r} tiles")
    classes = list(classes) if classes is not None else sorted(df["tissue"].unique())
    lookup = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(df["tissue"]) - set(lookup))
    if unknown:
        raise ValueError(f"tile table: tissue(s) {unknown} are not among the classes")
    untrained = sorted(set(classes) - set(df.loc[df["split"] == "train", "tissue"]))
    if untrained:
        logger.warning("tissue(s) %s have no training tiles (single-donor tissues?)", untrained)
    frame = pd.DataFrame(
        {
            "tile_index": np.arange(len(df), dtype=np.int64),
            "path": df["path"].astype(str),
            "tissue_sample_id": df["tissue_sample_id"].astype(str),
            "subject_id": df["subject_id"].astype(str),
            "tissue": df["tissue"].astype(str),
            "label": df["tissue"].map(lookup).astype(np.int64),
            "split": df["split"].astype(str),
        }
    )
    return SplitData(frame, classes)


def data_hash(split: SplitData) -> str:
    """Hash of what the model sees: tile paths, labels and split, in order."""
    h = hashlib.sha256()
    h.update(json.dumps(split.classes).encode())
    for p, t, s in zip(
        split.frame["path"], split.frame["tissue"], split.frame["split"], strict=True
    ):
        h.update(f"{p}\t{t}\t{s}\n".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Data: decoding and batches
# --------------------------------------------------------------------------------------------


class TileDataset(Dataset):
    """Tile JPEGs decoded with Pillow and resized: item ``i`` -> (uint8 (3, S, S), i)."""

    def __init__(self, paths: Sequence[str], input_size: int) -> None:
        self.paths = list(paths)
        self.input_size = input_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return load_tile(self.paths[i], self.input_size), i


def _worker_init(worker_id: int) -> None:
    # Decoding is deterministic; seed the worker's libraries anyway so nothing random in a
    # worker ever depends on the process that forked it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _loader(ds: Dataset, batch_sampler: Sequence[Sequence[int]], workers: int, pin: bool):
    return DataLoader(
        ds,
        batch_sampler=batch_sampler,
        num_workers=workers,
        worker_init_fn=_worker_init,
        pin_memory=pin,
        persistent_workers=False,
    )


class TileSource:
    """uint8 image batches by tile index: decoded once into memory (``memory``) or streamed
    from the JPEGs by DataLoader workers (``stream``); both give identical tensors.
    ``auto`` caches when the images fit in ``max_gb``."""

    def __init__(
        self,
        paths: Sequence[str],
        input_size: int,
        mode: str = "auto",
        num_workers: int = 0,
        max_gb: float = 4.0,
        pin_memory: bool = False,
    ) -> None:
        self.dataset = TileDataset(paths, input_size)
        self.num_workers = num_workers
        self.pin = pin_memory
        nbytes = len(paths) * 3 * input_size * input_size
        self.mode = mode if mode != "auto" else ("memory" if nbytes <= max_gb * 2**30 else "stream")
        self.images: torch.Tensor | None = None
        if self.mode == "memory":
            self.images = decode_tiles(paths, input_size, num_workers)

    def batches(self, batches: Sequence[np.ndarray]) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        if self.images is not None:
            for idx in batches:
                yield idx, self.images[torch.as_tensor(idx)]
            return
        loader = _loader(
            self.dataset, [list(map(int, b)) for b in batches], self.num_workers, self.pin
        )
        for idx, (x, _) in zip(batches, loader, strict=True):
            yield idx, x


def decode_tiles(paths: Sequence[str], input_size: int, num_workers: int = 0) -> torch.Tensor:
    """All tiles decoded and resized: uint8 ``(N, 3, S, S)``, in the order of ``paths``."""
    out = torch.empty((len(paths), 3, input_size, input_size), dtype=torch.uint8)
    ds = TileDataset(paths, input_size)
    chunks = [list(range(i, min(i + 64, len(paths)))) for i in range(0, len(paths), 64)]
    for x, idx in _loader(ds, chunks, num_workers, False):
        out[idx] = x
    return out


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of epoch ``epoch`` (1-based): a permutation of ``range(n)`` drawn
    from ``(seed, epoch)`` alone, so a resumed run replays it exactly."""
    g = torch.Generator().manual_seed(_mix(seed, epoch, _ORDER))
    return torch.randperm(n, generator=g).numpy()


def epoch_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Consecutive batches of ``order``; a final batch of one joins the previous one (batch
    norm cannot train on a single sample)."""
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        last = batches.pop()
        batches[-1] = np.concatenate([batches[-1], last])
    return batches


def loader_order_frame(split: SplitData, seed: int, epochs: int) -> pd.DataFrame:
    """The saved loader order: (epoch, position, tile_index) for every training epoch."""
    train = split.train_index
    parts = [
        pd.DataFrame(
            {
                "epoch": np.full(len(train), e, dtype=np.int32),
                "position": np.arange(len(train), dtype=np.int32),
                "tile_index": train[epoch_order(len(train), seed, e)].astype(np.int64),
            }
        )
        for e in range(1, epochs + 1)
    ]
    return pd.concat(parts, ignore_index=True)


# --------------------------------------------------------------------------------------------
# Augmentation (on the device, from a seeded CPU generator)
# --------------------------------------------------------------------------------------------


def augment_batch(x: torch.Tensor, gen: torch.Generator, jitter: float = 0.1) -> torch.Tensor:
    """uint8 batch -> float [0, 1] batch with a random dihedral transform per tile (flips and
    90° rotations: a tissue section has no orientation) and mild brightness / contrast /
    saturation jitter (factors in ``1 ± jitter``). Random draws come from ``gen`` (CPU)."""
    n = x.shape[0]
    rot = torch.randint(0, 4, (n,), generator=gen)
    flip = torch.randint(0, 2, (n,), generator=gen)
    factors = 1.0 + jitter * (2 * torch.rand((n, 3), generator=gen) - 1)
    x = x.float() / 255.0
    code = (rot * 2 + flip).tolist()
    out = torch.empty_like(x)
    for c in sorted(set(code)):
        mask = torch.tensor([k == c for k in code], device=x.device)
        sub = x[mask]
        if c % 2:
            sub = sub.flip(-1)
        out[mask] = torch.rot90(sub, c // 2, (-2, -1))
    if jitter > 0:
        f = factors.to(x.device).view(n, 3, 1, 1, 1)
        out = out * f[:, 0]
        mean = out.mean((1, 2, 3), keepdim=True)
        out = (out - mean) * f[:, 1] + mean
        gray = (out * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(
            1, keepdim=True
        )
        out = ((out - gray) * f[:, 2] + gray).clamp_(0.0, 1.0)
    return out


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def slide_probabilities(
    probs: np.ndarray, slide_ids: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Mean tile probabilities per slide: (slide ids sorted, (n_slides, K) array)."""
    codes, uniq = pd.factorize(pd.Series(list(slide_ids)), sort=True)
    sums = np.zeros((len(uniq), probs.shape[1]))
    np.add.at(sums, codes, probs)
    return np.asarray(uniq), sums / np.bincount(codes, minlength=len(uniq))[:, None]


def classification_metrics(
    probs: np.ndarray, labels: np.ndarray, slide_ids: Sequence[str]
) -> dict[str, float]:
    """Tile-level loss / accuracy / balanced accuracy / macro-F1, and slide-level accuracy
    (a slide is predicted by the mean of its tiles' probabilities)."""
    labels = np.asarray(labels)
    k = probs.shape[1]
    pred = probs.argmax(1)
    p_true = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
    present = np.unique(labels)
    slides, sp = slide_probabilities(probs, slide_ids)
    slide_label = pd.Series(labels, index=list(slide_ids)).groupby(level=0).first()
    slide_true = slide_label.loc[slides].to_numpy()
    with warnings.catch_warnings():  # classes absent from y_true: sklearn warns, fine here
        warnings.simplefilter("ignore")
        bal = balanced_accuracy_score(labels, pred)
    return {
        "loss": float(-np.log(p_true).mean()),
        "acc": float(np.mean(pred == labels)),
        "balanced_acc": float(bal),
        "macro_f1": float(f1_score(labels, pred, labels=present, average="macro", zero_division=0)),
        "slide_acc": float(np.mean(sp.argmax(1) == slide_true)),
        "n_tiles": int(len(labels)),
        "n_slides": int(len(slides)),
        "num_classes": int(k),
    }


def chance_level(labels: np.ndarray, num_classes: int) -> float:
    """Accuracy of the best constant guess: max(1/K, majority-class share of ``labels``)."""
    labels = np.asarray(labels)
    share = np.bincount(labels, minlength=num_classes).max() / len(labels) if len(labels) else 0
    return float(max(1.0 / num_classes, share))


def beats_chance(
    acc: float, labels: np.ndarray, num_classes: int, margin: float = 0.2
) -> tuple[bool, float, float]:
    """(passed, chance, threshold): does ``acc`` reach chance + margin (capped at 1)?"""
    chance = chance_level(labels, num_classes)
    threshold = min(chance + margin, 1.0)
    return bool(acc >= threshold), chance, threshold


def confusion_frame(
    true: np.ndarray, pred: np.ndarray, classes: Sequence[str], level: str
) -> pd.DataFrame:
    """Long confusion table (every true x predicted pair, zeros included)."""
    k = len(classes)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (np.asarray(true), np.asarray(pred)), 1)
    ti, pi = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    return pd.DataFrame(
        {
            "level": level,
            "true_tissue": np.asarray(classes, dtype=object)[ti.ravel()],
            "pred_tissue": np.asarray(classes, dtype=object)[pi.ravel()],
            "count": cm.ravel(),
        }
    )


def predictions_confusion(pred_df: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """Tile- and slide-level confusion from a checkpoint's predictions table."""
    lookup = {c: i for i, c in enumerate(classes)}
    true = pred_df["tissue"].map(lookup).to_numpy()
    probs = np.stack(pred_df["probs"].to_numpy()).astype(np.float64)
    tile = confusion_frame(true, probs.argmax(1), classes, "tile")
    slides, sp = slide_probabilities(probs, pred_df["tissue_sample_id"])
    slide_true = pred_df.groupby("tissue_sample_id")["tissue"].first().loc[slides].map(lookup)
    slide = confusion_frame(slide_true.to_numpy(), sp.argmax(1), classes, "slide")
    return pd.concat([tile, slide], ignore_index=True)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class _Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool


def _runtime(device_pref: str = "auto", mixed_precision: bool = True) -> _Runtime:
    device = resolve_device(device_pref)
    amp = None
    if mixed_precision and device.type == "cuda":
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return _Runtime(device, amp, device.type == "cuda")


@contextlib.contextmanager
def _determinism(enabled: bool) -> Iterator[None]:
    """Deterministic algorithms (warn only where none exists) for the block, then restore."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_bench = torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.benchmark = not enabled
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
        torch.backends.cudnn.benchmark = prev_bench


def _prep(x: torch.Tensor, rt: _Runtime) -> torch.Tensor:
    x = normalize(x)
    return x.contiguous(memory_format=torch.channels_last) if rt.channels_last else x


def _autocast(rt: _Runtime):
    if rt.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(rt.device.type, dtype=rt.amp_dtype)


def train_epoch(
    model: TissueNet,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    source: TileSource,
    split: SplitData,
    cfg: TrainConfig,
    epoch: int,
    rt: _Runtime,
) -> dict[str, float]:
    """One pass over the training tiles in epoch ``epoch``'s order; mean loss and accuracy
    (in train mode, augmented, as the SPEC's table reports them)."""
    train = split.train_index
    labels = torch.from_numpy(split.labels.copy())
    batches = [
        train[b]
        for b in epoch_batches(epoch_order(len(train), cfg.random_state, epoch), cfg.batch_size)
    ]
    torch.manual_seed(_mix(cfg.random_state, epoch, _DROPOUT))  # dropout draws of this epoch
    model.train()
    loss_sum, correct, n = 0.0, 0, 0
    for b, (idx, x) in enumerate(source.batches(batches)):
        x = x.to(rt.device, non_blocking=True)
        if cfg.augment:
            x = augment_batch(
                x,
                torch.Generator().manual_seed(_mix(cfg.random_state, epoch, _AUGMENT, b)),
                cfg.jitter,
            )
        y = labels[torch.as_tensor(idx)].to(rt.device)
        with _autocast(rt):
            logits = model(_prep(x, rt))
            loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.detach().argmax(1) == y).sum())
        n += len(y)
    return {"train_loss": loss_sum / n, "train_acc": correct / n}


def predict(
    model: TissueNet, source: TileSource, index: np.ndarray, batch_size: int, rt: _Runtime
) -> np.ndarray:
    """Class probabilities ``(len(index), K)`` for tiles ``index`` (eval mode, no augmentation)."""
    model.eval()
    out = []
    batches = [index[i : i + batch_size] for i in range(0, len(index), batch_size)]
    with torch.inference_mode():
        for _, x in source.batches(batches):
            with _autocast(rt):
                logits = model(_prep(x.to(rt.device, non_blocking=True), rt))
            out.append(torch.softmax(logits.float(), 1).cpu())
    return torch.cat(out).double().numpy()


def evaluate(
    model: TissueNet,
    source: TileSource,
    split: SplitData,
    batch_size: int,
    rt: _Runtime,
    index: np.ndarray | None = None,
) -> tuple[dict[str, float], np.ndarray]:
    """(metrics, probabilities) on the test tiles (or ``index``)."""
    index = split.test_index if index is None else index
    probs = predict(model, source, index, batch_size, rt)
    sub = split.frame.iloc[index]
    return classification_metrics(probs, sub["label"].to_numpy(), sub["tissue_sample_id"]), probs


def _epoch_row(run_id: str, epoch: int, tr: dict, te: dict, lr: float, seconds: float) -> dict:
    return {
        "run_id": run_id,
        "model_id": finetuned_model_id(run_id, epoch),
        "epoch": epoch,
        "train_loss": tr["train_loss"],
        "train_acc": tr["train_acc"],
        "test_loss": te["loss"],
        "test_acc": te["acc"],
        "test_balanced_acc": te["balanced_acc"],
        "test_macro_f1": te["macro_f1"],
        "slide_test_acc": te["slide_acc"],
        "lr": lr,
        "seconds": seconds,
    }


def predictions_frame(split: SplitData, index: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    sub = split.frame.iloc[index]
    return pd.DataFrame(
        {
            "tile_index": sub["tile_index"].to_numpy(),
            "tissue_sample_id": sub["tissue_sample_id"].to_numpy(),
            "tissue": sub["tissue"].to_numpy(),
            "pred_tissue": np.asarray(split.classes, dtype=object)[probs.argmax(1)],
            "probs": list(probs.astype(np.float32)),
        }
    )


# --------------------------------------------------------------------------------------------
# Runs: fresh, resumed, or already done
# --------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a run produced. ``history``: EPOCH_COLUMNS, one row per epoch 1..epochs.
    ``checkpoints``: run_id, model_id, backbone, epoch, path, card_path, selected, test_acc,
    slide_test_acc (one row per kept epoch). ``resumed_from``: 0 = fresh run, k = continued
    after epoch k (k == epochs: nothing left to train, stored results returned)."""

    run_id: str
    run_dir: Path
    classes: list[str]
    data_hash: str
    history: pd.DataFrame
    checkpoints: pd.DataFrame
    weights_source: str
    device: str
    resumed_from: int
    config: TrainConfig
    split: SplitData = field(repr=False)

    @property
    def selected(self) -> pd.Series:
        return self.checkpoints.loc[self.checkpoints["selected"]].iloc[0]


def checkpoint_path(run_dir: Path, epoch: int) -> Path:
    return run_dir / f"epoch_{epoch:03d}.pt"


def predictions_path(run_dir: Path, epoch: int) -> Path:
    return run_dir / f"epoch_{epoch:03d}.predictions.parquet"


def _load_state(path: Path, run_id: str, cfg: TrainConfig, log: Log) -> dict | None:
    if not path.is_file():
        return None
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a killed writer cannot leave one (atomic), but be safe
        log(f"resume state {path} unreadable ({e}); starting over")
        return None
    if st.get("run_id") != run_id:
        log(f"resume state {path} belongs to run {st.get('run_id')}; starting over")
        return None
    if st["epoch"] > cfg.epochs:
        log(f"run {run_id} is at epoch {st['epoch']} > {cfg.epochs} requested; retraining")
        return None
    missing = [
        e
        for e in cfg.kept_epochs()
        if e <= st["epoch"] and not checkpoint_path(path.parent, e).is_file()
    ]
    if missing:
        log(f"checkpoints for epochs {missing} of run {run_id} are missing; retraining")
        return None
    return st


def _save_state(
    path: Path, run_id: str, epoch: int, model, optimizer, scaler, history, source
) -> None:
    state = {
        "run_id": run_id,
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "history": history,
        "weights_source": source,
        "torch_rng": torch.get_rng_state(),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _new_training(cfg: TrainConfig, num_classes: int, rt: _Runtime, weights: str):
    torch.manual_seed(_mix(cfg.random_state, 0, _INIT))  # the new head's (and any random) init
    model = build_model(
        cfg.backbone,
        num_classes,
        weights=weights,
        allow_random_init=cfg.allow_random_init,
        dropout=cfg.dropout,
    )
    source = model.weights_source
    model = model.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    return model, opt, scaler, source


def fit(
    split: SplitData,
    cfg: TrainConfig,
    source: TileSource,
    rt: _Runtime,
    *,
    run_id: str = "sweep",
    run_dir: Path | None = None,
    card_extra: dict | None = None,
    retrain: bool = False,
    log: Log = logger.info,
) -> tuple[list[dict], int, str]:
    """Train epochs 1..cfg.epochs (continuing ``run_dir/state.pt`` when there is one).
    Without ``run_dir`` nothing is written (sweeps). Returns (history, resumed_from, weights)."""
    k = len(split.classes)
    state_path = run_dir / "state.pt" if run_dir is not None else None
    st = None if (retrain or state_path is None) else _load_state(state_path, run_id, cfg, log)
    if st is not None:
        # The weights come from the state: never re-download (or re-decide) the pretrained ones.
        model, opt, scaler, _ = _new_training(cfg, k, rt, "none")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        scaler.load_state_dict(st["scaler"])
        torch.set_rng_state(st["torch_rng"])
        model.weights_source = wsrc = st["weights_source"]
        history, start = list(st["history"]), int(st["epoch"])
        log(f"run {run_id}: resuming after epoch {start}")
    else:
        model, opt, scaler, wsrc = _new_training(cfg, k, rt, cfg.weights)
        history, start = [], 0
        log(f"run {run_id}: new run, {cfg.backbone} weights {wsrc}, device {rt.device}")
        if wsrc == "random" and cfg.weights.lower() != "none":
            log(
                f"WARNING: weights {cfg.weights!r} are not available for {cfg.backbone}; "
                "training from random initialisation (allow_random_init=True)"
            )
    test = split.test_index
    for epoch in range(start + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        tr = train_epoch(model, opt, scaler, source, split, cfg, epoch, rt)
        te, probs = evaluate(model, source, split, cfg.eval_batch_size, rt)
        row = _epoch_row(run_id, epoch, tr, te, cfg.lr, time.perf_counter() - t0)
        history.append(row)
        log(
            f"epoch {epoch}/{cfg.epochs}: train loss {row['train_loss']:.3f} acc "
            f"{row['train_acc']:.3f} | test loss {row['test_loss']:.3f} acc {row['test_acc']:.3f}"
            f" slide acc {row['slide_test_acc']:.3f} ({row['seconds']:.1f}s)"
        )
        if run_dir is None:
            continue
        if epoch in cfg.kept_epochs():
            write_parquet(predictions_frame(split, test, probs), predictions_path(run_dir, epoch))
            card = {
                "model_id": row["model_id"],
                "run_id": run_id,
                "epoch": epoch,
                "classes": split.classes,
                "input_size": cfg.input_size,
                "config": cfg.to_dict(),
                "metrics": {k2: v for k2, v in row.items() if k2 not in ("run_id", "model_id")},
                **(card_extra or {}),
            }
            model.weights_source = wsrc
            save_checkpoint(model, card, checkpoint_path(run_dir, epoch))
        _save_state(state_path, run_id, epoch, model, opt, scaler, history, wsrc)
    return history, start, wsrc


def _write_if_changed(df: pd.DataFrame, path: Path) -> None:
    if path.is_file():
        with contextlib.suppress(Exception):
            if pd.read_parquet(path).equals(df):
                return
    write_parquet(df, path)


def _tile_source(split, cfg: TrainConfig, rt) -> TileSource:
    """The tiles of a split, decoded as the config says (cache or stream)."""
    return TileSource(
        split.frame["path"].tolist(),
        cfg.input_size,
        cfg.cache,
        cfg.n_workers,
        cfg.cache_max_gb,
        pin_memory=rt.device.type == "cuda",
    )


def train_classifier(
    tiles: pd.DataFrame,
    cfg: TrainConfig,
    models_dir: str | Path,
    *,
    retrain: bool = False,
    log: Log = logger.info,
    source: TileSource | None = None,
) -> TrainResult:
    """Fine-tune (or continue, or reuse) the run that ``cfg`` and ``tiles`` define.

    Writes ``<models_dir>/<run_id>/``: ``run.json``, ``split.parquet``, ``loader_order.parquet``,
    ``state.pt`` and, at every kept epoch, ``epoch_NNN.pt`` + ``.json`` card +
    ``.predictions.parquet`` (test tiles' probabilities). Calling again with more epochs
    continues; with the same epochs it trains nothing and returns the stored results.
    """
    split = prepare_split(tiles)
    dh = data_hash(split)
    run_id = run_id_for(cfg, dh)
    run_dir = Path(models_dir) / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    rt = _runtime(cfg.device, cfg.mixed_precision)
    write_json(
        {"run_id": run_id, "data_hash": dh, "classes": split.classes, "config": cfg.to_dict()},
        run_dir / "run.json",
    )
    _write_if_changed(split.frame, run_dir / "split.parquet")
    write_parquet(
        loader_order_frame(split, cfg.random_state, cfg.epochs), run_dir / "loader_order.parquet"
    )
    with _determinism(cfg.deterministic):
        if source is None:
            source = _tile_source(split, cfg, rt)
        history, start, wsrc = fit(
            split,
            cfg,
            source,
            rt,
            run_id=run_id,
            run_dir=run_dir,
            card_extra={"data_hash": dh},
            retrain=retrain,
            log=log,
        )
    hist = pd.DataFrame(history[: cfg.epochs], columns=list(EPOCH_COLUMNS))
    rows = []
    for e in cfg.kept_epochs():
        r = hist.loc[hist["epoch"] == e].iloc[0]
        rows.append(
            {
                "run_id": run_id,
                "model_id": r["model_id"],
                "backbone": cfg.backbone,
                "epoch": e,
                "path": str(checkpoint_path(run_dir, e)),
                "card_path": str(checkpoint_path(run_dir, e).with_suffix(".json")),
                "selected": e == cfg.selected(),
                "test_acc": float(r["test_acc"]),
                "slide_test_acc": float(r["slide_test_acc"]),
            }
        )
    return TrainResult(
        run_id=run_id,
        run_dir=run_dir,
        classes=split.classes,
        data_hash=dh,
        history=hist,
        checkpoints=pd.DataFrame(rows),
        weights_source=wsrc,
        device=str(rt.device),
        resumed_from=start,
        config=cfg,
        split=split,
    )


# --------------------------------------------------------------------------------------------
# Sweeps: learning rates x backbones on the same split, order and seed
# --------------------------------------------------------------------------------------------


SWEEP_COLUMNS = (
    "sweep_id",
    "backbone",
    "lr",
    "weights_source",
    *[c for c in EPOCH_COLUMNS if c not in ("run_id", "model_id", "lr")],
)


def run_sweep(
    tiles: pd.DataFrame,
    base: TrainConfig,
    lrs: Sequence[float] = (),
    backbones: Sequence[str] = (),
    epochs: int | None = None,
    *,
    log: Log = logger.info,
    source: TileSource | None = None,
) -> pd.DataFrame:
    """Train every (backbone, lr) pair for ``epochs`` on ``base``'s split/seed/augmentation and
    return their per-epoch metrics in one table (nothing else is written)."""
    split = prepare_split(tiles)
    lrs = list(lrs) or [base.lr]
    backbones = list(backbones) or [base.backbone]
    epochs = epochs or base.epochs
    rt = _runtime(base.device, base.mixed_precision)
    sweep_id = params_hash(
        {
            "base": base.trajectory(),
            "lrs": lrs,
            "backbones": backbones,
            "epochs": epochs,
            "data_hash": data_hash(split),
        }
    )[:8]
    rows = []
    with _determinism(base.deterministic):
        if source is None:
            source = _tile_source(split, base, rt)
        for bb in backbones:
            for lr in lrs:
                cfg = dataclasses.replace(
                    base,
                    backbone=bb,
                    lr=float(lr),
                    epochs=epochs,
                    checkpoint_epochs=(),
                    selected_epoch=None,
                )
                log(f"sweep {sweep_id}: {bb} lr={lr:g}, {epochs} epochs")
                history, _, wsrc = fit(split, cfg, source, rt, run_id=f"{bb}-sweep", log=log)
                for r in history:
                    rows.append(
                        {
                            "sweep_id": sweep_id,
                            "backbone": bb,
                            "lr": float(lr),
                            "weights_source": wsrc,
                            **{c: r[c] for c in SWEEP_COLUMNS if c in r},
                        }
                    )
    return pd.DataFrame(rows, columns=list(SWEEP_COLUMNS))


def evaluate_checkpoint(
    model: TissueNet,
    split_frame: pd.DataFrame,
    classes: Sequence[str],
    input_size: int,
    *,
    device: str = "auto",
    max_tiles: int = 0,
    num_workers: int = 0,
    batch_size: int = 128,
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Re-evaluate a loaded checkpoint on a run's test tiles (``split.parquet``):
    (metrics, labels, probabilities). ``max_tiles`` > 0 takes an evenly spaced subset."""
    split = SplitData(split_frame.reset_index(drop=True), list(classes))
    index = split.test_index
    if max_tiles and len(index) > max_tiles:
        index = index[np.linspace(0, len(index) - 1, max_tiles).round().astype(int)]
    rt = _runtime(device)
    model = model.to(rt.device)
    sub_paths = split.frame["path"].tolist()
    source = TileSource(sub_paths, input_size, "stream", num_workers)
    metrics, probs = evaluate(model, source, split, batch_size, rt, index=index)
    return metrics, split.labels[index], probs
