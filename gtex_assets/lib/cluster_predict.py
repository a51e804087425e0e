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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.cluster import AgglomerativeClustering, KMeans

from gtex_assets.lib.projection import PCAResult, pca_fit_transform
from gtex_assets.lib.regression import donor_folds, r2_pearson

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
    reference (default :func:`exact_nearest`); ``fit_kw`` go to :func:`fit_cluster_predictor`.
    ``strata``: report within-stratum R² (as ``ridge_gene_r2(strata=...)`` does) so the two
    tables compare like for like; the prediction itself never sees the strata.
    """
    E = np.asarray(E, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    outer = donor_folds(groups, n_splits, random_state) if folds is None else np.asarray(folds)
    oof = np.empty_like(Y)
    clusters = np.empty(len(Y), dtype=np.int64)
    for f in range(int(outer.max()) + 1):
        tr, te = np.flatnonzero(outer != f), np.flatnonzero(outer == f)
        model = fit_cluster_predictor(E[tr], Y[tr], n_clusters, random_state=random_state, **fit_kw)
        nearest = nearest_factory(model.reference()[0]) if nearest_factory else None
        clusters[te] = model.assign_clusters(E[te], nearest)
        oof[te] = model.cluster_means[clusters[te]]
    r2, r = r2_pearson(Y, oof, strata)
    mu = Y.mean(0)  # per-sample r on gene-centred values: gene means alone would give r ≈ 1
    sample_r = r2_pearson((Y - mu).T, (oof - mu).T)[1]
    return ClusterEvalResult(r2, r, sample_r, oof, clusters, outer)


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
