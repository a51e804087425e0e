"""Benchmark: per-gene ridge R² (nested donor-grouped CV) — one multi-output solve vs sklearn.

This project: ``gtex_assets.lib.analysis.regression.ridge_gene_r2`` on all genes (one SVD per fold, every
gene and every λ by matrix products). Baseline: the per-gene sklearn loop
(``sklearn_per_gene_reference``: ``Ridge(alpha=λ)`` fitted per gene × outer fold × inner fold ×
λ, then refitted with the chosen λ) on the *same* outer and inner folds and λ grid, timed on a
random sample of genes and extrapolated linearly to all genes (its cost is exactly linear in
genes). Checks: the chosen λ per gene and fold agree, and max |ΔR²| on the sampled genes
(must be ≤ 1e-6).

Full scale (the issue's figure): 17,408 genes × 1,800 samples × 1,280 features:

    .venv/bin/python benchmarks/bench_gene_r2.py
    .venv/bin/python benchmarks/bench_gene_r2.py --quick          # 2,000 × 400 × 256, seconds

Both timings come from the same run on the same machine; the printed ratio is what to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from gtex_assets.lib.analysis.regression import (
    DEFAULT_ALPHAS,
    inner_donor_folds,
    ridge_gene_r2,
    sklearn_per_gene_reference,
)


def synth(n: int, p: int, g: int, seed: int, frac_linked: float = 0.05):
    """Embedding-like features (low-rank + noise), donors with 3 slides, planted linear genes."""
    rng = np.random.default_rng(seed)
    rank = min(64, p)
    Z = rng.standard_normal((n, rank))
    X = Z @ rng.standard_normal((rank, p)) / np.sqrt(rank) + 0.5 * rng.standard_normal((n, p))
    groups = np.arange(n) // 3  # donors
    n_linked = max(1, int(frac_linked * g))
    Y = rng.standard_normal((n, g))
    strength = rng.uniform(0.2, 2.0, n_linked)
    Y[:, :n_linked] += (Z @ rng.standard_normal((rank, n_linked)) / np.sqrt(rank)) * strength
    Y += rng.uniform(2, 10, g)  # logTPM-like offsets
    return X, Y, groups, n_linked


def plot(out: dict, dest: str) -> None:
    """Wall-clock and CPU seconds of both paths, log scale, ratio in the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 2.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rows = [
        (
            "sklearn per-gene loop\n(extrapolated)",
            out["baseline_extrapolated_s"],
            out.get("baseline_extrapolated_cpu_s"),
        ),
        ("ridge_gene_r2\n(all genes, one solve)", out["project_s"], out.get("project_cpu_s")),
    ]
    y = np.arange(len(rows))
    ax.barh(y + 0.2, [r[1] for r in rows], height=0.4, color="tab:blue", label="wall-clock")
    ax.barh(y - 0.2, [r[2] or 0 for r in rows], height=0.4, color="tab:gray", label="CPU")
    for yi, (_, w, c) in zip(y, rows, strict=True):
        ax.text(w * 1.1, yi + 0.2, f"{w:,.0f} s", va="center", fontsize=8)
        if c:
            ax.text(c * 1.1, yi - 0.2, f"{c:,.0f} s", va="center", fontsize=8)
    ax.set_yticks(y, [r[0] for r in rows], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(1, max(r[1] for r in rows) * 300)
    ax.set_xlabel("seconds (log scale)")
    ax.set_title(
        f"{out['genes']:,} genes × {out['samples']:,} samples × {out['features']:,} features: "
        f"{out['speedup']:,.0f}× faster (CPU time {out.get('speedup_cpu', float('nan')):,.0f}×)",
        fontsize=9,
    )
    ax.legend(frameon=False, fontsize=8, loc="upper right")
    fig.savefig(dest, dpi=110, bbox_inches="tight")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--genes", type=int, default=17_408)
    ap.add_argument("--samples", type=int, default=1_800)
    ap.add_argument("--features", type=int, default=1_280)
    ap.add_argument("--sample-genes", type=int, default=20, help="genes timed with the baseline")
    ap.add_argument("--n-splits", type=int, default=5)
    ap.add_argument("--inner-splits", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="2,000 genes × 400 samples × 256 features")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="BLAS threads for both paths (threadpoolctl); default: the library's own. On an "
        "oversubscribed machine 1 avoids OpenBLAS spin-wait collapse",
    )
    ap.add_argument("--project-only", action="store_true", help="skip the sklearn baseline")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("--plot", help="also write a bar chart (PNG) of the timings here")
    a = ap.parse_args(argv)
    if a.quick:
        a.genes, a.samples, a.features = 2_000, 400, 256
        a.sample_genes = min(a.sample_genes, 6)
    if a.threads is not None:
        from threadpoolctl import threadpool_limits

        threadpool_limits(a.threads)
    alphas = DEFAULT_ALPHAS
    print(
        f"scale: {a.genes:,} genes × {a.samples:,} samples × {a.features:,} features; "
        f"{a.n_splits} outer × {a.inner_splits} inner donor folds × {len(alphas)} λ; "
        f"BLAS threads {a.threads or 'default'}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"numpy {np.__version__}",
        flush=True,
    )
    X, Y, groups, n_linked = synth(a.samples, a.features, a.genes, a.seed)

    t0, c0 = time.perf_counter(), time.process_time()
    res = ridge_gene_r2(
        X, Y, groups, alphas=alphas, n_splits=a.n_splits, inner_splits=a.inner_splits,
        random_state=a.seed,
    )  # fmt: skip
    t_project, c_project = time.perf_counter() - t0, time.process_time() - c0
    print(
        f"project (all {a.genes:,} genes): {t_project:.2f} s wall, {c_project:.2f} s CPU",
        flush=True,
    )
    if a.project_only:
        return {"project_s": t_project}

    rng = np.random.default_rng(a.seed + 1)
    # half the sample from planted genes, half from the rest: both regimes are checked
    k1 = min(n_linked, a.sample_genes // 2)
    idx = np.sort(
        np.concatenate(
            [
                rng.choice(n_linked, k1, replace=False),
                n_linked + rng.choice(a.genes - n_linked, a.sample_genes - k1, replace=False),
            ]
        )
    )
    inner = inner_donor_folds(groups, res.folds, a.inner_splits, a.seed)
    t0, c0 = time.perf_counter(), time.process_time()
    ref = sklearn_per_gene_reference(X, Y[:, idx], res.folds, inner, alphas=alphas)
    t_sample, c_sample = time.perf_counter() - t0, time.process_time() - c0
    per_gene = t_sample / len(idx)
    t_baseline = per_gene * a.genes
    c_baseline = c_sample / len(idx) * a.genes
    d_r2 = float(np.abs(ref.r2 - res.r2[idx]).max())
    d_pred = float(np.abs(ref.oof - res.oof[:, idx]).max())
    same_alpha = float((ref.alpha_by_fold == res.alpha_by_fold[:, idx]).mean())
    ratio = t_baseline / t_project
    cpu_ratio = c_baseline / c_project
    out = {
        "genes": a.genes,
        "samples": a.samples,
        "features": a.features,
        "n_splits": a.n_splits,
        "inner_splits": a.inner_splits,
        "n_alphas": len(alphas),
        "cpus": os.cpu_count(),
        "blas_threads": a.threads,
        "project_s": round(t_project, 3),
        "baseline_sampled_genes": len(idx),
        "baseline_sample_s": round(t_sample, 3),
        "baseline_per_gene_s": round(per_gene, 4),
        "baseline_extrapolated_s": round(t_baseline, 1),
        "speedup": round(ratio, 1),
        "project_cpu_s": round(c_project, 3),
        "baseline_sample_cpu_s": round(c_sample, 3),
        "baseline_extrapolated_cpu_s": round(c_baseline, 1),
        "speedup_cpu": round(cpu_ratio, 1),
        "max_abs_delta_r2": d_r2,
        "max_abs_delta_pred": d_pred,
        "same_alpha_fraction": same_alpha,
        "sampled_r2_range": [float(ref.r2.min()), float(ref.r2.max())],
    }
    print(
        f"sklearn per-gene loop: {t_sample:.2f} s for {len(idx)} genes = {per_gene:.3f} s/gene "
        f"→ {t_baseline:,.0f} s ({t_baseline / 3600:.1f} h) extrapolated to {a.genes:,} genes"
    )
    print(f"  (CPU time: {c_sample:.2f} s for {len(idx)} genes → {c_baseline:,.0f} s extrapolated)")
    print(f"speed ratio: {ratio:,.0f}× wall-clock, {cpu_ratio:,.0f}× CPU time")
    print(
        f"sampled genes: max |ΔR²| = {d_r2:.2e}, max |Δprediction| = {d_pred:.2e}, "
        f"same λ in {same_alpha:.0%} of gene×fold choices; "
        f"R² range {ref.r2.min():.3f}..{ref.r2.max():.3f}"
    )
    ok = d_r2 <= 1e-6
    print("PASS" if ok else "FAIL: |ΔR²| > 1e-6")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    if a.plot:
        plot(out, a.plot)
    if not ok:
        sys.exit(1)
    return out


if __name__ == "__main__":
    main()
