"""The `tile_embeddings` run: which tiles of a slide to embed, what to reuse, one file per slide.

Each slide's rows (every model) go to ``tables/tile_embeddings/<sample id>.parquet`` in one
atomic write, so batches of slides run in parallel without a database lock and a killed run
leaves whole files. A model's rows are reused when their content hash (weights, tiles, input
size, code version) is unchanged. Vectors of models with different widths share the file at
the widest model's width, zero-padded (:func:`embed.fit_width`; exact for every downstream
use).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gtex_assets.core.atomic import write_parquet
from gtex_assets.core.ids import InvalidSampleIdError, subject_of
from gtex_assets.core.lake import Lake
from gtex_assets.lib.embeddings import embed as E
from gtex_assets.lib.embeddings import vector_store as V

TILE_DIR = "tile_embeddings"  # tables/tile_embeddings/<sample id>.parquet
SAMPLE_TABLE = "balanced_tile_sample"


def read_sample(lk: Lake, sample_ids: Sequence[str]) -> pd.DataFrame:
    """The balanced sample's rows of ``sample_ids`` (FileNotFoundError naming the asset)."""
    src = lk.table(SAMPLE_TABLE)
    if not src.is_file():
        raise FileNotFoundError(f"{src} missing: materialise {SAMPLE_TABLE} first")
    ids = list(sample_ids)
    return pl.scan_parquet(src).filter(pl.col("tissue_sample_id").is_in(ids)).collect().to_pandas()


def read_checkpoints(lk: Lake) -> pd.DataFrame | None:
    p = lk.table("classifier_checkpoints")
    return pd.read_parquet(p) if p.is_file() else None


def _donor_split(lk: Lake) -> dict[str, str]:
    p = lk.table("donor_split")
    if not p.is_file():
        return {}
    d = pl.read_parquet(p, columns=["subject_id", "split"])
    return dict(zip(d["subject_id"].to_list(), d["split"].to_list(), strict=True))


def slide_tiles(lk: Lake, sample: pd.DataFrame, sid: str, all_filtered: bool) -> pd.DataFrame:
    """The tiles to embed for one slide, with ``sampled`` and ``tile_id``: its balanced-sample
    tiles, plus (``all_filtered``) every other filtered 'kept' tile (``sampled=False``)."""
    tiles = sample[sample["tissue_sample_id"] == sid].assign(sampled=True)
    if all_filtered:
        fp = lk.partition_table("filtered_tiles", sid)
        if fp.is_file():
            kept = pd.read_parquet(fp)
            kept = kept[kept["verdict"] == "kept"].copy()
            kept["tile_id"] = E.tile_ids(kept)
            kept = kept[~kept["tile_id"].isin(tiles["tile_id"])]
            if len(tiles):
                first = tiles.iloc[0]
                for col in ("subject_id", "split", "tissue"):
                    kept[col] = first[col]
            else:  # a slide without sampled tiles: its donor's split, if the split table has it
                kept["subject_id"] = subject_of(sid)
                kept["split"] = _donor_split(lk).get(subject_of(sid))
            tiles = pd.concat([tiles, kept.assign(sampled=False)], ignore_index=True)
    if "tile_id" not in tiles.columns or tiles["tile_id"].isna().any():
        tiles["tile_id"] = E.tile_ids(tiles)
    return tiles.sort_values(["sampled", "y", "x"], ascending=[False, True, True]).reset_index(
        drop=True
    )


def existing_rows(path: Path) -> pa.Table | None:
    """A slide's previous file, or None when absent or unreadable (then it is recomputed)."""
    if not path.is_file():
        return None
    try:
        return pq.read_table(path)
    except Exception:  # unreadable (e.g. truncated by a crash outside atomic writes)
        return None


def store_width(specs: Sequence[E.ModelSpec]) -> int:
    """The common vector width of a run's files: the widest model's."""
    dims = [int(s.feature_dim) for s in specs if s.feature_dim]
    if len(dims) != len(specs):
        missing = [s.model_id for s in specs if not s.feature_dim]
        raise ValueError(f"models without a known feature width: {missing}")
    return max(dims)


def _fit_part(part: pa.Table, dim: int | None, width: int) -> pa.Table:
    """One model's rows at ``width`` (a reused part may have been written at another width)."""
    vec = V.arrow_to_vectors(part.column(V.VECTOR))
    if vec.shape[1] == width:
        return part
    fitted = E.fit_width(vec, dim, width)
    i = part.schema.get_field_index(V.VECTOR)
    return part.set_column(i, pa.field(V.VECTOR, V.vector_type(width), False),
                           V.vectors_to_arrow(fitted))  # fmt: skip


