"""Generate a complete, deterministic GTEx-like mirror directory (see :func:`generate_mirror`)."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from gtex_assets.lib.synth import expression as ex
from gtex_assets.lib.synth._rng import rng_for
from gtex_assets.lib.synth.cohort import Cohort, build_cohort, write_portal_csv
from gtex_assets.lib.synth.slide import (
    FACTORS,
    FAT_LOGIT_PER_Z,
    FIBRES_PER_Z,
    FIBROSIS_BASE,
    FIBROSIS_LOGIT_PER_Z,
    NUCLEI_PER_Z,
    TILE,
    SlideResult,
    SlideSpec,
    make_slide,
)
from gtex_assets.lib.synth.tissues import resolve_tissues

PORTAL_CSV_NAME = "GTEx Portal.csv"
SLIDES_DIR = "slides"
TRUTH_DIR = "truth"
SUMMARY_NAME = "summary.json"  # in truth/, written last: its presence means "mirror complete"


@dataclass(frozen=True)
class MirrorSummary:
    """What :func:`generate_mirror` wrote."""

    out_dir: Path
    n_rows: int  # rows of GTEx Portal.csv (one per slide)
    n_slides: int
    n_genes: int
    n_rna_samples: int
    tissues: tuple[str, ...]
    portal_csv: Path
    gct: Path
    sample_attributes: Path
    slides_dir: Path
    truth_dir: Path
    files: tuple[Path, ...] = field(repr=False)
    seconds: float = 0.0


def _atomic(path: Path, write: Callable[[Path], Any]) -> Any:
    """Run ``write(tmp)`` then rename tmp → path, so a killed run leaves no half file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        result = write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return result


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(header)
            w.writerows(rows)

    _atomic(path, write)


def _plan_artefacts(ids: Sequence[str], seed: int, pen: float, blur: float) -> tuple[set, set]:
    """Which slides get a pen smudge / an out-of-focus patch (disjoint when possible)."""
    rng = rng_for(seed, "artefact-plan")
    order = [ids[i] for i in rng.permutation(len(ids)).tolist()]
    n_pen = max(1, round(pen * len(ids))) if pen > 0 and ids else 0
    n_blur = max(1, round(blur * len(ids))) if blur > 0 and ids else 0
    pens = set(order[:n_pen])
    rest = order[n_pen:] or order
    return pens, set(rest[:n_blur])


def _usable_cpus() -> int:
    """CPUs this process may run on (a container's limit, not the host's core count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _worker_init() -> None:
    """Keep freed 16 MB numpy buffers in the heap of short-lived pool workers.

    Rendering allocates and frees many level-0 float fields; glibc would return each to the
    OS and page-fault it back in (a third of the CPU time went to the kernel). Raising the
    mmap/trim thresholds makes it reuse them. Only done in workers, never in the host process.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD (glibc maximum)
        libc.mallopt(-1, 512 * 1024 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc (macOS, musl): defaults are fine
        pass


def _render_all(
    specs: Sequence[SlideSpec], paths: Sequence[str], workers: int
) -> list[SlideResult]:
    """Render slides, in a spawn-based process pool when it pays off; results in input order.

    Each slide seeds its own generator from (seed, sample id), so results do not depend on
    the number of workers or the order they finish in.
    """
    if workers <= 1 or len(specs) <= 2:
        return [make_slide(s, p) for s, p in zip(specs, paths, strict=True)]
    ctx = multiprocessing.get_context("spawn")  # safe inside threaded hosts (Dagster, pytest)
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init) as pool:
        return list(pool.map(make_slide, specs, paths, chunksize=1))


