"""Embeddings: tile and slide embeddings, stored in Parquet and LanceDB (group ``embeddings``;
SPEC §7 first half). Science in ``lib/embedding``, storage in ``lib/vector_store``, the lookup in
``lib/nearest`` (`gtex-assets nearest`).

Write path (why two steps): each `tile_embeddings` partition (slide) writes its own Parquet,
``tables/tile_embeddings/<sample id>.parquet`` with the rows of every model, atomically. Batches
of slides therefore run in parallel without a database lock, a killed run leaves whole files,
and DuckDB sees them at once (the catalog's `tile_embeddings` view globs the folder). The single
writer `slide_embeddings` (pool ``lancedb_writer``) then bulk-loads only the slides whose rows
changed into LanceDB (one atomic merge per batch of slides: re-runs never duplicate rows),
computes slide means and k-means clusters, and builds the vector index once the tile table is
large enough.
"""

import json
import time

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from gtex_assets.core.atomic import params_hash, write_json, write_parquet
from gtex_assets.core.ids import InvalidSampleIdError, subject_of
from gtex_assets.core.lake import Lake
from gtex_assets.defs.execution import GPU_OP_TAGS, GPU_POOL
from gtex_assets.defs.metadata import counts_md, table_metadata
from gtex_assets.defs.partitions import SLIDE_BATCH, slide_partitions
from gtex_assets.lib.embeddings import embed as E
from gtex_assets.lib.embeddings import vector_store as V
from gtex_assets.lib.model.backbones import resolve_device
from gtex_assets.resources import DataLakeResource

GROUP = "embeddings"
TILE_DIR = "tile_embeddings"  # tables/tile_embeddings/<sample id>.parquet
SLIDE_TABLE_FILE = "slide_embeddings"  # tables/slide_embeddings.parquet
MODELS_TABLE = "embedding_models"  # tables/embedding_models.parquet
MODEL_SIDECARS = "embedding_models"  # models/embedding_models/<model_id>.json
META_COLUMNS = [f.name for f in V.tile_schema(1) if f.name != V.VECTOR]


# ----------------------------------------------------------------------------------------------
# tile_embeddings
# ----------------------------------------------------------------------------------------------


class TileEmbeddingsConfig(dg.Config):
    """Which models embed which tiles, and how fast."""

    checkpoints: str = Field(
        default="latest_run",
        description="Classifier checkpoints to embed with: 'latest_run' (every kept checkpoint of "
        "the latest training run), 'selected', 'all' or 'none'",
    )
    epochs: list[int] = Field(
        default=[],
        description="Only checkpoints of these epochs (e.g. [5, 10, 20, 30]); empty = all",
    )
    off_the_shelf: bool = Field(
        default=True, description="Also embed with the backbone as pretrained (no fine-tuning)"
    )
    off_the_shelf_weights: str = Field(
        default="",
        description="Weights of the off-the-shelf model; empty = the classifier card's setting "
        "(else 'imagenet'; random init, tagged '-random', when unavailable)",
    )
    backbone: str = Field(
        default="efficientnet_b0",
        description="Off-the-shelf backbone when there are no classifier checkpoints",
    )
    all_filtered_tiles: bool = Field(
        default=False,
        description="Also embed every filtered 'kept' tile of the slide, not only the balanced "
        "sample (rows get sampled=false)",
    )
    batch_size: int = Field(default=64, description="Tiles per forward pass")
    precision: str = Field(
        default="auto",
        description="'auto' (bf16 where native and cosine >= min_cosine to fp32, else fp32), "
        "'fp32' or 'bf16'",
    )
    min_cosine: float = Field(default=0.999, description="bf16 accuracy bar (auto precision)")
    engine: str = Field(
        default="auto",
        description="'auto' (ONNX Runtime fp32 on CPU, torch on GPU), 'onnxruntime' or 'torch'",
    )
    decode_workers: int = Field(default=2, description="Threads decoding JPEGs ahead of the model")
    device: str = Field(default="auto", description="auto (CUDA, MPS, CPU), cpu, cuda[:N], mps")

    def options(self) -> E.InferenceOptions:
        return E.InferenceOptions(
            batch_size=self.batch_size,
            precision=self.precision,
            decode_workers=self.decode_workers,
            min_cosine=self.min_cosine,
            engine=self.engine,
        )


