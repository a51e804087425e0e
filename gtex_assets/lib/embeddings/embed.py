"""SPEC §7: tile embeddings (pooled backbone features) with a fast inference path, and slide means.

The reference computation is the classifier's own evaluation path: each tile JPEG decoded with
Pillow, resized with :func:`models.eval_transform` (antialiased bilinear, no crop), normalised,
and ``model.features`` in eager fp32 (:func:`reference_embed`). :class:`TileEmbedder` computes
the same features faster; each step is exact or checked:

* **Decode**: Pillow decode + the same bilinear resize to uint8 (:func:`models.load_tile`), in
  ``decode_workers`` threads that run a batch ahead of the model (Pillow releases the GIL);
  normalisation happens once per batch on the tensor. Pixel-identical to ``eval_transform``.
* **BatchNorm folded into the preceding convolution** (torch.fx graph rewrite; exact up to
  float rounding, verified on a probe batch, skipped for a model that cannot be traced).
* **ONNX Runtime engine on CPU** (``engine="auto"``, the default): the folded feature module is
  exported to ONNX in memory and run by ONNX Runtime in fp32, data parallel (one
  single-threaded run per core on micro-batches of 4 images). Same precision as torch (checked
  on a probe batch: cosine > 0.99999, else torch is used), ~2.3x faster than torch's eager
  kernels for EfficientNet's depthwise convolutions.
* torch path (GPU, ``engine="torch"``, or ONNX Runtime missing): **channels_last** memory format
  + ``torch.inference_mode``; denormals flushed to zero on CPU (process-wide torch setting);
  **bf16 autocast** where the hardware has native bf16 (CPU flags ``avx512_bf16``/``amx_bf16``,
  or a CUDA GPU with bf16): the first batch is embedded in both fp32 and bf16 and bf16 is kept
  only if every tile's cosine similarity to fp32 is >= ``min_cosine`` (0.999), else the exact
  fp32 path is used. Which one ran is reported (``report.engine``, ``TileEmbedder.precision``).

Measured in ``benchmarks/bench_embedding.py`` (figures in ``benchmarks/README_embeddings.md``):
on a 2-core Zen 4 CPU, trained EfficientNet-Lite0 at 224 px, the project path is ~3x the eager
fp32 baseline at cosine 1.0; torch bf16 would be ~2.4x but fails the cosine bar (0.994 min).
"""

from __future__ import annotations

import collections
import copy
import functools
import hashlib
import logging
import platform
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from gtex_assets.core.atomic import params_hash
from gtex_assets.lib.model import backbones as M

log = logging.getLogger(__name__)

# Bump when the embedding of the same tiles with the same model changes (in content hashes).
EMBEDDING_VERSION = "1"
DEFAULT_INPUT_SIZE = 224
PRECISIONS = ("auto", "fp32", "bf16")
ENGINES = ("auto", "torch", "onnxruntime")
ORT_MICRO_BATCH = 4  # images per ONNX Runtime call (see OrtFeatures.__call__)


