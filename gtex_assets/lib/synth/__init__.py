"""Synthetic GTEx: a deterministic generator of a complete GTEx-like mirror directory.

``generate_mirror(out_dir, tissues=6, slides_per_tissue=8, seed=0)`` writes what the
pipeline reads from a real GTEx mirror (same file names and formats) plus the planted truth
(``truth/``) that tests and demos check results against:

- ``GTEx Portal.csv``: histology sample list, every field quoted, like the portal export;
- ``slides/<Tissue Sample ID>.svs``: Aperio-style tiled JPEG pyramids that slideio opens,
  with tissue-specific H&E morphology, tissue edges, pen smudges and blurred patches;
- ``GTEx_Analysis_2017-06-05_v8_RNASeQCv1.1.9_gene_tpm.gct.gz``: GCT v1.2 gene TPM;
- ``GTEx_Analysis_v8_Annotations_SampleAttributesDS.txt``: SAMPID → SMTS/SMTSD;
- ``truth/``: per-slide morphology factors (they drive both pixels and "image-linked"
  genes), the image-linked genes, artefact rectangles, and a summary.json with the genes
  each expression filter is expected to drop.

Only numpy, Pillow and tifffile are needed (no Dagster).
"""

from gtex_assets.lib.synth.mirror import PORTAL_CSV_NAME, MirrorSummary, generate_mirror
from gtex_assets.lib.synth.slide import FACTORS, TILE, SlideSpec, render_slide
from gtex_assets.lib.synth.tissues import GTEX_TISSUES, PROFILES, SMTS, TISSUE_ORDER

__all__ = [
    "FACTORS",
    "GTEX_TISSUES",
    "PORTAL_CSV_NAME",
    "PROFILES",
    "SMTS",
    "TILE",
    "TISSUE_ORDER",
    "MirrorSummary",
    "SlideSpec",
    "generate_mirror",
    "render_slide",
]
