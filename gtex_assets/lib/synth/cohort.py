"""Synthetic donors and tissue samples, and the GTEx Portal histology CSV that lists them.

Ids follow GTEx: subject ``GTEX-1117F`` (4-5 upper-case alphanumerics), tissue sample
``GTEX-1117F-0226`` (a per-donor site number + ``26``, the PAXgene-fixed aliquot type), RNA
aliquot ``GTEX-1117F-0226-SM-5GZZ7``. Each tissue draws its slides from a shared donor pool
about 1.5× the slides per tissue, so donors recur across tissues (a donor-level train/test
split has something to split) while no donor gives one tissue twice.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gtex_assets.lib.synth._rng import rng_for
from gtex_assets.lib.synth.slide import FACTORS
from gtex_assets.lib.synth.tissues import PROFILES, SEX_SPECIFIC

PORTAL_HEADER: tuple[str, ...] = (
    "Tissue Sample ID",
    "Tissue",
    "Subject ID",
    "Sex",
    "Age Bracket",
    "Hardy Scale",
    "Pathology Categories",
    "Pathology Notes",
)
AGE_BRACKETS = ("20-29", "30-39", "40-49", "50-59", "60-69", "70-79")
AGE_WEIGHTS = (0.08, 0.08, 0.16, 0.32, 0.32, 0.04)  # GTEx donors skew to 50-69
HARDY = (
    "Ventilator case",
    "Fast death - natural causes",
    "Intermediate death",
    "Slow death",
    "Fast death - violent",
)
HARDY_WEIGHTS = (0.33, 0.27, 0.18, 0.11, 0.11)
_ALNUM = np.array(list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
_GENERIC_NOTES = (
    "rep delineated",
    "well trimmed",
    "moderately autolyzed",
    "minimal autolysis",
    "clean specimens",
    "no abnormalities",
    "delineated (rep)",
)


@dataclass(frozen=True)
class Donor:
    subject_id: str
    sex: str
    age_bracket: str
    hardy_scale: str


@dataclass
class TissueSample:
    """One tissue sample: a slide, an RNA-seq aliquot, or both."""

    sample_id: str
    tissue: str
    subject_id: str
    has_slide: bool
    aliquot_id: str | None = None
    factors: dict[str, float] = field(default_factory=dict)
    categories: str = ""
    notes: str = ""

    @property
    def has_rna(self) -> bool:
        return self.aliquot_id is not None


@dataclass
class Cohort:
    donors: list[Donor]
    samples: list[TissueSample]  # sorted by sample id

    @property
    def slides(self) -> list[TissueSample]:
        return [s for s in self.samples if s.has_slide]

    @property
    def rna(self) -> list[TissueSample]:
        return [s for s in self.samples if s.has_rna]

    def donor(self, subject_id: str) -> Donor:
        return next(d for d in self.donors if d.subject_id == subject_id)


def _code(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(_ALNUM, n).tolist())


def _new_donor(rng: np.random.Generator, taken: set[str], sex: str | None = None) -> Donor:
    while True:
        sid = f"GTEX-{_code(rng, 5 if rng.random() < 0.6 else 4)}"
        if sid not in taken:
            break
    taken.add(sid)
    return Donor(
        subject_id=sid,
        sex=sex or ("male" if rng.random() < 0.66 else "female"),
        age_bracket=str(rng.choice(AGE_BRACKETS, p=AGE_WEIGHTS)),
        hardy_scale=str(rng.choice(HARDY, p=HARDY_WEIGHTS)),
    )


def _assign_donors(
    rng: np.random.Generator, tissues: Sequence[str], per_tissue: int
) -> tuple[list[Donor], dict[str, list[str]]]:
    """Donor pool and the donors (distinct within a tissue) of each tissue's slides."""
    taken: set[str] = set()
    # ~1.5x the slides per tissue, and at most ~25 samples per donor (two-digit site codes)
    n = max(per_tissue + 1, math.ceil(1.5 * per_tissue), math.ceil(len(tissues) * per_tissue / 25))
    donors = [_new_donor(rng, taken) for _ in range(n)]
    chosen: dict[str, list[str]] = {}
    for tissue in tissues:
        sex = SEX_SPECIFIC.get(tissue)
        eligible = [d for d in donors if sex in (None, d.sex)]
        while len(eligible) < per_tissue:  # e.g. Testis needs enough male donors
            d = _new_donor(rng, taken, sex)
            donors.append(d)
            eligible.append(d)
        idx = rng.choice(len(eligible), per_tissue, replace=False)
        chosen[tissue] = [eligible[i].subject_id for i in sorted(idx.tolist())]
    _ensure_shared_donor(chosen, {d.subject_id: d for d in donors}, tissues)
    return donors, chosen


def _ensure_shared_donor(
    chosen: dict[str, list[str]], by_id: dict[str, Donor], tissues: Sequence[str]
) -> None:
    """Guarantee at least one donor with slides of two tissues (tiny cohorts may miss it)."""
    counts: dict[str, int] = {}
    for subs in chosen.values():
        for s in subs:
            counts[s] = counts.get(s, 0) + 1
    if len(tissues) < 2 or max(counts.values(), default=0) >= 2:
        return
    first, second = tissues[0], tissues[1]
    for donor_id in chosen[first]:
        sex = SEX_SPECIFIC.get(second)
        if sex in (None, by_id[donor_id].sex) and donor_id not in chosen[second]:
            chosen[second][0] = donor_id
            return