# --------------------------------------------------------------------------------------------
# Options and hardware
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InferenceOptions:
    """How :class:`TileEmbedder` runs; defaults are the fast path."""

    batch_size: int = 64
    precision: str = "auto"  # auto: bf16 if native and accurate enough, else fp32
    # auto: ONNX Runtime on CPU (exact fp32, fastest measured) unless bf16 is forced; torch on GPU
    engine: str = "auto"
    channels_last: bool = True
    fold_bn: bool = True
    decode_workers: int = 2  # threads decoding JPEGs ahead of the model; 0 = inline
    min_cosine: float = 0.999  # bf16 vs fp32, every tile of the calibration batch
    calibration_tiles: int = 32

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.engine == "onnxruntime" and self.precision == "bf16":
            raise ValueError("precision 'bf16' runs on the torch engine only (engine='torch')")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.decode_workers < 0:
            raise ValueError(f"decode_workers must be >= 0, got {self.decode_workers}")


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` runs bf16 natively (emulated bf16 is slower than fp32 on CPU)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type != "cpu" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False  # Apple/ARM: stay on the exact path
    flags = _cpu_flags()
    return bool({"avx512_bf16", "amx_bf16"} & flags) and torch.backends.mkldnn.is_available()


# --------------------------------------------------------------------------------------------
# The feature module and BatchNorm folding
# --------------------------------------------------------------------------------------------


class _Features(nn.Module):
    """``images -> (N, dim)`` pooled features of a TissueNet or a torchvision classifier."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


class _TorchvisionFeatures(nn.Module):
    """torchvision EfficientNet/MobileNet-style model: ``avgpool(features(x))`` flattened."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.features = model.features
        self.avgpool = model.avgpool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.features(x)), 1)


def feature_module(model: nn.Module) -> nn.Module:
    """The part of ``model`` that maps a normalised image batch to pooled features."""
    if isinstance(model, M.TissueNet) or (
        callable(getattr(model, "features", None)) and not isinstance(model.features, nn.Module)
    ):
        return _Features(model).eval()
    if isinstance(getattr(model, "features", None), nn.Module) and hasattr(model, "avgpool"):
        return _TorchvisionFeatures(model).eval()
    raise TypeError(
        f"{type(model).__name__}: expected a TissueNet (features method) or a torchvision "
        "model with .features and .avgpool"
    )


class _ConvLeafTracer(torch.fx.Tracer):
    # Convolutions (incl. subclasses such as TF-'SAME' padded ones) and norms stay whole nodes.
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(m, qualname)


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def fold_batchnorm(module: nn.Module) -> tuple[nn.Module, int]:
    """Fold every eval-mode ``BatchNorm2d`` that directly follows a ``Conv2d`` into that conv.

    Returns ``(new module, number folded)``; ``module`` itself is not modified. A model that
    torch.fx cannot trace is returned as is with 0.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    module = module.eval()
    try:
        tracer = _ConvLeafTracer()
        graph = tracer.trace(module)
    except Exception as e:  # data-dependent control flow etc.
        log.info("BatchNorm folding skipped: %s cannot be traced (%s)", type(module).__name__, e)
        return module, 0
    gm = copy.deepcopy(
        torch.fx.GraphModule(tracer.root, graph)
    )  # never touch the caller's parameters
    mods = dict(gm.named_modules())
    calls = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.BatchNorm2d):
            continue
        prev = node.args[0] if node.args else None
        if (
            not isinstance(prev, torch.fx.Node)
            or prev.op != "call_module"
            or not isinstance(mods.get(prev.target), nn.Conv2d)
            or len(prev.users) != 1  # the conv output feeds only this norm
            or calls[prev.target] != 1  # the conv module is not reused elsewhere
            or calls[node.target] != 1
        ):
            continue
        bn, conv = mods[node.target], mods[prev.target]
        if bn.running_mean is None or bn.running_var is None:
            continue  # batch statistics at inference: not foldable
        _set_submodule(gm, prev.target, fuse_conv_bn_eval(conv.eval(), bn.eval()))
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        folded += 1
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm.eval(), folded


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def decode_tile(path: str | Path, input_size: int) -> np.ndarray:
    """One tile JPEG -> ``(S, S, 3)`` uint8, resized exactly as :func:`models.eval_transform`."""
    try:
        with Image.open(path) as img:
            return image_to_array(img, input_size)
    except (OSError, ValueError) as e:
        raise ValueError(f"tile {path}: cannot be decoded ({e})") from e


def image_to_array(img: Image.Image | np.ndarray, input_size: int) -> np.ndarray:
    """A Pillow image or ``(H, W, 3)`` uint8 array -> resized ``(S, S, 3)`` uint8 RGB."""
    if isinstance(img, np.ndarray):
        if img.ndim != 3 or img.shape[2] < 3 or img.dtype != np.uint8:
            raise ValueError(f"image array must be (h, w, 3) uint8, got {img.shape} {img.dtype}")
        img = Image.fromarray(np.ascontiguousarray(img[..., :3]))
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (input_size, input_size):
        img = img.resize((input_size, input_size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _stack(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """``(N, 3, S, S)`` uint8 tensor from HWC arrays."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


_MEAN = torch.tensor(M.IMAGENET_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(M.IMAGENET_STD).view(1, 3, 1, 1)


def normalize_batch(batch: torch.Tensor, memory_format=torch.contiguous_format) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` -> ImageNet-normalised float32, the same arithmetic as ToTensor +
    Normalize (``(x / 255 - mean) / std``)."""
    x = batch.to(dtype=torch.float32, memory_format=memory_format).div_(255.0)
    mean, std = _MEAN.to(x.device), _STD.to(x.device)
    return x.sub_(mean).div_(std)


def normalize_array(batch: np.ndarray) -> np.ndarray:
    """:func:`normalize_batch` in numpy: uint8 ``(N, 3, H, W)`` -> contiguous float32."""
    x = batch.astype(np.float32)  # contiguous copy in the array's (NCHW) index order
    x /= np.float32(255.0)
    x -= _MEAN.numpy().reshape(1, 3, 1, 1)
    x /= _STD.numpy().reshape(1, 3, 1, 1)
    return x


def iter_decoded(
    paths: Sequence[str | Path], input_size: int, batch_size: int, workers: int
) -> Iterator[tuple[int, list[np.ndarray | BaseException]]]:
    """``(start index, decoded arrays or the exception per tile)`` batch by batch, in order.

    With ``workers > 0`` the next two batches decode in threads while the caller computes.
    """
    n = len(paths)
    starts = range(0, n, batch_size)

    def one(p: str | Path) -> np.ndarray | BaseException:
        try:
            return decode_tile(p, input_size)
        except ValueError as e:
            return e

    if workers <= 0:
        for s in starts:
            yield s, [one(p) for p in paths[s : s + batch_size]]
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tile-decode") as pool:
        pending: collections.deque[tuple[int, list[Future]]] = collections.deque()
        it = iter(starts)

        def submit() -> None:
            s = next(it, None)
            if s is not None:
                pending.append((s, [pool.submit(one, p) for p in paths[s : s + batch_size]]))

        for _ in range(2):
            submit()
        while pending:
            s, futs = pending.popleft()
            submit()
            yield s, [f.result() for f in futs]


# --------------------------------------------------------------------------------------------
# The embedder
# --------------------------------------------------------------------------------------------


class OrtFeatures:
    """The feature module exported to ONNX and run by ONNX Runtime's CPU engine (fp32).

    Why: on CPU, PyTorch's eager kernels for EfficientNet's depthwise convolutions are slow;
    ONNX Runtime fuses conv+BN+activation and runs them ~3x faster at the same fp32 precision
    (benchmarks/bench_embedding.py). The export traces the module at a fixed image size with a
    dynamic batch dimension, in memory (no file).
    """

    def __init__(
        self,
        module: nn.Module,
        input_size: int,
        threads: int | None = None,
        micro_batch: int = ORT_MICRO_BATCH,
    ) -> None:
        import io
        import warnings

        import onnxruntime as ort

        buf = io.BytesIO()
        x = torch.randn(1, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic (fixed size)
            torch.onnx.export(
                module.cpu().eval(), (x,), buf, input_names=["x"], output_names=["y"],
                dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False,
            )  # fmt: skip
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Data parallel, not operator parallel: one single-threaded run per core, each on its
        # own micro-batch (runs are thread-safe and release the GIL): no intra-op
        # synchronisation, 143 vs 125 images/s on 2 cores (EfficientNet-Lite0, 224 px).
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
        self.threads = max(1, int(threads or torch.get_num_threads()))
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ort")
        self.micro_batch = max(1, int(micro_batch))

    def _run(self, a: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"x": a})[0]

    def __call__(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            x = x.detach().to("cpu", torch.float32).numpy()
        a = np.ascontiguousarray(x, dtype=np.float32)
        # Small runs keep a layer's activations in cache (4 images per run are ~15 % faster
        # per image than 16); results do not depend on the split (single-threaded runs).
        chunks = [a[i : i + self.micro_batch] for i in range(0, len(a), self.micro_batch)]
        if len(chunks) <= 1:
            return self._run(a)
        return np.concatenate(list(self._pool.map(self._run, chunks)))


def onnxruntime_available() -> bool:
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _same_features(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to float rounding (BN folding, another engine): every row's cosine > 0.99999."""
    return float(_cosine_rows(a, b).min()) > 0.99999


