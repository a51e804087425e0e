"""The `slide_embeddings` run: slide means, k-means clusters and the LanceDB bulk load.

The single LanceDB writer reads the per-slide tile-embedding files, (re)loads into the LanceDB
``tile_embeddings`` table only the slides whose rows changed (one atomic merge per batch of
slides: re-runs never duplicate rows), recomputes the slide means whose tiles changed (the
others keep their previous rows), clusters the slides per model and rewrites the slide table.

Vector width: one per table. Files written at different widths (an encoder added or dropped
since) are zero-padded to the widest (:func:`embed.fit_width`, exact downstream); a LanceDB
table of another width is rebuilt from the files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gtex_assets.core.atomic import params_hash, write_json
from gtex_assets.core.lake import Lake
from gtex_assets.lib.embeddings import embed as E
from gtex_assets.lib.embeddings import vector_store as V
from gtex_assets.lib.embeddings.tile_job import TILE_DIR, existing_rows

SLIDE_TABLE_FILE = "slide_embeddings"  # tables/slide_embeddings.parquet
MODELS_TABLE = "embedding_models"  # tables/embedding_models.parquet
MODEL_SIDECARS = "embedding_models"  # models/embedding_models/<model_id>.json
MEAN_OVER = ("sampled", "all")


@dataclass(frozen=True)
class SlideParams:
    """How slide embeddings are made (SPEC §7; the asset's config defaults)."""

    mean_over: str = "sampled"  # the balanced sample's tiles, or 'all' embedded tiles
    n_clusters: int = 0  # k-means clusters per model; 0 = the number of tissues
    kmeans_seed: int = 0
    index_min_rows: int = V.DEFAULT_INDEX_MIN_ROWS
    index_type: str = V.DEFAULT_INDEX_TYPE
    load_batch_slides: int = 50  # slides per LanceDB merge (one atomic commit each)

    def __post_init__(self) -> None:
        if self.mean_over not in MEAN_OVER:
            raise ValueError(f"mean_over {self.mean_over!r}: use 'sampled' or 'all'")


def current_slides(lk: Lake, partition_keys: Sequence[str]) -> list[str]:
    """Slides with a tile-embedding file that are still ``slides`` partitions (all files when
    the instance has no partitions)."""
    d = lk.partition_dir(TILE_DIR)
    files = sorted(p.stem for p in d.glob("*.parquet")) if d.is_dir() else []
    keys = set(partition_keys)
    return [s for s in files if s in keys] if keys else files


def file_hashes(lk: Lake, sids: Sequence[str]) -> pd.DataFrame:
    """Distinct ``(tissue_sample_id, model_id, content_hash, width)`` of the per-slide files;
    a ValueError names an unreadable file."""
    parts = []
    for sid in sids:
        path = lk.partition_table(TILE_DIR, sid)
        try:
            t = pq.read_table(path, columns=["model_id", "content_hash"])
            width = pq.read_schema(path).field(V.VECTOR).type.list_size
        except Exception as e:  # pyarrow raises several types for bad files
            raise ValueError(
                f"slide {sid}: {path} is unreadable ({e}); re-materialise its tile_embeddings "
                "partition"
            ) from e
        parts.append(
            pl.from_arrow(t)
            .unique()
            .with_columns(tissue_sample_id=pl.lit(sid), width=pl.lit(int(width)))
        )
    return pl.concat(parts).to_pandas() if parts else pd.DataFrame()


def mean_hash(tile_hashes, mean_over: str) -> str:
    """The content hash of a slide mean: its tiles' content hashes + how they are averaged."""
    return params_hash({"tiles": sorted(set(tile_hashes)), "mean_over": mean_over})


def slide_rows(tile_tbl: pa.Table, mean_over: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Slide means (one row per model x slide) of one or more slides' tile rows."""
    meta = pl.from_arrow(tile_tbl.drop_columns([V.VECTOR]))
    vecs = V.arrow_to_vectors(tile_tbl.column(V.VECTOR))
    keys = ["model_id", "tissue_sample_id"]
    if mean_over == "sampled":
        # Per (model, slide): the sampled tiles, or all when a slide has none sampled.
        keep = (pl.col("sampled") | ~pl.col("sampled").any().over(keys)).alias("keep")
        mask = meta.select(keep)["keep"].to_numpy()
        meta, vecs = meta.filter(pl.Series(mask)), vecs[mask]
    pdm = meta.to_pandas()
    groups, means = E.slide_means(pdm, vecs)
    agg = (
        meta.group_by(keys, maintain_order=True)
        .agg(
            pl.col("subject_id").first(),
            pl.col("tissue").first(),
            pl.when(pl.col("split").n_unique() == 1)
            .then(pl.col("split").first())
            .otherwise(pl.lit("mixed"))
            .alias("split"),
            pl.col("content_hash").unique().sort().alias("hashes"),
        )
        .to_pandas()
    )
    agg["content_hash"] = [mean_hash(h, mean_over) for h in agg["hashes"]]
    groups = groups.merge(agg.drop(columns=["hashes"]), on=keys, how="left")
    return groups, means


def clusters(
    meta: pd.DataFrame, vecs: np.ndarray, n_clusters: int, seed: int
) -> tuple[np.ndarray, pd.DataFrame]:
    """k-means cluster id per row, fitted per model on L2-normalised slide embeddings (cosine
    geometry); and per model: clusters, adjusted Rand index vs tissue."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    out = np.full(len(meta), -1, dtype=np.int32)
    summary = []
    for mid, idx in meta.groupby("model_id").indices.items():
        x = vecs[idx].astype(np.float64)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        n_tissues = int(meta["tissue"].iloc[idx].nunique())
        k = n_clusters or n_tissues
        k = max(1, min(k, len(np.unique(x.round(6), axis=0))))
        labels = KMeans(n_clusters=k, random_state=seed, n_init=10).fit_predict(x)
        out[idx] = labels
        tissue = meta["tissue"].iloc[idx].fillna("").to_numpy()
        summary.append({"model_id": mid, "slides": len(idx), "clusters": k,
                        "ari_vs_tissue": round(float(adjusted_rand_score(tissue, labels)), 4)})  # fmt: skip
    return out, pd.DataFrame(summary)


def write_model_cards(lk: Lake, specs: Sequence[E.ModelSpec]) -> None:
    """One JSON card per model (``models/embedding_models/<model_id>.json``), read back by
    :func:`models_table`; a run without models is an error naming the config."""
    if not specs:
        raise ValueError(
            "no models selected (checkpoints='none', off_the_shelf=false, no encoders)"
        )
    for spec in specs:
        write_json(spec.as_dict(), lk.models / MODEL_SIDECARS / f"{spec.model_id}.json")


def models_table(lk: Lake, model_ids: Sequence[str]) -> pd.DataFrame:
    """One row per embedded model from its sidecar card (``ModelSpec`` columns)."""
    rows = []
    for mid in model_ids:
        p = lk.models / MODEL_SIDECARS / f"{mid}.json"
        rows.append(json.loads(p.read_text()) if p.is_file() else {"model_id": mid})
    return pd.DataFrame(rows).reindex(columns=list(E.ModelSpec.__dataclass_fields__))


def _pad(tbl: pa.Table, width: int, schema: pa.Schema) -> pa.Table:
    vec = V.arrow_to_vectors(tbl.column(V.VECTOR))
    if vec.shape[1] == width:
        return tbl.cast(schema)
    meta = tbl.drop_columns([V.VECTOR]).to_pandas()
    return V.table_from_frame(meta, E.fit_width(vec, None, width), schema)


def _isin(column: pa.ChunkedArray, values: Sequence[str]) -> pa.Array:
    return pc.is_in(column, value_set=pa.array(list(values), pa.string()))


@dataclass
class SlideRun:
    """What :func:`update_slide_embeddings` made (the asset writes ``table``)."""

    table: pa.Table  # slide_embeddings rows (schema V.slide_schema(width))
    meta: pd.DataFrame  # the same rows without vectors
    width: int
    cluster_summary: pd.DataFrame
    loaded: list[str]  # slides (re)loaded into LanceDB tile_embeddings
    removed: list[str]
    recomputed: int  # slide means recomputed
    rows: dict[str, int]  # inserted / updated / deleted tile rows
    rebuilt_store: bool  # the LanceDB tile table was rebuilt at a new width


def update_slide_embeddings(
    lk: Lake, store: V.VectorStore, sids: Sequence[str], params: SlideParams
) -> SlideRun:
    """Bulk-load changed slides into LanceDB ``tile_embeddings`` and compute every slide mean
    (reusing unchanged ones from the previous table) with its k-means cluster."""
    if not sids:
        raise FileNotFoundError(
            f"no tile embeddings under {lk.partition_dir(TILE_DIR)}: materialise tile_embeddings first"
        )
    files = file_hashes(lk, sids)
    width = int(files["width"].max())
    file_sets = files.groupby("tissue_sample_id")["content_hash"].agg(set).to_dict()
    rebuilt = store.has_table(V.TILE_TABLE) and store.width(V.TILE_TABLE) != width
    if rebuilt:
        store.drop(V.TILE_TABLE)  # another width: rebuilt from the files below
    in_store = store.partition_hashes(V.TILE_TABLE)
    narrow = set(files.loc[files["width"] != width, "tissue_sample_id"])
    to_load = {s for s in sids if in_store.get(s) != file_sets[s]}
    removed = sorted(set(in_store) - set(sids))

    # Slide means to recompute: the expected mean hash (per model) differs from the previous
    # table's; the others keep their previous rows.
    expected = {
        (m, sid): mean_hash(g, params.mean_over)
        for (m, sid), g in files.groupby(["model_id", "tissue_sample_id"])["content_hash"]
    }
    prev = existing_rows(lk.table(SLIDE_TABLE_FILE))
    prev_hash: dict[tuple[str, str], str] = {}
    if prev is not None and prev.schema.field(V.VECTOR).type.list_size == width:
        p = prev.select(["model_id", "tissue_sample_id", "content_hash"]).to_pylist()
        prev_hash = {(r["model_id"], r["tissue_sample_id"]): r["content_hash"] for r in p}
    stale = {sid for (m, sid), h in expected.items() if prev_hash.get((m, sid)) != h}
    stale |= {sid for (m, sid) in prev_hash if sid in file_sets and (m, sid) not in expected}
    need_read = sorted(to_load | stale | narrow)

    metas, vecs = [], []
    rows = {"inserted": 0, "updated": 0, "deleted": 0}
    batch = max(1, params.load_batch_slides)
    tile_schema = V.tile_schema(width)
    for i in range(0, len(need_read), batch):
        chunk = need_read[i : i + batch]
        tbl = pa.concat_tables(
            [_pad(pq.read_table(lk.partition_table(TILE_DIR, s)), width, tile_schema)
             for s in chunk]
        )  # fmt: skip
        reload = [s for s in chunk if s in to_load]
        if reload:
            part = tbl.filter(_isin(tbl.column("tissue_sample_id"), reload))
            st = store.replace_partitions(V.TILE_TABLE, part, reload)
            rows["inserted"] += st.inserted
            rows["updated"] += st.updated
            rows["deleted"] += st.deleted
        m, v = slide_rows(tbl, params.mean_over)
        metas.append(m)
        vecs.append(v)
    if removed:
        rows["deleted"] += store.delete_partitions(V.TILE_TABLE, removed)
    reused = [s for s in sids if s not in set(need_read)]
    if prev_hash and reused:
        kept = prev.filter(_isin(prev.column("tissue_sample_id"), reused))
        metas.append(kept.drop_columns([V.VECTOR]).to_pandas())
        vecs.append(V.arrow_to_vectors(kept.column(V.VECTOR)))
    meta = pd.concat(metas, ignore_index=True)
    vec = np.vstack(vecs)
    order = meta.sort_values(["model_id", "tissue", "tissue_sample_id"]).index.to_numpy()
    meta, vec = meta.loc[order].reset_index(drop=True), vec[order]
    meta["cluster"], summary = clusters(meta, vec, params.n_clusters, params.kmeans_seed)
    meta["row_id"] = meta["model_id"] + "|" + meta["tissue_sample_id"]
    table = V.table_from_frame(meta, vec, V.slide_schema(width))
    return SlideRun(table, meta.drop(columns=["row_id"]), width, summary, sorted(to_load),
                    removed, len(need_read), rows, bool(rebuilt))  # fmt: skip


__all__ = [
    "MEAN_OVER",
    "MODELS_TABLE",
    "MODEL_SIDECARS",
    "SLIDE_TABLE_FILE",
    "SlideParams",
    "SlideRun",
    "clusters",
    "current_slides",
    "file_hashes",
    "mean_hash",
    "models_table",
    "slide_rows",
    "update_slide_embeddings",
    "write_model_cards",
]
