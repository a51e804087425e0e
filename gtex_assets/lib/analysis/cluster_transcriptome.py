"""SPEC §8: cluster-average transcriptome — cluster slides in embedding space, predict a new slide's
whole transcriptome as the mean expression of its nearest cluster.

Less precise per gene than the per-gene ridge (``regression.ridge_gene_r2``), but one lookup
returns all genes at once. The nearest-neighbour step is pluggable (``nearest``): the default is
an exact numpy search; the asset passes a LanceDB lookup over the stored vectors.

A ``NearestFn`` takes query vectors (m × d, in the predictor's space, see
``ClusterPredictor.transform``) and ``k`` and returns the m × k row indices of the nearest
*reference* vectors, nearest first, where the reference rows are ``ClusterPredictor.reference()``
in that order:

- ``assign="centroid"`` (default): the reference is the cluster centroids → nearest centroid.
- ``assign="member"``: the reference is the training slides' vectors (what a LanceDB table of
  slide embeddings holds) → the majority cluster of the ``k_neighbors`` nearest slides (ties go to
  the cluster of the nearer slide).

Serving (LanceDB)
-----------------
The centroids live in the LanceDB table ``cluster_centroids`` (:func:`centroid_schema`; one row
per model × fold × cluster, in the clustering space, i.e. after the PCA). :func:`lancedb_nearest`
is a ``NearestFn`` over one model's (and fold's) rows: an exact L2 scan, the same distance as
k-means and :func:`exact_nearest`. ``fold = -1`` (:data:`SERVED_FOLD`) holds the predictor
fitted on all paired slides, what a lookup serves; ``fold >= 0`` rows are the cross-validation
fits that :func:`lancedb_nearest_factory` writes (the asset keeps them in a temporary store),
so the held-out evaluation goes through the same search as a served lookup.
:func:`save_projection` / :func:`load_projection` keep the PCA that maps a raw slide embedding
into the clustering space; :func:`transcriptome_table` is the long table of the clusters' mean
transcriptomes. A ``fit_id`` on every artefact ties them to one fit.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from sklearn.cluster import AgglomerativeClustering, KMeans

from gtex_assets.core.atomic import atomic_open
from gtex_assets.lib.analysis.projection import PCAResult, pca_fit_transform
from gtex_assets.lib.analysis.regression import donor_folds, r2_pearson
from gtex_assets.lib.embeddings.vector_store import VECTOR, VectorStore, sql_str, vectors_to_arrow

NearestFn = Callable[[np.ndarray, int], np.ndarray]
NearestFactory = Callable[[np.ndarray], NearestFn]


def exact_nearest(reference: np.ndarray) -> NearestFn:
    """Brute-force Euclidean k-NN over ``reference`` rows (ties → lower row index)."""
    ref = np.asarray(reference, dtype=np.float64)
    ref_sq = (ref * ref).sum(1)

    def nearest(queries: np.ndarray, k: int) -> np.ndarray:
        q = np.asarray(queries, dtype=np.float64)
        d = ref_sq[None, :] - 2.0 * q @ ref.T  # + |q|², constant per row
        return np.argsort(d, axis=1, kind="stable")[:, :k]

    return nearest


@dataclass(frozen=True)
class ClusterPredictor:
    """Clusters of training slides and their mean transcriptomes."""

    centroids: np.ndarray  # clusters × d (predictor space)
    cluster_means: np.ndarray  # clusters × genes
    cluster_sizes: np.ndarray
    train_vectors: np.ndarray = field(repr=False)  # train × d (predictor space)
    train_clusters: np.ndarray = field(repr=False)
    pca: PCAResult | None = field(default=None, repr=False)
    assign: str = "centroid"
    k_neighbors: int = 1

    @property
    def n_clusters(self) -> int:
        return len(self.centroids)

    def transform(self, E: np.ndarray) -> np.ndarray:
        """Raw embeddings → the space the clusters (and the reference vectors) live in."""
        E = np.asarray(E, dtype=np.float64)
        return self.pca.transform(E) if self.pca is not None else E

    def reference(self) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, cluster id per vector) that a ``NearestFn`` searches, in row order."""
        if self.assign == "centroid":
            return self.centroids, np.arange(self.n_clusters)
        return self.train_vectors, self.train_clusters

    def assign_clusters(self, E_new: np.ndarray, nearest: NearestFn | None = None) -> np.ndarray:
        """Cluster id of each new slide (rows of raw embeddings ``E_new``)."""
        vectors, ref_clusters = self.reference()
        nearest = nearest or exact_nearest(vectors)
        k = 1 if self.assign == "centroid" else self.k_neighbors
        q = self.transform(E_new)
        idx = np.asarray(nearest(q, k)).reshape(len(q), -1)[:, :k]
        if idx.size and (idx.min() < 0 or idx.max() >= len(vectors)):
            raise ValueError(f"nearest returned row ids outside 0..{len(vectors) - 1}")
        return _majority(ref_clusters[idx])

    def predict(self, E_new: np.ndarray, nearest: NearestFn | None = None) -> np.ndarray:
        """Predicted transcriptome (new slides × genes): the assigned cluster's mean."""
        return self.cluster_means[self.assign_clusters(E_new, nearest)]