def _cosine_rows(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return num / np.maximum(den, 1e-30)


cosine_rows = _cosine_rows


@dataclass
class EmbedReport:
    """What an embedder did (asset metadata / benchmark output)."""

    precision: str = "fp32"
    engine: str = "torch"
    calibration_cosine: float | None = None  # min cosine bf16 vs fp32 on the first batch
    bn_folded: int = 0
    tiles: int = 0
    failed: list[str] = field(default_factory=list)  # "path: reason"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class TileEmbedder:
    """Pooled features of tiles with the fast inference path (module docstring).

    ``model``: a :class:`~gtex_assets.lib.model.backbones.TissueNet` (or a torchvision classifier with
    ``features``/``avgpool``). Not thread-safe; one per model.
    """

    def __init__(
        self,
        model: nn.Module,
        input_size: int = DEFAULT_INPUT_SIZE,
        options: InferenceOptions = InferenceOptions(),
        device: str | torch.device = "cpu",
    ) -> None:
        self.input_size = int(input_size)
        self.options = options
        self.device = M.resolve_device(device) if isinstance(device, str) else device
        self.report = EmbedReport()
        if self.device.type == "cpu":
            # Values below ~1e-38 become 0 instead of taking the slow denormal path (random-init
            # backbones are full of them). Process-wide; numerically nil for real features.
            torch.set_flush_denormal(True)
        self._fmt = torch.channels_last if options.channels_last else torch.contiguous_format
        feats = feature_module(model.eval()).to(self.device)
        ref = self._probe(feats)  # the unfolded model's features on a fixed random batch
        if options.fold_bn:
            folded, n = fold_batchnorm(feats)
            if n and _same_features(ref, self._probe(folded)):
                feats, self.report.bn_folded = folded, n
            elif n:
                log.warning("BatchNorm folding changed the features; using the unfolded model")
        self.module = feats.to(self.device, memory_format=self._fmt).eval()
        self.dim = int(ref.shape[1])
        self._precision: str | None = None  # auto/bf16: decided on the first batch
        self._ort: OrtFeatures | None = None
        if self._wants_ort(options):
            self._ort = self._make_ort(feats, ref)
        if self._ort is not None:
            self._precision = "fp32"
            self.report.precision, self.report.engine = "fp32", "onnxruntime"
            return
        if options.precision == "fp32" or (
            options.precision == "auto" and not native_bf16(self.device)
        ):
            self._precision = "fp32"
            self.report.precision = "fp32"

    # -- helpers ----------------------------------------------------------------------------
    def _wants_ort(self, options: InferenceOptions) -> bool:
        if options.engine == "torch" or self.device.type != "cpu":
            if options.engine == "onnxruntime":
                raise ValueError(f"engine 'onnxruntime' runs on CPU only, not {self.device}")
            return False
        if options.engine == "onnxruntime":
            if not onnxruntime_available():
                raise ImportError("engine 'onnxruntime' needs the onnx and onnxruntime packages")
            return True
        return options.precision != "bf16" and onnxruntime_available()

    def _make_ort(self, feats: nn.Module, ref: np.ndarray) -> OrtFeatures | None:
        """ONNX Runtime copy of ``feats``, kept only if it gives the reference features."""
        forced = self.options.engine == "onnxruntime"
        try:
            ort_feats = OrtFeatures(feats, self.input_size)
            same = _same_features(ref, self._probe(ort_feats))
        except Exception as e:  # an op the exporter does not know, a runtime error
            if forced:
                raise
            log.warning("ONNX Runtime unavailable for this model (%s); using torch", e)
            return None
        if same:
            return ort_feats
        if forced:
            raise RuntimeError("ONNX Runtime features differ from torch's for this model")
        log.warning("ONNX Runtime changed the features; using torch")
        return None

    def _probe(self, run) -> np.ndarray:
        """``run`` (a module or :class:`OrtFeatures`) on a fixed random batch of two images."""
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, self.input_size, self.input_size, generator=g)
        with torch.inference_mode():
            out = run(x.to(self.device))
        return out.float().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)

    def _forward(self, x: torch.Tensor, precision: str) -> torch.Tensor:
        if precision == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                return self.module(x).float()
        return self.module(x).float()

    @property
    def precision(self) -> str | None:
        """``fp32`` or ``bf16`` (``None`` until the first batch when ``auto``/``bf16``)."""
        return self._precision

    # -- public -----------------------------------------------------------------------------
    def embed_uint8(self, batch: torch.Tensor) -> np.ndarray:
        """``(N, 3, S, S)`` uint8 images -> ``(N, dim)`` float32 features."""
        if len(batch) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self._ort is not None:
            # numpy, not torch: a torch op here would wake torch's OpenMP threads, which then
            # spin for a while and take the cores from ONNX Runtime's runs (~30 % slower)
            return self._ort(normalize_array(batch.numpy()))
        with torch.inference_mode():
            x = normalize_batch(batch.to(self.device), self._fmt)
            if self._precision is None:
                return self._calibrate(x)
            return self._forward(x, self._precision).cpu().numpy()

    def _calibrate(self, x: torch.Tensor) -> np.ndarray:
        """Embed the first ``calibration_tiles`` both ways; keep bf16 only if accurate enough.
        The rest of the batch then runs once, in the chosen precision."""
        n = min(len(x), max(1, self.options.calibration_tiles))
        ref = self._forward(x[:n], "fp32")
        fast = self._forward(x[:n], "bf16")
        cos = float(_cosine_rows(ref.cpu(), fast.cpu()).min())
        self.report.calibration_cosine = cos
        if cos >= self.options.min_cosine or self.options.precision == "bf16":
            if cos < self.options.min_cosine:
                log.warning("bf16 forced although its min cosine to fp32 is %.5f", cos)
            self._precision, head = "bf16", fast
        else:
            log.warning(
                "bf16 features have min cosine %.5f < %.4f to fp32: using the exact fp32 path",
                cos,
                self.options.min_cosine,
            )
            self._precision, head = "fp32", ref
        self.report.precision = self._precision
        out = torch.cat([head, self._forward(x[n:], self._precision)]) if n < len(x) else head
        return out.cpu().numpy()

    def embed_images(self, images: Sequence[Image.Image | np.ndarray]) -> np.ndarray:
        """Pillow images / uint8 arrays (any size; resized like the tiles) -> features."""
        out = []
        bs = self.options.batch_size
        for i in range(0, len(images), bs):
            arrs = [image_to_array(im, self.input_size) for im in images[i : i + bs]]
            out.append(self.embed_uint8(_stack(arrs)))
        self.report.tiles += len(images)
        return np.vstack(out) if out else np.zeros((0, self.dim), dtype=np.float32)

    def embed_paths(
        self, paths: Sequence[str | Path], skip_errors: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(features (n_ok, dim), ok mask (n,))`` for tile image files.

        An undecodable file raises (naming it), or with ``skip_errors`` is left out (mask False)
        and listed in ``report.failed``.
        """
        paths = [str(p) for p in paths]
        ok = np.ones(len(paths), dtype=bool)
        out: list[np.ndarray] = []
        for start, items in iter_decoded(
            paths, self.input_size, self.options.batch_size, self.options.decode_workers
        ):
            arrs = []
            for j, item in enumerate(items):
                if isinstance(item, BaseException):
                    if not skip_errors:
                        raise item
                    ok[start + j] = False
                    self.report.failed.append(str(item))
                else:
                    arrs.append(item)
            if arrs:
                out.append(self.embed_uint8(_stack(arrs)))
        self.report.tiles += int(ok.sum())
        feats = np.vstack(out) if out else np.zeros((0, self.dim), dtype=np.float32)
        return feats, ok


def reference_embed(
    model: nn.Module,
    paths: Sequence[str | Path],
    input_size: int = DEFAULT_INPUT_SIZE,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """The baseline: ``eval_transform`` per tile, eager fp32 NCHW ``features`` under no_grad."""
    tf = M.eval_transform(input_size)
    feats = feature_module(model.eval()).to(device)
    out = []
    with torch.no_grad():
        for i in range(0, len(paths), batch_size):
            imgs = []
            for p in paths[i : i + batch_size]:
                with Image.open(p) as im:
                    imgs.append(tf(im))
            out.append(feats(torch.stack(imgs).to(device)).float().cpu().numpy())
    return np.vstack(out) if out else np.zeros((0, 0), dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Which models to embed with
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """One model whose features are embedded; ``model_id`` tags every row it produces."""

    model_id: str
    kind: str  # "checkpoint" | "off_the_shelf"
    backbone: str
    weights: str  # off-the-shelf: build_model's weights argument; checkpoint: "checkpoint"
    path: str | None = None  # checkpoint .pt
    epoch: int | None = None
    run_id: str | None = None
    input_size: int = DEFAULT_INPUT_SIZE
    selected: bool = False  # the classifier's selected checkpoint (default for lookups)
    fingerprint: str = ""  # changes when the weights change
    encoder: str = (
        ""  # timm encoder config string (lib.model.backbones.parse_encoder); "" = torchvision
    )
    feature_dim: int | None = None  # the model's own width (stored vectors may be zero-padded)
    normalization: str = "imagenet"  # the input normalisation the model applies to its tiles

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def file_fingerprint(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def weights_argument(weights_source: str) -> str:
    """The classifier card's ``weights_source`` -> ``build_model``'s ``weights`` argument."""
    s = str(weights_source or "")
    if s.startswith("imagenet"):
        return "imagenet"
    if s.startswith("package"):
        return "package"
    if s.startswith("file:"):
        return s[len("file:") :]
    return "none"


def checkpoint_spec(row: dict[str, Any]) -> ModelSpec:
    """A checkpoint row of ``classifier_checkpoints`` (+ its card) -> :class:`ModelSpec`."""
    path = str(row["path"])
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"checkpoint {row.get('model_id')}: file {path} is missing "
            "(re-materialise `tissue_classifier`)"
        )
    card = M.read_card(path)
    return ModelSpec(
        model_id=str(row.get("model_id") or card.get("model_id")),
        kind="checkpoint",
        backbone=str(card["backbone"]),
        weights="checkpoint",
        path=path,
        epoch=int(row["epoch"]) if row.get("epoch") is not None else card.get("epoch"),
        run_id=None if row.get("run_id") is None else str(row["run_id"]),
        input_size=int(card.get("input_size") or DEFAULT_INPUT_SIZE),
        selected=bool(row.get("selected", False)),
        fingerprint=file_fingerprint(path),
        feature_dim=int(card.get("feature_dim") or M.BACKBONES[str(card["backbone"])]),
    )


def latest_run_rows(checkpoints: pd.DataFrame) -> pd.DataFrame:
    """Rows of the latest training run: by ``created_at``/``trained_at`` when present, else the
    run of the selected checkpoint, else the last run listed."""
    if checkpoints.empty or "run_id" not in checkpoints.columns:
        return checkpoints
    for col in ("created_at", "trained_at", "finished_at"):
        if col in checkpoints.columns and checkpoints[col].notna().any():
            run = checkpoints.loc[checkpoints[col].idxmax(), "run_id"]
            return checkpoints[checkpoints["run_id"] == run]
    if "selected" in checkpoints.columns and checkpoints["selected"].fillna(False).any():
        run = checkpoints.loc[checkpoints["selected"].fillna(False).astype(bool), "run_id"].iloc[0]
        return checkpoints[checkpoints["run_id"] == run]
    return checkpoints[checkpoints["run_id"] == checkpoints["run_id"].iloc[-1]]


def select_models(
    checkpoints: pd.DataFrame | None,
    which: str = "latest_run",
    epochs: Sequence[int] = (),
    off_the_shelf: bool = True,
    backbone: str = M.DEFAULT_BACKBONE,
    weights: str | None = None,
    encoders: Sequence[str] = (),
) -> list[ModelSpec]:
    """The models to embed with: classifier checkpoints + the off-the-shelf backbone.

    ``which``: ``latest_run`` (every kept checkpoint of the latest run), ``selected``, ``all``
    or ``none``; ``epochs`` narrows to those epochs. The off-the-shelf model uses the backbone
    and pretrained-weights setting of the checkpoints' cards (so it is the same starting point
    the fine-tuning had), else ``backbone``/``weights`` (default ImageNet, or random init when
    ImageNet weights are unavailable; the model id says which). ``encoders``: further
    off-the-shelf arms, timm encoder strings (:func:`encoder_spec`).
    """
    if which not in ("latest_run", "selected", "all", "none"):
        raise ValueError(f"checkpoints {which!r}: use latest_run, selected, all or none")
    specs: list[ModelSpec] = []
    if checkpoints is not None and len(checkpoints) and which != "none":
        rows = checkpoints
        if which == "latest_run":
            rows = latest_run_rows(rows)
        elif which == "selected":
            rows = rows[rows["selected"].fillna(False).astype(bool)]
        if epochs:
            rows = rows[rows["epoch"].isin(list(epochs))]
        sort_cols = [c for c in ("run_id", "epoch") if c in rows.columns]
        for row in rows.sort_values(sort_cols).to_dict("records"):
            specs.append(checkpoint_spec(row))
    if off_the_shelf:
        card_weights = None
        if specs:
            card = M.read_card(specs[0].path)
            backbone = str(card["backbone"])
            card_weights = weights_argument(card.get("weights_source", ""))
        w = weights or card_weights or "imagenet"
        model = build_off_the_shelf(backbone, w)
        specs.append(
            ModelSpec(
                model_id=str(model.model_id),
                kind="off_the_shelf",
                backbone=backbone,
                weights=w if model.weights_source != "random" else "none",
                input_size=specs[0].input_size if specs else DEFAULT_INPUT_SIZE,
                fingerprint=params_hash({"weights_source": model.weights_source, "seed": 0}),
                feature_dim=int(model.feature_dim),
            )
        )
    specs.extend(encoder_spec(text) for text in encoders)
    ids = [s.model_id for s in specs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"model ids are not unique: {dup}")
    return specs


def encoder_spec(text: str) -> ModelSpec:
    """A timm encoder config string -> the :class:`ModelSpec` of an off-the-shelf arm. Builds
    the encoder (downloads hub weights once) to learn its input size, normalisation and width;
    the built model is kept for :func:`load_model` (one model cached)."""
    enc_spec = M.parse_encoder(text)
    canonical = enc_spec.text()
    local = enc_spec.weights not in ("pretrained", "none")
    file_fp = (
        file_fingerprint(enc_spec.weights) if local and Path(enc_spec.weights).is_file() else ""
    )
    enc = _encoder(canonical, file_fp)
    # hub/timm weights: the spec and timm's source name them; random: seeded
    fp = file_fp or params_hash({"encoder": canonical, "source": enc.weights_source})
    return ModelSpec(
        model_id=enc.model_id,
        kind="off_the_shelf",
        backbone=enc_spec.model,
        weights=enc_spec.weights,
        input_size=enc.input_size,
        fingerprint=fp,
        encoder=canonical,
        feature_dim=enc.feature_dim,
        normalization=enc.normalization,
    )


@functools.lru_cache(maxsize=1)
def _encoder(text: str, file_fp: str) -> M.TimmEncoder:
    # Selection and embedding build the same encoder (a foundation model's weights are GBs);
    # keyed on the weights file's hash too, so an edited file is never served from the cache.
    return M.build_encoder(text)


def build_off_the_shelf(backbone: str, weights: str) -> M.TissueNet:
    """The un-fine-tuned backbone; a random init (weights unavailable or "none") is seeded so
    that its embeddings are reproducible."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return M.off_the_shelf_model(backbone, weights, allow_random_init=True)


