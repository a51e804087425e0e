"""Backbones, weights resolution, the offline pretrained EfficientNet-Lite0, checkpoints,
devices and the input transform (all offline)."""

from __future__ import annotations

import os
import urllib.error

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from gtex_assets.core.torchvision_compat import models as tv_models
from gtex_assets.lib.model import backbones as M

GRACE_HOPPER = os.path.join(
    os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg"
)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def offline(monkeypatch):
    """torchvision's weights download fails as it does on a machine without network."""

    def fail(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(M.models, "get_model", fail)


@pytest.mark.parametrize("backbone", sorted(M.BACKBONES))
def test_every_backbone_gives_pooled_features_and_logits(backbone):
    torch.manual_seed(0)
    model = M.build_model(backbone, 5, weights="none").eval()
    assert isinstance(model, M.TissueNet) and model.weights_source == "random"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats, logits = model.features(x), model(x)
    assert feats.shape == (2, M.BACKBONES[backbone]) and logits.shape == (2, 5)
    # The head is the only classifier: logits are the head applied to the features.
    torch.testing.assert_close(logits, model.head(feats))
    assert all(k.startswith(("body.", "head.")) for k in model.state_dict())


def test_dims_match_the_interface():
    assert M.BACKBONES == {
        "efficientnet_b0": 1280,
        "resnet50": 2048,
        "densenet121": 1024,
        "convnext_tiny": 768,
        "efficientnet_lite0": 1280,
    }
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        M.build_model("vgg16", 3, weights="none")


def test_imagenet_weights_offline_fail_clearly_or_fall_back(offline):
    with pytest.raises(M.WeightsUnavailable) as e:
        M.build_model("resnet50", 3, weights="imagenet")
    msg = str(e.value)
    assert "'resnet50'" in msg and "Name or service not known" in msg
    assert "efficientnet_lite0" in msg and "allow_random_init" in msg and "weights=" in msg
    model = M.build_model("resnet50", 3, weights="imagenet", allow_random_init=True)
    assert model.weights_source == "random"
    with pytest.raises(M.WeightsUnavailable, match="no package ships"):
        M.build_model("convnext_tiny", 3, weights="package")
    with pytest.raises(M.WeightsUnavailable, match="does not exist"):
        M.build_model("efficientnet_b0", 3, weights="/nonexistent/b0.pth")


def test_local_weights_file_native_or_tissuenet_format(tmp_path):
    torch.manual_seed(1)
    native = tv_models.efficientnet_b0(weights=None)  # as torchvision's own file is laid out
    torch.save(native.state_dict(), tmp_path / "b0.pth")
    model = M.build_model("efficientnet_b0", 4, weights=str(tmp_path / "b0.pth"))
    assert model.weights_source == f"file:{tmp_path / 'b0.pth'}"
    for k, v in native.features.state_dict().items():
        assert torch.equal(model.body.features.state_dict()[k], v)
    # A TissueNet state_dict (e.g. a fine-tuned checkpoint) gives its body, not its head.
    torch.save(model.state_dict(), tmp_path / "ft.pt")
    again = M.build_model("efficientnet_b0", 7, weights=str(tmp_path / "ft.pt"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again.eval().features(x), model.eval().features(x))
    with pytest.raises(ValueError, match="not a resnet50 state_dict"):
        M.build_model("resnet50", 3, weights=str(tmp_path / "b0.pth"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        M.build_model("resnet50", 3, weights=str(tmp_path / "junk.pt"))


def test_densenet_old_style_keys_are_renamed():
    state = {"features.denseblock1.denselayer1.norm.1.weight": torch.ones(1), "x.y": torch.ones(1)}
    out = M._rename_densenet_keys(state)
    assert set(out) == {"features.denseblock1.denselayer1.norm1.weight", "x.y"}


def test_lite0_package_weights_are_real_imagenet_weights():
    """The shipped weights load strictly into our EfficientNet-Lite0 and classify a real photo:
    Grace Hopper in uniform -> ImageNet class 652 'military uniform'."""
    net = M.EfficientNetLite0()
    net.load_state_dict(M._load_state_file(M.lite0_package_weights()), strict=True)
    model = M.build_model("efficientnet_lite0", 3, weights="package")
    assert model.weights_source == "package:efficientnet-lite0-57934424.pth"
    assert M.build_model("efficientnet_lite0", 3, weights="imagenet").weights_source.startswith(
        "package:"
    )
    img = Image.open(GRACE_HOPPER) if os.path.isfile(GRACE_HOPPER) else None
    if img is None:
        pytest.skip("matplotlib sample image not installed")
    x = M.eval_transform(224)(img)[None]
    # TissueNet converts ImageNet normalisation to Lite's; with _fc kept, "features" are logits.
    lite = M.TissueNet("efficientnet_lite0", net, 0).eval()
    with torch.no_grad():
        probs = torch.softmax(lite.features(x), 1)[0]
        net._fc = torch.nn.Identity()
        feats = model.eval().features(x)
        torch.manual_seed(0)
        random_feats = M.build_model("efficientnet_lite0", 3, weights="none").eval().features(x)
    assert int(probs.argmax()) == 652 and float(probs.max()) > 0.3
    entropy = float(-(probs * probs.clamp_min(1e-12).log()).sum())
    assert entropy < 0.6 * np.log(1000)  # far from uniform (6.9 nats)
    torch.testing.assert_close(feats, lite.features(x))  # same body as the raw net
    assert not torch.allclose(feats, random_feats, atol=1e-3)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = M.build_model("efficientnet_b0", 3, weights="none", dropout=0.3)
    card = {"classes": ["A", "B", "C"], "epoch": 5, "model_id": "efficientnet_b0-ft-e005-abcd1234"}
    path = M.save_checkpoint(model, card, tmp_path / "epoch_005.pt")
    assert path.is_file() and M.card_path_for(path).is_file()
    loaded, card2 = M.load_checkpoint(path)
    assert not loaded.training and loaded.model_id == card["model_id"]
    assert card2["backbone"] == "efficientnet_b0" and card2["classes"] == ["A", "B", "C"]
    assert card2["feature_dim"] == 1280 and card2["dropout"] == 0.3
    assert card2["format"] == M.CARD_FORMAT and card2["epoch"] == 5
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    # The file is a plain state_dict: loadable with weights_only=True.
    assert set(torch.load(path, weights_only=True)) == set(model.state_dict())
    with pytest.raises(ValueError, match="must list the 3 class names"):
        M.save_checkpoint(model, {"classes": ["A"]}, tmp_path / "bad.pt")
    torch.save(M.build_model("resnet50", 3, weights="none").state_dict(), path)
    with pytest.raises(ValueError, match="does not match its card"):
        M.load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="model card"):
        M.load_checkpoint(tmp_path / "missing.pt")


def test_resolve_device():
    assert M.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if M._mps_available() else "cpu")
    assert M.resolve_device("auto").type == expected
    assert M.resolve_device("").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            M.resolve_device("cuda")
    with pytest.raises(ValueError, match="not a torch device"):
        M.resolve_device("gpu-please")


def test_eval_transform_matches_training_preprocessing(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "t.jpg", quality=90)
    with Image.open(tmp_path / "t.jpg") as img:
        a = M.eval_transform(96)(img)
    b = M.normalize(M.load_tile(tmp_path / "t.jpg", 96)[None])[0]
    assert a.shape == (3, 96, 96)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # ImageNet normalisation: a mid-grey pixel maps to (0.5 - mean) / std.
    grey = M.normalize(torch.full((1, 3, 2, 2), 0.5))[0, :, 0, 0]
    expected = (0.5 - torch.tensor(M.IMAGENET_MEAN)) / torch.tensor(M.IMAGENET_STD)
    torch.testing.assert_close(grey, expected)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ValueError, match="broken.jpg"):
        M.load_tile(tmp_path / "broken.jpg", 32)


def test_off_the_shelf_model_ids(offline):
    m = M.off_the_shelf_model("efficientnet_lite0", "package")
    assert m.model_id == "efficientnet_lite0-imagenet" and not m.training
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), m.features(x))
    assert m(x).shape == (1, 1280)
    with pytest.raises(M.WeightsUnavailable):
        M.off_the_shelf_model("efficientnet_b0", "imagenet")
    r = M.off_the_shelf_model("efficientnet_b0", "imagenet", allow_random_init=True)
    assert r.model_id == "efficientnet_b0-random"


