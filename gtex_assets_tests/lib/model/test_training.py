"""Fine-tuning on a tiny generated tile set: one epoch in seconds on CPU, determinism, resume
equals continuous, saved split/order, metrics, the chance gate, sweeps."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from gtex_assets.lib.model import training as T
from gtex_assets.lib.model.backbones import build_model, load_checkpoint, read_card

# (RGB base colour, stripe angle) per tissue: pink / purple / pale / dark, each its own texture.
_LOOKS = [
    ((225, 150, 190), 0.0),
    ((120, 80, 170), np.pi / 2),
    ((235, 215, 225), np.pi / 4),
    ((180, 60, 110), 3 * np.pi / 4),
]


def make_tile_table(
    root: Path, tissues: int = 3, slides_per_tissue: int = 4, tiles_per_slide: int = 6, seed=0
) -> pd.DataFrame:
    """A balanced_tile_sample-shaped table of 448 px JPEG tiles: one donor per slide, odd
    slides in test; each tissue a colour and a stripe orientation, each slide a shade."""
    rng = np.random.default_rng(seed)
    size, rows = 448, []
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for c in range(tissues):
        colour, angle = _LOOKS[c]
        for s in range(slides_per_tissue):
            donor = f"GTEX-{c:02d}{s:02d}Z"
            sid = f"{donor}-{1000 + c:04d}"
            d = Path(root) / sid
            d.mkdir(parents=True, exist_ok=True)
            shade = rng.normal(0, 6, 3)
            for t in range(tiles_per_slide):
                phase = rng.uniform(0, 2 * np.pi)
                wave = np.sin(0.06 * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
                img = np.array(colour) + shade + 35 * wave[..., None]
                img = img + rng.normal(0, 10, (size, size, 3))
                p = d / f"{t * size}_0.jpg"
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p, quality=85)
                rows.append(
                    {
                        "tissue_sample_id": sid,
                        "subject_id": donor,
                        "tissue": f"Tissue {chr(65 + c)}",
                        "x": t * size,
                        "y": 0,
                        "level": 0,
                        "tile_size": size,
                        "path": str(p),
                        "split": "test" if s % 2 else "train",
                    }
                )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> pd.DataFrame:
    return make_tile_table(tmp_path_factory.mktemp("tiles"))


@pytest.fixture(autouse=True)
def _one_thread():
    # 2 shared cores on the build machine; also makes CPU results independent of the load.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Random-init EfficientNet-B0 at 32 px: the cheapest real configuration.
FAST = T.TrainConfig(
    backbone="efficientnet_b0",
    weights="none",
    input_size=32,
    batch_size=8,
    epochs=1,
    lr=1e-3,
    checkpoint_epochs=(1,),
    cache="memory",
    n_workers=0,
)


def _metric_cols(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=["seconds"])


def test_prepare_split_validates_and_labels(tiles):
    split = T.prepare_split(tiles)
    assert split.classes == ["Tissue A", "Tissue B", "Tissue C"]
    assert split.labels.tolist() == [0] * 24 + [1] * 24 + [2] * 24
    assert len(split.train_index) == 36 and len(split.test_index) == 36
    with pytest.raises(ValueError, match="missing column.*split"):
        T.prepare_split(tiles.drop(columns="split"))
    leaky = tiles.copy()
    leaky.loc[0, "split"] = "test"  # donor GTEX-0000Z now on both sides
    with pytest.raises(ValueError, match="GTEX-0000Z.*both train and test"):
        T.prepare_split(leaky)
    bad = tiles.copy()
    bad.loc[5, "split"] = "valid"
    with pytest.raises(ValueError, match="row 5"):
        T.prepare_split(bad)
    with pytest.raises(ValueError, match="no 'test' tiles"):
        T.prepare_split(tiles[tiles["split"] == "train"])
    assert T.data_hash(split) == T.data_hash(T.prepare_split(tiles.copy()))
    assert T.data_hash(split) != T.data_hash(T.prepare_split(tiles.iloc[1:]))


def test_config_kept_epochs_and_selection():
    cfg = T.TrainConfig(epochs=12)
    assert cfg.kept_epochs() == [5, 10, 12] and cfg.selected() == 12
    assert T.TrainConfig().kept_epochs() == [5, 10, 20, 30]
    with pytest.raises(ValueError, match="selected_epoch 7"):
        T.TrainConfig(epochs=12, selected_epoch=7)
    with pytest.raises(ValueError, match="backbone"):
        T.TrainConfig(backbone="vgg16")
    # epochs is not part of the run identity: 5 x 1 epoch and 5 epochs are the same run.
    assert T.run_id_for(cfg, "h") == T.run_id_for(dataclasses.replace(cfg, epochs=3), "h")
    assert T.run_id_for(cfg, "h") != T.run_id_for(dataclasses.replace(cfg, lr=1e-3), "h")
    assert T.finetuned_model_id("efficientnet_b0-1a2b3c4d", 5) == "efficientnet_b0-ft-e005-1a2b3c4d"


def test_epoch_order_is_a_function_of_seed_and_epoch():
    a = T.epoch_order(50, seed=0, epoch=1)
    assert sorted(a.tolist()) == list(range(50))
    assert np.array_equal(a, T.epoch_order(50, seed=0, epoch=1))
    assert not np.array_equal(a, T.epoch_order(50, seed=0, epoch=2))
    assert not np.array_equal(a, T.epoch_order(50, seed=1, epoch=1))
    sizes = [len(b) for b in T.epoch_batches(np.arange(17), 8)]
    assert sizes == [8, 9]  # a trailing batch of one joins the previous (batch norm)
    assert [len(b) for b in T.epoch_batches(np.arange(18), 8)] == [8, 8, 2]


def test_augmentation_is_seeded_and_only_flips_rotates_and_jitters():
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    a = T.augment_batch(x, torch.Generator().manual_seed(3), jitter=0.1)
    b = T.augment_batch(x, torch.Generator().manual_seed(3), jitter=0.1)
    assert torch.equal(a, b) and a.dtype == torch.float32 and a.min() >= 0 and a.max() <= 1
    plain = T.augment_batch(x, torch.Generator().manual_seed(3), jitter=0.0)
    xf = x.float() / 255
    dihedral = [torch.rot90(t, k, (-2, -1)) for t in (xf, xf.flip(-1)) for k in range(4)]
    for i in range(len(x)):  # each tile is one of the 8 symmetries of itself, untouched values
        assert any(torch.equal(plain[i], d[i]) for d in dihedral)
    assert not torch.equal(plain, xf)  # something was transformed


def test_metrics_tile_slide_and_confusion():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4], [0.45, 0.55]])
    labels = np.array([0, 0, 1, 1, 1, 1])
    slides = ["s1", "s1", "s2", "s2", "s3", "s3"]
    m = T.classification_metrics(probs, labels, slides)
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["balanced_acc"] == pytest.approx((1 / 2 + 3 / 4) / 2)
    # s1 mean (0.65, 0.35) -> 0 ok; s2 -> 1 ok; s3 mean (0.525, 0.475) -> 0 wrong
    assert m["slide_acc"] == pytest.approx(2 / 3) and m["n_slides"] == 3
    assert m["loss"] == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.8, 0.7, 0.4, 0.55])))
    conf = T.confusion_frame(labels, probs.argmax(1), ["A", "B"], "tile")
    cm = conf.set_index(["true_tissue", "pred_tissue"])["count"]
    assert cm[("A", "A")] == 1 and cm[("A", "B")] == 1 and cm[("B", "A")] == 1
    assert cm[("B", "B")] == 3 and cm.sum() == 6


def test_chance_gate():
    labels = np.array([0, 0, 1, 2])
    assert T.chance_level(labels, 3) == pytest.approx(0.5)  # majority share beats 1/3
    assert T.beats_chance(0.75, labels, 3, margin=0.2) == (True, 0.5, pytest.approx(0.7))
    assert T.beats_chance(0.5, labels, 3, margin=0.2)[0] is False


def test_tile_source_memory_equals_streaming_workers(tiles):
    paths = tiles["path"].tolist()[:10]
    mem = T.TileSource(paths, 32, mode="memory")
    stream = T.TileSource(paths, 32, mode="stream", num_workers=2)
    batches = [np.array([3, 1, 7]), np.array([0, 9])]
    for (i1, a), (i2, b) in zip(mem.batches(batches), stream.batches(batches), strict=True):
        assert np.array_equal(i1, i2) and a.dtype == torch.uint8 and torch.equal(a, b)
    assert T.TileSource(paths, 32, mode="auto", max_gb=1e-9).mode == "stream"


def test_one_epoch_on_cpu_writes_a_complete_run(tiles, tmp_path):
    res = T.train_classifier(tiles, FAST, tmp_path)
    h = res.history
    assert h["epoch"].tolist() == [1] and list(h.columns) == list(T.EPOCH_COLUMNS)
    row = h.iloc[0]
    assert np.isfinite(row["train_loss"]) and np.isfinite(row["test_loss"])
    for col in ("train_acc", "test_acc", "test_balanced_acc", "test_macro_f1", "slide_test_acc"):
        assert 0.0 <= row[col] <= 1.0
    assert row["model_id"] == f"efficientnet_b0-ft-e001-{res.run_id.rsplit('-', 1)[1]}"
    run = res.run_dir
    for name in ("run.json", "split.parquet", "loader_order.parquet", "state.pt", "epoch_001.pt"):
        assert (run / name).is_file(), name
    # The saved loader order is the one the loop used.
    order = pd.read_parquet(run / "loader_order.parquet")
    split = res.split
    assert order["tile_index"].tolist() == split.train_index[T.epoch_order(36, 0, 1)].tolist()
    assert pd.read_parquet(run / "split.parquet").equals(split.frame)
    card = read_card(run / "epoch_001.pt")
    assert card["backbone"] == "efficientnet_b0" and card["classes"] == split.classes
    assert card["epoch"] == 1 and card["data_hash"] == res.data_hash
    assert card["weights_source"] == "random" and card["metrics"]["test_acc"] == row["test_acc"]
    assert card["config"]["lr"] == 1e-3 and card["input_size"] == 32
    # Reloaded with weights_only, the checkpoint reproduces its recorded test predictions.
    model, _ = load_checkpoint(run / "epoch_001.pt")
    src = T.TileSource(split.frame["path"].tolist(), 32, mode="memory")
    probs = T.predict(model, src, split.test_index, 64, T._runtime("cpu"))
    saved = np.stack(pd.read_parquet(T.predictions_path(run, 1))["probs"].to_numpy())
    np.testing.assert_allclose(probs, saved, atol=1e-5)
    sel = res.selected
    assert sel["epoch"] == 1 and sel["path"] == str(run / "epoch_001.pt")


def test_same_config_and_seed_give_identical_metrics(tiles, tmp_path):
    cfg = dataclasses.replace(FAST, epochs=2, checkpoint_epochs=())
    a = T.train_classifier(tiles, cfg, tmp_path / "a")
    b = T.train_classifier(tiles, cfg, tmp_path / "b")
    assert a.run_id == b.run_id
    pd.testing.assert_frame_equal(_metric_cols(a.history), _metric_cols(b.history))
    wa = torch.load(a.run_dir / "epoch_002.pt", weights_only=True)
    wb = torch.load(b.run_dir / "epoch_002.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = T.train_classifier(
        tiles, dataclasses.replace(cfg, random_state=1, epochs=1), tmp_path / "c"
    )
    assert c.history["train_loss"].iloc[0] != a.history["train_loss"].iloc[0]


def test_restart_mode_equals_continuous_training(tiles, tmp_path):
    """5 x 1 epoch ("restart" mode), each resuming from the saved state, equals 5 epochs at
    once: same metrics at every epoch and the same final weights (bit for bit on CPU)."""
    cfg = dataclasses.replace(FAST, epochs=5, checkpoint_epochs=(1, 3))
    cont = T.train_classifier(tiles, cfg, tmp_path / "cont")
    for e in range(1, 6):
        step = T.train_classifier(tiles, dataclasses.replace(cfg, epochs=e), tmp_path / "restart")
        assert step.resumed_from == e - 1
    pd.testing.assert_frame_equal(_metric_cols(cont.history), _metric_cols(step.history))
    wa = torch.load(cont.run_dir / "epoch_005.pt", weights_only=True)
    wb = torch.load(step.run_dir / "epoch_005.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    again = T.train_classifier(tiles, cfg, tmp_path / "restart")  # done: nothing to train
    assert again.resumed_from == 5 and again.history.equals(step.history)
    assert again.checkpoints["epoch"].tolist() == [1, 3, 5]
    assert again.checkpoints["selected"].tolist() == [False, False, True]


def test_pretrained_backbone_learns_the_tissues(tiles, tmp_path):
    """With the offline ImageNet EfficientNet-Lite0, three epochs separate the tissues."""
    cfg = dataclasses.replace(
        FAST, backbone="efficientnet_lite0", weights="package", input_size=64, epochs=3
    )
    res = T.train_classifier(tiles, cfg, tmp_path)
    last = res.history.iloc[-1]
    assert res.weights_source.startswith("package:")
    assert last["test_acc"] >= 0.85 and last["slide_test_acc"] == 1.0
    assert last["test_loss"] < res.history["test_loss"].iloc[0]


def test_one_class_model_fails_the_chance_gate(tiles):
    split = T.prepare_split(tiles)
    torch.manual_seed(0)
    model = build_model("efficientnet_b0", 3, weights="none")
    with torch.no_grad():  # a degenerate head: always "Tissue A"
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))
    metrics, labels, probs = T.evaluate_checkpoint(
        model, split.frame, split.classes, 32, device="cpu"
    )
    assert (probs.argmax(1) == 0).all() and metrics["acc"] == pytest.approx(1 / 3)
    passed, chance, threshold = T.beats_chance(metrics["acc"], labels, 3, margin=0.2)
    assert not passed and chance == pytest.approx(1 / 3) and threshold == pytest.approx(1 / 3 + 0.2)


def test_sweep_trains_each_lr_and_backbone_into_one_table(tiles):
    cfg = dataclasses.replace(FAST, epochs=1)
    sweep = T.run_sweep(tiles, cfg, lrs=[1e-3, 1e-4], epochs=1)
    assert list(sweep.columns) == list(T.SWEEP_COLUMNS)
    assert sorted(sweep["lr"].tolist()) == [1e-4, 1e-3] and (sweep["epoch"] == 1).all()
    assert sweep["backbone"].unique().tolist() == ["efficientnet_b0"]
    assert sweep["sweep_id"].nunique() == 1 and sweep["train_loss"].nunique() == 2