def load_model(spec: ModelSpec, device: str | torch.device = "cpu") -> nn.Module:
    """The model of a spec, in eval mode; checks the weights did not change since selection."""
    if spec.kind == "checkpoint":
        if spec.fingerprint and file_fingerprint(spec.path) != spec.fingerprint:
            raise RuntimeError(f"checkpoint {spec.path} changed while embedding ({spec.model_id})")
        model, _card = M.load_checkpoint(spec.path, device=device)
        return model.eval()
    if spec.encoder:
        local = spec.weights not in ("pretrained", "none")
        file_fp = file_fingerprint(spec.weights) if local else ""
        if local and file_fp != spec.fingerprint:
            raise RuntimeError(f"encoder {spec.encoder} changed since selection ({spec.model_id})")
        enc = _encoder(spec.encoder, file_fp)
        if enc.model_id != spec.model_id:
            raise RuntimeError(f"encoder {spec.encoder} is now {enc.model_id}, not {spec.model_id}")
        return enc.to(device).eval()
    model = build_off_the_shelf(spec.backbone, spec.weights)
    if model.model_id != spec.model_id:
        raise RuntimeError(f"off-the-shelf model is now {model.model_id}, expected {spec.model_id}")
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------
# Tiles -> rows, and slide means
# --------------------------------------------------------------------------------------------