def generate_mirror(
    out_dir: str | Path,
    *,
    tissues: int | Sequence[str] = 6,
    slides_per_tissue: int = 8,
    seed: int = 0,
    slide_size: tuple[int, int] = (2240, 1792),
    n_genes: int = 2000,
    mpp: float = 0.4990,
    app_mag: int = 20,
    rna_fraction: float = 0.85,
    extra_rna_samples: int = 3,
    workers: int | None = None,
    jpeg_quality: int = 85,
    pen_fraction: float = 0.15,
    blur_fraction: float = 0.15,
) -> MirrorSummary:
    """Write a GTEx-like mirror to ``out_dir``: the portal CSV, one SVS per slide, the gzipped
    gene-TPM GCT, the sample-attributes table, and the planted truth in ``truth/``.

    Deterministic: the same arguments give byte-identical tables and identical slide pixels
    (``workers`` does not matter). Every file is written to a temp name and renamed;
    ``truth/summary.json`` is removed first and written last, so it marks a complete mirror.

    ``slide_size`` is (width, height) at level 0; the pipeline cuts 448 px tiles, so
    (2240, 1792) holds 5 × 4 tiles. ``pen_fraction``/``blur_fraction`` of the slides (at least
    one each) get a flat ink smudge / an out-of-focus patch covering one whole tile.
    """
    t0 = time.perf_counter()
    names = resolve_tissues(tissues)
    width, height = (int(v) for v in slide_size)
    if width < 64 or height < 64:
        raise ValueError(f"slide_size={slide_size}: each side must be at least 64 px")
    out = Path(out_dir)
    slides_dir, truth_dir = out / SLIDES_DIR, out / TRUTH_DIR
    for d in (out, slides_dir, truth_dir):
        d.mkdir(parents=True, exist_ok=True)
    previous = _previous_slides(truth_dir / SUMMARY_NAME)
    (truth_dir / SUMMARY_NAME).unlink(missing_ok=True)  # "incomplete" until written again
    for d in (out, slides_dir, truth_dir):
        for tmp in d.glob(".*.tmp"):  # left by a killed run
            tmp.unlink(missing_ok=True)

    cohort = build_cohort(
        names, slides_per_tissue, seed=seed, rna_fraction=rna_fraction,
        extra_rna_samples=extra_rna_samples,
    )  # fmt: skip
    genes = ex.plant_genes(n_genes, names, seed)  # validates n_genes before the slow part
    slides = cohort.slides
    pens, blurs = _plan_artefacts([s.sample_id for s in slides], seed, pen_fraction, blur_fraction)
    specs = [
        SlideSpec(
            sample_id=s.sample_id,
            tissue=s.tissue,
            width=width,
            height=height,
            mpp=mpp,
            app_mag=app_mag,
            factors=tuple((f, s.factors[f]) for f in FACTORS),
            seed=seed,
            pen=s.sample_id in pens,
            blur=s.sample_id in blurs,
            quality=jpeg_quality,
        )  # fmt: skip
        for s in slides
    ]
    paths = [str(slides_dir / f"{s.sample_id}.svs") for s in slides]
    for stale in previous - {s.sample_id for s in slides}:  # from an earlier synthetic run
        (slides_dir / f"{stale}.svs").unlink(missing_ok=True)
    n_workers = workers if workers is not None else min(_usable_cpus(), len(specs))
    results = _render_all(specs, paths, max(1, n_workers))

    rna = cohort.rna
    log_tpm = ex.simulate_log_tpm(genes, rna, seed)
    text = ex.format_tpm(np.exp2(log_tpm) - 1.0)
    written_log = np.log2(1.0 + text.astype(float))  # what a reader of the GCT will compute
    gct = out / ex.GCT_NAME
    _atomic(gct, lambda tmp: ex.write_gct(tmp, genes, [s.aliquot_id for s in rna], text))
    attrs = out / ex.ATTRIBUTES_NAME
    _atomic(attrs, lambda tmp: ex.write_sample_attributes(tmp, cohort, seed))

    truth_files = _write_truth(truth_dir, cohort, results, genes, written_log)
    portal = out / PORTAL_CSV_NAME
    n_rows = _atomic(portal, lambda tmp: write_portal_csv(cohort, tmp))

    files = (portal, gct, attrs, *(Path(p) for p in paths), *truth_files)
    summary = MirrorSummary(
        out_dir=out, n_rows=n_rows, n_slides=len(slides), n_genes=len(genes.ids),
        n_rna_samples=len(rna), tissues=tuple(names), portal_csv=portal, gct=gct,
        sample_attributes=attrs, slides_dir=slides_dir, truth_dir=truth_dir,
        files=(*files, truth_dir / SUMMARY_NAME), seconds=0.0,
    )  # fmt: skip
    params = {
        "tissues": names, "slides_per_tissue": slides_per_tissue, "seed": seed,
        "slide_size": [width, height], "n_genes": n_genes, "mpp": mpp, "app_mag": app_mag,
        "rna_fraction": rna_fraction, "extra_rna_samples": extra_rna_samples,
        "jpeg_quality": jpeg_quality, "pen_fraction": pen_fraction, "blur_fraction": blur_fraction,
    }  # fmt: skip
    doc = _summary_json(params, summary, cohort, genes, written_log, results)
    _atomic(truth_dir / SUMMARY_NAME, lambda tmp: tmp.write_text(json.dumps(doc, indent=2) + "\n"))
    return replace(summary, seconds=round(time.perf_counter() - t0, 3))