def test_predict_proba_batches_uint8_tiles():
    torch.manual_seed(0)
    model = M.build_model("efficientnet_b0", 4, weights="none")
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    probs = M.predict_proba(model, x, batch_size=2)
    assert probs.shape == (5, 4) and not model.training
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    with torch.no_grad():
        expected = torch.softmax(model(M.normalize(x)), 1).double().numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-6)


# ---------------------------------------------------------------------------- timm encoders


def _tiny_vit_file(tmp_path, img_size: int = 32):
    """A small timm ViT built offline and saved as a local weights file (with a head, as a
    user's checkpoint would have)."""
    import timm

    import gtex_assets.core.torchvision_compat  # noqa: F401

    torch.manual_seed(3)
    m = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=img_size, num_classes=7
    )
    path = tmp_path / "tiny_vit.pth"
    torch.save(m.state_dict(), path)
    return m.eval(), path


def test_parse_encoder_forms_and_canonical_text(tmp_path):
    uni = M.parse_encoder("UNI")
    assert uni.model == "hf-hub:MahmoodLab/UNI" and uni.weights == "pretrained"
    assert dict(uni.kwargs) == {"init_values": 1e-5, "dynamic_img_size": True}
    v2 = M.parse_encoder("virchow2")
    assert v2.pool == "cls_mean" and dict(v2.kwargs)["mlp_layer"] == "timm.layers.SwiGLUPacked"
    hub = M.parse_encoder("hf_hub:bioptimus/H-optimus-0?init_values=1e-5")
    assert hub.model == "hf-hub:bioptimus/H-optimus-0" and hub.name == "h-optimus-0"
    assert M.encoder_model_id(hub) == "h-optimus-0-hub"
    local = M.parse_encoder(f"vit_tiny_patch16_224?img_size=32&mean=[0.5,0.5,0.5]@{tmp_path}/w.pth")
    assert local.weights == f"{tmp_path}/w.pth" and dict(local.kwargs)["img_size"] == 32
    for spec in (uni, v2, hub, local):  # the canonical text round-trips
        assert M.parse_encoder(spec.text()) == spec
    assert M.encoder_model_id(local).startswith("vit_tiny_patch16_224-file-")
    for bad in ("", "hf-hub:nohub", "uni?pool=max", "uni@/some/file.bin", "vit_tiny?x"):
        with pytest.raises(ValueError):
            M.parse_encoder(bad)