@dataclass
class SlideOutcome:
    sample_id: str
    status: str  # embedded | unchanged | empty | invalid
    tiles: int = 0  # tile embeddings computed
    failed: int = 0  # undecodable tiles
    models_reused: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class TileRun:
    slides: list[SlideOutcome]
    seconds_embedding: float
    embedders: dict[str, E.TileEmbedder]
    width: int

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.slides)

    @property
    def tiles(self) -> int:
        return sum(o.tiles for o in self.slides)

    def models_table(self, specs: Sequence[E.ModelSpec]) -> pd.DataFrame:
        """Per model: kind, epoch, width, input size, normalisation and the inference path."""
        rows = []
        for s in specs:
            emb = self.embedders.get(s.model_id)
            rows.append({
                "model_id": s.model_id, "kind": s.kind, "epoch": s.epoch,
                "feature_dim": s.feature_dim, "input_size": s.input_size,
                "normalization": s.normalization,
                "precision": emb.precision if emb else "", "engine": emb.report.engine if emb else "",
                "bf16_min_cosine": emb.report.calibration_cosine if emb else None,
                "bn_folded": emb.report.bn_folded if emb else None,
            })  # fmt: skip
        return pd.DataFrame(rows)


def embed_slide(
    lk: Lake,
    sid: str,
    tiles: pd.DataFrame,
    specs: Sequence[E.ModelSpec],
    embedder: Callable[[E.ModelSpec], E.TileEmbedder],
    width: int,
) -> tuple[SlideOutcome, float]:
    """Embed (or reuse) one slide's rows for every model and write its file atomically.
    Returns the outcome and the seconds spent in the models."""
    try:
        out_path = lk.partition_table(TILE_DIR, sid)
    except InvalidSampleIdError as e:
        return SlideOutcome(sid, "invalid", warnings=[str(e)]), 0.0
    if tiles.empty:
        out_path.unlink(missing_ok=True)  # a slide that lost its tiles loses its rows
        return SlideOutcome(sid, "empty", warnings=[
            f"slide {sid}: no tiles in the balanced sample; nothing to embed"]), 0.0  # fmt: skip
    digest = E.tiles_hash(tiles)
    old = existing_rows(out_path)
    outcome = SlideOutcome(sid, "unchanged")
    parts: list[pa.Table] = []
    changed = old is None
    seconds = 0.0
    for spec in specs:
        h = E.content_hash(spec, digest)
        if old is not None:
            mine = old.filter(pc.equal(old.column("model_id"), spec.model_id))
            if mine.num_rows and set(mine.column("content_hash").to_pylist()) == {h}:
                fitted = _fit_part(mine, spec.feature_dim, width)
                changed |= fitted is not mine  # the file's width changed
                parts.append(fitted)
                outcome.models_reused.append(spec.model_id)
                continue
        changed = True
        emb = embedder(spec)
        n_failed = len(emb.report.failed)
        t0 = time.perf_counter()
        feats, ok = emb.embed_paths(list(tiles["path"]), skip_errors=True)
        seconds += time.perf_counter() - t0
        outcome.warnings += [f"slide {sid}, model {spec.model_id}: {m}"
                             for m in emb.report.failed[n_failed:]]  # fmt: skip
        outcome.failed += int((~ok).sum())
        outcome.tiles += int(ok.sum())
        rows = tiles[ok].assign(model_id=spec.model_id, precision=emb.precision, content_hash=h)
        rows["row_id"] = rows["model_id"] + "|" + rows["tile_id"]
        vec = E.fit_width(feats.reshape(len(feats), -1), spec.feature_dim, width)
        parts.append(V.table_from_frame(rows, vec, V.tile_schema(width)))
    if not changed and old is not None:  # a model dropped from the config: rewrite without it
        changed = set(old.column("model_id").to_pylist()) != {s.model_id for s in specs}
    if changed:
        write_parquet(pa.concat_tables(parts), out_path)
        outcome.status = "embedded"
    return outcome, seconds


def embed_slides(
    lk: Lake,
    sample_ids: Sequence[str],
    sample: pd.DataFrame,
    specs: Sequence[E.ModelSpec],
    make_embedder: Callable[[E.ModelSpec], E.TileEmbedder],
    all_filtered: bool = False,
) -> TileRun:
    """Every slide of ``sample_ids`` (one file each); models are built on first use."""
    embedders: dict[str, E.TileEmbedder] = {}

    def get(spec: E.ModelSpec) -> E.TileEmbedder:
        if spec.model_id not in embedders:
            embedders[spec.model_id] = make_embedder(spec)
        return embedders[spec.model_id]

    width = store_width(specs)
    outcomes, seconds = [], 0.0
    for sid in sample_ids:
        try:
            lk.partition_table(TILE_DIR, sid)
        except InvalidSampleIdError as e:  # never a file name; the other slides go on
            outcomes.append(SlideOutcome(sid, "invalid", warnings=[str(e)]))
            continue
        tiles = slide_tiles(lk, sample, sid, all_filtered)
        o, s = embed_slide(lk, sid, tiles, specs, get, width)
        outcomes.append(o)
        seconds += s
    return TileRun(outcomes, seconds, embedders, width)


def tiles_per_second(run: TileRun) -> float:
    return round(run.tiles / run.seconds_embedding, 1) if run.seconds_embedding > 0 else 0.0


__all__ = [
    "TILE_DIR",
    "SlideOutcome",
    "TileRun",
    "embed_slide",
    "embed_slides",
    "existing_rows",
    "read_checkpoints",
    "read_sample",
    "slide_tiles",
    "store_width",
    "tiles_per_second",
]