def _previous_slides(summary: Path) -> set[str]:
    """Slide ids of an earlier synthetic mirror in the same place (to remove stale slides)."""
    try:
        doc = json.loads(summary.read_text())
    except (OSError, ValueError):
        return set()
    if doc.get("generator") != "gtex_assets.lib.synth":
        return set()
    return {
        s for s in doc.get("slides", []) if isinstance(s, str) and "/" not in s and ".." not in s
    }


def _write_truth(
    truth_dir: Path,
    cohort: Cohort,
    results: Sequence[SlideResult],
    genes: ex.GeneSet,
    log_tpm: np.ndarray,
) -> list[Path]:
    by_id = {r.sample_id: r for r in results}
    rows = []
    for s in cohort.samples:
        r = by_id.get(s.sample_id)
        realised = (
            [f"{r.tissue_fraction:.6f}", f"{r.fat_fraction:.6f}", r.n_nuclei, r.n_fibres,
             f"{r.fibrosis_fraction:.6f}"]
            if r else ["", "", "", "", ""]
        )  # fmt: skip
        rows.append(
            [s.sample_id, s.tissue, s.subject_id, int(s.has_slide), int(s.has_rna),
             s.aliquot_id or "", *(f"{s.factors[f]:.6f}" for f in FACTORS), *realised]
        )  # fmt: skip
    factors_csv = truth_dir / "slide_factors.csv"
    _write_csv(
        factors_csv,
        ["sample_id", "tissue", "subject_id", "has_slide", "has_rna", "aliquot_id", *FACTORS,
         "tissue_fraction", "fat_area_fraction", "n_nuclei", "n_fibres", "fibrosis_fraction"],
        rows,
    )  # fmt: skip
    linked_csv = truth_dir / "image_linked_genes.csv"
    _write_csv(
        linked_csv,
        ["gene_id", "symbol", "factor", "effect"],
        [[g, s, f, f"{e:.4f}"] for g, s, f, e, c in
         zip(genes.ids, genes.symbols, genes.factor, genes.effect, genes.category, strict=True)
         if c == "image_linked"],
    )  # fmt: skip
    genes_csv = truth_dir / "genes.csv"
    mx, sd = (
        log_tpm.max(axis=1, initial=0.0),
        (log_tpm.std(axis=1) if log_tpm.shape[1] else np.zeros(len(genes.ids))),
    )
    _write_csv(
        genes_csv,
        ["gene_id", "symbol", "category", "tissue", "factor", "effect", "max_log_tpm", "std_log_tpm"],
        [[g, s, c, t, f, f"{e:.4f}", f"{m:.4f}", f"{d:.4f}"] for g, s, c, t, f, e, m, d in
         zip(genes.ids, genes.symbols, genes.category, genes.tissue, genes.factor, genes.effect,
             mx, sd, strict=True)],
    )  # fmt: skip
    art_csv = truth_dir / "artefacts.csv"
    arts = [a for r in results for a in r.artefacts]
    _write_csv(
        art_csv,
        ["sample_id", "kind", "x", "y", "w", "h"],
        [[a["sample_id"], a["kind"], a["x"], a["y"], a["w"], a["h"]] for a in arts],
    )
    return [factors_csv, linked_csv, genes_csv, art_csv]