def test_timm_encoder_from_local_file_matches_timm_with_its_own_normalisation(tmp_path):
    ref, path = _tiny_vit_file(tmp_path)
    enc = M.build_encoder(f"vit_tiny_patch16_224?img_size=32@{path}")
    assert enc.input_size == 32 and enc.feature_dim == 192
    assert enc.mean == (0.5, 0.5, 0.5) and enc.std == (0.5, 0.5, 0.5)  # timm's data config
    assert enc.weights_source == f"file:{path}"
    g = torch.Generator().manual_seed(0)
    raw = torch.rand(3, 3, 32, 32, generator=g)  # [0, 1] RGB
    imagenet = (raw - torch.tensor(M.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        M.IMAGENET_STD
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        want = ref.forward_head(ref.forward_features((raw - 0.5) / 0.5), pre_logits=True)
        got = enc(imagenet)  # the platform's input: ImageNet-normalised
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # mean/std overrides (a local file has no card)
    enc2 = M.build_encoder(
        f"vit_tiny_patch16_224?img_size=32&mean=[0.485,0.456,0.406]&std=[0.229,0.224,0.225]@{path}"
    )
    with torch.no_grad():
        torch.testing.assert_close(
            enc2(imagenet), ref.forward_head(ref.forward_features(imagenet), pre_logits=True),
            rtol=1e-4, atol=1e-5,
        )  # fmt: skip


def test_timm_encoder_errors_name_the_file_and_the_options(tmp_path, monkeypatch):
    _ref, path = _tiny_vit_file(tmp_path)
    with pytest.raises(ValueError, match="not a vit_small_patch16_224 state_dict"):
        M.build_encoder(f"vit_small_patch16_224?img_size=32@{path}")
    with pytest.raises(M.WeightsUnavailable, match="does not exist"):
        M.build_encoder(f"vit_tiny_patch16_224@{tmp_path}/missing.pth")
    import timm

    import gtex_assets.core.torchvision_compat  # noqa: F401

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(M.WeightsUnavailable, match="huggingface-cli login"):
        M.build_encoder("uni")


def test_cls_mean_pool_concatenates_class_and_patch_tokens(tmp_path):
    ref, path = _tiny_vit_file(tmp_path)
    enc = M.build_encoder(f'vit_tiny_patch16_224?img_size=32&pool="cls_mean"@{path}')
    assert enc.feature_dim == 384
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = enc(x)
        tokens = ref.forward_features(x * enc.in_scale + enc.in_shift)
    torch.testing.assert_close(out[:, :192], tokens[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[:, 192:], tokens[:, 1:].mean(1), rtol=1e-4, atol=1e-5)
