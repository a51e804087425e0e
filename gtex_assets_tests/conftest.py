"""Shared fixtures: everything offline, under tmp paths, on small generated data."""

from __future__ import annotations

import csv
import gzip
import os
import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"

# Under pytest-xdist each worker gets its share of the cores for torch/numba/BLAS threads
# (read when those libraries load, so set before any test module imports them).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _share = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(_var, _share)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path_factory):
    """No test reads the user's data root, source or Dagster instance."""
    monkeypatch.delenv("GTEX_SOURCE", raising=False)
    monkeypatch.setenv("GTEX_DATA_ROOT", str(tmp_path_factory.mktemp("root")))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def cmu_slide() -> Path:
    return FIXTURES / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def portal_csv_sample() -> Path:
    return FIXTURES / "GTEx_Portal.head300.csv"


def shared_dir(tmp_path_factory, name: str, build) -> Path:
    """A directory built once per test session and shared by every xdist worker: the first
    worker to ask builds it under a lock (into a temp name, renamed when complete), the others
    wait and reuse it. Tests treat it as read-only (copy before changing it)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, common to all workers
    out = base / f"shared-{name}"
    with FileLock(str(out) + ".lock"):
        if not out.is_dir():
            tmp = base / f".building-{name}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            build(tmp)
            tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def tiny_mirror(tmp_path_factory) -> Path:
    """A generated mirror: 3 tissues x 3 slides, small slides, a few hundred genes."""
    from gtex_assets.lib.synth import generate_mirror

    return shared_dir(
        tmp_path_factory,
        "tiny_mirror",
        lambda out: generate_mirror(
            out, tissues=3, slides_per_tissue=3, seed=7, slide_size=(1344, 896), n_genes=300
        ),
    )


@pytest.fixture
def mini_mirror(tmp_path, cmu_slide, portal_csv_sample):
    """12 portal rows (3 tissues x 4 samples): 11 real slides (copies of CMU), 1 truncated;
    RNA for every other sample. Returns (mirror dir, sample ids, RNA sample ids)."""
    from gtex_assets.lib.ingest.sources import GENE_TPM_GCT, SAMPLE_ATTRIBUTES

    m = tmp_path / "mirror"
    (m / "slides").mkdir(parents=True)
    with open(portal_csv_sample, newline="") as f:
        rows = list(csv.DictReader(f))
    keep = [r for r in rows if r["Tissue"] in ("Lung", "Thyroid", "Spleen")][:12]
    with open(m / "GTEx Portal.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), quoting=csv.QUOTE_ALL)
        w.writeheader()
        w.writerows(keep)
    ids = [r["Tissue Sample ID"] for r in keep]
    for sid in ids[:-1]:
        shutil.copy(cmu_slide, m / "slides" / f"{sid}.svs")
    (m / "slides" / f"{ids[-1]}.svs").write_bytes(cmu_slide.read_bytes()[:5000])  # truncated
    rna = ids[::2]
    aliquots = [f"{s}-SM-A{i:04d}" for i, s in enumerate(rna)]
    with open(m / SAMPLE_ATTRIBUTES, "w") as f:
        f.write("SAMPID\tSMTS\tSMTSD\n")
        for a, s in zip(aliquots, rna, strict=True):
            t = next(r["Tissue"] for r in keep if r["Tissue Sample ID"] == s)
            f.write(f"{a}\t{t.split(' - ')[0]}\t{t}\n")
        f.write("K-562-SM-26GMQ\tBone Marrow\tCells - Leukemia cell line (CML)\n")
    with gzip.open(m / GENE_TPM_GCT, "wt") as f:
        f.write(f"#1.2\n1\t{len(aliquots)}\nName\tDescription\t" + "\t".join(aliquots) + "\n")
        f.write("ENSG00000000001.1\tA1\t" + "\t".join(["1"] * len(aliquots)) + "\n")
    return m, ids, set(rna)
