"""Where GTEx's four inputs come from: the public addresses, or a mirror with the same names.

A mirror is a local directory (path or ``file://``) or an ``http(s)://`` base URL holding::

    GTEx Portal.csv
    GTEx_Analysis_v8_Annotations_SampleAttributesDS.txt
    GTEx_Analysis_2017-06-05_v8_RNASeQCv1.1.9_gene_tpm.gct.gz
    slides/<Tissue Sample ID>.svs

Local mirror files are used in place (no copy of multi-GB slides); remote files are
downloaded into the data root's ``raw/`` with resumable, verified transfers.
"""

from __future__ import annotations

import enum
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gtex_assets.core.ids import validate_sample_id
from gtex_assets.lib.ingest import download as dl

HISTOLOGY_CSV = "GTEx Portal.csv"
SAMPLE_ATTRIBUTES = "GTEx_Analysis_v8_Annotations_SampleAttributesDS.txt"
GENE_TPM_GCT = "GTEx_Analysis_2017-06-05_v8_RNASeQCv1.1.9_gene_tpm.gct.gz"
SLIDES_DIR = "slides"

PORTAL_SLIDE_URL = "https://brd.nci.nih.gov/brd/imagedownload/{sample_id}"
PORTAL_GCT_URL = f"https://storage.googleapis.com/adult-gtex/bulk-gex/v8/rna-seq/{GENE_TPM_GCT}"
PORTAL_GCT_URL_OLD = f"https://storage.googleapis.com/gtex_analysis_v8/rna_seq_data/{GENE_TPM_GCT}"
PORTAL_ATTRIBUTES_URL = (
    "https://storage.googleapis.com/adult-gtex/annotations/v8/metadata-files/" + SAMPLE_ATTRIBUTES
)
PORTAL_HISTOLOGY_PAGE = "https://gtexportal.org/home/histologyPage"


class Kind(str, enum.Enum):
    HISTOLOGY = "histology"
    ATTRIBUTES = "attributes"
    GCT = "gct"
    SLIDE = "slide"


FILE_NAMES = {
    Kind.HISTOLOGY: HISTOLOGY_CSV,
    Kind.ATTRIBUTES: SAMPLE_ATTRIBUTES,
    Kind.GCT: GENE_TPM_GCT,
}


class SourceError(RuntimeError):
    """A source file that is missing or cannot be fetched; the message says which and why."""


@dataclass(frozen=True)
class GTExSource:
    """Resolve, fetch and version GTEx inputs from ``source``: ``portal`` or a mirror.

    ``histology_csv``: with ``portal`` the histology CSV has no download URL (the portal page
    offers it as a button), so it is read from this path, defaulting to ``raw/GTEx Portal.csv``
    under the data root.
    """

    source: str = "portal"
    histology_csv: str | None = None
    download_options: dict[str, Any] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        s = self.source.strip()
        if s == "portal":
            return "portal"
        scheme = urllib.parse.urlparse(s).scheme
        if scheme in ("http", "https"):
            return "http"
        if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
            return "local"
        raise SourceError(
            f"GTEX_SOURCE {s!r}: unsupported scheme {scheme!r}; use 'portal', a directory, "
            "file://, or http(s)://"
        )

    @property
    def mirror_dir(self) -> Path:
        s = self.source
        if s.startswith("file://"):
            s = urllib.parse.unquote(urllib.parse.urlparse(s).path)
        return Path(s).expanduser().resolve()

    def _relative(self, kind: Kind, sample_id: str | None) -> str:
        if kind is Kind.SLIDE:
            if sample_id is None:
                raise ValueError("a slide needs its sample id")
            return f"{SLIDES_DIR}/{validate_sample_id(sample_id)}.svs"
        return FILE_NAMES[kind]

    def location(
        self, kind: Kind, sample_id: str | None = None, raw_dir: Path | None = None
    ) -> str:
        """Path or URL the input is read from."""
        kind = Kind(kind)
        rel = self._relative(kind, sample_id)
        mode = self.mode
        if mode == "local":
            return str(self.mirror_dir / rel)
        if mode == "http":
            return self.source.rstrip("/") + "/" + urllib.parse.quote(rel)
        # portal
        if kind is Kind.SLIDE:
            return PORTAL_SLIDE_URL.format(sample_id=sample_id)
        if kind is Kind.GCT:
            return PORTAL_GCT_URL
        if kind is Kind.ATTRIBUTES:
            return PORTAL_ATTRIBUTES_URL
        if self.histology_csv:
            return str(Path(self.histology_csv).expanduser().resolve())
        if raw_dir is None:
            raise SourceError(f"{HISTOLOGY_CSV}: no path configured for the portal source")
        return str(raw_dir / HISTOLOGY_CSV)

    def is_local(self, kind: Kind) -> bool:
        return self.mode == "local" or (self.mode == "portal" and Kind(kind) is Kind.HISTOLOGY)

    def fetch(self, kind: Kind, raw_dir: Path, sample_id: str | None = None) -> Path:
        """Return a local path to the input, downloading it into ``raw_dir`` when remote."""
        kind = Kind(kind)
        loc = self.location(kind, sample_id, raw_dir)
        if self.is_local(kind):
            p = Path(loc)
            if not p.is_file():
                hint = ""
                if self.mode == "portal":
                    hint = (
                        f"; download it from {PORTAL_HISTOLOGY_PAGE} (the CSV button) and put it "
                        f"there, or set histology_csv"
                    )
                raise SourceError(f"{kind.value} file {p} does not exist{hint}")
            return p
        dest = raw_dir / self._relative(kind, sample_id)
        try:
            dl.download(loc, dest, **self.download_options)
        except dl.DownloadError as e:
            raise SourceError(str(e)) from e
        return dest

    def version(self, kind: Kind, sample_id: str | None = None, raw_dir: Path | None = None) -> str:
        """A token that changes when the input changes (ETag/Last-Modified/size remotely,
        size+mtime+partial hash for a local file)."""
        kind = Kind(kind)
        loc = self.location(kind, sample_id, raw_dir)
        if self.is_local(kind):
            p = Path(loc)
            if not p.is_file():
                raise SourceError(f"{kind.value} file {p} does not exist")
            return dl.local_version(p)
        try:
            return dl.head(loc).token
        except dl.DownloadError as e:
            raise SourceError(str(e)) from e
