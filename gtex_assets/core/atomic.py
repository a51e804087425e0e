"""Atomic, idempotent writes: a killed run never leaves a half file that looks done.

Everything is written to a hidden temp name in the destination's own directory (so the final
``os.replace`` is a same-filesystem rename) and renamed only once complete and flushed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

_UMASK = os.umask(0)
os.umask(_UMASK)


def _tmp_path(dest: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    # mkstemp makes 0600 files; results are shared data, so use the usual umask-based mode.
    os.fchmod(fd, 0o666 & ~_UMASK)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``dest``; on success it replaces ``dest``, on error it is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(dest)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(dest: str | Path, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """``open`` for writing whose result appears at ``dest`` only when the block succeeds."""
    with atomic_path(dest) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield a temp directory that replaces ``dest`` (a directory) when the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def to_arrow(data: Any) -> pa.Table:
    """An Arrow table from a polars or pandas frame (or an Arrow table as it is)."""
    if isinstance(data, pa.Table):
        return data
    if hasattr(data, "to_arrow"):  # polars
        return data.to_arrow()
    return pa.Table.from_pandas(data, preserve_index=False)


def write_parquet(data: Any, dest: str | Path) -> Path:
    """Write a polars/pandas frame or Arrow table to Parquet atomically; returns the path."""
    table = to_arrow(data)
    with atomic_path(dest) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return Path(dest)


def write_json(obj: Any, dest: str | Path) -> Path:
    with atomic_open(dest, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    return Path(dest)


def params_hash(params: Mapping[str, Any]) -> str:
    """Short stable hash of a parameter mapping (decides whether done work is still valid)."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def clean_stale_temps(directory: str | Path) -> int:
    """Remove temp files left by killed writers in ``directory``; returns how many."""
    n = 0
    for p in Path(directory).glob(".*.tmp"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n