def _read_checkpoints(lk: Lake) -> pd.DataFrame | None:
    p = lk.table("classifier_checkpoints")
    return pd.read_parquet(p) if p.is_file() else None


def _slide_tiles(lk: Lake, sample: pd.DataFrame, sid: str, all_filtered: bool) -> pd.DataFrame:
    """The tiles to embed for one slide, with ``sampled`` and ``tile_id``."""
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


def _donor_split(lk: Lake) -> dict[str, str]:
    p = lk.table("donor_split")
    if not p.is_file():
        return {}
    d = pd.read_parquet(p, columns=["subject_id", "split"])
    return dict(zip(d["subject_id"], d["split"], strict=True))


def _existing_rows(path) -> pa.Table | None:
    if not path.is_file():
        return None
    try:
        return pq.read_table(path)
    except Exception:  # unreadable (e.g. truncated by a crash outside atomic writes): recompute
        return None


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "parquet"},
    partitions_def=slide_partitions,
    backfill_policy=SLIDE_BATCH,
    deps=[dg.AssetKey("tissue_classifier"), dg.AssetKey("balanced_tile_sample")],
    pool=GPU_POOL,  # one inference job on the accelerator (or the CPU cores) at a time
    op_tags=GPU_OP_TAGS,
    code_version=E.EMBEDDING_VERSION,
)
def tile_embeddings(
    context: dg.AssetExecutionContext, config: TileEmbeddingsConfig, lake: DataLakeResource
) -> dg.MaterializeResult:
    """SPEC §7: the backbone's pooled features (1,280 for EfficientNet-B0) of every tile of the
    balanced sample (optionally every filtered 'kept' tile), for each chosen classifier
    checkpoint and the off-the-shelf backbone, tagged with the model id. One Parquet per slide
    (`tables/tile_embeddings/<id>.parquet`, all models); a slide whose tiles and weights are
    unchanged is skipped. Fast inference path (BN folded, channels_last, bf16 where accurate)."""
    lk = lake.lake()
    src = lk.table("balanced_tile_sample")
    if not src.is_file():
        raise dg.Failure(description=f"{src} missing: materialise balanced_tile_sample first")
    keys = list(context.partition_keys)
    sample = pd.read_parquet(src, filters=[("tissue_sample_id", "in", keys)])
    checkpoints = _read_checkpoints(lk)
    if checkpoints is None and config.checkpoints != "none":
        context.log.warning(
            "no classifier_checkpoints table: embedding with the off-the-shelf backbone only"
        )
    try:
        specs = E.select_models(
            checkpoints,
            which=config.checkpoints,
            epochs=config.epochs,
            off_the_shelf=config.off_the_shelf,
            backbone=config.backbone,
            weights=config.off_the_shelf_weights or None,
        )
    except (FileNotFoundError, ValueError) as e:
        raise dg.Failure(description=str(e)) from e
    if not specs:
        raise dg.Failure(description="no models selected (checkpoints='none', off_the_shelf=false)")
    for spec in specs:
        if spec.model_id.endswith("-random"):
            context.log.warning(
                f"{spec.model_id}: pretrained weights unavailable, the off-the-shelf model is a "
                "seeded random init (set off_the_shelf_weights, e.g. a local state_dict path)"
            )
    for spec in specs:
        write_json(spec.as_dict(), lk.models / MODEL_SIDECARS / f"{spec.model_id}.json")

    device = resolve_device(config.device)
    embedders: dict[str, E.TileEmbedder] = {}
    stats = {"embedded": 0, "reused": 0, "empty": 0, "invalid": 0, "tiles": 0, "failed": 0}
    t_embed = 0.0
    for sid in keys:
        try:
            out_path = lk.partition_table(TILE_DIR, sid)
        except InvalidSampleIdError as e:
            context.log.warning(str(e))
            stats["invalid"] += 1
            continue
        tiles = _slide_tiles(lk, sample, sid, config.all_filtered_tiles)
        if tiles.empty:
            context.log.warning(f"slide {sid}: no tiles in the balanced sample; nothing to embed")
            out_path.unlink(missing_ok=True)  # a slide that lost its tiles loses its rows
            stats["empty"] += 1
            continue
        digest = E.tiles_hash(tiles)
        old = _existing_rows(out_path)
        parts: list[pa.Table] = []
        changed = old is None
        for spec in specs:
            h = E.content_hash(spec, digest)
            if old is not None:
                mine = old.filter(pc.equal(old.column("model_id"), spec.model_id))
                if mine.num_rows and set(mine.column("content_hash").to_pylist()) == {h}:
                    parts.append(mine)
                    continue
            changed = True
            emb = embedders.get(spec.model_id)
            if emb is None:
                emb = E.TileEmbedder(
                    E.load_model(spec, device), spec.input_size, config.options(), device
                )
                embedders[spec.model_id] = emb
            t0 = time.perf_counter()
            n_failed = len(emb.report.failed)
            feats, ok = emb.embed_paths(list(tiles["path"]), skip_errors=True)
            t_embed += time.perf_counter() - t0
            for msg in emb.report.failed[n_failed:]:
                context.log.warning(f"slide {sid}, model {spec.model_id}: {msg}")
            stats["failed"] += int((~ok).sum())
            stats["tiles"] += int(ok.sum())
            rows = tiles[ok].assign(model_id=spec.model_id, precision=emb.precision, content_hash=h)
            rows["row_id"] = rows["model_id"] + "|" + rows["tile_id"]
            parts.append(V.table_from_frame(rows, feats, V.tile_schema(feats.shape[1])))
        if old is not None and old.num_rows and len(parts) and not changed:
            # Same rows for every model; still rewrite if a model was dropped from the config.
            changed = set(old.column("model_id").to_pylist()) != {s.model_id for s in specs}
        if changed:
            write_parquet(pa.concat_tables(parts), out_path)
            stats["embedded"] += 1
        else:
            stats["reused"] += 1

    model_md = pd.DataFrame(
        [
            {
                "model_id": s.model_id,
                "kind": s.kind,
                "epoch": s.epoch,
                "precision": embedders[s.model_id].precision if s.model_id in embedders else "",
                "engine": embedders[s.model_id].report.engine if s.model_id in embedders else "",
                "bf16_min_cosine": (
                    embedders[s.model_id].report.calibration_cosine
                    if s.model_id in embedders
                    else None
                ),
                "bn_folded": embedders[s.model_id].report.bn_folded
                if s.model_id in embedders
                else None,
            }
            for s in specs
        ]
    )
    context.log.info(
        f"{len(keys)} slides: {stats['embedded']} embedded, {stats['reused']} unchanged; "
        f"{stats['tiles']} tile embeddings in {t_embed:.1f}s on {device}"
    )
    return dg.MaterializeResult(
        metadata={
            "slides": dg.MetadataValue.int(len(keys)),
            "slides_embedded": dg.MetadataValue.int(stats["embedded"]),
            "slides_unchanged": dg.MetadataValue.int(stats["reused"]),
            "slides_without_tiles": dg.MetadataValue.int(stats["empty"]),
            "tile_embeddings_computed": dg.MetadataValue.int(stats["tiles"]),
            "undecodable_tiles": dg.MetadataValue.int(stats["failed"]),
            "tiles_per_second": dg.MetadataValue.float(
                round(stats["tiles"] / t_embed, 1) if t_embed > 0 else 0.0
            ),
            "device": dg.MetadataValue.text(str(device)),
            "models": dg.MetadataValue.md(model_md.to_markdown(index=False)),
            "table": dg.MetadataValue.path(str(lk.partition_dir(TILE_DIR))),
        }
    )