def _site_codes(rng: np.random.Generator, n: int) -> list[str]:
    """Distinct per-donor site codes like ``0126``, ``1426`` in random collection order."""
    numbers = rng.choice(np.arange(1, max(34, min(n, 99) + 1)), size=min(n, 99), replace=False)
    if n > 99:
        raise ValueError(f"a donor with {n} tissue samples cannot get distinct site codes")
    return [f"{k:02d}26" for k in numbers.tolist()]


def _notes(rng: np.random.Generator, tissue: str, z: dict[str, float]) -> tuple[str, str]:
    """Pathology categories and free-text notes (with commas), partly driven by the factors."""
    prof = PROFILES[tissue]
    pieces = int(rng.choice([2, 2, 2, 4, 5, 6]))
    pool = list(prof.notes) + list(_GENERIC_NOTES)
    k = int(rng.integers(0, 3))
    clauses = [pool[i] for i in sorted(rng.choice(len(pool), k, replace=False).tolist())]
    cats: list[str] = []
    if z["fat_fraction"] > 1.0:
        clauses.append(f"~{int(rng.integers(2, 7)) * 5}% adherent fat")
    if z["fibrosis"] > 1.2:
        clauses.append("mild interstitial fibrosis")
        cats.append("fibrosis")
    if z["nuclear_density"] > 1.3:
        clauses.append("patchy chronic inflammation")
        cats.append("inflammation")
    if prof.blood and rng.random() < 0.3:
        cats.append("congestion")
    if rng.random() < 0.05:
        clauses.append('one aliquot labeled "rep"')  # real notes contain quotes too
    if not cats and rng.random() < 0.08:
        cats.append("clean_specimens")
    return ", ".join(sorted(set(cats))), ", ".join([f"{pieces} pieces", *clauses])


def build_cohort(
    tissues: Sequence[str],
    slides_per_tissue: int,
    *,
    seed: int,
    rna_fraction: float,
    extra_rna_samples: int,
) -> Cohort:
    """Donors, slides and RNA aliquots; deterministic in all arguments."""
    if slides_per_tissue < 1:
        raise ValueError(f"slides_per_tissue={slides_per_tissue}: need at least 1")
    if not 0.0 <= rna_fraction <= 1.0:
        raise ValueError(f"rna_fraction={rna_fraction}: expected 0..1")
    rng = rng_for(seed, "cohort")
    donors, chosen = _assign_donors(rng, tissues, slides_per_tissue)
    by_id = {d.subject_id: d for d in donors}
    pairs = [(t, s, True) for t in tissues for s in chosen[t]]
    for _ in range(max(0, extra_rna_samples)):  # RNA from tissue samples that have no slide
        have = {(t, s) for t, s, _ in pairs}
        options = [
            (t, d.subject_id)
            for t in tissues
            for d in donors
            if (t, d.subject_id) not in have and SEX_SPECIFIC.get(t) in (None, d.sex)
        ]
        if not options:
            d = _new_donor(rng, set(by_id), SEX_SPECIFIC.get(tissues[0]))
            donors.append(d)
            by_id[d.subject_id] = d
            options = [(tissues[0], d.subject_id)]
        t, s = options[int(rng.integers(len(options)))]
        pairs.append((t, s, False))
    per_donor: dict[str, list[int]] = {}
    for i, (_, s, _) in enumerate(pairs):
        per_donor.setdefault(s, []).append(i)
    sample_ids = [""] * len(pairs)
    for subject in sorted(per_donor):
        for i, code in zip(
            per_donor[subject], _site_codes(rng, len(per_donor[subject])), strict=True
        ):
            sample_ids[i] = f"{subject}-{code}"
    samples = [
        TissueSample(sample_id=sid, tissue=t, subject_id=s, has_slide=slide)
        for sid, (t, s, slide) in zip(sample_ids, pairs, strict=True)
    ]
    samples.sort(key=lambda x: x.sample_id)
    _choose_rna(rng, samples, rna_fraction)
    for smp in samples:
        z = rng_for(seed, "factors", smp.sample_id).standard_normal(len(FACTORS))
        smp.factors = {f: round(float(v), 6) for f, v in zip(FACTORS, z, strict=True)}
        smp.categories, smp.notes = _notes(
            rng_for(seed, "notes", smp.sample_id), smp.tissue, smp.factors
        )
    donors.sort(key=lambda d: d.subject_id)
    return Cohort(donors=donors, samples=samples)


def _choose_rna(rng: np.random.Generator, samples: list[TissueSample], rna_fraction: float) -> None:
    """Give RNA aliquots to ``rna_fraction`` of the slides (at least one without, if < 1) and
    to every slide-less sample."""
    slides = [s for s in samples if s.has_slide]
    k = round(rna_fraction * len(slides))
    if 0.0 < rna_fraction < 1.0 and len(slides) >= 2:
        k = min(max(k, 1), len(slides) - 1)
    with_rna = {slides[i].sample_id for i in rng.choice(len(slides), k, replace=False).tolist()}
    taken: set[str] = set()
    for s in samples:
        if s.sample_id in with_rna or not s.has_slide:
            while (code := _code(rng, 5)) in taken:
                pass
            taken.add(code)
            s.aliquot_id = f"{s.sample_id}-SM-{code}"


def write_portal_csv(cohort: Cohort, path: Path) -> int:
    """The GTEx Portal histology CSV: every field quoted, CRLF line ends, one row per slide."""
    rows = 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(PORTAL_HEADER)
        for s in cohort.slides:
            d = cohort.donor(s.subject_id)
            w.writerow(
                [s.sample_id, s.tissue, s.subject_id, d.sex, d.age_bracket, d.hardy_scale,
                 s.categories, s.notes]
            )  # fmt: skip
            rows += 1
    return rows
