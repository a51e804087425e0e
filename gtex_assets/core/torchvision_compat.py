"""Import torchvision safely beside a CPU-only torch. Everything imports torchvision from here.

PyPI's torchvision wheel is a CUDA build; beside the CPU torch wheel its C++ extension does not
load, and ``import torchvision`` then fails with ``operator torchvision::nms does not exist``
because ``torchvision/_meta_registrations.py`` registers fake kernels for ``nms``/``qnms``
unconditionally. Only in that case we define those operator schemas (no kernels: detection
ops stay unavailable, which this project never uses) and import again. Models and transforms
work; image decoding goes through Pillow, not ``torchvision.io``.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
# The Library object must stay alive, or its definitions are dropped again.
_LIB: torch.library.Library | None = None
PATCHED = False


def _op_exists(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


def _define_missing_ops() -> None:
    global _LIB
    if _LIB is None:
        _LIB = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _SCHEMAS.items():
        if not _op_exists(name):
            _LIB.define(schema)


def _import_torchvision() -> ModuleType:
    global PATCHED
    try:
        import torchvision as tv

        return tv
    except RuntimeError as e:
        if "torchvision::" not in str(e) or "does not exist" not in str(e):
            raise
    # Drop the half-imported package before trying again.
    for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[mod]
    _define_missing_ops()
    PATCHED = True
    import torchvision as tv

    return tv


torchvision = _import_torchvision()
models = torchvision.models
transforms = torchvision.transforms
from torchvision.transforms import v2 as transforms_v2  # noqa: E402

__all__ = ["PATCHED", "models", "torchvision", "transforms", "transforms_v2"]
