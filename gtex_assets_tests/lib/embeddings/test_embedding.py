"""lib.embedding: the fast inference path against the reference, BN folding, slide means, specs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from gtex_assets.core.atomic import write_parquet
from gtex_assets.core.torchvision_compat import models as tvm
from gtex_assets.lib.embeddings import embed as E
from gtex_assets.lib.model import backbones as M


@pytest.fixture(scope="module")
def tile_paths(tmp_path_factory) -> list[str]:
    """Eight 448-px JPEG tiles with H&E-like colours and texture."""
    d = tmp_path_factory.mktemp("tiles")
    rng = np.random.default_rng(0)
    out = []
    for i in range(8):
        base = np.array([200, 120 + 10 * i, 180], np.float32)
        low = rng.normal(0, 40, (28, 28, 3)).astype(np.float32)
        img = Image.fromarray(np.clip(base + low, 0, 255).astype(np.uint8)).resize(
            (448, 448), Image.Resampling.BICUBIC
        )
        p = d / f"t{i}.jpg"
        img.save(p, quality=90)
        out.append(str(p))
    return out


@pytest.fixture(scope="module")
def lite0() -> M.TissueNet:
    """A trained network: EfficientNet-Lite0 with its offline ImageNet weights."""
    return E.build_off_the_shelf("efficientnet_lite0", "package")


def test_embedding_shape_and_determinism(lite0, tile_paths):
    opts = E.InferenceOptions(batch_size=4, precision="fp32", decode_workers=2)
    emb = E.TileEmbedder(lite0, 160, opts)
    a, ok = emb.embed_paths(tile_paths)
    assert a.shape == (8, 1280) and a.dtype == np.float32 and ok.all()
    assert emb.report.bn_folded == 49 and emb.report.tiles == 8
    b, _ = emb.embed_paths(tile_paths)
    np.testing.assert_array_equal(a, b)  # same embedder, same batches: bit-identical
    c, _ = E.TileEmbedder(lite0, 160, opts).embed_paths(tile_paths)
    np.testing.assert_array_equal(a, c)  # a fresh embedder too
    d, _ = E.TileEmbedder(
        lite0, 160, E.InferenceOptions(batch_size=3, precision="fp32", decode_workers=0)
    ).embed_paths(tile_paths)
    np.testing.assert_allclose(a, d, rtol=1e-4, atol=1e-5)  # batching / threads don't matter
    # Order follows the input.
    e, _ = emb.embed_paths(tile_paths[::-1])
    np.testing.assert_allclose(e[::-1], a, rtol=1e-4, atol=1e-5)


def test_fast_path_matches_the_eager_fp32_reference(lite0, tile_paths):
    ref = E.reference_embed(lite0, tile_paths, 160)
    exact, _ = E.TileEmbedder(lite0, 160, E.InferenceOptions(precision="fp32")).embed_paths(
        tile_paths
    )
    assert E.cosine_rows(exact, ref).min() > 0.99999
    np.testing.assert_allclose(exact, ref, rtol=1e-3, atol=1e-4)
    auto = E.TileEmbedder(
        lite0, 160, E.InferenceOptions(precision="auto", min_cosine=0.999, engine="torch")
    )
    fast, _ = auto.embed_paths(tile_paths)
    assert auto.precision in ("fp32", "bf16")
    # Whatever it chose, the accuracy bar holds against the reference.
    assert E.cosine_rows(fast, ref).min() >= 0.999
    if not E.native_bf16("cpu"):
        assert auto.precision == "fp32" and auto.report.calibration_cosine is None
    else:
        assert auto.report.calibration_cosine is not None


def test_auto_precision_falls_back_to_fp32_below_the_bar(lite0, tile_paths, monkeypatch):
    monkeypatch.setattr(E, "native_bf16", lambda device="cpu": True)
    opts = E.InferenceOptions(precision="auto", min_cosine=1.01, engine="torch")
    emb = E.TileEmbedder(lite0, 96, opts)
    out, _ = emb.embed_paths(tile_paths[:4])
    assert emb.precision == "fp32" and emb.report.calibration_cosine < 1.01
    ref, _ = E.TileEmbedder(
        lite0, 96, E.InferenceOptions(precision="fp32", engine="torch")
    ).embed_paths(tile_paths[:4])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_onnxruntime_engine_is_the_exact_cpu_default(lite0, tile_paths):
    ref = E.reference_embed(lite0, tile_paths, 128)
    emb = E.TileEmbedder(lite0, 128, E.InferenceOptions(batch_size=3))  # auto on CPU
    out, ok = emb.embed_paths(tile_paths)
    assert emb.report.engine == "onnxruntime" and emb.precision == "fp32" and ok.all()
    assert out.shape == (8, 1280) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-4)
    assert E.cosine_rows(out, ref).min() > 0.99999
    again, _ = E.TileEmbedder(lite0, 128, E.InferenceOptions(batch_size=5)).embed_paths(tile_paths)
    np.testing.assert_allclose(again, out, rtol=1e-5, atol=1e-6)  # batch size doesn't matter
    torch_emb = E.TileEmbedder(lite0, 128, E.InferenceOptions(engine="torch", precision="fp32"))
    assert torch_emb.report.engine == "torch"


def test_engine_choices_and_fallback(lite0, tile_paths, monkeypatch):
    with pytest.raises(ValueError, match="bf16"):
        E.InferenceOptions(engine="onnxruntime", precision="bf16")
    with pytest.raises(ValueError, match="engine"):
        E.InferenceOptions(engine="tensorrt")
    # forced bf16 stays on torch (ONNX Runtime runs fp32 only)
    monkeypatch.setattr(E, "native_bf16", lambda device="cpu": True)
    bf = E.TileEmbedder(lite0, 96, E.InferenceOptions(precision="bf16"))
    assert bf.report.engine == "torch"

    # a model the exporter cannot handle: auto falls back to torch, forced raises
    def broken(*a, **k):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(E.OrtFeatures, "__init__", broken)
    emb = E.TileEmbedder(lite0, 96, E.InferenceOptions(precision="fp32"))
    assert emb.report.engine == "torch"
    out, _ = emb.embed_paths(tile_paths[:2])
    assert out.shape == (2, 1280)
    with pytest.raises(RuntimeError, match="unsupported operator"):
        E.TileEmbedder(lite0, 96, E.InferenceOptions(engine="onnxruntime"))


def test_preprocessing_is_pixel_identical_to_eval_transform(tile_paths):
    tf = M.eval_transform(224)
    with Image.open(tile_paths[0]) as im:
        ref = tf(im)
    x = E.normalize_batch(E._stack([E.decode_tile(tile_paths[0], 224)]))[0]
    assert torch.equal(x, ref) or float((x - ref).abs().max()) < 1e-6


def test_fold_batchnorm_is_exact_on_torchvision_efficientnet_b0():
    torch.manual_seed(0)
    net = tvm.efficientnet_b0(weights=None).eval()
    for m in net.modules():  # non-trivial statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    feats = E.feature_module(net)
    folded, n = E.fold_batchnorm(feats)
    assert n == 49
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), feats(x), rtol=1e-4, atol=1e-5)
    # The original model is untouched.
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 49


def test_fold_batchnorm_leaves_untraceable_models_alone():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return self.bn(self.conv(x))
            return x

    m = Branchy().eval()
    out, n = E.fold_batchnorm(m)
    assert n == 0 and out is m


def test_undecodable_tile_is_named_or_skipped(lite0, tile_paths, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    emb = E.TileEmbedder(lite0, 96, E.InferenceOptions(precision="fp32", batch_size=2))
    with pytest.raises(ValueError, match="broken.jpg"):
        emb.embed_paths([tile_paths[0], str(bad)])
    feats, ok = emb.embed_paths([tile_paths[0], str(bad), tile_paths[1]], skip_errors=True)
    assert ok.tolist() == [True, False, True] and feats.shape == (2, 1280)
    assert "broken.jpg" in emb.report.failed[-1]


def test_embed_images_matches_files(lite0, tile_paths):
    emb = E.TileEmbedder(lite0, 96, E.InferenceOptions(precision="fp32"))
    from_files, _ = emb.embed_paths(tile_paths[:3])
    imgs = [Image.open(p) for p in tile_paths[:3]]
    arrs = [np.asarray(im.convert("RGB")) for im in imgs]
    np.testing.assert_allclose(emb.embed_images(imgs), from_files, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(emb.embed_images(arrs), from_files, rtol=1e-5, atol=1e-6)


def test_slide_means_are_group_means():
    rng = np.random.default_rng(3)
    meta = pd.DataFrame(
        {
            "model_id": ["b", "a", "a", "b", "a", "a"],
            "tissue_sample_id": ["S2", "S1", "S2", "S2", "S1", "S1"],
        }
    )
    vec = rng.normal(size=(6, 5)).astype(np.float32)
    groups, means = E.slide_means(meta, vec)
    assert groups[["model_id", "tissue_sample_id"]].values.tolist() == [
        ["a", "S1"], ["a", "S2"], ["b", "S2"],
    ]  # fmt: skip
    assert groups["n_tiles"].tolist() == [3, 1, 2]
    np.testing.assert_allclose(means[0], vec[[1, 4, 5]].mean(0), rtol=1e-6)
    np.testing.assert_allclose(means[1], vec[2], rtol=1e-6)
    np.testing.assert_allclose(means[2], vec[[0, 3]].mean(0), rtol=1e-6)
    assert means.dtype == np.float32


def test_select_models_latest_run_epochs_and_off_the_shelf(tmp_path):
    torch.manual_seed(0)
    rows = []
    for run, selected in (("old", False), ("new", True)):
        for epoch in (5, 10):
            model = M.build_model("efficientnet_lite0", 2, weights="package")
            path = tmp_path / run / f"e{epoch}.pt"
            path.parent.mkdir(exist_ok=True)
            mid = f"efficientnet_lite0-ft-e{epoch:03d}-{run}"
            M.save_checkpoint(
                model,
                {"model_id": mid, "epoch": epoch, "classes": ["A", "B"], "input_size": 192},
                path,
            )
            rows.append({"run_id": run, "model_id": mid, "backbone": "efficientnet_lite0",
                         "epoch": epoch, "path": str(path), "card_path": "",
                         "selected": selected and epoch == 10})  # fmt: skip
    ck = pd.DataFrame(rows)
    write_parquet(ck, tmp_path / "ck.parquet")
    specs = E.select_models(ck)
    assert [s.model_id for s in specs] == [
        "efficientnet_lite0-ft-e005-new",
        "efficientnet_lite0-ft-e010-new",
        "efficientnet_lite0-imagenet",  # same backbone + weights setting as the cards
    ]
    assert [s.selected for s in specs] == [False, True, False]
    assert {s.input_size for s in specs} == {192}
    assert specs[-1].kind == "off_the_shelf" and specs[-1].weights == "package"
    only10 = E.select_models(ck, which="all", epochs=[10], off_the_shelf=False)
    assert sorted(s.model_id for s in only10) == [
        "efficientnet_lite0-ft-e010-new",
        "efficientnet_lite0-ft-e010-old",
    ]
    # Fingerprints follow the weights: a changed checkpoint is detected.
    spec = specs[0]
    torch.save({"x": torch.zeros(1)}, spec.path)
    with pytest.raises(RuntimeError, match="changed"):
        E.load_model(spec)


def test_off_the_shelf_random_init_is_reproducible():
    a = E.build_off_the_shelf("efficientnet_b0", "none")
    b = E.build_off_the_shelf("efficientnet_b0", "none")
    assert a.model_id == "efficientnet_b0-random"
    for (ka, va), (_kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(va, vb), ka