# ----------------------------------------------------------------------------------------------
# slide_embeddings
# ----------------------------------------------------------------------------------------------


class SlideEmbeddingsConfig(dg.Config):
    mean_over: str = Field(
        default="sampled",
        description="Tiles averaged into a slide embedding: 'sampled' (the balanced sample) or "
        "'all' (every embedded tile)",
    )
    n_clusters: int = Field(
        default=0, description="k-means clusters of slide embeddings per model; 0 = # tissues"
    )
    kmeans_seed: int = Field(default=0, description="k-means random_state")
    index_min_rows: int = Field(
        default=V.DEFAULT_INDEX_MIN_ROWS,
        description="Build the tile vector index once the table has this many rows",
    )
    index_type: str = Field(default=V.DEFAULT_INDEX_TYPE, description="LanceDB vector index type")
    load_batch_slides: int = Field(
        default=50, description="Slides per LanceDB merge (one atomic commit each)"
    )


def _current_slides(context: dg.AssetExecutionContext, lk: Lake) -> list[str]:
    """Slides with a tile-embedding file that are still `slides` partitions."""
    d = lk.partition_dir(TILE_DIR)
    files = sorted(p.stem for p in d.glob("*.parquet")) if d.is_dir() else []
    keys = set(context.instance.get_dynamic_partitions(slide_partitions.name))
    return [s for s in files if s in keys] if keys else files


