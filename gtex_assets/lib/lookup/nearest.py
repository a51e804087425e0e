"""Nearest-neighbour lookup over the stored embeddings (SPEC §7, §8 "assign a new slide").

A query is a stored sample id, a slide file, or a tile image. It is embedded if needed with the
same model (and the same tile pipeline) as the stored embeddings, then searched in LanceDB:

* **sample id**: its stored slide embedding; if the slide is not in the store yet, its
  per-slide Parquet embeddings, else its tiles (balanced sample, else filtered 'kept' tiles),
  else its raw slide file -- embedded on the fly;
* **slide file**: tiled with the project's tiler (``lib.tiling``) and quality filters into a
  temp dir, up to ``max_tiles`` kept tiles drawn as the balanced sample draws them, embedded,
  averaged; a plain image that the tiler cannot open is cut into a simple grid;
* **tile image**: embedded as one tile.

Returns the ``k`` nearest slides (or tiles with ``tiles=True``) with tissue, cosine distance and
their k-means cluster, plus the query's predicted cluster (nearest cluster centroid) and the
majority tissue of its neighbours.

:func:`predict_transcriptome` answers the same three query kinds with a whole predicted
transcriptome (SPEC §8): the mean expression of the nearest ``cluster_transcriptome`` cluster,
found by a LanceDB search of ``cluster_centroids`` in the fit's PCA space.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gtex_assets.core.lake import Lake, resolve_root
from gtex_assets.lib.embeddings.vector_store import (
    SLIDE_TABLE,
    TILE_TABLE,
    VECTOR,
    VectorStore,
    arrow_to_vectors,
    sql_str,
)

MODELS_TABLE = "embedding_models"
TILE_EMBEDDINGS_DIR = "tile_embeddings"
DEFAULT_MAX_TILES = 100  # like the balanced sample's tiles per slide (SPEC §4)

SLIDE_COLUMNS = ["tissue_sample_id", "subject_id", "tissue", "split", "cluster", "n_tiles"]
TILE_COLUMNS = ["tile_id", "tissue_sample_id", "tissue", "x", "y", "split", "path"]


class NearestError(LookupError):
    """A query that cannot be answered; the message says why and what to do."""


@dataclass
class NearestResult:
    query: dict[str, Any]
    neighbours: pd.DataFrame
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        rows = self.neighbours.replace({np.nan: None}).to_dict("records")
        return {"query": self.query, "neighbours": rows}


def _lake(data_root: str | Path | None) -> Lake:
    return resolve_root(data_root)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def embedding_models(lk: Lake) -> pd.DataFrame:
    """The models the stored embeddings were made with (``tables/embedding_models.parquet``)."""
    p = lk.table(MODELS_TABLE)
    if not p.is_file():
        return pd.DataFrame(columns=["model_id", "kind", "selected", "epoch"])
    return pd.read_parquet(p)


def default_model_id(lk: Lake, store: VectorStore) -> str:
    """The classifier's selected checkpoint, else the latest-epoch checkpoint, else any model
    present in the slide table."""
    present = set()
    if store.has_table(SLIDE_TABLE):
        present = set(store.read(SLIDE_TABLE, ["model_id"]).column("model_id").to_pylist())
    if not present:
        raise NearestError(
            f"no slide embeddings in {store.uri}: materialise `tile_embeddings` and "
            "`slide_embeddings` first (e.g. `gtex-assets demo`)"
        )
    models = embedding_models(lk)
    models = models[models["model_id"].isin(present)]
    if len(models):
        sel = models[models["selected"].fillna(False).astype(bool)]
        if len(sel):
            return str(sel["model_id"].iloc[0])
        ck = models[models["kind"] == "checkpoint"]
        if len(ck):
            return str(ck.sort_values("epoch")["model_id"].iloc[-1])
    return sorted(present)[0]


def _spec_for(lk: Lake, model_id: str):
    from gtex_assets.lib.embeddings.embed import ModelSpec

    models = embedding_models(lk)
    rows = models[models["model_id"] == model_id]
    if rows.empty:
        raise NearestError(
            f"model {model_id!r} is not in {lk.table(MODELS_TABLE)}: cannot embed a new query "
            "with it (known: " + (", ".join(models["model_id"]) or "none") + ")"
        )
    r = rows.iloc[0].to_dict()
    fields = ModelSpec.__dataclass_fields__
    kw = {k: (None if pd.isna(v) else v) for k, v in r.items() if k in fields and not _isseq(v)}
    if kw.get("epoch") is not None:
        kw["epoch"] = int(kw["epoch"])
    kw["input_size"] = int(kw.get("input_size") or 224)
    if kw.get("feature_dim") is not None:
        kw["feature_dim"] = int(kw["feature_dim"])
    return ModelSpec(**kw)


def _isseq(v: Any) -> bool:
    return isinstance(v, (list, tuple, np.ndarray))


class _Embedders:
    """One loaded model per query (loading is the slow part of an ad-hoc lookup)."""

    def __init__(self, lk: Lake, model_id: str, device: str = "auto", precision: str = "auto"):
        self.lk, self.model_id, self.device, self.precision = lk, model_id, device, precision
        self._emb = None

    def get(self):
        if self._emb is None:
            from gtex_assets.lib.embeddings.embed import InferenceOptions, TileEmbedder, load_model

            spec = _spec_for(self.lk, self.model_id)
            try:
                model = load_model(spec)
            except RuntimeError as e:
                raise NearestError(
                    f"model {self.model_id}: {e}; the stored embeddings were made with other "
                    "weights -- re-materialise `tile_embeddings` first"
                ) from e
            opts = InferenceOptions(decode_workers=1, precision=self.precision)
            self._emb = TileEmbedder(model, spec.input_size, opts, device=self.device)
        return self._emb


# --------------------------------------------------------------------------------------------
# Query vectors
# --------------------------------------------------------------------------------------------


def _stored_precision(store: VectorStore, model_id: str) -> str:
    if not store.has_table(TILE_TABLE):
        return "auto"
    t = (
        store.open(TILE_TABLE)
        .search()
        .where(f"model_id = {sql_str(model_id)}")
        .select(["precision"])
        .limit(1)
        .to_arrow()
    )
    p = t.column("precision")[0].as_py() if t.num_rows else None
    return p if p in ("fp32", "bf16") else "auto"


def _stored_slide_vector(store: VectorStore, model_id: str, sample_id: str) -> np.ndarray | None:
    if not store.has_table(SLIDE_TABLE):
        return None
    t = store.read(
        SLIDE_TABLE,
        [VECTOR],
        where=f"model_id = {sql_str(model_id)} AND tissue_sample_id = {sql_str(sample_id)}",
    )
    return arrow_to_vectors(t.column(VECTOR))[0] if t.num_rows else None


def _parquet_slide_vector(lk: Lake, model_id: str, sample_id: str) -> tuple[np.ndarray, int] | None:
    p = lk.partition_table(TILE_EMBEDDINGS_DIR, sample_id)
    if not p.is_file():
        return None
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t = pq.read_table(p, columns=["model_id", "sampled", VECTOR])
    t = t.filter(pc.equal(t.column("model_id"), model_id))
    if t.num_rows == 0:
        return None
    v = arrow_to_vectors(t.column(VECTOR))
    sampled = np.asarray(t.column("sampled").to_pylist(), dtype=bool)
    if sampled.any():
        v = v[sampled]
    return v.mean(axis=0), len(v)


def _stored_tiles_of(lk: Lake, sample_id: str, max_tiles: int) -> pd.DataFrame | None:
    """A slide's tile files: its balanced-sample tiles, else its filtered 'kept' tiles."""
    bal = lk.table("balanced_tile_sample")
    if bal.is_file():
        df = pd.read_parquet(bal, filters=[("tissue_sample_id", "==", sample_id)])
        if len(df):
            return df
    ft = lk.partition_table("filtered_tiles", sample_id)
    if ft.is_file():
        df = pd.read_parquet(ft)
        df = df[df["verdict"] == "kept"]
        if len(df):
            return _draw(df, max_tiles)
    return None


