"""SPEC §7: views of embeddings and expression — PCA, then UMAP / t-SNE to 2-D — with a number.

Each view (tile embeddings, slide embeddings per model/checkpoint, expression, joint) is
``compute_view(X, labels)``: PCA to 40 components, 2-D projections of the PCs, and the silhouette
score by tissue in the PCA space and in each 2-D map, so "clusters sharpen with training" and
"the joint view separates tissues better" are measured rather than eyeballed.

The silhouette of the PCA space is the number to compare across views and checkpoints: UMAP and
t-SNE distort distances (t-SNE inflates dense clusters), so their silhouettes are reported for
reference but are not comparable between methods.

``umap`` is imported lazily: its numba JIT costs ~12 s per process.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import silhouette_score

METHODS = ("umap", "tsne")


@dataclass(frozen=True)
class PCAResult:
    """PCA scores plus what is needed to project new samples into the same space."""

    scores: np.ndarray  # samples × components
    components: np.ndarray  # components × features
    explained_variance_ratio: np.ndarray
    mean: np.ndarray
    scale: np.ndarray

    def transform(self, X: np.ndarray) -> np.ndarray:
        return ((np.asarray(X, dtype=np.float64) - self.mean) / self.scale) @ self.components.T


def pca_fit_transform(
    X: np.ndarray, n_components: int = 40, *, standardize: bool = False, random_state: int = 0
) -> PCAResult:
    """PCA (centred; z-scored features if ``standardize``) to at most ``n_components``.

    The count is capped at ``min(samples, features)`` so small inputs (tests, a tissue with few
    slides) still work; the cap shows in ``scores.shape``.
    """
    X = _check_matrix(X, "X")
    mean = X.mean(0)
    scale = X.std(0) if standardize else np.ones(X.shape[1])
    scale[scale == 0] = 1.0
    k = int(min(n_components, X.shape[0], X.shape[1]))
    if k < 1:
        raise ValueError(f"n_components must be >= 1, got {n_components}")
    # "full" SVD is exact and deterministic; randomized only pays off far beyond these sizes
    solver = "full" if min(X.shape) <= 2000 else "randomized"
    pca = PCA(n_components=k, svd_solver=solver, random_state=random_state)
    scores = pca.fit_transform((X - mean) / scale)
    comps = pca.components_
    # sign convention: largest |loading| positive, so reruns and library versions agree
    flip = np.sign(comps[np.arange(k), np.abs(comps).argmax(1)])
    flip[flip == 0] = 1.0
    return PCAResult(
        scores * flip, comps * flip[:, None], pca.explained_variance_ratio_, mean, scale
    )


def project_2d(
    Xp: np.ndarray,
    method: str = "umap",
    *,
    random_state: int = 0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    perplexity: float = 30.0,
    max_iter: int | None = None,
) -> np.ndarray:
    """2-D coordinates of ``Xp`` (usually PCA scores) by UMAP or t-SNE, deterministic.

    ``n_neighbors`` / ``perplexity`` are capped for small inputs (t-SNE needs
    perplexity < samples; UMAP needs neighbours < samples). ``max_iter``: t-SNE iterations
    (≥ 250) / UMAP epochs; None = the library default.
    """
    Xp = _check_matrix(Xp, "Xp")
    n = Xp.shape[0]
    if n < 4:
        raise ValueError(f"a 2-D projection needs at least 4 samples, got {n}")
    if method == "tsne":
        perp = float(min(perplexity, max(1.0, (n - 1) / 3)))
        tsne = TSNE(
            n_components=2,
            perplexity=perp,
            init="pca",
            learning_rate="auto",
            random_state=random_state,
            **({"max_iter": max_iter} if max_iter is not None else {}),
        )
        return tsne.fit_transform(Xp)
    if method == "umap":
        import umap  # lazy: numba compiles on first import

        with warnings.catch_warnings():
            # "n_jobs overridden by random_state": determinism is the point here
            warnings.simplefilter("ignore", UserWarning)
            reducer = umap.UMAP(
                n_components=2,
                n_neighbors=int(min(n_neighbors, n - 1)),
                min_dist=min_dist,
                random_state=random_state,
                init="spectral" if n > n_neighbors + 2 else "random",
                n_epochs=max_iter,
            )
            return np.asarray(reducer.fit_transform(Xp), dtype=np.float64)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def silhouette_by_label(
    X: np.ndarray,
    labels: Sequence | np.ndarray,
    *,
    sample_size: int | None = 5000,
    random_state: int = 0,
) -> float:
    """Mean silhouette (Euclidean) of samples by label; in [-1, 1], higher = tighter tissues.

    NaN when undefined (fewer than 2 labels, or every sample its own label). Above
    ``sample_size`` samples a random subset is scored (the score is O(n²)).
    """
    X = _check_matrix(X, "X")
    labels = np.asarray(labels)
    if len(labels) != X.shape[0]:
        raise ValueError(f"{len(labels)} labels for {X.shape[0]} samples")
    n_labels = len(np.unique(labels))
    if n_labels < 2 or n_labels >= X.shape[0]:
        return float("nan")
    if sample_size is not None and X.shape[0] > sample_size:
        idx = _stratified_subsample(labels, sample_size, random_state)
        X, labels = X[idx], labels[idx]
        if len(np.unique(labels)) < 2:
            return float("nan")
    return float(silhouette_score(X, labels))


def joint_matrix(*blocks: np.ndarray, balance: bool = True) -> np.ndarray:
    """Concatenate per-sample blocks (e.g. slide-embedding PCs, expression PCs) column-wise.

    With ``balance`` every block is scaled to unit total variance first, so neither modality
    dominates the joint distances just because its PCs have larger variance.
    """
    if len(blocks) < 2:
        raise ValueError("joint_matrix needs at least two blocks")
    n = blocks[0].shape[0]
    out = []
    for i, b in enumerate(blocks):
        b = _check_matrix(b, f"block {i}")
        if b.shape[0] != n:
            raise ValueError(f"block {i} has {b.shape[0]} rows, block 0 has {n}")
        b = b - b.mean(0)
        if balance:
            tot = np.sqrt((b * b).sum() / max(1, n - 1))
            b = b / tot if tot > 0 else b
        out.append(b)
    return np.hstack(out)


def align_samples(
    ids_a: Sequence[str], ids_b: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample ids present in both, sorted, with their row indices in ``ids_a`` and ``ids_b``."""
    a, b = pd.Index(ids_a), pd.Index(ids_b)
    for name, ix in (("first", a), ("second", b)):
        if ix.has_duplicates:
            dup = ix[ix.duplicated()][0]
            raise ValueError(f"duplicate sample id {dup!r} in the {name} table")
    common = a.intersection(b).sort_values()
    return np.asarray(common), a.get_indexer(common), b.get_indexer(common)