def _majority(c: np.ndarray) -> np.ndarray:
    """Most frequent id per row; ties → the one that appears first (the nearer neighbour)."""
    if c.shape[1] == 1:
        return c[:, 0]
    out = np.empty(len(c), dtype=c.dtype)
    for i, row in enumerate(c):
        vals, first, counts = np.unique(row, return_index=True, return_counts=True)
        top = counts == counts.max()
        out[i] = vals[top][np.argmin(first[top])]
    return out


def fit_cluster_predictor(
    E: np.ndarray,
    Y: np.ndarray,
    n_clusters: int,
    *,
    method: str = "kmeans",
    n_components: int | None = None,
    standardize: bool = False,
    assign: str = "centroid",
    k_neighbors: int = 1,
    random_state: int = 0,
) -> ClusterPredictor:
    """Cluster slides (rows of ``E``; PCA first if ``n_components``) and average ``Y`` per cluster.

    ``method``: ``"kmeans"`` (k-means++, 10 inits) or ``"agglomerative"`` (Ward).
    ``n_clusters`` is capped at the number of slides.
    """
    E = np.asarray(E, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if E.ndim != 2 or Y.ndim != 2 or E.shape[0] != Y.shape[0]:
        raise ValueError(f"E and Y must be 2-D with the same rows, got {E.shape} and {Y.shape}")
    if not (np.isfinite(E).all() and np.isfinite(Y).all()):
        raise ValueError("E or Y has non-finite values")
    if assign not in ("centroid", "member"):
        raise ValueError(f"assign must be 'centroid' or 'member', got {assign!r}")
    if n_clusters < 1 or k_neighbors < 1:
        raise ValueError(
            f"n_clusters and k_neighbors must be >= 1, got {n_clusters}, {k_neighbors}"
        )
    pca = None
    Z = E
    if n_components is not None:
        pca = pca_fit_transform(E, n_components, standardize=standardize, random_state=random_state)
        Z = pca.scores
    k = int(min(n_clusters, len(Z)))
    if method == "kmeans":
        labels = KMeans(n_clusters=k, n_init=10, random_state=random_state).fit_predict(Z)
    elif method == "agglomerative":
        labels = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(Z)
    else:
        raise ValueError(f"method must be 'kmeans' or 'agglomerative', got {method!r}")
    sizes = np.bincount(labels, minlength=k)
    onehot = np.zeros((k, len(Z)))
    onehot[labels, np.arange(len(Z))] = 1.0 / sizes[labels]
    return ClusterPredictor(
        centroids=onehot @ Z,
        cluster_means=onehot @ Y,
        cluster_sizes=sizes,
        train_vectors=Z,
        train_clusters=labels,
        pca=pca,
        assign=assign,
        k_neighbors=k_neighbors,
    )


@dataclass(frozen=True)
class ClusterEvalResult:
    """Held-out-donor evaluation: per-gene and per-sample accuracy of the cluster predictor."""

    r2: np.ndarray  # per gene, pooled out-of-fold (same definition as ridge_gene_r2)
    pearson_r: np.ndarray  # per gene
    sample_r: np.ndarray  # per slide: Pearson r across genes of gene-centred true vs predicted
    oof: np.ndarray = field(repr=False)  # samples × genes
    clusters: np.ndarray = field(repr=False)  # assigned cluster per sample in its test fold
    folds: np.ndarray = field(repr=False)
    # with a nearest_factory: the assignment exact numpy search gives for the same fold fits
    exact_clusters: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_agree_exact(self) -> int | None:
        """Held-out assignments equal to exact search (None without a ``nearest_factory``)."""
        if self.exact_clusters is None:
            return None
        return int((self.clusters == self.exact_clusters).sum())


def evaluate_cluster_predictor(
    E: np.ndarray,
    Y: np.ndarray,
    groups: Sequence | np.ndarray,
    *,
    n_clusters: int,
    n_splits: int = 5,
    random_state: int = 0,
    folds: np.ndarray | None = None,
    nearest_factory: NearestFactory | None = None,
    strata: Sequence | np.ndarray | None = None,
    **fit_kw,
) -> ClusterEvalResult:
    """K-fold over donors: fit on the training donors, predict the held-out donors' slides.

    Same folds as ``ridge_gene_r2`` for equal ``groups``/``n_splits``/``random_state`` (or
    pass ``folds``), so the two per-gene R² columns compare like for like.
    ``nearest_factory(reference_vectors) -> NearestFn`` builds the lookup for each fold's
    reference, called once per fold in fold order (default :func:`exact_nearest`; with a
    factory, ``exact_clusters`` records what exact search assigns, for an agreement check);
    ``fit_kw`` go to :func:`fit_cluster_predictor`.
    ``strata``: report within-stratum R² (as ``ridge_gene_r2(strata=...)`` does) so the two
    tables compare like for like; the prediction itself never sees the strata.
    """
    E = np.asarray(E, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    outer = donor_folds(groups, n_splits, random_state) if folds is None else np.asarray(folds)
    oof = np.empty_like(Y)
    clusters = np.empty(len(Y), dtype=np.int64)
    exact = np.empty(len(Y), dtype=np.int64) if nearest_factory else None
    for f in range(int(outer.max()) + 1):
        tr, te = np.flatnonzero(outer != f), np.flatnonzero(outer == f)
        model = fit_cluster_predictor(E[tr], Y[tr], n_clusters, random_state=random_state, **fit_kw)
        nearest = nearest_factory(model.reference()[0]) if nearest_factory else None
        clusters[te] = model.assign_clusters(E[te], nearest)
        if exact is not None:  # what the plugged-in lookup should have returned
            exact[te] = model.assign_clusters(E[te])
        oof[te] = model.cluster_means[clusters[te]]
    r2, r = r2_pearson(Y, oof, strata)
    mu = Y.mean(0)  # per-sample r on gene-centred values: gene means alone would give r ≈ 1
    sample_r = r2_pearson((Y - mu).T, (oof - mu).T)[1]
    return ClusterEvalResult(r2, r, sample_r, oof, clusters, outer, exact)


def compare_gene_r2(
    ridge: pd.DataFrame, cluster: ClusterEvalResult, genes: Sequence[str]
) -> pd.DataFrame:
    """One table: per gene, ridge R² (a ``GeneR2Result.table()``) next to the cluster R².

    Columns: gene, symbol, r2_ridge, r2_cluster, pearson_ridge, pearson_cluster,
    delta_r2 (cluster − ridge), rank_ridge; ordered by ridge rank.
    """
    c = pd.DataFrame(
        {"gene": list(genes), "r2_cluster": cluster.r2, "pearson_cluster": cluster.pearson_r}
    )
    missing = set(c["gene"]) - set(ridge["gene"])
    if missing:
        raise ValueError(
            f"{len(missing)} gene(s) missing from the ridge table, e.g. {sorted(missing)[:3]}"
        )
    r = ridge.rename(columns={"r2": "r2_ridge", "pearson_r": "pearson_ridge", "rank": "rank_ridge"})
    out = r[["gene", "symbol", "r2_ridge", "pearson_ridge", "rank_ridge"]].merge(c, on="gene")
    out["delta_r2"] = out["r2_cluster"] - out["r2_ridge"]
    cols = ["gene", "symbol", "r2_ridge", "r2_cluster", "pearson_ridge", "pearson_cluster"]
    return out[[*cols, "delta_r2", "rank_ridge"]].sort_values("rank_ridge").reset_index(drop=True)


# ----------------------------------------------------------------------------------------------
# Serving: centroids in LanceDB, the projection, the clusters' transcriptomes
# ----------------------------------------------------------------------------------------------

CENTROID_TABLE = "cluster_centroids"
SERVED_FOLD = -1  # fold id of the predictor fitted on all paired slides (what a lookup serves)
L2 = "l2"  # LanceDB's "l2" is the squared Euclidean distance (k-means' own)
_QUERY_BATCH = 1024  # query vectors per LanceDB multi-vector search


def centroid_schema(dim: int) -> pa.Schema:
    """Schema of ``cluster_centroids`` (vectors in the clustering space: after the PCA)."""
    return pa.schema(
        [
            pa.field("row_id", pa.string(), nullable=False),  # model_id|fold|cluster
            pa.field("model_id", pa.string(), nullable=False),
            pa.field("fit_id", pa.string()),  # ties centroids, projection, transcriptomes
            pa.field("fold", pa.int32(), nullable=False),  # -1 = served fit; >= 0: a CV fold
            pa.field("cluster", pa.int32(), nullable=False),  # = the row of the reference
            pa.field("n_slides", pa.int32()),
            pa.field("majority_tissue", pa.string()),
            pa.field(VECTOR, pa.list_(pa.float32(), int(dim)), nullable=False),
        ]
    )


def centroid_table(
    model_id: str,
    centroids: np.ndarray,
    *,
    fit_id: str = "",
    fold: int = SERVED_FOLD,
    n_slides: Sequence[int] | np.ndarray | None = None,
    majority_tissue: Sequence[str | None] | None = None,
) -> pa.Table:
    """Arrow rows of ``cluster_centroids``: row ``i`` of ``centroids`` is cluster ``i``."""
    c = np.asarray(centroids, dtype=np.float64)
    if c.ndim != 2 or len(c) == 0:
        raise ValueError(f"centroids must be a non-empty 2-D array, got shape {c.shape}")
    if not np.isfinite(c).all():
        raise ValueError(f"model {model_id}: centroids have non-finite values")
    k = len(c)
    ids = np.arange(k)
    n = [None] * k if n_slides is None else [int(v) for v in n_slides]
    t = [None] * k if majority_tissue is None else list(majority_tissue)
    if len(n) != k or len(t) != k:
        raise ValueError(f"{k} centroids but {len(n)} sizes / {len(t)} tissues")
    schema = centroid_schema(c.shape[1])
    cols = {
        "row_id": [f"{model_id}|{int(fold)}|{i}" for i in ids],
        "model_id": [model_id] * k,
        "fit_id": [fit_id] * k,
        "fold": [int(fold)] * k,
        "cluster": ids.tolist(),
        "n_slides": n,
        "majority_tissue": t,
    }
    arrays = [pa.array(cols[f.name], type=f.type) for f in schema if f.name != VECTOR]
    return pa.Table.from_arrays([*arrays, vectors_to_arrow(c)], schema=schema)


@dataclass(frozen=True)
class CentroidWrite:
    rows: int  # this model's (and fold's) rows after the write
    total_rows: int  # rows of the whole table
    dropped_models: list[str]  # other models removed: their vectors had another width


def write_centroids(
    store: VectorStore, data: pa.Table, name: str = CENTROID_TABLE
) -> CentroidWrite:
    """Make the table's rows of ``data``'s (model_id, fold) exactly ``data``, in one commit under
    the store's writer lock: a re-run replaces, never duplicates, and other models' rows stay.

    A table holds one vector width; when this fit's width differs (another ``n_components``),
    the table is rewritten with this fit only and the other models are reported as dropped.
    """
    mids, folds = data.column("model_id").to_pylist(), data.column("fold").to_pylist()
    keys = set(zip(mids, folds, strict=True))
    if len(keys) != 1:
        raise ValueError(f"write one (model_id, fold) at a time, got {sorted(keys)}")
    (model_id, fold) = keys.pop()
    dim = data.schema.field(VECTOR).type.list_size
    mine = f"model_id = {sql_str(model_id)} AND fold = {int(fold)}"
    dropped: list[str] = []
    with store.writer():  # (store methods take the lock themselves: use the raw table here)
        if name not in store.table_names():
            tbl = store.db.create_table(name, data=data)
        else:
            tbl = store.db.open_table(name)
            if tbl.schema.field(VECTOR).type.list_size != dim:
                old = tbl.search().select(["model_id"]).limit(None).to_arrow()
                dropped = sorted(set(old.column("model_id").to_pylist()) - {model_id})
                tbl = store.db.create_table(name, data=data, mode="overwrite")
            else:
                (
                    tbl.merge_insert("row_id")
                    .when_matched_update_all()
                    .when_not_matched_insert_all()
                    .when_not_matched_by_source_delete(mine)
                    .execute(data.cast(tbl.schema))
                )
        return CentroidWrite(int(tbl.count_rows(mine)), int(tbl.count_rows()), dropped)


def centroid_models(store: VectorStore, name: str = CENTROID_TABLE) -> dict[str, str]:
    """``model_id -> fit_id`` of the served fits in the table ({} when there is no table)."""
    if name not in store.table_names():
        return {}
    t = store.read(name, ["model_id", "fit_id"], where=f"fold = {SERVED_FOLD}")
    return dict(zip(t.column("model_id").to_pylist(), t.column("fit_id").to_pylist(), strict=True))


def search_centroids(
    store: VectorStore,
    model_id: str,
    queries: np.ndarray,
    k: int = 1,
    *,
    fold: int = SERVED_FOLD,
    name: str = CENTROID_TABLE,
) -> pd.DataFrame:
    """The ``k`` nearest centroids of each query row (clustering space), by an exact LanceDB
    scan of the model's rows. Columns: query_index, cluster, distance (Euclidean), n_slides,
    majority_tissue, fit_id; sorted by query, then distance (ties → lower cluster id)."""
    Q = np.ascontiguousarray(queries, dtype=np.float32)
    if Q.ndim == 1:
        Q = Q[None, :]
    tbl = store.open(name)
    where = f"model_id = {sql_str(model_id)} AND fold = {int(fold)}"
    cols = ["cluster", "n_slides", "majority_tissue", "fit_id"]
    parts = []
    for i0 in range(0, len(Q), _QUERY_BATCH):
        chunk = Q[i0 : i0 + _QUERY_BATCH]
        # a single vector must be passed as such: a list of one is not a multi-vector query
        q = tbl.search(chunk[0] if len(chunk) == 1 else list(chunk), vector_column_name=VECTOR)
        q = q.distance_type(L2).where(where, prefilter=True).bypass_vector_index()
        df = q.limit(int(k)).select([*cols, "_distance"]).to_arrow().to_pandas()
        if "query_index" not in df.columns:
            df["query_index"] = 0
        df["query_index"] = df["query_index"].astype(np.int64) + i0
        parts.append(df)
    df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=cols)
    df["distance"] = np.sqrt(df.pop("_distance").astype(np.float64).clip(lower=0.0))
    df = df.sort_values(["query_index", "distance", "cluster"], kind="mergesort")
    return df[["query_index", *cols[:1], "distance", *cols[1:]]].reset_index(drop=True)


def lancedb_nearest(
    store: VectorStore, model_id: str, *, fold: int = SERVED_FOLD, name: str = CENTROID_TABLE
) -> NearestFn:
    """A ``NearestFn`` over the stored reference rows of (``model_id``, ``fold``): their
    ``cluster`` column is the row index of the reference (the cluster id for centroids)."""

    def nearest(queries: np.ndarray, k: int) -> np.ndarray:
        m = len(queries)
        df = search_centroids(store, model_id, queries, k, fold=fold, name=name)
        got = np.bincount(df["query_index"].to_numpy(), minlength=m) if len(df) else np.zeros(m)
        if m and got.min() < k:
            raise ValueError(
                f"LanceDB {store.uri}/{name}: model {model_id!r} fold {fold} has fewer than "
                f"{k} reference rows (query {int(np.argmin(got))} got {int(got.min())})"
            )
        return df["cluster"].to_numpy(dtype=np.int64).reshape(m, k)

    return nearest


def lancedb_nearest_factory(
    store: VectorStore, model_id: str, name: str = CENTROID_TABLE
) -> NearestFactory:
    """For :func:`evaluate_cluster_predictor`: each call (one per fold, in order) stores that
    fold's reference vectors as ``fold = 0, 1, ...`` rows and returns :func:`lancedb_nearest`
    over them, so held-out slides are assigned through the LanceDB search that serves."""
    counter = itertools.count()

    def factory(reference: np.ndarray) -> NearestFn:
        fold = next(counter)
        write_centroids(store, centroid_table(model_id, reference, fold=fold), name)
        return lancedb_nearest(store, model_id, fold=fold, name=name)

    return factory


def cluster_summary(model: ClusterPredictor, tissues: Sequence[str] | np.ndarray) -> pd.DataFrame:
    """Per cluster: n_slides, majority_tissue (ties → alphabetical), majority_fraction."""
    tissues = np.asarray(tissues, dtype=object)
    if len(tissues) != len(model.train_clusters):
        raise ValueError(f"{len(tissues)} tissues for {len(model.train_clusters)} training slides")
    rows = []
    for c in range(model.n_clusters):
        t = pd.Series(tissues[model.train_clusters == c]).value_counts()
        top = sorted(t[t == t.max()].index)[0] if len(t) else None
        rows.append(
            (c, int(model.cluster_sizes[c]), top, float(t.max() / t.sum()) if len(t) else 0.0)
        )
    return pd.DataFrame(
        rows, columns=["cluster", "n_slides", "majority_tissue", "majority_fraction"]
    )


def transcriptome_table(
    model: ClusterPredictor,
    gene_ids: Sequence[str],
    symbols: Sequence[str],
    summary: pd.DataFrame,
    *,
    model_id: str,
    fit_id: str,
) -> pd.DataFrame:
    """Long table of the clusters' mean transcriptomes (``cluster_transcriptomes``): model_id,
    fit_id, cluster, n_slides, majority_tissue, gene_id, symbol, log_tpm; gene order kept."""
    k, g = model.cluster_means.shape
    if len(gene_ids) != g or len(symbols) != g:
        raise ValueError(f"{g} genes in the model but {len(gene_ids)} ids / {len(symbols)} symbols")
    s = summary.set_index("cluster").loc[np.arange(k)]
    return pd.DataFrame(
        {
            "model_id": model_id,
            "fit_id": fit_id,
            "cluster": np.repeat(np.arange(k, dtype=np.int32), g),
            "n_slides": np.repeat(s["n_slides"].to_numpy(dtype=np.int32), g),
            "majority_tissue": np.repeat(s["majority_tissue"].to_numpy(dtype=object), g),
            "gene_id": np.tile(np.asarray(gene_ids, dtype=object), k),
            "symbol": np.tile(np.asarray(symbols, dtype=object), k),
            "log_tpm": model.cluster_means.reshape(-1).astype(np.float32),
        }
    )


def member_table(
    model: ClusterPredictor, meta: pd.DataFrame, *, model_id: str, fit_id: str
) -> pd.DataFrame:
    """Training slides and their cluster (``cluster_members``): model_id, fit_id,
    tissue_sample_id, subject_id, tissue, cluster, distance (to its centroid, clustering space)."""
    d = np.linalg.norm(model.train_vectors - model.centroids[model.train_clusters], axis=1)
    return pd.DataFrame(
        {
            "model_id": model_id,
            "fit_id": fit_id,
            "tissue_sample_id": meta["tissue_sample_id"].astype(str).to_numpy(),
            "subject_id": meta["subject_id"].astype(str).to_numpy(),
            "tissue": meta["tissue"].astype(str).to_numpy(),
            "cluster": model.train_clusters.astype(np.int32),
            "distance": d,
        }
    )


def fit_fingerprint(model: ClusterPredictor, params: dict[str, Any]) -> str:
    """A short id of one fit (parameters + what was fitted): the same inputs give the same id."""
    h = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for a in (model.centroids, model.cluster_means, model.train_clusters):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Projection:
    """Raw slide embedding → clustering space: the fit's PCA (without its scores), or identity."""

    pca: PCAResult | None
    card: dict[str, Any]

    @property
    def components(self) -> np.ndarray | None:
        return None if self.pca is None else self.pca.components

    @property
    def dim_in(self) -> int | None:
        return None if self.pca is None else int(self.pca.components.shape[1])

    def transform(self, E: np.ndarray) -> np.ndarray:
        E = np.atleast_2d(np.asarray(E, dtype=np.float64))
        if self.pca is None:
            return E
        if E.shape[1] != self.dim_in:
            raise ValueError(
                f"embedding has {E.shape[1]} features, the projection expects "
                f"{self.dim_in} (model {self.card.get('model_id')})"
            )
        return self.pca.transform(E)


def save_projection(model: ClusterPredictor, dest: str | Path, card: dict[str, Any]) -> Path:
    """Write the fit's projection (``.npz``: mean, scale, components; ``card`` as JSON inside)
    atomically; ``card`` should carry ``fit_id`` and ``model_id``."""
    arrays: dict[str, np.ndarray] = {"card": np.array(json.dumps(card, sort_keys=True))}
    if model.pca is not None:
        arrays.update(
            mean=model.pca.mean,
            scale=model.pca.scale,
            components=model.pca.components,
            explained_variance_ratio=model.pca.explained_variance_ratio,
        )
    with atomic_open(dest, "wb") as f:
        np.savez(f, **arrays)
    return Path(dest)


def load_projection(path: str | Path) -> Projection:
    with np.load(Path(path), allow_pickle=False) as z:
        card = json.loads(str(z["card"]))
        if "components" not in z.files:
            return Projection(None, card)
        k = z["components"].shape[0]
        pca = PCAResult(
            np.empty((0, k)), z["components"], z["explained_variance_ratio"], z["mean"], z["scale"]
        )
        return Projection(pca, card)


def projection_path(models_dir: str | Path, model_id: str) -> Path:
    """Where a model's projection lives: ``<models>/cluster_transcriptome/<model_id>.npz``."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in model_id)
    return Path(models_dir) / "cluster_transcriptome" / f"{safe}.npz"
