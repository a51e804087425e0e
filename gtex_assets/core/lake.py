"""The data root's layout: one place that knows where every kind of output lives.

Everything the platform writes sits under one root (``GTEX_DATA_ROOT``):

    raw/                 downloads (slides/, the GCT, the attributes TSV, GTEx Portal.csv)
    tables/<name>.parquet          unpartitioned tables
    tables/<name>/<key>.parquet    per-partition tables (one file per slide), read by glob
    tiles/<sample id>/             tile JPEGs
    models/                        state_dicts + JSON model cards
    plots/                         PNGs shown in asset metadata
    lancedb/                       LanceDB tables
    gtex.duckdb                    DuckDB catalog: views over the Parquet and Lance data
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gtex_assets.core.ids import validate_sample_id

DEFAULT_DATA_ROOT = "./gtex_data"
DATA_ROOT_ENV = "GTEX_DATA_ROOT"


def resolve_root(root: str | Path | None = None) -> Lake:
    """The data root: ``root`` if given, else ``$GTEX_DATA_ROOT``, else ``./gtex_data`` (read
    when called, never at import)."""
    return Lake.at(root or os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT)


@dataclass(frozen=True)
class Lake:
    root: Path

    @classmethod
    def at(cls, root: str | Path) -> Lake:
        root_s = str(root)
        if root_s.startswith("file://"):
            root_s = root_s[len("file://") :]
        if "://" in root_s:
            raise ValueError(
                f"data root {root_s!r}: only local paths (or file://) are supported by the "
                "embedded deployment; mount the object store (e.g. s3fs/gcsfuse) and point "
                "GTEX_DATA_ROOT at the mount"
            )
        return cls(Path(root_s).expanduser().resolve())

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def raw_slides(self) -> Path:
        return self.raw / "slides"

    @property
    def quarantine(self) -> Path:
        return self.raw / "quarantine"

    @property
    def tables(self) -> Path:
        return self.root / "tables"

    @property
    def tiles(self) -> Path:
        return self.root / "tiles"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def lancedb(self) -> Path:
        return self.root / "lancedb"

    @property
    def catalog(self) -> Path:
        return self.root / "gtex.duckdb"

    def table(self, name: str) -> Path:
        """Path of an unpartitioned Parquet table."""
        return self.tables / f"{name}.parquet"

    def partition_dir(self, name: str) -> Path:
        return self.tables / name

    def partition_table(self, name: str, sample_id: str) -> Path:
        """Path of one slide's Parquet file of a per-slide table."""
        validate_sample_id(sample_id)
        return self.partition_dir(name) / f"{sample_id}.parquet"

    def slide_tiles(self, sample_id: str) -> Path:
        validate_sample_id(sample_id)
        return self.tiles / sample_id

    def plot(self, name: str) -> Path:
        return self.plots / name