def _draw(kept: pd.DataFrame, n: int) -> pd.DataFrame:
    try:
        from gtex_assets.lib.tiles.sampling import draw_slide_tiles

        return draw_slide_tiles(kept, n, seed=0)
    except ImportError:  # pragma: no cover - the sampling module ships with the package
        return kept.sort_values(["y", "x"]).head(n)


def _raw_slide_path(lk: Lake, sample_id: str) -> str | None:
    p = lk.partition_table("raw_slides", sample_id)
    if not p.is_file():
        return None
    row = pd.read_parquet(p).iloc[0]
    if row.get("status") == "ok" and row.get("path") and Path(row["path"]).is_file():
        return str(row["path"])
    return None


def slide_file_tiles(
    slide: str | Path, workdir: Path, max_tiles: int = DEFAULT_MAX_TILES, sample_id: str = ""
) -> tuple[list[str], str]:
    """Tile a slide file into ``workdir`` with the project's tiler + quality filters; returns
    (up to ``max_tiles`` kept tile paths, how it was tiled). A file the tiler cannot open but
    Pillow can (a plain image) is cut into a simple 448-px grid instead."""
    frame, how = slide_file_tile_frame(slide, workdir, max_tiles, sample_id)
    return list(frame["path"]), how


def slide_file_tile_frame(
    slide: str | Path, workdir: Path, max_tiles: int = DEFAULT_MAX_TILES, sample_id: str = ""
) -> tuple[pd.DataFrame, str]:
    """:func:`slide_file_tiles` with each tile's position: (``x``, ``y``, ``tile_size``,
    ``path`` rows, how it was tiled)."""
    slide = Path(slide)
    if not slide.is_file():
        raise NearestError(f"slide file {slide} does not exist")
    sid = sample_id or "GTEX-QUERY-0000"
    try:
        from gtex_assets.lib.tiles.quality import QualityThresholds, apply_filters
        from gtex_assets.lib.tiles.tiling import SlideJob, TilingError, TilingParams, tile_slides

        job = SlideJob(
            sample_id=sid,
            tissue="",
            slide_path=str(slide),
            tiles_dir=workdir / "tiles",
            index_path=workdir / "index.parquet",
            status_path=workdir / "status.parquet",
        )
        outcome = None
        for _job, out in tile_slides([job], TilingParams(), workers=1, force=True):
            outcome = out
        if outcome is not None and len(outcome.index):
            judged = apply_filters(outcome.index, QualityThresholds()).assign(tissue_sample_id=sid)
            kept = judged[judged["verdict"] == "kept"]
            if len(kept):
                return _positions(_draw(kept, max_tiles)), "tiler+filters"
            ok = judged[judged["status"] == "ok"]
            if len(ok):  # better an answer from imperfect tiles than none; the query says so
                return _positions(_draw(ok, max_tiles)), "tiler, no tile passed the filters"
            raise NearestError(f"slide file {slide}: no readable tissue tile")
        reason = outcome.status.get("reason") if outcome is not None else "no outcome"
        if outcome is not None and outcome.status.get("status") in ("no_tissue", "too_small"):
            raise NearestError(f"slide file {slide}: {outcome.status.get('status')} ({reason})")
    except (ImportError, TilingError):
        pass
    return _grid_tiles(slide, workdir, max_tiles), "simple grid"