def tile_ids(df: pd.DataFrame) -> pd.Series:
    """``<sample id>_<x>_<y>`` (the balanced sample's ``tile_id``)."""
    return (
        df["tissue_sample_id"].astype(str) + "_" + df["x"].astype(str) + "_" + df["y"].astype(str)
    )


def tiles_hash(tiles: pd.DataFrame) -> str:
    """Hash of a slide's tile list (which tiles, where, whether sampled)."""
    cols = [c for c in ("tile_id", "path", "sampled", "level") if c in tiles.columns]
    blob = tiles[cols].astype(str).sort_values(cols).to_csv(index=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def content_hash(spec: ModelSpec, tiles_digest: str) -> str:
    """What decides a slide's rows for one model: weights, tiles, input size, code version."""
    return params_hash(
        {
            "model_id": spec.model_id,
            "fingerprint": spec.fingerprint,
            "tiles": tiles_digest,
            "input_size": spec.input_size,
            "version": EMBEDDING_VERSION,
        }
    )


def slide_means(
    meta: pd.DataFrame, vectors: np.ndarray, by: Sequence[str] = ("model_id", "tissue_sample_id")
) -> tuple[pd.DataFrame, np.ndarray]:
    """Mean vector per group (float64 sums, float32 out): ``(one row per group with n_tiles,
    (n_groups, dim))``, groups sorted by ``by``."""
    if len(meta) != len(vectors):
        raise ValueError(f"{len(meta)} rows but {len(vectors)} vectors")
    by = list(by)
    if len(meta) == 0:
        return pd.DataFrame(columns=[*by, "n_tiles"]), np.zeros(
            (0, vectors.shape[1] if vectors.ndim == 2 else 0), np.float32
        )
    keys = meta[by].astype(str).agg("\x1f".join, axis=1).to_numpy()
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    sums = np.add.reduceat(vectors[order].astype(np.float64), starts, axis=0)
    counts = np.diff(np.r_[starts, len(sk)])
    means = (sums / counts[:, None]).astype(np.float32)
    first = meta.iloc[order[starts]].reset_index(drop=True)
    groups = first[by].copy()
    groups["n_tiles"] = counts.astype(np.int32)
    return groups, means


def fit_width(vectors: np.ndarray, feature_dim: int | None, width: int) -> np.ndarray:
    """A model's vectors at the store's common ``width``: its first ``feature_dim`` values,
    zero-padded. Why: Parquet/LanceDB columns hold one vector size, and encoders differ (192
    to 2,560). Zero columns change nothing downstream -- centred ridge, PCA, cosine and
    Euclidean distances, k-means and the RBF 'scale' heuristic (its n_features x variance of
    centred data is the sum of squares per row) are all exactly invariant to them."""
    v = np.asarray(vectors, dtype=np.float32)
    d = int(feature_dim or v.shape[1])
    if d > width:
        raise ValueError(f"vectors of width {d} do not fit in {width}")
    if v.shape[1] == width and d == width:
        return v
    out = np.zeros((len(v), width), dtype=np.float32)
    out[:, :d] = v[:, :d]
    return out
