"""Fetch, verify and describe one slide; unreadable slides are quarantined with the reason."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow as pa

from gtex_assets.core.ids import InvalidSampleIdError, validate_sample_id
from gtex_assets.lib.ingest.sources import GTExSource, Kind, SourceError
from gtex_assets.lib.slides.reader import SlideReadError, inspect_slide

# One fixed schema so that per-slide files of ok and quarantined slides union cleanly.
RAW_SLIDE_SCHEMA = pa.schema(
    [
        ("tissue_sample_id", pa.string()), ("tissue", pa.string()), ("status", pa.string()),
        ("reason", pa.string()), ("path", pa.string()), ("source_version", pa.string()),
        ("width", pa.int64()), ("height", pa.int64()), ("mpp_x", pa.float64()),
        ("mpp_y", pa.float64()), ("magnification", pa.float64()), ("levels", pa.int64()),
        ("level_downsamples", pa.list_(pa.float64())), ("channels", pa.int64()),
        ("file_bytes", pa.int64()), ("fetched_at", pa.float64()),
    ]
)  # fmt: skip
RAW_SLIDE_COLUMNS = RAW_SLIDE_SCHEMA.names


def rows_to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(
        [{c: r.get(c) for c in RAW_SLIDE_COLUMNS} for r in rows], schema=RAW_SLIDE_SCHEMA
    )


def fetch_and_inspect(
    source: GTExSource,
    sample_id: str,
    tissue: str | None,
    raw_dir: Path,
    quarantine_dir: Path,
    previous: dict | None = None,
) -> dict:
    """One row of the ``raw_slides`` table for ``sample_id``: status ``ok`` or ``quarantined``.

    Skips the work when ``previous`` (the slide's last row) is ok and the source version is
    unchanged. Never raises for bad slide data: the reason goes into the row.
    """
    row: dict = dict.fromkeys(RAW_SLIDE_COLUMNS)
    row.update(tissue_sample_id=sample_id, tissue=tissue, fetched_at=time.time())
    try:
        validate_sample_id(sample_id)
    except InvalidSampleIdError as e:
        return {**row, "status": "quarantined", "reason": str(e)}
    try:
        version = source.version(Kind.SLIDE, sample_id) if source.is_local(Kind.SLIDE) else None
        if (
            previous is not None
            and previous.get("status") == "ok"
            and version is not None
            and previous.get("source_version") == version
            and Path(previous.get("path") or "").is_file()
        ):
            return previous
        path = source.fetch(Kind.SLIDE, raw_dir, sample_id)
        if version is None:
            version = _downloaded_version(path)
    except SourceError as e:
        return {**row, "status": "quarantined", "reason": f"fetch failed: {e}"}
    row.update(path=str(path), source_version=version)
    try:
        info = inspect_slide(path)
    except SlideReadError as e:
        if not source.is_local(Kind.SLIDE):
            # Move a bad download aside so it is neither re-used nor mistaken for a good slide.
            quarantine_dir.mkdir(parents=True, exist_ok=True)
            dest = quarantine_dir / path.name
            os.replace(path, dest)
            row["path"] = str(dest)
        return {**row, "status": "quarantined", "reason": str(e)}
    row.update(info.as_row(), status="ok", reason="")
    return row


def _downloaded_version(path: Path) -> str:
    st = path.stat()
    return f"size={st.st_size}"
