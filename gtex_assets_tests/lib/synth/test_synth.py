"""The synthetic GTEx mirror: real formats, planted truth, determinism."""

from __future__ import annotations

import csv
import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import tifffile

from gtex_assets.lib.synth import (
    FACTORS,
    GTEX_TISSUES,
    PROFILES,
    TISSUE_ORDER,
    SlideSpec,
    generate_mirror,
    render_slide,
)
from gtex_assets.lib.synth.cohort import AGE_BRACKETS, HARDY, PORTAL_HEADER
from gtex_assets.lib.synth.expression import ATTRIBUTES_NAME, GCT_NAME

ARGS = dict(tissues=3, slides_per_tissue=2, seed=11, slide_size=(1344, 896), n_genes=300)
QUOTED_ROW = re.compile(r'^"(?:[^"]|"")*"(?:,"(?:[^"]|"")*")*$')


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "mirror"
    s = generate_mirror(out, workers=2, **ARGS)
    assert s.n_slides == 6 and s.n_rows == 6 and s.n_genes == 300
    return out


@pytest.fixture(scope="module")
def mirror_again(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "again"
    generate_mirror(out, workers=1, **ARGS)  # serial: pixels must not depend on workers
    return out


def _portal(mirror: Path) -> list[dict[str, str]]:
    with open(mirror / "GTEx Portal.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _truth(mirror: Path, name: str) -> list[dict[str, str]]:
    with open(mirror / "truth" / name, newline="") as f:
        return list(csv.DictReader(f))


def _gct(mirror: Path) -> tuple[list[str], list[str], list[str], np.ndarray, list[str]]:
    with gzip.open(mirror / GCT_NAME, "rt") as f:
        lines = f.read().splitlines()
    header = lines[2].split("\t")
    rows = [ln.split("\t") for ln in lines[3:]]
    tpm = np.array([[float(v) for v in r[2:]] for r in rows])
    return lines[:2], header, [r[0] for r in rows], tpm, [r[1] for r in rows]


def _spec(mirror: Path, sample_id: str) -> SlideSpec:
    """The spec that produced a slide, rebuilt from the planted truth."""
    row = next(r for r in _truth(mirror, "slide_factors.csv") if r["sample_id"] == sample_id)
    kinds = {a["kind"] for a in _truth(mirror, "artefacts.csv") if a["sample_id"] == sample_id}
    w, h = ARGS["slide_size"]
    return SlideSpec(
        sample_id, row["tissue"], w, h, 0.499, 20,
        tuple((f, float(row[f])) for f in FACTORS), ARGS["seed"],
        pen="pen" in kinds, blur="blur" in kinds,
    )  # fmt: skip


def _level0(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as t:
        return t.pages[0].asarray()


# ---------------------------------------------------------------- tissues


def test_the_40_gtex_tissues_and_a_distinct_first_order():
    assert len(GTEX_TISSUES) == 40 == len(set(GTEX_TISSUES))
    assert {"Adipose - Visceral (Omentum)", "Skin - Sun Exposed (Lower leg)",
            "Esophagus - Gastroesophageal Junction", "Cervix - Ectocervix",
            "Kidney - Medulla", "Small Intestine - Terminal Ileum"} <= set(GTEX_TISSUES)  # fmt: skip
    assert sorted(TISSUE_ORDER) == sorted(GTEX_TISSUES) and set(PROFILES) == set(GTEX_TISSUES)

    def look(t: str) -> tuple:
        p = PROFILES[t]
        return p.main.family, p.surface.family if p.surface else None, p.fat_base > 0.5

    first = [look(t) for t in TISSUE_ORDER[:8]]
    assert len(set(first)) == 8  # no two of the first 8 share a morphology recipe


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown GTEx tissue"):
        generate_mirror(tmp_path / "m", tissues=["Lung", "Brain - Hippocampus"])
    with pytest.raises(ValueError, match="too small"):
        generate_mirror(tmp_path / "m", tissues=3, n_genes=20)
    assert not (tmp_path / "m" / "truth" / "summary.json").exists()


# ---------------------------------------------------------------- portal CSV


def test_portal_csv_has_the_real_format(mirror):
    raw = (mirror / "GTEx Portal.csv").read_bytes().decode()
    lines = raw.split("\r\n")
    assert lines[-1] == "" and all("\n" not in ln for ln in lines)  # CRLF like the portal
    assert lines[0] == ",".join(f'"{h}"' for h in PORTAL_HEADER)
    assert all(QUOTED_ROW.match(ln) for ln in lines[:-1]), "every field must be quoted"
    rows = _portal(mirror)
    assert len(rows) == 6 and tuple(rows[0]) == PORTAL_HEADER
    for r in rows:
        assert re.fullmatch(r"GTEX-[A-Z0-9]{4,5}-\d{2}26", r["Tissue Sample ID"])
        assert r["Tissue Sample ID"].rsplit("-", 1)[0] == r["Subject ID"]
        assert r["Sex"] in ("male", "female") and r["Age Bracket"] in AGE_BRACKETS
        assert r["Hardy Scale"] in HARDY
        assert r["Pathology Notes"].split(",")[0].endswith("pieces")
    assert [r["Tissue"] for r in rows].count("Lung") == 2
    assert len({r["Tissue Sample ID"] for r in rows}) == 6


def test_donors_recur_across_tissues_but_not_within_one(mirror):
    tissues_of = defaultdict(set)
    donors_of = defaultdict(list)
    for r in _portal(mirror):
        tissues_of[r["Subject ID"]].add(r["Tissue"])
        donors_of[r["Tissue"]].append(r["Subject ID"])
    assert max(len(t) for t in tissues_of.values()) >= 2
    assert all(len(d) == len(set(d)) for d in donors_of.values())
    assert len(tissues_of) >= ARGS["slides_per_tissue"]


# ---------------------------------------------------------------- slides


def test_slides_open_in_slideio_with_aperio_metadata(mirror):
    slideio = pytest.importorskip("slideio")
    rows = _portal(mirror)
    w, h = ARGS["slide_size"]
    for r in rows:
        path = mirror / "slides" / f"{r['Tissue Sample ID']}.svs"
        scene = slideio.open_slide(str(path), "SVS").get_scene(0)
        assert scene.magnification == 20
        assert scene.resolution[0] == pytest.approx(0.499e-6, rel=1e-3)
        assert tuple(scene.size) == (w, h) and scene.num_zoom_levels >= 2
    with tifffile.TiffFile(mirror / "slides" / f"{rows[0]['Tissue Sample ID']}.svs") as t:
        p0 = t.pages[0]
        assert p0.is_tiled and (p0.tilewidth, p0.tilelength) == (256, 256)
        assert p0.compression == 7 and p0.photometric == 2  # JPEG, RGB (as Aperio writes)
        assert (
            p0.description.startswith("Aperio Image Library") and "|MPP = 0.4990" in p0.description
        )


def test_read_block_returns_the_rendered_pixels(mirror):
    slideio = pytest.importorskip("slideio")
    sid = _portal(mirror)[0]["Tissue Sample ID"]
    rgb, _ = render_slide(_spec(mirror, sid))
    scene = slideio.open_slide(str(mirror / "slides" / f"{sid}.svs"), "SVS").get_scene(0)
    block = scene.read_block((448, 0, 448, 448))
    assert block.shape == (448, 448, 3)
    diff = np.abs(block.astype(int) - rgb[0:448, 448:896].astype(int))
    assert diff.mean() < 3.0  # JPEG Q85 only
    assert np.abs(scene.read_block((0, 0, *ARGS["slide_size"])).astype(int) - rgb).mean() < 3.0


def _tissue_stats(tissue: str, sample_id: str = "GTEX-TEST-0126") -> dict[str, float]:
    z = tuple((f, 0.0) for f in FACTORS)
    rgb, info = render_slide(SlideSpec(sample_id, tissue, 1344, 896, 0.499, 20, z, 3))
    inside = info["tissue_alpha"] > 0.99
    px = rgb[inside].astype(float)
    white = (px.min(axis=1) > 215).mean()
    hema = ((px[:, 2] > px[:, 0]) & (px[:, 0] < 150)).mean()  # blue-purple, dark: nuclei
    return {"white": white, "hema": hema, "mean": px.mean(axis=0), "info": info}


def test_tissue_morphology_differs_measurably():
    fat, liver = _tissue_stats("Adipose - Subcutaneous"), _tissue_stats("Liver")
    lung, spleen = _tissue_stats("Lung"), _tissue_stats("Spleen")
    assert fat["white"] > 0.6 and liver["white"] < 0.12  # fat vacuoles vs solid cords
    assert lung["white"] > 0.25  # alveolar air spaces
    assert spleen["hema"] > 3 * fat["hema"] and liver["hema"] > 2 * fat["hema"]
    assert np.abs(spleen["mean"] - liver["mean"]).sum() > 25  # red pulp vs pink cords
    assert fat["info"]["fat_fraction"] > 0.7 and liver["info"]["fat_fraction"] < 0.1


def test_factors_drive_the_pixels():
    def info(**z: float) -> dict:
        factors = tuple((f, z.get(f, 0.0)) for f in FACTORS)
        return render_slide(SlideSpec("GTEX-TEST-0226", "Lung", 896, 896, 0.499, 20, factors, 5))[1]

    lo, hi = info(nuclear_density=-1.5), info(nuclear_density=1.5)
    assert hi["n_nuclei"] > 2.0 * lo["n_nuclei"]  # exp(0.4 * 3) = 3.3
    assert info(fat_fraction=2.0)["fat_fraction"] > 4 * info(fat_fraction=-1.0)["fat_fraction"]
    assert info(fibrosis=2.0)["n_fibres"] > 2 * info(fibrosis=-1.0)["n_fibres"]


@pytest.mark.parametrize("tissue", ["Liver", "Muscle - Skeletal", "Thyroid"])
def test_fibrosis_is_visible_in_tissues_without_stroma(tissue: str):
    """Collagen patches replace parenchyma in every tissue, their area set by the factor."""

    def slide(z: float) -> tuple[np.ndarray, dict]:
        factors = tuple((f, z if f == "fibrosis" else 0.0) for f in FACTORS)
        return render_slide(SlideSpec("GTEX-TEST-0226", tissue, 896, 896, 0.499, 20, factors, 5))

    (rgb_lo, lo), (rgb_hi, hi) = slide(-1.5), slide(1.5)
    assert 0.01 < lo["fibrosis_fraction"] < 0.06 < 0.3 < hi["fibrosis_fraction"] < 0.55
    # dense collagen is eosin-rich: the tissue gets pinker (less green) as fibrosis rises
    m = lo["tissue_alpha"] > 0.99
    assert rgb_hi[..., 1][m].mean() < rgb_lo[..., 1][m].mean() - 2


def test_planted_artefacts_are_flat_or_blurred(mirror):
    arts = _truth(mirror, "artefacts.csv")
    assert {a["kind"] for a in arts} == {"pen", "blur"}
    for a in arts:
        x, y, w, h = (int(a[k]) for k in "xywh")
        assert (w, h) == (448, 448) and x % 448 == 0 and y % 448 == 0
        img = _level0(mirror / "slides" / f"{a['sample_id']}.svs")[y : y + h, x : x + w]
        std = img.reshape(-1, 3).std(axis=0)
        if a["kind"] == "pen":
            assert (std < 5).all(), std  # flat ink smudge
        else:
            clean, _ = render_slide(
                SlideSpec(**{**_spec(mirror, a["sample_id"]).__dict__, "blur": False, "pen": False})
            )
            sharp = clean[y : y + h, x : x + w].astype(float)
            grad = lambda im: np.abs(np.diff(im.astype(float), axis=1)).mean()  # noqa: E731
            assert grad(img) < 0.35 * grad(sharp)
    # ordinary tissue is far from flat: the most tissue-filled tile of a clean slide
    clean_id = next(r["Tissue Sample ID"] for r in _portal(mirror)
                    if r["Tissue Sample ID"] not in {a["sample_id"] for a in arts})  # fmt: skip
    _, info = render_slide(_spec(mirror, clean_id))
    img = _level0(mirror / "slides" / f"{clean_id}.svs")
    tiles = [(x, y) for y in (0, 448) for x in (0, 448, 896)]
    x, y = max(
        tiles, key=lambda t: info["tissue_alpha"][t[1] : t[1] + 448, t[0] : t[0] + 448].mean()
    )
    std = img[y : y + 448, x : x + 448].reshape(-1, 3).std(axis=0)
    assert (std > 6).all() and std.mean() > 15, std  # even fat-rich tissue is far above ink


# ---------------------------------------------------------------- expression


def test_gct_format_and_sample_mapping(mirror):
    head, header, ids, tpm, _ = _gct(mirror)
    assert head[0] == "#1.2" and head[1] == f"{len(ids)}\t{len(header) - 2}"
    assert header[:2] == ["Name", "Description"] and len(ids) == 300 == tpm.shape[0]
    assert all(re.fullmatch(r"ENSG\d{11}\.\d+", g) for g in ids) and len(set(ids)) == 300
    assert (tpm >= 0).all() and (tpm == 0).any()
    with gzip.open(mirror / GCT_NAME, "rt") as f:
        body = f.read()
    assert "e+" not in body and "e-" not in body and "\t0\t" in body  # GTEx-style numbers
    assert (mirror / GCT_NAME).read_bytes()[4:8] == b"\0\0\0\0"  # gzip mtime 0
    aliquots = header[2:]
    assert all(re.fullmatch(r"GTEX-[A-Z0-9]{4,5}-\d{4}-SM-[A-Z0-9]{5}", a) for a in aliquots)
    slides = {r["Tissue Sample ID"] for r in _portal(mirror)}
    rna_samples = {"-".join(a.split("-")[:3]) for a in aliquots}
    assert slides - rna_samples, "some slides must lack RNA"
    assert len(rna_samples - slides) == 3, "extra_rna_samples aliquots have no slide"
    assert len(slides & rna_samples) == 5  # round(0.85 * 6)


def test_sample_attributes_cover_every_aliquot(mirror):
    _, header, *_ = _gct(mirror)
    with open(mirror / ATTRIBUTES_NAME, newline="") as f:
        attrs = {r["SAMPID"]: r for r in csv.DictReader(f, delimiter="\t")}
    tissue = {r["sample_id"]: r["tissue"] for r in _truth(mirror, "slide_factors.csv")}
    for a in header[2:]:
        assert attrs[a]["SMTSD"] == tissue["-".join(a.split("-")[:3])]
        assert attrs[a]["SMAFRZE"] == "RNASEQ"
    assert attrs[header[2]]["SMTS"] in {"Adipose Tissue", "Lung", "Liver"}
    assert "K-562-SM-26GMQ" in attrs  # a non-GTEx row the pipeline must skip


def test_each_expression_filter_removes_planted_genes(mirror):
    _, _, ids, tpm, symbols = _gct(mirror)
    log = np.log2(1 + tpm)
    lowly = {g for g, m in zip(ids, log.max(axis=1), strict=True) if m <= 5}
    flat = {g for g, s in zip(ids, log.std(axis=1), strict=True) if s <= 0.5}
    clone = {g for g, s in zip(ids, symbols, strict=True) if re.search(r"[-.]", s)}
    counts = defaultdict(int)
    for s in symbols:
        counts[s] += 1
    repeated = {g for g, s in zip(ids, symbols, strict=True) if counts[s] > 1}
    truth = json.loads((mirror / "truth" / "summary.json").read_text())["expression_filters"]
    planted = {k: set(v) for k, v in truth["planted"].items()}
    assert lowly == planted["lowly"] and len(lowly) >= 20
    assert flat == planted["nonvariable"] and len(flat) >= 10
    assert clone == planted["nonstandard"] and len(clone) >= 10
    assert repeated == planted["duplicate"] and len(repeated) >= 4
    assert {"Y_RNA", "Metazoa_SRP"} <= {
        s for g, s in zip(ids, symbols, strict=True) if g in repeated
    }
    kept = set(ids) - lowly - flat - clone - repeated
    assert kept == set(truth["expected_kept"]) and len(kept) > 100


def test_tissue_specific_and_image_linked_genes(mirror):
    _, header, ids, tpm, _ = _gct(mirror)
    log = np.log2(1 + tpm)
    samples = ["-".join(a.split("-")[:3]) for a in header[2:]]
    factors = {r["sample_id"]: r for r in _truth(mirror, "slide_factors.csv")}
    tissue = np.array([factors[s]["tissue"] for s in samples])
    genes = {r["gene_id"]: r for r in _truth(mirror, "genes.csv")}
    row = {g: i for i, g in enumerate(ids)}
    liver = [
        g for g, r in genes.items() if r["category"] == "tissue_specific" and r["tissue"] == "Liver"
    ]
    assert any(genes[g]["symbol"] == "ALB" for g in liver)
    for g in liver:
        v = log[row[g]]
        assert v[tissue == "Liver"].min() > v[tissue != "Liver"].max() + 1
    linked = _truth(mirror, "image_linked_genes.csv")
    assert {r["factor"] for r in linked} == set(FACTORS)
    corr = []
    for r in linked:
        z = np.array([float(factors[s][r["factor"]]) for s in samples])
        c = np.corrcoef(z, log[row[r["gene_id"]]])[0, 1]
        corr.append(c * np.sign(float(r["effect"])))
        assert 1.0 <= abs(float(r["effect"])) <= 2.0
    assert np.median(corr) > 0.7


def test_truth_summary_counts(mirror):
    doc = json.loads((mirror / "truth" / "summary.json").read_text())
    c = doc["counts"]
    assert doc["seed"] == ARGS["seed"] and c["slides"] == 6 and c["rna_samples"] == 8
    assert c["slides_without_rna"] == 1 and c["rna_without_slide"] == 3
    assert sum(c["genes_by_category"].values()) == 300 and c["donors_in_several_tissues"] >= 1
    assert c["artefacts"] == {"pen": 1, "blur": 1}
    factors = _truth(mirror, "slide_factors.csv")
    z = np.array([[float(r[f]) for f in FACTORS] for r in factors])
    assert np.abs(z).max() < 5 and len(factors) == 9
    assert not list(mirror.rglob(".*.tmp")), "temp files left behind"


# ---------------------------------------------------------------- determinism


def test_same_seed_same_bytes_and_pixels(mirror, mirror_again):
    names = ["GTEx Portal.csv", GCT_NAME, ATTRIBUTES_NAME] + [
        f"truth/{p.name}" for p in sorted((mirror / "truth").iterdir())
    ]
    for name in names:
        assert (mirror / name).read_bytes() == (mirror_again / name).read_bytes(), name
    for p in sorted((mirror / "slides").glob("*.svs")):
        assert np.array_equal(_level0(p), _level0(mirror_again / "slides" / p.name)), p.name


def test_different_seed_different_mirror(mirror, tmp_path):
    other = tmp_path / "other"
    generate_mirror(other, **{**ARGS, "seed": 12, "slide_size": (448, 448)})
    for name in ("GTEx Portal.csv", GCT_NAME, "truth/slide_factors.csv"):
        assert (mirror / name).read_bytes() != (other / name).read_bytes()
    spec = _spec(mirror, _portal(mirror)[0]["Tissue Sample ID"])
    a, _ = render_slide(spec)
    b, _ = render_slide(SlideSpec(**{**spec.__dict__, "seed": 12}))
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 10