def _positions(tiles: pd.DataFrame) -> pd.DataFrame:
    out = tiles[["x", "y", "path"]].copy()
    out["tile_size"] = tiles["tile_size"] if "tile_size" in tiles.columns else 448
    return out.reset_index(drop=True)


def _grid_tiles(path: Path, workdir: Path, max_tiles: int, tile: int = 448) -> pd.DataFrame:
    """Fallback: non-overlapping tiles of a plain image, most textured (least blank) first."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise NearestError(f"slide file {path}: neither a readable slide nor an image ({e})") from e
    h, w = rgb.shape[:2]
    if h < tile or w < tile:
        raise NearestError(f"slide file {path}: {w}x{h} px is smaller than one {tile}-px tile")
    cands = []
    for y in range(0, h - tile + 1, tile):
        for x in range(0, w - tile + 1, tile):
            t = rgb[y : y + tile, x : x + tile]
            cands.append((float(t.std(axis=(0, 1)).min()), x, y))
    cands.sort(key=lambda c: (-c[0], c[2], c[1]))
    out = []
    (workdir / "tiles").mkdir(parents=True, exist_ok=True)
    for _std, x, y in cands[:max_tiles]:
        p = workdir / "tiles" / f"{x}_{y}.jpg"
        Image.fromarray(rgb[y : y + tile, x : x + tile]).save(p, quality=90)
        out.append({"x": x, "y": y, "path": str(p), "tile_size": tile})
    return pd.DataFrame(out, columns=["x", "y", "path", "tile_size"])


# --------------------------------------------------------------------------------------------
# The lookup
# --------------------------------------------------------------------------------------------


def _cluster_centroids(store: VectorStore, model_id: str) -> tuple[np.ndarray, np.ndarray]:
    t = store.read(SLIDE_TABLE, ["cluster", VECTOR], where=f"model_id = {sql_str(model_id)}")
    if t.num_rows == 0:
        return np.zeros(0, int), np.zeros((0, 0), np.float32)
    v = arrow_to_vectors(t.column(VECTOR)).astype(np.float64)
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    cl = np.asarray(t.column("cluster").to_pylist())
    ids = np.unique(cl[cl >= 0]) if len(cl) else np.zeros(0, int)
    cents = np.stack([v[cl == c].mean(0) for c in ids]) if len(ids) else np.zeros((0, v.shape[1]))
    return ids, cents


def _assign_cluster(store: VectorStore, model_id: str, vec: np.ndarray) -> int | None:
    ids, cents = _cluster_centroids(store, model_id)
    if len(ids) == 0:
        return None
    q = vec / max(float(np.linalg.norm(vec)), 1e-12)
    cn = cents / np.maximum(np.linalg.norm(cents, axis=1, keepdims=True), 1e-12)
    return int(ids[int(np.argmax(cn @ q))])


def _query_vector(
    lk: Lake,
    store: VectorStore,
    mid: str,
    query: dict[str, Any],
    sample_id: str | None,
    slide: str | Path | None,
    tile: str | Path | None,
    max_tiles: int,
    device: str,
) -> np.ndarray:
    """The query's slide-level vector for model ``mid`` (stored, or embedded now); records its
    kind and source in ``query``."""
    # Embed queries the way the stored tiles were embedded (fp32 or bf16), so that a stored
    # tile queried again lands on itself.
    emb = _Embedders(lk, mid, device, _stored_precision(store, mid))
    given = next(q for q in (sample_id, slide, tile) if q is not None)
    if sample_id is not None:
        from gtex_assets.core.ids import validate_sample_id

        try:
            validate_sample_id(sample_id)
        except ValueError as e:
            raise NearestError(str(e)) from e
        query.update(kind="sample_id", sample_id=sample_id)
        vec = _stored_slide_vector(store, mid, sample_id)
        if vec is not None:
            query["source"] = "stored slide embedding"
        else:
            got = _parquet_slide_vector(lk, mid, sample_id)
            if got is not None:
                vec, n = got
                query.update(source="stored tile embeddings (not yet in LanceDB)", n_tiles=n)
            else:
                df = _stored_tiles_of(lk, sample_id, max_tiles)
                if df is not None:
                    feats, _ok = emb.get().embed_paths(list(df["path"]), skip_errors=True)
                    query.update(source="embedded its stored tiles", n_tiles=len(feats))
                    vec = feats.mean(0) if len(feats) else None
                else:
                    raw = _raw_slide_path(lk, sample_id)
                    if raw is None:
                        raise NearestError(
                            f"sample {sample_id}: not in the store and no tiles or slide file "
                            f"under {lk.root}; pass --slide FILE to embed a slide file"
                        )
                    vec, info = _embed_slide_file(emb, raw, max_tiles, sample_id)
                    query.update(source=f"embedded its slide file ({info['how']})", **info)
    elif slide is not None:
        vec, info = _embed_slide_file(emb, slide, max_tiles, "")
        query.update(kind="slide_file", slide=str(slide), source="embedded", **info)
    else:
        p = Path(tile)
        if not p.is_file():
            raise NearestError(f"tile image {p} does not exist")
        feats, _ok = emb.get().embed_paths([str(p)])
        vec = feats[0]
        query.update(kind="tile_image", tile=str(p), source="embedded", n_tiles=1)
    if vec is None:
        raise NearestError(f"query {given}: no tile could be embedded")
    if emb._emb is not None:
        query["precision"] = emb._emb.precision
    return store_width_vector(store, np.asarray(vec))


def store_width_vector(store: VectorStore, vec: np.ndarray) -> np.ndarray:
    """A query embedded at its model's own width, zero-padded to the store's vector width
    (models of different widths share the tables padded; see embed.fit_width)."""
    if not store.has_table(SLIDE_TABLE):
        return vec
    width = store.width(SLIDE_TABLE)
    if vec.shape[-1] >= width:
        return vec
    from gtex_assets.lib.embeddings.embed import fit_width

    return fit_width(vec.reshape(-1, vec.shape[-1]), None, width).reshape(*vec.shape[:-1], width)


def _one_query(sample_id, slide, tile) -> None:
    if len([q for q in (sample_id, slide, tile) if q is not None]) != 1:
        raise ValueError("give exactly one of sample_id, slide or tile")


def nearest(
    sample_id: str | None = None,
    *,
    slide: str | Path | None = None,
    tile: str | Path | None = None,
    k: int = 10,
    model_id: str | None = None,
    tiles: bool = False,
    data_root: str | Path | None = None,
    exact: bool = False,
    max_tiles: int = DEFAULT_MAX_TILES,
    device: str = "auto",
) -> NearestResult:
    """The ``k`` nearest stored slides (or tiles) to a sample id, a slide file or a tile image.

    Exactly one of ``sample_id``, ``slide``, ``tile``. ``model_id`` defaults to the classifier's
    selected checkpoint. Raises :class:`LookupError` (with what to do) for unanswerable queries.
    """
    _one_query(sample_id, slide, tile)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    lk = _lake(data_root)
    store = VectorStore(lk.lancedb)
    mid = model_id or default_model_id(lk, store)
    if store.has_table(SLIDE_TABLE) and not store.count(SLIDE_TABLE, f"model_id = {sql_str(mid)}"):
        known = sorted(set(store.read(SLIDE_TABLE, ["model_id"]).column("model_id").to_pylist()))
        raise NearestError(f"model {mid!r} has no stored embeddings (models: {', '.join(known)})")
    query: dict[str, Any] = {"model_id": mid, "target": "tiles" if tiles else "slides"}
    vec = _query_vector(lk, store, mid, query, sample_id, slide, tile, max_tiles, device)

    table = TILE_TABLE if tiles else SLIDE_TABLE
    if not store.has_table(table):
        raise NearestError(f"no {table} table in {store.uri}: materialise `slide_embeddings` first")
    cols = TILE_COLUMNS if tiles else SLIDE_COLUMNS
    hits = store.search(
        table,
        vec,
        k=k,
        where=f"model_id = {sql_str(mid)}",
        exact=exact,
        columns=cols,
    )
    if tiles:
        clusters = store.read(
            SLIDE_TABLE, ["tissue_sample_id", "cluster"], where=f"model_id = {sql_str(mid)}"
        ).to_pandas()
        hits = hits.merge(clusters, on="tissue_sample_id", how="left")
    hits.insert(0, "rank", np.arange(1, len(hits) + 1))
    order = ["rank", *[c for c in cols if c != "path"], "distance"]
    if tiles:
        order.append("cluster")
    hits = hits[[c for c in order if c in hits.columns]]
    query["predicted_cluster"] = _assign_cluster(store, mid, np.asarray(vec))
    if len(hits):
        top = Counter(hits["tissue"].dropna()).most_common(1)
        query["majority_tissue"] = top[0][0] if top else None
    return NearestResult(query=query, neighbours=hits.reset_index(drop=True))


# --------------------------------------------------------------------------------------------
# The predicted transcriptome (SPEC §8 cluster-average prediction)
# --------------------------------------------------------------------------------------------

TRANSCRIPTOMES_TABLE = "cluster_transcriptomes"
MEMBERS_TABLE = "cluster_members"
_MATERIALISE = (
    "materialise the `cluster_transcriptome` asset (after `gene_r2`), e.g. "
    "`gtex-assets demo --select gene_r2 cluster_transcriptome`"
)


@dataclass
class TranscriptomeResult:
    """A query's predicted transcriptome: the mean expression of its nearest cluster."""

    query: dict[str, Any]  # the query + model_id, cluster, n_slides, majority_tissue, distance
    transcriptome: pd.DataFrame  # gene_id, symbol, log_tpm (the table's gene order)

    def top(self, n: int) -> pd.DataFrame:
        """The ``n`` genes with the highest predicted log TPM (rank, gene_id, symbol, log_tpm)."""
        t = self.transcriptome.sort_values("log_tpm", ascending=False, kind="mergesort").head(n)
        return t.assign(rank=np.arange(1, len(t) + 1))[["rank", "gene_id", "symbol", "log_tpm"]]

    def to_dict(self) -> dict[str, Any]:
        rows = self.transcriptome.replace({np.nan: None}).to_dict("records")
        return {"query": self.query, "transcriptome": rows}


