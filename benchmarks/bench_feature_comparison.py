"""Benchmark: feature_comparison's per-gene paired Wilcoxon test, vectorised vs scipy.

``feature_comparison`` tests, for every gene, R²(fine-tuned) vs R²(off-the-shelf) over the R
CV repeats. Before: ``scipy.stats.wilcoxon(B, A, axis=0)`` on the repeats × genes matrices;
after: ``gtex_assets.lib.analysis.stats.wilcoxon_signed_rank`` (all genes at once, method per
gene). The inputs imitate repeated-CV R²: continuous values for image-linked genes and, for the
genes both feature sets cannot predict, R² values that repeat exactly across repeats (both arms
fall back to the training mean and score the same), which gives ties and zero differences.

scipy decides its method once for the whole matrix, so it is timed on a random subset of genes
(the same share of tied genes) and extrapolated linearly to all genes; its p-values on that
subset are checked against the vectorised ones where both use the same method.

    .venv/bin/python benchmarks/bench_feature_comparison.py                 # 17,408 × 50 and × 10
    .venv/bin/python benchmarks/bench_feature_comparison.py --scipy-genes 200
"""

import argparse
import platform
import time
import warnings

import numpy as np
from scipy import stats

from gtex_assets.lib.analysis.stats import wilcoxon_signed_rank


def synth_r2(R: int, g: int, seed: int, frac_flat: float) -> tuple[np.ndarray, np.ndarray]:
    """repeats × genes R² of two feature sets; ``frac_flat`` of the genes tie across repeats."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(-0.05, 0.6, g)
    A = base + 0.03 * rng.standard_normal((R, g))
    B = A + 0.02 + 0.03 * rng.standard_normal((R, g))
    flat = rng.random(g) < frac_flat
    levels = np.round(rng.uniform(-0.02, 0.0, (3, g)), 4)  # a few exact values per gene
    pick = rng.integers(0, 3, (R, g))
    A[:, flat] = np.take_along_axis(levels, pick, 0)[:, flat]
    B[:, flat] = np.take_along_axis(levels, rng.integers(0, 3, (R, g)), 0)[:, flat]
    return A, B


def run(R: int, g: int, scipy_genes: int, seed: int, frac_flat: float) -> dict:
    A, B = synth_r2(R, g, seed, frac_flat)
    t0 = time.perf_counter()
    ours = wilcoxon_signed_rank(B, A)
    t_ours = time.perf_counter() - t0
    cols = np.sort(np.random.default_rng(seed + 1).choice(g, scipy_genes, replace=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        ref = np.asarray(stats.wilcoxon(B[:, cols], A[:, cols], axis=0).pvalue)
        t_scipy = time.perf_counter() - t0
    t_scipy_all = t_scipy * g / scipy_genes
    # scipy's one method for the subset; where it is ours too the p-values agree (a permutation
    # over untied ranks is the exact table)
    sub = ours.method[cols]
    tied = np.isin(sub, ["permutation", "asymptotic"]).any()
    scipy_method = ("permutation" if R <= 13 else "asymptotic") if tied else "exact"
    same = np.full(len(cols), scipy_method == "permutation") | (sub == scipy_method)
    ok = same & np.isfinite(ref)
    diff = float(np.max(np.abs(ours.pvalue[cols][ok] - ref[ok]))) if ok.any() else float("nan")
    methods = {m: int((ours.method == m).sum()) for m in ("exact", "permutation", "asymptotic")}
    return {
        "R": R,
        "genes": g,
        "ours_s": t_ours,
        "scipy_s_measured": t_scipy,
        "scipy_genes": scipy_genes,
        "scipy_s_all": t_scipy_all,
        "ratio": t_scipy_all / t_ours,
        "max_abs_dp_same_method": diff,
        "methods": methods,
        "scipy_method": scipy_method,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--genes", type=int, default=17_408)
    ap.add_argument("--repeats", type=int, nargs="+", default=[50, 10])
    ap.add_argument("--scipy-genes", type=int, default=300)
    ap.add_argument("--frac-flat", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} python {platform.python_version()}"
    )
    for R in a.repeats:
        r = run(R, a.genes, a.scipy_genes, a.seed, a.frac_flat)
        print(
            f"{r['genes']:,} genes × {R} repeats: vectorised {r['ours_s']:.3f} s; scipy "
            f"{r['scipy_s_measured']:.2f} s on {r['scipy_genes']} genes → {r['scipy_s_all']:.1f} s "
            f"extrapolated ({r['scipy_method']} for all); ratio {r['ratio']:,.0f}×; methods {r['methods']}; max |Δp| where "
            f"both used the same method {r['max_abs_dp_same_method']:.1e}"
        )


if __name__ == "__main__":
    main()