def _file_hashes(lk: Lake, sids: list[str]) -> pd.DataFrame:
    """Distinct ``(tissue_sample_id, model_id, content_hash)`` of the per-slide files."""
    parts = []
    for sid in sids:
        path = lk.partition_table(TILE_DIR, sid)
        try:
            t = pq.read_table(path, columns=["model_id", "content_hash"])
        except Exception as e:  # pyarrow raises several types for bad files
            raise dg.Failure(
                description=f"slide {sid}: {path} is unreadable ({e}); re-materialise its "
                "tile_embeddings partition"
            ) from e
        parts.append(t.to_pandas().drop_duplicates().assign(tissue_sample_id=sid))
    return pd.concat(parts, ignore_index=True)


def _mean_hash(tile_hashes, mean_over: str) -> str:
    """The content hash of a slide mean: its tiles' content hashes + how they are averaged."""
    return params_hash({"tiles": sorted(set(tile_hashes)), "mean_over": mean_over})


def _slide_rows(tile_tbl: pa.Table, mean_over: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Slide means (one row per model x slide) of one or more slides' tile rows."""
    meta = tile_tbl.drop_columns([V.VECTOR]).to_pandas()
    vecs = V.arrow_to_vectors(tile_tbl.column(V.VECTOR))
    if mean_over == "sampled":
        # Per (model, slide): the sampled tiles, or all when a slide has none sampled.
        has = meta.groupby(["model_id", "tissue_sample_id"])["sampled"].transform("any")
        keep = (meta["sampled"] | ~has).to_numpy()
        meta, vecs = meta[keep].reset_index(drop=True), vecs[keep]
    groups, means = E.slide_means(meta, vecs)
    first = meta.drop_duplicates(["model_id", "tissue_sample_id"]).set_index(
        ["model_id", "tissue_sample_id"]
    )
    splits = meta.groupby(["model_id", "tissue_sample_id"])["split"].agg(
        lambda s: s.iloc[0] if s.nunique(dropna=False) == 1 else "mixed"
    )
    hashes = meta.groupby(["model_id", "tissue_sample_id"])["content_hash"].agg(
        lambda s: _mean_hash(s, mean_over)
    )
    idx = pd.MultiIndex.from_frame(groups[["model_id", "tissue_sample_id"]])
    groups["subject_id"] = first.loc[idx, "subject_id"].to_numpy()
    groups["tissue"] = first.loc[idx, "tissue"].to_numpy()
    groups["split"] = splits.loc[idx].to_numpy()
    groups["content_hash"] = hashes.loc[idx].to_numpy()
    return groups, means


def _clusters(
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
        summary.append(
            {
                "model_id": mid,
                "slides": len(idx),
                "clusters": k,
                "ari_vs_tissue": round(float(adjusted_rand_score(tissue, labels)), 4),
            }
        )
    return out, pd.DataFrame(summary)


@dg.asset(
    group_name=GROUP,
    kinds={"lancedb", "parquet"},
    deps=[tile_embeddings],
    pool="lancedb_writer",  # the single LanceDB writer (dagster.yaml: every pool is exclusive)
    code_version=E.EMBEDDING_VERSION,
)
def slide_embeddings(
    context: dg.AssetExecutionContext, config: SlideEmbeddingsConfig, lake: DataLakeResource
) -> dg.MaterializeResult:
    """SPEC §7: each slide's embedding = the mean of its tiles' embeddings, per model, with a
    k-means cluster per slide (`tables/slide_embeddings.parquet` + LanceDB `slide_embeddings`).
    Bulk-loads the changed per-slide tile embeddings into LanceDB `tile_embeddings` (idempotent
    merges, one writer) and builds its vector index when the table is large enough."""
    if config.mean_over not in ("sampled", "all"):
        raise dg.Failure(description=f"mean_over {config.mean_over!r}: use 'sampled' or 'all'")
    lk = lake.lake()
    store = V.VectorStore(lk.lancedb)
    sids = _current_slides(context, lk)
    if not sids:
        raise dg.Failure(
            description=f"no tile embeddings under {lk.partition_dir(TILE_DIR)}: "
            "materialise tile_embeddings first"
        )
    t0 = time.perf_counter()
    files = _file_hashes(lk, sids)
    file_sets = files.groupby("tissue_sample_id")["content_hash"].agg(set).to_dict()
    in_store = store.partition_hashes(V.TILE_TABLE)
    to_load = {s for s in sids if in_store.get(s) != file_sets[s]}
    removed = sorted(set(in_store) - set(sids))

    # Slide means to recompute: slides whose expected mean hash (per model) differs from the
    # previous table's; the others keep their previous rows.
    expected = {
        (m, sid): _mean_hash(g, config.mean_over)
        for (m, sid), g in files.groupby(["model_id", "tissue_sample_id"])["content_hash"]
    }
    prev_path = lk.table(SLIDE_TABLE_FILE)
    prev = _existing_rows(prev_path)
    prev_hash: dict[tuple[str, str], str] = {}
    if prev is not None:
        p = prev.select(["model_id", "tissue_sample_id", "content_hash"]).to_pandas()
        prev_hash = {
            (m, sid): h
            for m, sid, h in zip(
                p["model_id"], p["tissue_sample_id"], p["content_hash"], strict=True
            )
        }
    stale = {sid for (m, sid), h in expected.items() if prev_hash.get((m, sid)) != h}
    stale |= {sid for (m, sid) in prev_hash if sid in file_sets and (m, sid) not in expected}
    need_read = sorted(to_load | stale)

    metas, vecs = [], []
    loaded = {"inserted": 0, "updated": 0, "deleted": 0}
    batch = max(1, config.load_batch_slides)
    for i in range(0, len(need_read), batch):
        chunk = need_read[i : i + batch]
        tbl = pa.concat_tables(
            [pq.read_table(lk.partition_table(TILE_DIR, s)) for s in chunk],
            promote_options="default",
        )
        reload = [s for s in chunk if s in to_load]
        if reload:
            part = tbl.filter(pc_isin(tbl.column("tissue_sample_id"), reload))
            dim = V.arrow_to_vectors(part.column(V.VECTOR)[:1]).shape[1]
            st = store.replace_partitions(V.TILE_TABLE, part.cast(V.tile_schema(dim)), reload)
            loaded["inserted"] += st.inserted
            loaded["updated"] += st.updated
            loaded["deleted"] += st.deleted
        m, v = _slide_rows(tbl, config.mean_over)
        metas.append(m)
        vecs.append(v)
    if removed:
        loaded["deleted"] += store.delete_partitions(V.TILE_TABLE, removed)
    reused = [s for s in sids if s not in set(need_read)]
    if prev is not None and reused:
        kept = prev.filter(pc_isin(prev.column("tissue_sample_id"), reused))
        metas.append(kept.drop_columns([V.VECTOR]).to_pandas())
        vecs.append(V.arrow_to_vectors(kept.column(V.VECTOR)))
    meta = pd.concat(metas, ignore_index=True)
    dims = {v.shape[1] for v in vecs if len(v)}
    if len(dims) > 1:
        raise dg.Failure(
            description=f"models with different feature sizes {sorted(dims)} in one run: embed "
            "one backbone at a time (LanceDB tables hold one vector size)"
        )
    vec = np.vstack(vecs)
    order = meta.sort_values(["model_id", "tissue", "tissue_sample_id"]).index.to_numpy()
    meta, vec = meta.loc[order].reset_index(drop=True), vec[order]
    meta["cluster"], cluster_summary = _clusters(meta, vec, config.n_clusters, config.kmeans_seed)
    meta["row_id"] = meta["model_id"] + "|" + meta["tissue_sample_id"]
    slide_tbl = V.table_from_frame(meta, vec, V.slide_schema(vec.shape[1]))
    out = write_parquet(slide_tbl, prev_path)
    store.overwrite(V.SLIDE_TABLE, slide_tbl)
    store.optimize(V.SLIDE_TABLE)  # drop data files of old versions (older than an hour)

    models = _models_table(lk, sorted(meta["model_id"].unique()))
    write_parquet(models, lk.table(MODELS_TABLE))
    index_state = store.ensure_index(
        V.TILE_TABLE, min_rows=config.index_min_rows, index_type=config.index_type
    )
    n_tiles = store.count(V.TILE_TABLE)
    seconds = time.perf_counter() - t0
    context.log.info(
        f"LanceDB: {len(to_load)} slides (re)loaded, {len(removed)} removed, {n_tiles} tile rows "
        f"(index: {index_state}); {len(meta)} slide embeddings in {seconds:.1f}s"
    )
    return dg.MaterializeResult(
        metadata={
            **table_metadata(meta.drop(columns=["row_id"]), out),
            "lancedb": dg.MetadataValue.path(str(lk.lancedb)),
            "tile_rows": dg.MetadataValue.int(n_tiles),
            "slides": dg.MetadataValue.int(int(meta["tissue_sample_id"].nunique())),
            "models": dg.MetadataValue.md(models.to_markdown(index=False)),
            "slides_loaded": dg.MetadataValue.int(len(to_load)),
            "slide_means_recomputed": dg.MetadataValue.int(len(need_read)),
            "slides_removed": dg.MetadataValue.int(len(removed)),
            "rows_inserted": dg.MetadataValue.int(loaded["inserted"]),
            "rows_updated": dg.MetadataValue.int(loaded["updated"]),
            "rows_deleted": dg.MetadataValue.int(loaded["deleted"]),
            "tile_index": dg.MetadataValue.text(index_state),
            "clusters": dg.MetadataValue.md(cluster_summary.to_markdown(index=False)),
            "slides_per_tissue": counts_md(
                meta.drop_duplicates("tissue_sample_id")["tissue"], "slides"
            ),
            "dim": dg.MetadataValue.int(int(vec.shape[1])),
        }
    )


def pc_isin(column: pa.ChunkedArray, values: list[str]) -> pa.Array:
    return pc.is_in(column, value_set=pa.array(values, pa.string()))


def _models_table(lk: Lake, model_ids: list[str]) -> pd.DataFrame:
    rows = []
    for mid in model_ids:
        p = lk.models / MODEL_SIDECARS / f"{mid}.json"
        rows.append(json.loads(p.read_text()) if p.is_file() else {"model_id": mid})
    cols = list(E.ModelSpec.__dataclass_fields__)
    return pd.DataFrame(rows).reindex(columns=cols)


@dg.asset_check(asset=slide_embeddings, description="LanceDB holds exactly the Parquet rows")
def embeddings_store_matches_parquet(
    context: dg.AssetCheckExecutionContext, lake: DataLakeResource
) -> dg.AssetCheckResult:
    """The LanceDB tables hold exactly the rows of the Parquet files (no duplicates, none
    missing): tile rows per slide = the slide's file, slide rows = slide_embeddings.parquet."""
    lk = lake.lake()
    store = V.VectorStore(lk.lancedb)
    sids = _current_slides(context, lk)
    want = {s: pq.ParquetFile(lk.partition_table(TILE_DIR, s)).metadata.num_rows for s in sids}
    ids = store.read(V.TILE_TABLE, ["row_id", "tissue_sample_id"]).to_pandas()
    have = ids.groupby("tissue_sample_id").size().to_dict()
    dup = int(ids["row_id"].duplicated().sum())
    wrong = sorted(s for s in set(want) | set(have) if want.get(s, 0) != have.get(s, 0))
    slide_pq = pq.ParquetFile(lk.table(SLIDE_TABLE_FILE)).metadata.num_rows
    slide_lance = store.count(V.SLIDE_TABLE)
    ok = not dup and not wrong and slide_pq == slide_lance
    return dg.AssetCheckResult(
        passed=ok,
        metadata={
            "tile_rows_lancedb": dg.MetadataValue.int(len(ids)),
            "tile_rows_parquet": dg.MetadataValue.int(sum(want.values())),
            "duplicate_row_ids": dg.MetadataValue.int(dup),
            "slides_mismatched": dg.MetadataValue.text(", ".join(wrong[:20]) or "none"),
            "slide_rows_lancedb": dg.MetadataValue.int(slide_lance),
            "slide_rows_parquet": dg.MetadataValue.int(slide_pq),
        },
    )