@dataclass(frozen=True)
class ViewResult:
    """Coordinates (one row per sample) and silhouette scores of one view."""

    coords: pd.DataFrame  # sample_id, label, pc1..pcK, umap_x/y, tsne_x/y, in_2d
    silhouette: dict[str, float]  # space ("pca", "umap", "tsne") → score
    explained_variance_ratio: np.ndarray | None = field(default=None, repr=False)

    def silhouette_rows(self, **keys: object) -> list[dict]:
        """Rows for the cross-view/checkpoint table: ``keys`` (view, model_id, ...) + space."""
        n = int(self.coords["in_2d"].sum())
        return [
            {
                **keys,
                "space": space,
                "silhouette": score,
                "n_samples": len(self.coords) if space == "pca" else n,
                "n_labels": int(self.coords["label"].nunique()),
            }
            for space, score in self.silhouette.items()
        ]


def compute_view(
    X: np.ndarray,
    labels: Sequence | np.ndarray,
    sample_ids: Sequence[str] | None = None,
    *,
    n_components: int | None = 40,
    methods: Sequence[str] = METHODS,
    standardize: bool = False,
    max_points: int | None = 20_000,
    random_state: int = 0,
    silhouette_sample_size: int | None = 5000,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    perplexity: float = 30.0,
    max_iter: int | None = None,
) -> ViewResult:
    """PCA (skipped when ``n_components`` is None: ``X`` already is the space, e.g. a joint
    matrix of PCs) → each 2-D method → silhouettes by label.

    Above ``max_points`` samples a label-stratified subset is projected to 2-D (UMAP/t-SNE on
    200k tiles would take hours); the others keep their PCs and get NaN 2-D coordinates
    (``in_2d`` False).
    """
    X = _check_matrix(X, "X")
    labels = np.asarray(labels)
    n = X.shape[0]
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} samples")
    ids = np.asarray(sample_ids) if sample_ids is not None else np.arange(n).astype(str)
    evr = None
    if n_components is None:
        space = X
    else:
        pca = pca_fit_transform(X, n_components, standardize=standardize, random_state=random_state)
        space, evr = pca.scores, pca.explained_variance_ratio
    coords = pd.DataFrame({"sample_id": ids, "label": labels})
    for j in range(space.shape[1]):
        coords[f"pc{j + 1}"] = space[:, j]
    sil = {
        "pca": silhouette_by_label(
            space, labels, sample_size=silhouette_sample_size, random_state=random_state
        )
    }
    sub = (
        np.arange(n)
        if max_points is None or n <= max_points
        else _stratified_subsample(labels, max_points, random_state)
    )
    coords["in_2d"] = np.isin(np.arange(n), sub)
    for method in methods:
        xy = np.full((n, 2), np.nan)
        xy[sub] = project_2d(
            space[sub],
            method,
            random_state=random_state,
            n_neighbors=n_neighbors,
            min_dist=min_dist,
            perplexity=perplexity,
            max_iter=max_iter,
        )
        coords[f"{method}_x"], coords[f"{method}_y"] = xy[:, 0], xy[:, 1]
        sil[method] = silhouette_by_label(
            xy[sub], labels[sub], sample_size=silhouette_sample_size, random_state=random_state
        )
    return ViewResult(coords, sil, evr)


def _stratified_subsample(labels: np.ndarray, size: int, random_state: int) -> np.ndarray:
    """``size`` row indices, each label represented in proportion (at least one each), sorted."""
    rng = np.random.default_rng(random_state)
    uniq, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    take = np.maximum(1, np.floor(counts * size / len(labels)).astype(int))
    take = np.minimum(take, counts)
    out = [rng.choice(np.flatnonzero(inv == i), take[i], replace=False) for i in range(len(uniq))]
    return np.sort(np.concatenate(out))


def _check_matrix(X: np.ndarray, name: str) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array, got shape {X.shape}")
    bad = ~np.isfinite(X)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(f"{name} has {int(bad.sum())} non-finite value(s), first at [{i}, {j}]")
    return X
