"""Dagster resources: thin configurable wrappers over the Dagster-free ``core``/``lib`` objects.

Bound in ``defs/resources.py``; the data root comes from ``dg.EnvVar("GTEX_DATA_ROOT")`` there,
so the UI shows where it is read from. Heavy imports (lancedb, duckdb, torch) happen when a
step asks for the object, never when the definitions load.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import Field

from gtex_assets.core.lake import Lake, resolve_root
from gtex_assets.lib.ingest.sources import GTExSource


class DataLakeResource(dg.ConfigurableResource):
    """Where every output goes. Empty ``root`` means ``$GTEX_DATA_ROOT``, else ``./gtex_data``
    (resolved when a step runs, never at import)."""

    root: str = Field(
        default="", description="Data root path; empty = $GTEX_DATA_ROOT or ./gtex_data"
    )

    def lake(self) -> Lake:
        return resolve_root(self.root or None)


class GTExSourceResource(dg.ConfigurableResource):
    """Where GTEx inputs come from: ``portal`` (the public addresses) or a mirror directory /
    ``file://`` / ``http(s)://`` URL with GTEx's file names. Empty = ``$GTEX_SOURCE`` or portal."""

    source: str = Field(
        default="", description="'portal' or a mirror path/URI; empty = $GTEX_SOURCE or 'portal'"
    )
    histology_csv: str = Field(
        default="",
        description="With the portal source: path of the downloaded 'GTEx Portal.csv' "
        "(default: raw/GTEx Portal.csv under the data root)",
    )
    retries: int = Field(default=5, description="Download retries (resumed, exponential backoff)")
    timeout_s: float = Field(default=60.0, description="Per-request network timeout")

    def spec(self) -> GTExSource:
        import os

        return GTExSource(
            source=self.source or os.environ.get("GTEX_SOURCE") or "portal",
            histology_csv=self.histology_csv or None,
            download_options={"retries": self.retries, "timeout": self.timeout_s},
        )


class LanceDBResource(dg.ConfigurableResource):
    """The LanceDB store of tile and slide embeddings (``lancedb/`` under the data root unless
    ``uri`` is set). One writer at a time: writers also take the ``lancedb_writer`` pool."""

    uri: str = Field(default="", description="LanceDB directory; empty = <data root>/lancedb")
    lock_timeout_s: float = Field(
        default=1800.0, description="How long a writer waits for the store's file lock"
    )

    def store(self, lake: Lake):
        from gtex_assets.lib.embeddings.vector_store import VectorStore

        return VectorStore(Path(self.uri) if self.uri else lake.lancedb, self.lock_timeout_s)


class DuckDBCatalogResource(dg.ConfigurableResource):
    """The DuckDB catalog file (views over every table); ``gtex.duckdb`` under the data root
    unless ``path`` is set. Only ``duckdb_catalog`` writes it (pool ``duckdb_catalog``)."""

    path: str = Field(default="", description="Catalog file; empty = <data root>/gtex.duckdb")

    def catalog_path(self, lake: Lake) -> Path:
        return Path(self.path) if self.path else lake.catalog

    def connect_readonly(self, lake: Lake):
        from gtex_assets.lib.catalog.views import connect_readonly

        return connect_readonly(self.catalog_path(lake))


class TorchDeviceResource(dg.ConfigurableResource):
    """The torch device for training and embedding: ``auto`` = CUDA if present, else MPS, else
    CPU; or an explicit ``cpu`` / ``cuda[:N]`` / ``mps`` that must exist."""

    device: str = Field(default="auto", description="auto | cpu | cuda[:N] | mps")

    def resolve(self):
        from gtex_assets.lib.model.backbones import resolve_device

        return resolve_device(self.device)
