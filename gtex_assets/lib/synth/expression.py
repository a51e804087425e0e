"""Synthetic gene TPM matrix (GTEx GCT v1.2, gzipped) and the sample-attributes table.

Genes are planted in categories so that every expression filter of the pipeline has
something to remove and the image→expression stages have known answers:

- ``tissue_specific``: high in one tissue (markers such as ALB for Liver, SFTPC for Lung);
- ``image_linked``: logTPM = base + effect · z(factor) + noise, z being the same per-sample
  morphology factor that drives the slide's pixels (see ``slide.render_slide``);
- ``background``: variable, tissue-dependent, unrelated to the image;
- ``lowly``: max log2(1+TPM) ≤ 4.7 in every sample (removed by "max logTPM > 5");
- ``nonvariable``: high but flat, std(log2(1+TPM)) < 0.3 (removed by "std > 0.5");
- ``nonstandard``: clone-based names (``RP11-34P13.3``, ``AC012345.1``);
- ``duplicate``: one symbol for several Ensembl ids (``Y_RNA``, ``Metazoa_SRP``, ``U6``).

The last two pass the numeric filters on purpose, so each filter's removals are distinct.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gtex_assets.lib.synth._rng import rng_for
from gtex_assets.lib.synth.cohort import Cohort, TissueSample
from gtex_assets.lib.synth.slide import FACTORS
from gtex_assets.lib.synth.tissues import SMTS

GCT_NAME = "GTEx_Analysis_2017-06-05_v8_RNASeQCv1.1.9_gene_tpm.gct.gz"
ATTRIBUTES_NAME = "GTEx_Analysis_v8_Annotations_SampleAttributesDS.txt"
CATEGORIES = (
    "tissue_specific",
    "image_linked",
    "background",
    "lowly",
    "nonvariable",
    "nonstandard",
    "duplicate",
)
LOW_MAX, KEEP_MAX = 4.7, 5.3  # planted margins around the pipeline's "max logTPM > 5"
FLAT_STD, KEEP_STD = 0.3, 0.6  # ... and around "std > 0.5"

# Real marker genes (only the names matter): a few per tissue, all distinct.
MARKERS: dict[str, tuple[str, ...]] = {
    "Adipose - Subcutaneous": ("ADIPOQ", "FABP4", "LPL", "SFRP4", "CFD"),
    "Adipose - Visceral (Omentum)": ("MSLN", "UPK3B", "ITLN1", "KRT19", "CALB2"),
    "Adrenal Gland": ("CYP11B1", "CYP11B2", "STAR", "CYP17A1", "NR5A1"),
    "Artery - Aorta": ("ELN", "MYH11", "CNN1", "ACTA2", "MFAP4"),
    "Artery - Coronary": ("LMOD1", "SMTN", "KCNMB1", "SOST"),
    "Artery - Tibial": ("MYOCD", "TAGLN", "SYNPO2", "CASQ2"),
    "Bladder": ("UPK1A", "UPK1B", "UPK2", "UPK3A"),
    "Brain - Cerebellum": ("CBLN1", "PCP2", "ZIC1", "GABRA6"),
    "Brain - Cortex": ("GFAP", "SNAP25", "NRGN", "SLC17A7"),
    "Breast - Mammary Tissue": ("ANKRD30A", "SCGB2A2", "PIP", "KRT15"),
    "Cervix - Ectocervix": ("KRT6A", "SPRR1A", "CRNN", "KRT5"),
    "Cervix - Endocervix": ("MUC5B", "MUC16", "SLC34A2", "PAX8"),
    "Colon - Sigmoid": ("HAND2", "SYNM", "PCP4", "GREM1"),
    "Colon - Transverse": ("CDX2", "CDX1", "MUC2", "CEACAM5", "LGALS4"),
    "Esophagus - Gastroesophageal Junction": ("CHRM2", "NOS1", "PRPH"),
    "Esophagus - Mucosa": ("KRT4", "KRT13", "TGM3", "ECM1"),
    "Esophagus - Muscularis": ("CHRM3", "KIT", "ANO1"),
    "Fallopian Tube": ("OVGP1", "FOXJ1", "CAPS", "DNAH5"),
    "Heart - Atrial Appendage": ("NPPA", "MYL4", "MYL7", "SLN"),
    "Heart - Left Ventricle": ("MYH7", "NPPB", "MYL2", "TNNI3", "MB"),
    "Kidney - Cortex": ("UMOD", "SLC34A1", "NPHS1", "NPHS2", "PAX2"),
    "Kidney - Medulla": ("AQP2", "SLC12A1", "CLDN16", "CALB1"),
    "Liver": ("ALB", "APOA1", "CYP3A4", "SERPINA1", "TF", "HP"),
    "Lung": ("SFTPC", "SFTPB", "SFTPA1", "NAPSA", "AGER"),
    "Minor Salivary Gland": ("PRB1", "STATH", "HTN3", "MUC7"),
    "Muscle - Skeletal": ("ACTA1", "MYH2", "CKM", "MYL1", "TNNT3"),
    "Nerve - Tibial": ("MPZ", "PMP22", "PRX", "S100B", "SOX10"),
    "Ovary": ("FOXL2", "AMHR2", "INHA", "WT1"),
    "Pancreas": ("PRSS1", "CPA1", "CELA3A", "INS", "GCG", "PNLIP"),
    "Pituitary": ("POMC", "GH1", "PRL", "CGA", "LHB"),
    "Prostate": ("KLK3", "KLK2", "MSMB", "ACPP", "TGM4"),
    "Skin - Not Sun Exposed (Suprapubic)": ("KRT1", "KRT10", "LOR", "DCD"),
    "Skin - Sun Exposed (Lower leg)": ("FLG", "KRT2", "LCE2B", "KRT77"),
    "Small Intestine - Terminal Ileum": ("FABP2", "APOA4", "DEFA5", "DEFA6", "RBP2"),
    "Spleen": ("CD5L", "CR2", "FCRL1", "STAB2"),
    "Stomach": ("PGC", "GKN1", "GKN2", "ATP4A", "ATP4B", "LIPF"),
    "Testis": ("PRM1", "PRM2", "TNP1", "DAZL", "DDX4"),
    "Thyroid": ("TG", "TPO", "TSHR", "FOXE1", "IYD"),
    "Uterus": ("HOXA10", "HOXA11", "OXTR", "PGR"),
    "Vagina": ("SPRR2A", "SPRR1B", "ALOX12", "CRCT1"),
}
FACTOR_GENES: dict[str, tuple[str, ...]] = {
    "nuclear_density": ("MKI67", "TOP2A", "PTPRC", "CD3E", "MS4A1", "CCNB1", "CD19", "CD52",
                        "LCK", "CD2", "CDK1", "BIRC5", "CENPF", "UBE2C", "RRM2", "TYMS",
                        "CD79A", "CORO1A", "LAPTM5", "CXCR4"),
    "fat_fraction": ("PLIN1", "CIDEA", "LEP", "CIDEC", "GPD1", "TUSC5", "PLIN4", "LIPE", "AQP7",
                     "RBP4", "PNPLA2", "CD36", "THRSP", "SLC2A4", "DGAT2", "PPARG", "ACACB",
                     "G0S2", "SAA1", "TIMP4"),
    "fibrosis": ("COL1A1", "COL1A2", "COL3A1", "FN1", "POSTN", "LUM", "DCN", "SPARC", "COL5A1",
                 "FAP", "COL6A3", "THBS2", "MMP2", "LOX", "CTHRC1", "FBN1", "COMP", "ASPN",
                 "VCAN", "TNC"),
}  # fmt: skip
DUPLICATE_SYMBOLS = ("Y_RNA", "Metazoa_SRP", "U6", "U3", "SNORA70", "7SK", "5S_rRNA", "snoU13",
                     "SNORD112", "U8", "Vault", "uc_338")  # fmt: skip
# The first rows of the real GCT, for flavour: (id, symbol, category).
REAL_HEAD = (
    ("ENSG00000223972.5", "DDX11L1", "lowly"),
    ("ENSG00000227232.5", "WASH7P", "background"),
    ("ENSG00000243485.5", "RP11-34P13.3", "nonstandard"),
    ("ENSG00000237613.2", "FAM138A", "lowly"),
    ("ENSG00000186092.4", "OR4F5", "lowly"),
)
_PREFIXES = ("ZNF", "SLC", "TMEM", "CCDC", "FAM", "KIAA", "LRRC", "ANKRD", "WDR", "ZBTB", "RNF",
             "TRIM", "KLHL", "DNAJC", "PPP1R", "RBM", "TTC", "ARHGAP", "USP", "MAP3K", "ABCA",
             "ACSL", "ADAM", "AKAP", "BTBD", "CDK", "CLDN", "DOCK", "EFCAB", "EPHA", "FBXO",
             "GPR", "IFT", "KCNJ", "KIF", "MYO", "NDUFA", "NUP", "PCDHB", "PLEKHA", "PRDM",
             "RAB", "SPATA", "SYT", "TBC1D", "UBE2", "ZC3H", "SH3BP", "PHF", "NUDT", "SNX",
             "STK", "SMIM", "TSPAN", "VPS", "ZDHHC", "CYP4", "HSPA", "PDE", "SEMA")  # fmt: skip
_SUFFIXES = ("", "", "", "", "A", "B", "C", "L", "L1", "L2")


@dataclass
class GeneSet:
    """The planted genes (rows of the GCT, in file order)."""

    ids: list[str]
    symbols: list[str]
    category: list[str]
    tissue: list[str]  # tissue of a tissue-specific gene, else ""
    factor: list[str]  # factor of an image-linked gene, else ""
    effect: list[float]  # log2 units per SD of the factor, else 0


def _counts(n_genes: int, n_tissues: int) -> dict[str, int]:
    per_factor = max(3, round(0.01 * n_genes))
    c = {
        "image_linked": per_factor * len(FACTORS),
        "tissue_specific": max(n_tissues, round(0.12 * n_genes)),
        "lowly": max(4, round(0.2 * n_genes)),
        "nonvariable": max(4, round(0.1 * n_genes)),
        "nonstandard": max(4, round(0.1 * n_genes)),
        "duplicate": max(4, round(0.04 * n_genes)),
    }
    c["background"] = n_genes - sum(c.values())
    if c["background"] < 5:
        raise ValueError(
            f"n_genes={n_genes} is too small for {n_tissues} tissues (need ~{n_genes - c['background'] + 5})"
        )
    return c


def _standard_symbols(rng: np.random.Generator, n: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        prefix = str(rng.choice(_PREFIXES))
        num = int(rng.integers(100, 900)) if prefix == "ZNF" else int(rng.integers(1, 60))
        if rng.random() < 0.3:  # family-member style, e.g. SLC25A17, TBC1D22B
            sym = f"{prefix}{num}{rng.choice(list('ABCD'))}{int(rng.integers(1, 30))}"
        else:
            sym = f"{prefix}{num}{rng.choice(_SUFFIXES)}"
        if sym not in taken:
            taken.add(sym)
            out.append(sym)
    return out


def _clone_symbols(rng: np.random.Generator, n: int, taken: set[str]) -> list[str]:
    """Clone/contig-based names: RP11-34P13.3, AC012345.1, CTD-2012K14.6, XXbac-B461K10.4."""
    letters = "ABCDEFGHIJKLMNOP"
    out: list[str] = []
    while len(out) < n:
        kind = int(rng.integers(0, 5))
        v = int(rng.integers(1, 12))
        if kind == 0:
            sym = (
                f"RP11-{rng.integers(1, 1100)}{rng.choice(list(letters))}{rng.integers(1, 24)}.{v}"
            )
        elif kind == 1:
            sym = f"RP{rng.integers(1, 14)}-{rng.integers(1, 900)}{rng.choice(list(letters))}{rng.integers(1, 24)}.{v}"
        elif kind == 2:
            sym = f"{rng.choice(['AC', 'AL', 'AP'])}{rng.integers(0, 1_000_000):06d}.{v}"
        elif kind == 3:
            sym = f"{rng.choice(['CTD', 'CTB', 'CTC'])}-{rng.integers(2000, 3200)}{rng.choice(list(letters))}{rng.integers(1, 24)}.{v}"
        else:
            sym = f"XXbac-B{rng.integers(100, 600)}{rng.choice(list(letters))}{rng.integers(1, 24)}.{v}"
        if sym not in taken:
            taken.add(sym)
            out.append(sym)
    return out


def plant_genes(n_genes: int, tissues: Sequence[str], seed: int) -> GeneSet:
    """Gene ids, symbols and categories (independent of the samples)."""
    rng = rng_for(seed, "genes")
    counts = _counts(n_genes, len(tissues))
    curated = {s for v in MARKERS.values() for s in v} | {
        s for v in FACTOR_GENES.values() for s in v
    }
    taken = set(curated) | {s for _, s, _ in REAL_HEAD} | set(DUPLICATE_SYMBOLS)
    rows: list[tuple[str, str, str, float]] = []  # symbol, category, tissue/factor, effect
    per_factor = counts["image_linked"] // len(FACTORS)
    for f in FACTORS:
        names = list(FACTOR_GENES[f][:per_factor])
        names += _standard_symbols(rng, per_factor - len(names), taken)
        for name in names:
            effect = float(rng.uniform(1.0, 2.0) * rng.choice([1, 1, 1, -1]))
            rows.append((name, "image_linked", f, round(effect, 4)))
    for i in range(counts["tissue_specific"]):
        t = tissues[i % len(tissues)]
        k = i // len(tissues)
        name = MARKERS[t][k] if k < len(MARKERS[t]) else _standard_symbols(rng, 1, taken)[0]
        rows.append((name, "tissue_specific", t, 0.0))
    head = {c: [s for _, s, cat in REAL_HEAD if cat == c] for c in CATEGORIES}
    for cat in ("background", "lowly", "nonvariable"):
        n = counts[cat] - len(head[cat])
        rows += [(s, cat, "", 0.0) for s in head[cat] + _standard_symbols(rng, n, taken)]
    n = counts["nonstandard"] - len(head["nonstandard"])
    rows += [
        (s, "nonstandard", "", 0.0) for s in head["nonstandard"] + _clone_symbols(rng, n, taken)
    ]
    left, g = counts["duplicate"], 0
    while left > 0:
        size = min(left, int(rng.integers(2, 5)))
        if left - size == 1:
            size = left  # never leave a one-member "duplicate" group
        rows += [(DUPLICATE_SYMBOLS[g % len(DUPLICATE_SYMBOLS)], "duplicate", "", 0.0)] * size
        left -= size
        g += 1
    head_syms = [s for _, s, _ in REAL_HEAD]
    first = [next(i for i, r in enumerate(rows) if r[0] == s) for s in head_syms]
    rest = [i for i in range(len(rows)) if i not in set(first)]
    order = first + [rest[i] for i in rng.permutation(len(rest)).tolist()]
    ids = _ensembl_ids(rng, len(rows) - len(REAL_HEAD))
    gene_ids = [gid for gid, _, _ in REAL_HEAD] + ids
    out = GeneSet([], [], [], [], [], [])
    for gid, i in zip(gene_ids, order, strict=True):
        sym, cat, tf, eff = rows[i]
        out.ids.append(gid)
        out.symbols.append(sym)
        out.category.append(cat)
        out.tissue.append(tf if cat == "tissue_specific" else "")
        out.factor.append(tf if cat == "image_linked" else "")
        out.effect.append(eff)
    return out


def _ensembl_ids(rng: np.random.Generator, n: int) -> list[str]:
    reserved = {int(g[4:15]) for g, _, _ in REAL_HEAD}
    nums = rng.choice(np.arange(3, 290_000), size=n + len(reserved), replace=False)
    nums = [int(x) for x in nums if int(x) not in reserved][:n]
    versions = rng.integers(1, 19, size=n)
    return [f"ENSG{x:011d}.{v}" for x, v in zip(nums, versions.tolist(), strict=True)]


def simulate_log_tpm(genes: GeneSet, samples: Sequence[TissueSample], seed: int) -> np.ndarray:
    """log2(1+TPM), genes × samples, per the category models in the module docstring."""
    rng = rng_for(seed, "expression")
    if not samples:
        return np.zeros((len(genes.ids), 0))
    tissues = sorted({s.tissue for s in samples})
    t_idx = np.array([tissues.index(s.tissue) for s in samples], dtype=np.int64)
    z = {f: np.array([s.factors[f] for s in samples]) for f in FACTORS}
    n_s, n_t = len(samples), len(tissues)
    out = np.zeros((len(genes.ids), n_s))
    for g, cat in enumerate(genes.category):
        off = rng.normal(0, 1, n_t)
        noise = rng.normal(0, 1, n_s)
        if cat == "lowly":
            v = rng.uniform(0.5, 2.5) + 0.7 * off[t_idx] + 0.9 * noise
        elif cat == "nonvariable":
            v = rng.uniform(6, 11) + 0.06 * off[t_idx] + 0.12 * noise
        elif cat == "tissue_specific":
            v = rng.uniform(1.5, 3.5) + 0.4 * off[t_idx] + 0.4 * noise
            v += np.where(
                np.array([s.tissue for s in samples]) == genes.tissue[g], rng.uniform(4.5, 7), 0.0
            )
        elif cat == "image_linked":
            f = genes.factor[g]
            v = rng.uniform(5.5, 8) + 0.5 * off[t_idx] + genes.effect[g] * z[f] + 0.3 * noise
        else:  # background, nonstandard, duplicate: variable, tissue-dependent
            v = rng.uniform(3.5, 8) + 1.0 * off[t_idx] + rng.uniform(0.4, 0.9) * noise
        out[g] = v
    _enforce_margins(out, genes.category)
    return np.clip(out, 0.0, 15.0)


def _enforce_margins(log_tpm: np.ndarray, category: Sequence[str]) -> None:
    """Make planted categories unambiguous even with few samples: genes meant to pass the
    numeric filters get max ≥ 5.3 and std ≥ 0.6; non-variable ones std ≤ 0.3."""
    if log_tpm.shape[1] < 2:
        return
    for g, cat in enumerate(category):
        v = log_tpm[g]
        mean, std = v.mean(), v.std()
        if cat == "lowly":  # variable but never above 4.7, so only the first filter drops it
            if std < KEEP_STD:
                v[:] = mean + (v - mean) * (KEEP_STD * 1.25 / max(std, 1e-6))
            v += min(0.0, LOW_MAX - v.max())
            v += max(0.0, -v.min())
            np.clip(v, 0.0, LOW_MAX, out=v)
            v[v <= np.quantile(v, 0.25)] = 0.0  # GTEx has many exact zeros in such genes
            continue
        if cat == "nonvariable":
            if std > FLAT_STD:
                v[:] = mean + (v - mean) * (FLAT_STD * 0.8 / std)
            continue
        if std < KEEP_STD:
            v[:] = mean + (v - mean) * (KEEP_STD * 1.25 / max(std, 1e-6))
        if v.max() < KEEP_MAX:
            v += KEEP_MAX + 0.2 - v.max()
        if v.min() < 0:  # clipping at 0 later must not undo the std margin
            v += -v.min()


def format_tpm(tpm: np.ndarray) -> np.ndarray:
    """TPM values as GTEx prints them: 4 significant digits, no exponent, zeros as ``0``."""
    flat = [
        "0"
        if x == 0
        else np.format_float_positional(x, precision=4, unique=False, fractional=False, trim="-")
        for x in tpm.ravel().tolist()
    ]
    return np.array(flat, dtype=object).reshape(tpm.shape)


def write_gct(path: Path, genes: GeneSet, aliquots: Sequence[str], text: np.ndarray) -> None:
    """GCT v1.2, gzip with mtime 0 and no embedded file name (byte-reproducible)."""
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz,
    ):
        gz.write(f"#1.2\n{len(genes.ids)}\t{len(aliquots)}\n".encode())
        gz.write(("\t".join(["Name", "Description", *aliquots]) + "\n").encode())
        for gid, sym, row in zip(genes.ids, genes.symbols, text, strict=True):
            gz.write(("\t".join([gid, sym, *row]) + "\n").encode())


ATTRIBUTE_COLUMNS = ("SAMPID", "SMATSSCR", "SMCENTER", "SMPTHNTS", "SMRIN", "SMTS", "SMTSD",
                     "SMTSISCH", "SMNABTCH", "SMNABTCHT", "SMNABTCHD", "SMGEBTCH", "SMGEBTCHD",
                     "SMGEBTCHT", "SMAFRZE")  # fmt: skip


def write_sample_attributes(path: Path, cohort: Cohort, seed: int) -> int:
    """SampleAttributesDS: one row per RNA aliquot, plus whole-blood WGS rows for some donors
    and a K-562 control (rows the pipeline must ignore, as in the real file)."""
    rng = rng_for(seed, "attributes")
    rows: list[list[str]] = []
    for s in cohort.rna:
        batch = int(rng.integers(30000, 40000))
        rows.append([
            str(s.aliquot_id), str(int(rng.integers(0, 4))), str(rng.choice(["B1", "C1", "D1", "B1, A1"])),
            s.notes, f"{rng.uniform(5.5, 9.5):.1f}", SMTS[s.tissue], s.tissue,
            str(int(rng.integers(60, 1400))), f"BP-{batch}", "RNA isolation_PAXgene Tissue miRNA",
            f"{int(rng.integers(1, 13)):02d}/{int(rng.integers(1, 29)):02d}/2013",
            f"LCSET-{int(rng.integers(1000, 6000))}", "03/01/2014", "TruSeq.v1", "RNASEQ",
        ])  # fmt: skip
    for d in cohort.donors[::3]:
        rows.append([f"{d.subject_id}-0005-SM-{_code(rng)}", "", "B1", "", "", "Blood", "Whole Blood",
                     "", "", "", "", "", "", "", "WGS"])  # fmt: skip
    rows.append(["K-562-SM-26GMQ", "", "C1", "", "", "Bone Marrow", "Cells - Leukemia cell line (CML)",
                 "", "", "", "", "", "", "", "EXCLUDE"])  # fmt: skip
    rows.sort(key=lambda r: r[0])
    with open(path, "w", newline="", encoding="utf-8") as f:
        # minimal quoting: only a note containing a double quote gets quoted (pandas reads it)
        w = csv.writer(f, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        w.writerow(ATTRIBUTE_COLUMNS)
        w.writerows(rows)
    return len(rows)


def _code(rng: np.random.Generator) -> str:
    return "".join(rng.choice(list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"), 5).tolist())
