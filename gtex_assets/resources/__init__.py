"""Dagster resources: thin configurable wrappers over the Dagster-free ``lib`` objects."""

from __future__ import annotations

import os

import dagster as dg
from pydantic import Field

from gtex_assets.core.lake import DEFAULT_DATA_ROOT, Lake
from gtex_assets.lib.ingest.sources import GTExSource


class DataLakeResource(dg.ConfigurableResource):
    """Where every output goes. Empty ``root`` means ``$GTEX_DATA_ROOT``, else ``./gtex_data``
    (resolved when a run starts, never at import)."""

    root: str = Field(
        default="", description="Data root path; empty = $GTEX_DATA_ROOT or ./gtex_data"
    )

    def lake(self) -> Lake:
        return Lake.at(self.root or os.environ.get("GTEX_DATA_ROOT") or DEFAULT_DATA_ROOT)


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
        return GTExSource(
            source=self.source or os.environ.get("GTEX_SOURCE") or "portal",
            histology_csv=self.histology_csv or None,
            download_options={"retries": self.retries, "timeout": self.timeout_s},
        )
