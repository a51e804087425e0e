"""Fetch, verify and describe one slide; unreadable slides are quarantined with the reason."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from gtex_assets.core.ids import InvalidSampleIdError, validate_sample_id
from gtex_assets.core.lake import Lake
from gtex_assets.lib.ingest.sources import GTExSource, Kind, SourceError
from gtex_assets.lib.slides.mpp import (
    DEFAULT_OVERRIDES_FILE,
    DEFAULT_POLICY,
    MppOverrides,
    MppPolicy,
    resolve_mpp,
)
from gtex_assets.lib.slides.reader import SlideReadError, inspect_slide

# One fixed schema so that per-slide files of ok and quarantined slides union cleanly.
RAW_SLIDE_SCHEMA = pa.schema(
    [
        ("tissue_sample_id", pa.string()), ("tissue", pa.string()), ("status", pa.string()),
        ("reason", pa.string()), ("path", pa.string()), ("source_version", pa.string()),
        ("width", pa.int64()), ("height", pa.int64()), ("mpp_x", pa.float64()),
        ("mpp_y", pa.float64()), ("mpp_source", pa.string()), ("description_mpp", pa.float64()),
        ("magnification", pa.float64()), ("levels", pa.int64()),
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
    *,
    overrides: MppOverrides | None = None,
    policy: MppPolicy = DEFAULT_POLICY,
) -> dict:
    """One row of the ``raw_slides`` table for ``sample_id``: status ``ok`` or ``quarantined``.

    ``mpp_x``/``mpp_y`` are the MPP chosen by the policy of :mod:`gtex_assets.lib.slides.mpp`
    (``mpp_source`` says which; ``description_mpp`` is what the file itself says); a slide
    without any is quarantined with the three fixes. Skips the work when ``previous`` (the
    slide's last row) is ok, the source version is unchanged and the policy gives the same MPP
    (``previous`` itself is returned). Never raises for bad slide data: the reason goes into
    the row.
    """
    overrides = overrides or MppOverrides(Path(DEFAULT_OVERRIDES_FILE), {})
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
            mpp = resolve_mpp(sample_id, previous.get("description_mpp"), overrides, policy)
            if (mpp.mpp, mpp.source) == (previous.get("mpp_x"), previous.get("mpp_source")):
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
    row.update(info.as_row(), description_mpp=info.mpp_x)
    mpp = resolve_mpp(sample_id, info.mpp_x, overrides, policy)
    if mpp.mpp is None:
        return {**row, "status": "quarantined", "reason": f"{path.name}: {mpp.reason}"}
    # One MPP for both axes unless the description gives both (square pixels otherwise).
    mpp_y = info.mpp_y if mpp.source == "description" and info.mpp_y else mpp.mpp
    row.update(mpp_x=mpp.mpp, mpp_y=mpp_y, mpp_source=mpp.source, status="ok", reason="")
    return row


def _downloaded_version(path: Path) -> str:
    st = path.stat()
    return f"size={st.st_size}"


def previous_row(path: Path) -> dict | None:
    """The slide's last ``raw_slides`` row, or None (absent or unreadable file)."""
    try:
        return pq.read_table(path).to_pylist()[0] if path.is_file() else None
    except (OSError, IndexError, pa.ArrowException):
        return None


def inspect_slides(
    source: GTExSource,
    sample_ids: Sequence[str],
    lake: Lake,
    tissue_of: Mapping[str, str],
    *,
    overrides: MppOverrides | None = None,
    policy: MppPolicy = DEFAULT_POLICY,
    workers: int = 4,
) -> list[tuple[dict, bool]]:
    """``(row, changed)`` of :func:`fetch_and_inspect` for each id, ``workers`` at a time.

    ``changed`` is False when the slide's stored row was reused (nothing to write). A malformed
    id is quarantined without ever becoming a path.
    """

    def one(sample_id: str) -> tuple[dict, bool]:
        try:
            part = lake.partition_table("raw_slides", sample_id)
        except InvalidSampleIdError as e:
            row = {**dict.fromkeys(RAW_SLIDE_COLUMNS), "tissue_sample_id": sample_id}
            return {**row, "status": "quarantined", "reason": str(e)}, False
        prev = previous_row(part)
        row = fetch_and_inspect(
            source, sample_id, tissue_of.get(sample_id), lake.raw, lake.quarantine,
            previous=prev, overrides=overrides, policy=policy,
        )  # fmt: skip
        return row, row is not prev

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, sample_ids))