def _summary_json(
    params: dict,
    summary: MirrorSummary,
    cohort: Cohort,
    genes: ex.GeneSet,
    log_tpm: np.ndarray,
    results: Sequence[SlideResult],
) -> dict:
    """Parameters, counts, and the genes each expression filter is expected to drop."""
    cat = np.array(genes.category)
    ids = np.array(genes.ids)
    n = log_tpm.shape[1]
    mx = log_tpm.max(axis=1) if n else np.zeros(len(ids))
    sd = log_tpm.std(axis=1) if n else np.zeros(len(ids))
    symbols = np.array(genes.symbols)
    _, inverse, counts = np.unique(symbols, return_inverse=True, return_counts=True)
    repeated = counts[inverse] > 1
    tissue_counts = {t: sum(s.tissue == t for s in cohort.slides) for t in params["tissues"]}
    donors_per_tissue_ct = {}
    for s in cohort.slides:
        donors_per_tissue_ct.setdefault(s.subject_id, set()).add(s.tissue)
    return {
        "generator": "gtex_assets.lib.synth",
        "seed": params["seed"],
        "params": params,
        "counts": {
            "slides": summary.n_slides,
            "portal_rows": summary.n_rows,
            "donors": len({s.subject_id for s in cohort.samples}),
            "donors_in_several_tissues": sum(len(v) > 1 for v in donors_per_tissue_ct.values()),
            "rna_samples": summary.n_rna_samples,
            "slides_with_rna": sum(s.has_rna for s in cohort.slides),
            "slides_without_rna": sum(not s.has_rna for s in cohort.slides),
            "rna_without_slide": sum(not s.has_slide for s in cohort.rna),
            "genes": summary.n_genes,
            "genes_by_category": {c: int((cat == c).sum()) for c in ex.CATEGORIES},
            "slides_by_tissue": tissue_counts,
            "artefacts": {
                k: sum(a["kind"] == k for r in results for a in r.artefacts)
                for k in ("pen", "blur")
            },
        },
        "slides": [s.sample_id for s in cohort.slides],
        "tile_size": TILE,
        "factors": {
            "names": list(FACTORS),
            "pixel_effects": {
                "nuclear_density": f"nuclei density x exp({NUCLEI_PER_Z} z)",
                "fat_fraction": f"fat area fraction = sigmoid(logit(tissue base) + {FAT_LOGIT_PER_Z} z)",
                "fibrosis": (
                    f"collagen fibre density x exp({FIBRES_PER_Z} z); collagen patches over "
                    f"sigmoid(logit({FIBROSIS_BASE}) + {FIBROSIS_LOGIT_PER_Z} z) of the parenchyma"
                ),
            },
            "gene_model": "log2(1+TPM) = base + tissue offset + effect * z + N(0, 0.3)",
        },
        "expression_filters": {
            "rules": {
                "lowly": "max log2(1+TPM) over samples <= 5",
                "nonvariable": "std log2(1+TPM) over samples <= 0.5",
                "nonstandard": "clone-based symbol (contains '-' or '.')",
                "duplicate": "symbol shared by several Ensembl ids",
            },
            "planted": {
                c: ids[cat == c].tolist()
                for c in ("lowly", "nonvariable", "nonstandard", "duplicate")
            },
            "measured": {
                "lowly": ids[mx <= 5.0].tolist(),
                "nonvariable": ids[sd <= 0.5].tolist(),
                "nonstandard": [
                    g for g, s in zip(genes.ids, genes.symbols, strict=True) if "-" in s or "." in s
                ],
                "duplicate": ids[repeated].tolist(),
            },
            "expected_kept": ids[
                np.isin(cat, ["tissue_specific", "image_linked", "background"])
            ].tolist(),
        },
    }