def _cluster_model(lk: Lake, store: VectorStore, model_id: str | None) -> tuple[str, str]:
    """(model id, fit id) of the served cluster predictor to use."""
    from gtex_assets.lib.analysis.cluster_transcriptome import CENTROID_TABLE, centroid_models

    fitted = centroid_models(store)
    if not fitted or not lk.table(TRANSCRIPTOMES_TABLE).is_file():
        what = (
            f"no {CENTROID_TABLE} table in {store.uri}"
            if not fitted
            else f"{lk.table(TRANSCRIPTOMES_TABLE)} is missing"
        )
        raise NearestError(f"no cluster transcriptomes: {what}; {_MATERIALISE}")
    if model_id is None:
        try:
            default = default_model_id(lk, store)
        except NearestError:
            default = None
        if default in fitted:
            model_id = default
        elif len(fitted) == 1:
            model_id = next(iter(fitted))
        else:
            raise NearestError(
                f"clusters exist for several models ({', '.join(sorted(fitted))}): pass --model-id"
            )
    if model_id not in fitted:
        raise NearestError(
            f"model {model_id!r} has no clusters (cluster_transcriptome was fitted for: "
            f"{', '.join(sorted(fitted))}); to add it, materialise gene_r2 with "
            f"model={model_id!r} in its config, then `cluster_transcriptome`"
        )
    return model_id, fitted[model_id]


