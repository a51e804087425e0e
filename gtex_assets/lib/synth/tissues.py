"""The 40 GTEx v8 histology tissues and a parametric morphology profile for each.

A profile says how a slide of that tissue is painted: a *main* pattern family (with its
parameters), an optional *surface* layer along the top edge of each tissue piece (squamous
epithelium, colonic mucosa ...), how much adherent fat it carries at factor z = 0, how fibrous
it is, and its colour balance. Families are shared (e.g. every smooth-muscle organ uses
``fibres`` with ``orient="patches"``); parameter values make tissues of one family differ, and
the first tissues of :data:`TISSUE_ORDER` use different families so that even a tiny demo has
visually distinct classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

# Portal names, alphabetical as the GTEx Portal lists them (40 histology tissues in v8).
GTEX_TISSUES: tuple[str, ...] = (
    "Adipose - Subcutaneous",
    "Adipose - Visceral (Omentum)",
    "Adrenal Gland",
    "Artery - Aorta",
    "Artery - Coronary",
    "Artery - Tibial",
    "Bladder",
    "Brain - Cerebellum",
    "Brain - Cortex",
    "Breast - Mammary Tissue",
    "Cervix - Ectocervix",
    "Cervix - Endocervix",
    "Colon - Sigmoid",
    "Colon - Transverse",
    "Esophagus - Gastroesophageal Junction",
    "Esophagus - Mucosa",
    "Esophagus - Muscularis",
    "Fallopian Tube",
    "Heart - Atrial Appendage",
    "Heart - Left Ventricle",
    "Kidney - Cortex",
    "Kidney - Medulla",
    "Liver",
    "Lung",
    "Minor Salivary Gland",
    "Muscle - Skeletal",
    "Nerve - Tibial",
    "Ovary",
    "Pancreas",
    "Pituitary",
    "Prostate",
    "Skin - Not Sun Exposed (Suprapubic)",
    "Skin - Sun Exposed (Lower leg)",
    "Small Intestine - Terminal Ileum",
    "Spleen",
    "Stomach",
    "Testis",
    "Thyroid",
    "Uterus",
    "Vagina",
)

# ``tissues=N`` takes the first N of this order: the first ones differ most in morphology
# (fat, alveoli, hepatocyte cords, striated fibres, colloid follicles, squamous surface ...);
# the known look-alike pairs (Adipose/Breast, the Skin pair, the Esophagus trio) come late.
TISSUE_ORDER: tuple[str, ...] = (
    "Adipose - Subcutaneous",
    "Lung",
    "Liver",
    "Muscle - Skeletal",
    "Thyroid",
    "Skin - Sun Exposed (Lower leg)",
    "Brain - Cerebellum",
    "Spleen",
    "Testis",
    "Colon - Transverse",
    "Nerve - Tibial",
    "Artery - Tibial",
    "Heart - Left Ventricle",
    "Pancreas",
    "Kidney - Cortex",
    "Esophagus - Mucosa",
    "Stomach",
    "Brain - Cortex",
    "Adrenal Gland",
    "Pituitary",
    "Prostate",
    "Ovary",
    "Uterus",
    "Breast - Mammary Tissue",
    "Esophagus - Muscularis",
    "Artery - Aorta",
    "Small Intestine - Terminal Ileum",
    "Minor Salivary Gland",
    "Bladder",
    "Vagina",
    "Fallopian Tube",
    "Cervix - Endocervix",
    "Kidney - Medulla",
    "Heart - Atrial Appendage",
    "Adipose - Visceral (Omentum)",
    "Artery - Coronary",
    "Colon - Sigmoid",
    "Esophagus - Gastroesophageal Junction",
    "Cervix - Ectocervix",
    "Skin - Not Sun Exposed (Suprapubic)",
)

# SMTS (broad tissue) of the GTEx sample attributes for each portal tissue (= SMTSD).
SMTS: Mapping[str, str] = MappingProxyType(
    {
        "Adipose - Subcutaneous": "Adipose Tissue",
        "Adipose - Visceral (Omentum)": "Adipose Tissue",
        "Adrenal Gland": "Adrenal Gland",
        "Artery - Aorta": "Blood Vessel",
        "Artery - Coronary": "Blood Vessel",
        "Artery - Tibial": "Blood Vessel",
        "Bladder": "Bladder",
        "Brain - Cerebellum": "Brain",
        "Brain - Cortex": "Brain",
        "Breast - Mammary Tissue": "Breast",
        "Cervix - Ectocervix": "Cervix Uteri",
        "Cervix - Endocervix": "Cervix Uteri",
        "Colon - Sigmoid": "Colon",
        "Colon - Transverse": "Colon",
        "Esophagus - Gastroesophageal Junction": "Esophagus",
        "Esophagus - Mucosa": "Esophagus",
        "Esophagus - Muscularis": "Esophagus",
        "Fallopian Tube": "Fallopian Tube",
        "Heart - Atrial Appendage": "Heart",
        "Heart - Left Ventricle": "Heart",
        "Kidney - Cortex": "Kidney",
        "Kidney - Medulla": "Kidney",
        "Liver": "Liver",
        "Lung": "Lung",
        "Minor Salivary Gland": "Salivary Gland",
        "Muscle - Skeletal": "Muscle",
        "Nerve - Tibial": "Nerve",
        "Ovary": "Ovary",
        "Pancreas": "Pancreas",
        "Pituitary": "Pituitary",
        "Prostate": "Prostate",
        "Skin - Not Sun Exposed (Suprapubic)": "Skin",
        "Skin - Sun Exposed (Lower leg)": "Skin",
        "Small Intestine - Terminal Ileum": "Small Intestine",
        "Spleen": "Spleen",
        "Stomach": "Stomach",
        "Testis": "Testis",
        "Thyroid": "Thyroid",
        "Uterus": "Uterus",
        "Vagina": "Vagina",
    }
)

# Donor sex required by a tissue (GTEx collects these from one sex only).
SEX_SPECIFIC: Mapping[str, str] = MappingProxyType(
    {
        "Testis": "male",
        "Prostate": "male",
        "Ovary": "female",
        "Uterus": "female",
        "Vagina": "female",
        "Fallopian Tube": "female",
        "Cervix - Ectocervix": "female",
        "Cervix - Endocervix": "female",
    }
)


@dataclass(frozen=True)
class Layer:
    """One pattern family and its parameters (see ``patterns.FAMILIES``)."""

    family: str
    params: Mapping[str, float | str] = field(default_factory=dict)


@dataclass(frozen=True)
class TissueProfile:
    """How slides of one tissue look; every number is at morphology factor z = 0."""

    name: str
    main: Layer
    surface: Layer | None = None
    surface_um: float = 0.0  # thickness of the surface layer below each piece's top edge
    shape: str = "blobs"  # "blobs" (1-3 smooth pieces) or "ring" (a vessel cross-section)
    fat_base: float = 0.06  # fraction of the tissue that is (adherent) fat at z = 0
    fat_cell_um: float = (
        70.0  # adipocyte diameter (small enough that a 56 µm tile piece always sees a rim)
    )
    fibre_base: float = 30.0  # extra collagen fibres per mm² of tissue at z = 0
    stain: tuple[float, float] = (1.0, 1.0)  # hematoxylin, eosin gain
    tint: tuple[float, float, float] = (0.0, 0.0, 0.0)  # optical density added to R, G, B
    blood: float = 0.0  # fraction of the tissue with red-cell congestion
    notes: tuple[str, ...] = ()  # phrases for the portal's pathology notes


def _p(**kw: float | str) -> Mapping[str, float | str]:
    return MappingProxyType(kw)


def _profiles() -> dict[str, TissueProfile]:
    smooth = _p(orient="patches", width_um=7, wave_amp_um=6, wave_len_um=160, gap=0.15,
                e=0.55, h=0.05, nuc=2600, nuc_len_um=16, nuc_elong=4.0, nuc_pos="any")  # fmt: skip
    squam = _p(keratin=0, glycogen=0.6, nuc=9000)
    dermis = _p(fibres=2400, fibre_w_um=7, fibre_len_um=260, wave=0.5, e=0.55, nuc=500)
    profiles = [
        TissueProfile(
            "Adipose - Subcutaneous",
            Layer("stroma", _p(fibres=1800, fibre_w_um=5, nuc=1600, vessels=14, e=0.45)),
            fat_base=0.86,
            fat_cell_um=66,
            notes=("~15% vessel stroma", "rep delineated", "clean"),
        ),
        TissueProfile(
            "Adipose - Visceral (Omentum)",
            Layer("stroma", _p(fibres=900, nuc=3200, vessels=24, e=0.38, h=0.06)),
            fat_base=0.80,
            fat_cell_um=56,
            notes=("mesothelial lining present", "~10% fibrovascular septa"),
        ),
        TissueProfile(
            "Adrenal Gland",
            Layer(
                "cords",
                _p(cell_um=24, e=0.32, h=0.05, foamy=0.55, nuc_um=7, border_clear=0.25, veins=2),
            ),
            fat_base=0.12,
            tint=(0.0, 0.02, 0.06),
            notes=("cortex and medulla present", "adherent fat"),
        ),
        TissueProfile(
            "Artery - Aorta",
            Layer(
                "fibres",
                _p(
                    orient="global",
                    width_um=11,
                    wave_amp_um=9,
                    wave_len_um=90,
                    lamellae=0.9,
                    gap=0.05,
                    e=0.62,
                    h=0.04,
                    nuc=1500,
                    nuc_len_um=14,
                    nuc_elong=4.5,
                ),
            ),
            fat_base=0.04,
            notes=("media with elastic lamellae", "intimal thickening"),
        ),
        TissueProfile(
            "Artery - Coronary",
            Layer(
                "fibres",
                _p(
                    orient="ring",
                    width_um=9,
                    wave_amp_um=4,
                    wave_len_um=120,
                    lamellae=0.5,
                    gap=0.08,
                    e=0.6,
                    nuc=2600,
                    nuc_len_um=14,
                    nuc_elong=4,
                ),
            ),
            shape="ring",
            fat_base=0.30,
            fat_cell_um=66,
            notes=("atherosclerosis", "adherent fat"),
        ),
        TissueProfile(
            "Artery - Tibial",
            Layer(
                "fibres",
                _p(
                    orient="ring",
                    width_um=8,
                    wave_amp_um=3,
                    wave_len_um=140,
                    lamellae=0.25,
                    gap=0.1,
                    e=0.58,
                    nuc=3200,
                    nuc_len_um=15,
                    nuc_elong=4.5,
                ),
            ),
            shape="ring",
            fat_base=0.05,
            notes=("medial calcific sclerosis", "clean"),
        ),
        TissueProfile(
            "Bladder",
            Layer("fibres", smooth),
            surface=Layer("squamous", _p(keratin=0, glycogen=0.2, nuc=12000, umbrella=1)),
            surface_um=70,
            fat_base=0.06,
            notes=("urothelium partially denuded", "detrusor muscle"),
        ),
        TissueProfile(
            "Brain - Cerebellum",
            Layer("neural", _p(granular=1.0, e=0.28, nuc=1500)),
            fat_base=0.0,
            fibre_base=0.0,
            stain=(1.05, 0.9),
            notes=("granular and molecular layers", "Purkinje cells present"),
        ),
        TissueProfile(
            "Brain - Cortex",
            Layer("neural", _p(granular=0.0, e=0.32, nuc=2200, neurons=260)),
            fat_base=0.0,
            fibre_base=0.0,
            stain=(0.95, 0.85),
            notes=("grey and white matter", "perineuronal vacuolization"),
        ),
        TissueProfile(
            "Breast - Mammary Tissue",
            Layer(
                "stroma",
                _p(fibres=3600, fibre_w_um=8, wave=0.3, nuc=1000, e=0.6, glands=32, vessels=6),
            ),
            fat_base=0.55,
            fat_cell_um=66,
            notes=("fibrocystic changes", "rep ductal/lobular elements delineated"),
        ),
        TissueProfile(
            "Cervix - Ectocervix",
            Layer("stroma", _p(fibres=2200, fibre_w_um=5, nuc=3400, e=0.5)),
            surface=Layer("squamous", _p(keratin=0, glycogen=0.8, nuc=7500)),
            surface_um=260,
            fat_base=0.0,
            notes=("squamous mucosa", "chronic cervicitis"),
        ),
        TissueProfile(
            "Cervix - Endocervix",
            Layer("stroma", _p(fibres=1700, nuc=3800, e=0.48, glands=70, gland_lumen="mucin")),
            fat_base=0.0,
            notes=("endocervical glands", "nabothian cysts"),
        ),
        TissueProfile(
            "Colon - Sigmoid",
            Layer("fibres", _p(**{**smooth, "width_um": 8, "e": 0.6, "nuc": 2300})),
            fat_base=0.08,
            notes=("all muscularis", "well trimmed of mucosa"),
        ),
        TissueProfile(
            "Colon - Transverse",
            Layer("fibres", smooth),
            surface=Layer("glands", _p(kind="crypts", gland_um=55, lp_nuc=9000)),
            surface_um=420,
            fat_base=0.04,
            notes=("mucosa and submucosa", "~15% lymphoid elements"),
        ),
        TissueProfile(
            "Esophagus - Gastroesophageal Junction",
            Layer(
                "fibres", _p(**{**smooth, "width_um": 6, "e": 0.5, "nuc": 3000, "wave_amp_um": 9})
            ),
            fat_base=0.05,
            notes=("muscularis", "few submucosal glands"),
        ),
        TissueProfile(
            "Esophagus - Mucosa",
            Layer("stroma", _p(fibres=1600, nuc=2800, e=0.45, vessels=10)),
            surface=Layer("squamous", squam),
            surface_um=560,
            fat_base=0.0,
            notes=("squamous mucosa", "well trimmed of muscularis"),
        ),
        TissueProfile(
            "Esophagus - Muscularis",
            Layer("fibres", _p(**{**smooth, "e": 0.58, "nuc": 2500})),
            fat_base=0.04,
            notes=("all muscularis", "rep delineated"),
        ),
        TissueProfile(
            "Fallopian Tube",
            Layer("plicae", _p(fold_um=140, lumen=0.42, nuc=3800, lining_nuc=16000)),
            fat_base=0.05,
            notes=("plicae and muscular wall", "paratubal cyst"),
        ),
        TissueProfile(
            "Heart - Atrial Appendage",
            Layer(
                "fibres",
                _p(
                    orient="patches",
                    width_um=13,
                    wave_amp_um=7,
                    wave_len_um=110,
                    gap=0.18,
                    e=0.7,
                    h=0.05,
                    nuc=1500,
                    nuc_len_um=13,
                    nuc_elong=2.2,
                    nuc_pos="centre",
                ),
            ),
            fat_base=0.22,
            fibre_base=90,
            stain=(1.0, 1.08),
            notes=("epicardial fat", "interstitial fibrosis"),
        ),
        TissueProfile(
            "Heart - Left Ventricle",
            Layer(
                "fibres",
                _p(
                    orient="global",
                    width_um=16,
                    wave_amp_um=6,
                    wave_len_um=130,
                    gap=0.16,
                    e=0.75,
                    h=0.06,
                    nuc=1300,
                    nuc_len_um=13,
                    nuc_elong=2.2,
                    nuc_pos="centre",
                    striation=0.25,
                ),
            ),
            fat_base=0.03,
            stain=(1.0, 1.12),
            tint=(0.0, 0.0, -0.03),
            notes=("myocardium", "focal contraction bands"),
        ),
        TissueProfile(
            "Kidney - Cortex",
            Layer(
                "follicles",
                _p(
                    cell_um=52,
                    border_um=13,
                    border_e=0.72,
                    border_h=0.08,
                    lumen="clear",
                    lumen_frac=0.38,
                    ring_nuc=4500,
                    gap_um=3,
                    glomeruli=9,
                ),
            ),
            fat_base=0.02,
            notes=("glomeruli noted", "autolyzed tubules"),
        ),
        TissueProfile(
            "Kidney - Medulla",
            Layer(
                "follicles",
                _p(
                    cell_um=40,
                    aniso=3.0,
                    border_um=9,
                    border_e=0.62,
                    lumen="clear",
                    lumen_frac=0.5,
                    ring_nuc=5200,
                    gap_um=6,
                ),
            ),
            fat_base=0.02,
            notes=("renal medulla", "collecting ducts"),
        ),
        TissueProfile(
            "Liver",
            Layer(
                "cords",
                _p(cell_um=27, e=0.62, h=0.07, border_clear=0.55, nuc_um=8, veins=3, portal=2),
            ),
            fat_base=0.03,
            fat_cell_um=38,
            fibre_base=10,
            stain=(1.0, 1.05),
            tint=(0.02, 0.06, 0.16),
            blood=0.05,
            notes=("moderate congestion", "mild steatosis"),
        ),
        TissueProfile(
            "Lung",
            Layer("alveolar", _p(cell_um=85, septa_um=10, nuc=14000, pigment=1.0)),
            fat_base=0.03,
            fibre_base=20,
            blood=0.25,
            notes=("patchy atelectasis", "anthracotic pigment"),
        ),
        TissueProfile(
            "Minor Salivary Gland",
            Layer(
                "follicles",
                _p(
                    cell_um=42,
                    border_um=12,
                    border_e=0.22,
                    border_h=0.16,
                    lumen="pale",
                    lumen_frac=0.5,
                    ring_nuc=6000,
                    gap_um=5,
                    empty_p=0.0,
                ),
            ),
            fat_base=0.12,
            notes=("mucous acini", "ducts, chronic sialadenitis"),
        ),
        TissueProfile(
            "Muscle - Skeletal",
            Layer(
                "fibres",
                _p(
                    orient="global",
                    width_um=58,
                    wave_amp_um=2,
                    wave_len_um=600,
                    gap=0.55,
                    e=0.78,
                    h=0.03,
                    nuc=900,
                    nuc_len_um=14,
                    nuc_elong=3.2,
                    nuc_pos="edge",
                    striation=0.35,
                ),
            ),
            fat_base=0.05,
            fibre_base=15,
            stain=(1.0, 1.05),
            tint=(0.0, -0.03, 0.05),
            notes=("~5% fibrous connective tissue", "delineated (rep)"),
        ),
        TissueProfile(
            "Nerve - Tibial",
            Layer(
                "fibres",
                _p(
                    orient="patches",
                    fascicles=1.0,
                    width_um=5,
                    wave_amp_um=14,
                    wave_len_um=70,
                    gap=0.35,
                    e=0.42,
                    h=0.04,
                    nuc=2600,
                    nuc_len_um=18,
                    nuc_elong=5,
                ),
            ),
            fat_base=0.16,
            notes=("fascicles with epineurium", "adherent fat"),
        ),
        TissueProfile(
            "Ovary",
            Layer(
                "stroma",
                _p(fibres=500, nuc=14000, nuc_um=8, elong=3.2, whorl=1.0, e=0.4, h=0.08, hyaline=3),
            ),
            fat_base=0.0,
            notes=("ovarian stroma", "corpora albicantia"),
        ),
        TissueProfile(
            "Pancreas",
            Layer(
                "follicles",
                _p(
                    cell_um=34,
                    border_um=10,
                    border_e=0.45,
                    border_h=0.3,
                    lumen="purple",
                    lumen_frac=0.3,
                    ring_nuc=9500,
                    gap_um=2,
                    islets=6,
                ),
            ),
            fat_base=0.08,
            stain=(1.05, 1.0),
            notes=("autolysis", "acini and islets"),
        ),
        TissueProfile(
            "Pituitary",
            Layer(
                "cords",
                _p(cell_um=16, e=0.45, h=0.12, multicolour=1.0, nuc_um=7, border_clear=0.15),
            ),
            fat_base=0.0,
            notes=("adenohypophysis", "mixed acidophils and basophils"),
        ),
        TissueProfile(
            "Prostate",
            Layer(
                "follicles",
                _p(
                    cell_um=170,
                    border_um=14,
                    border_e=0.32,
                    border_h=0.1,
                    lumen="clear",
                    lumen_frac=0.65,
                    ring_nuc=6000,
                    gap_um=70,
                    empty_p=0.35,
                    interstitium="muscle",
                    amylacea=1.0,
                ),
            ),
            fat_base=0.02,
            notes=("nodular hyperplasia", "corpora amylacea"),
        ),
        TissueProfile(
            "Skin - Not Sun Exposed (Suprapubic)",
            Layer("stroma", dermis),
            surface=Layer("squamous", _p(keratin=1, glycogen=0.0, nuc=11000)),
            surface_um=85,
            fat_base=0.1,
            notes=("squamous epithelium is ~50 microns", "adnexa present"),
        ),
        TissueProfile(
            "Skin - Sun Exposed (Lower leg)",
            Layer("stroma", _p(**{**dermis, "elastosis": 1.0})),
            surface=Layer("squamous", _p(keratin=1, glycogen=0.0, nuc=11000)),
            surface_um=75,
            fat_base=0.06,
            notes=("squamous epithelium is ~50-70 microns", "solar elastosis"),
        ),
        TissueProfile(
            "Small Intestine - Terminal Ileum",
            Layer("fibres", smooth),
            surface=Layer("glands", _p(kind="villi", gland_um=45, lp_nuc=11000, lymphoid=1.0)),
            surface_um=480,
            fat_base=0.03,
            notes=("prominent lymphoid component", "villi autolyzed"),
        ),
        TissueProfile(
            "Spleen",
            Layer("lymphoid", _p(follicle_um=330, follicle_frac=0.32, nuc=9000)),
            fat_base=0.0,
            fibre_base=8,
            blood=0.5,
            stain=(1.05, 0.95),
            notes=("red pulp congestion", "white pulp present"),
        ),
        TissueProfile(
            "Stomach",
            Layer("fibres", smooth),
            surface=Layer("glands", _p(kind="gastric", gland_um=45, lp_nuc=6000)),
            surface_um=520,
            fat_base=0.03,
            notes=("mucosa predominantly autolyzed", "chronic gastritis"),
        ),
        TissueProfile(
            "Testis",
            Layer(
                "follicles",
                _p(
                    cell_um=210,
                    border_um=6,
                    border_e=0.5,
                    border_h=0.1,
                    lumen="clear",
                    lumen_frac=0.3,
                    ring_frac=0.62,
                    ring_nuc=21000,
                    ring_nuc_um=6.5,
                    gap_um=30,
                    interstitium="leydig",
                ),
            ),
            fat_base=0.0,
            stain=(1.05, 0.95),
            notes=("active spermatogenesis", "interstitial Leydig cells"),
        ),
        TissueProfile(
            "Thyroid",
            Layer(
                "follicles",
                _p(
                    cell_um=105,
                    size_var=0.0,
                    border_um=8,
                    border_e=0.4,
                    border_h=0.2,
                    lumen="colloid",
                    lumen_frac=1.0,
                    ring_nuc=28000,
                    gap_um=4,
                    empty_p=0.08,
                ),
            ),
            fat_base=0.02,
            stain=(1.0, 1.05),
            notes=("colloid follicles", "nodularity"),
        ),
        TissueProfile(
            "Uterus",
            Layer(
                "fibres", _p(**{**smooth, "width_um": 6, "wave_amp_um": 12, "nuc": 3600, "e": 0.52})
            ),
            fat_base=0.0,
            notes=("myometrium", "leiomyoma excluded"),
        ),
        TissueProfile(
            "Vagina",
            Layer("stroma", _p(fibres=2600, nuc=2600, e=0.52, vessels=12)),
            surface=Layer("squamous", _p(keratin=0, glycogen=0.9, nuc=8000)),
            surface_um=220,
            fat_base=0.0,
            notes=("squamous mucosa", "atrophic"),
        ),
    ]
    return {p.name: p for p in profiles}


PROFILES: Mapping[str, TissueProfile] = MappingProxyType(_profiles())


def resolve_tissues(tissues: int | Sequence[str]) -> list[str]:
    """``tissues`` as a list of portal names: an int takes the first N of :data:`TISSUE_ORDER`."""
    if isinstance(tissues, int):
        if not 1 <= tissues <= len(TISSUE_ORDER):
            raise ValueError(f"tissues={tissues}: expected 1..{len(TISSUE_ORDER)}")
        return list(TISSUE_ORDER[:tissues])
    names = list(tissues)
    unknown = [t for t in names if t not in PROFILES]
    if unknown:
        raise ValueError(f"unknown GTEx tissue name(s) {unknown}; known: {list(GTEX_TISSUES)}")
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"tissues must be a non-empty list without repeats, got {names}")
    return names


def _check() -> None:
    assert len(GTEX_TISSUES) == 40 == len(set(GTEX_TISSUES))
    assert sorted(TISSUE_ORDER) == sorted(GTEX_TISSUES)
    assert set(SMTS) == set(GTEX_TISSUES) == set(PROFILES)


_check()