def predict_transcriptome(
    sample_id: str | None = None,
    *,
    slide: str | Path | None = None,
    tile: str | Path | None = None,
    model_id: str | None = None,
    data_root: str | Path | None = None,
    max_tiles: int = DEFAULT_MAX_TILES,
    device: str = "auto",
) -> TranscriptomeResult:
    """The whole predicted transcriptome of a sample id, a slide file or a tile image.

    The query is embedded like :func:`nearest` does, projected into the clustering space of
    the ``cluster_transcriptome`` fit (its stored PCA), and assigned to the nearest cluster
    centroid by a LanceDB search of ``cluster_centroids``; the prediction is that cluster's
    mean log TPM per gene. ``model_id`` defaults to the selected checkpoint when it has
    clusters, else the only model that has. A stored sample that was one of the fit's slides
    is predicted from a mean that includes its own expression (``query['member']`` says so).
    """
    from gtex_assets.lib.analysis.cluster_transcriptome import (
        load_projection,
        projection_path,
        search_centroids,
    )

    _one_query(sample_id, slide, tile)
    lk = _lake(data_root)
    store = VectorStore(lk.lancedb)
    mid, fit_id = _cluster_model(lk, store, model_id)
    ppath = projection_path(lk.models, mid)
    if not ppath.is_file():
        raise NearestError(f"model {mid}: projection {ppath} is missing; {_MATERIALISE}")
    proj = load_projection(ppath)
    if proj.card.get("fit_id") != fit_id:
        raise NearestError(
            f"model {mid}: {ppath} and the LanceDB centroids come from different fits "
            f"(an interrupted run?); {_MATERIALISE}"
        )
    query: dict[str, Any] = {"model_id": mid, "target": "transcriptome"}
    vec = _query_vector(lk, store, mid, query, sample_id, slide, tile, max_tiles, device)
    try:
        z = proj.transform(vec)
    except ValueError as e:
        raise NearestError(str(e)) from e
    hit = search_centroids(store, mid, z, k=1)
    if hit.empty:
        raise NearestError(f"model {mid}: no centroids in LanceDB; {_MATERIALISE}")
    h = hit.iloc[0]
    cluster = int(h["cluster"])
    tx = pd.read_parquet(
        lk.table(TRANSCRIPTOMES_TABLE),
        filters=[("model_id", "==", mid), ("cluster", "==", cluster)],
    )
    if tx.empty or set(tx["fit_id"]) != {fit_id}:
        raise NearestError(
            f"model {mid} cluster {cluster}: {lk.table(TRANSCRIPTOMES_TABLE)} does not hold this "
            f"fit's transcriptome (an interrupted run?); {_MATERIALISE}"
        )
    query.update(
        cluster=cluster,
        n_slides=int(tx["n_slides"].iloc[0]),
        majority_tissue=tx["majority_tissue"].iloc[0],
        distance=float(h["distance"]),
        fit_id=fit_id,
        n_genes=len(tx),
    )
    if sample_id is not None and lk.table(MEMBERS_TABLE).is_file():
        m = pd.read_parquet(
            lk.table(MEMBERS_TABLE),
            columns=["cluster"],
            filters=[("model_id", "==", mid), ("tissue_sample_id", "==", sample_id)],
        )
        query["member"] = bool(len(m))
        if len(m):
            query["member_of_cluster"] = int(m["cluster"].iloc[0])
    out = tx[["gene_id", "symbol", "log_tpm"]].reset_index(drop=True)
    out["log_tpm"] = out["log_tpm"].astype(np.float64)
    return TranscriptomeResult(query=query, transcriptome=out)


def _embed_slide_file(
    emb: _Embedders, slide: str | Path, max_tiles: int, sample_id: str
) -> tuple[np.ndarray | None, dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="gtex_nearest_") as tmp:
        paths, how = slide_file_tiles(slide, Path(tmp), max_tiles, sample_id)
        feats, _ok = emb.get().embed_paths(paths, skip_errors=True)
    return (feats.mean(0) if len(feats) else None), {"n_tiles": int(len(feats)), "how": how}
