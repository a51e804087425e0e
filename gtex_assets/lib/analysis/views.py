"""SPEC §7 views: the joint PCA (slide-embedding PCs ⊕ expression PCs of the same samples) and
the PCA → UMAP / t-SNE views of slides, tiles, expression and the joint space, with silhouettes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pyarrow.parquet as pq

from gtex_assets.lib.analysis import plots as P
from gtex_assets.lib.analysis.projection import (
    compute_view,
    joint_matrix,
    pca_fit_transform,
    silhouette_by_label,
)
from gtex_assets.lib.analysis.selection import model_label
from gtex_assets.lib.embeddings import vector_store as V

JOINT_TABLE = "joint_pca"
COORDS_TABLE = "projection_coords"
SILHOUETTE_TABLE = "projection_silhouettes"
BLOCKS = ("image", "expression")


@dataclass(frozen=True)
class ViewParams:
    """SPEC §7 defaults of embedding_views / joint_pca (their Configs take them from here)."""

    n_components: int = 40  # PCA components before the 2-D maps (and of each joint block)
    methods: tuple[str, ...] = ("umap", "tsne")
    tiles: bool = True
    tiles_per_slide: int = 20
    max_points: int = 20_000
    max_iter: int = 0  # 0 = library default
    random_state: int = 0

    def view_kw(self) -> dict:
        return {
            "n_components": self.n_components,
            "methods": list(self.methods),
            "max_points": self.max_points,
            "random_state": self.random_state,
            "max_iter": self.max_iter or None,
        }


# ----------------------------------------------------------------------------- joint PCA


def joint_pca_table(
    F: np.ndarray,
    Y: np.ndarray,
    slides: pd.DataFrame,
    model_id: str,
    n_components: int,
    random_state: int,
) -> pl.DataFrame:
    """Long table of the joint PCA's two blocks for the samples with a slide and expression:
    tissue_sample_id, subject_id, tissue, model_id, block (image | expression), component
    (1-based), score. Each block is the PCA of its modality on these samples."""
    parts = []
    for block, M in zip(BLOCKS, (F, Y), strict=True):
        S = pca_fit_transform(M, n_components, random_state=random_state).scores
        n, k = S.shape
        parts.append(
            pl.DataFrame(
                {
                    "tissue_sample_id": np.repeat(
                        slides["tissue_sample_id"].astype(str).to_numpy(), k
                    ),
                    "subject_id": np.repeat(slides["subject_id"].astype(str).to_numpy(), k),
                    "tissue": np.repeat(slides["tissue"].astype(str).to_numpy(), k),
                    "model_id": model_id,
                    "block": block,
                    "component": np.tile(np.arange(1, k + 1, dtype=np.int32), n),
                    "score": S.ravel(),
                }
            )
        )
    return pl.concat(parts)


def joint_blocks(table: pl.DataFrame) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """(samples: tissue_sample_id, tissue; image PCs; expression PCs) back from the long table."""
    blocks, ids = [], []
    for block in BLOCKS:
        w = table.filter(pl.col("block") == block).pivot(
            on="component", index=["tissue_sample_id", "tissue"], values="score"
        )  # rows in the order written
        cols = sorted((c for c in w.columns if c not in ("tissue_sample_id", "tissue")), key=int)
        blocks.append(w.select(cols).to_numpy())
        ids.append(w.select("tissue_sample_id", "tissue"))
    if not ids[0].equals(ids[1]):
        raise ValueError("joint_pca: the image and expression blocks have different samples")
    return ids[0].to_pandas(), blocks[0], blocks[1]


def joint_silhouettes(img: np.ndarray, ex: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Tissue silhouette of the image PCs alone, the expression PCs alone, and the joint space."""
    return {
        "image_only": silhouette_by_label(img, labels),
        "expression_only": silhouette_by_label(ex, labels),
        "joint": silhouette_by_label(joint_matrix(img, ex), labels),
    }


# ----------------------------------------------------------------------------- views


def coord_rows(view: str, model_id: str | None, vr, methods: list[str]) -> pd.DataFrame:
    c = vr.coords
    parts = []
    for method, cx, cy in [("pca", "pc1", "pc2")] + [(m, f"{m}_x", f"{m}_y") for m in methods]:
        if cx not in c:
            continue
        parts.append(
            pd.DataFrame(
                {
                    "view": view,
                    "model_id": model_id,
                    "sample_id": c["sample_id"].astype(str),
                    "tissue": c["label"].astype(str),
                    "method": method,
                    "x": c[cx].astype(float),
                    "y": c[cy].astype(float) if cy in c else 0.0,
                }
            )
        )
    out = pd.concat(parts, ignore_index=True)
    return out[np.isfinite(out["x"])]


def tile_sample(tile_dir: Path, model_ids: list[str], per_slide: int, seed: int):
    """Up to ``per_slide`` tiles per slide and model (the balanced sample first)."""
    files = sorted(tile_dir.glob("*.parquet")) if tile_dir.is_dir() else []
    rng = np.random.default_rng(seed)
    metas, vecs = [], []
    for fp in files:
        t = pq.read_table(
            fp,
            columns=["model_id", "tile_id", "tissue", "sampled", V.VECTOR],
            filters=[("model_id", "in", model_ids)],
        )
        if t.num_rows == 0:
            continue
        m = t.drop_columns([V.VECTOR]).to_pandas()
        keep = []
        for _, idx in m.groupby("model_id").indices.items():
            pool = idx[m["sampled"].fillna(False).to_numpy()[idx]]
            pool = pool if len(pool) else idx
            keep.append(rng.choice(pool, min(per_slide, len(pool)), replace=False))
        keep = np.sort(np.concatenate(keep))
        metas.append(m.iloc[keep])
        vecs.append(V.arrow_to_vectors(t.column(V.VECTOR).take(keep)))
    if not metas:
        return None, None
    return pd.concat(metas, ignore_index=True), np.vstack(vecs).astype(np.float64)


@dataclass
class ViewsOutput:
    coords: pd.DataFrame
    silhouettes: pd.DataFrame
    plots: dict[str, Path] = field(default_factory=dict)
    n_tiles: int = 0


def embedding_views(
    slide_sets: list[tuple[str, np.ndarray, pd.DataFrame]],
    tile_sets: list[tuple[str, np.ndarray, pd.DataFrame]],
    expression: tuple[np.ndarray, pd.Series, pd.Series],
    joint: pl.DataFrame,
    models: pl.DataFrame,
    selected: str,
    params: ViewParams,
    plot_path: Callable[[str], Path],
    log: Callable[[str], None] = lambda _: None,
) -> ViewsOutput:
    """Every view: slides per model, tiles per model, expression, the joint PCA.

    ``slide_sets`` / ``tile_sets``: (model_id, vectors, meta with tissue and an id column
    ``tissue_sample_id`` / ``tile_id``), in plot order; ``expression``: (matrix, tissue, sample
    ids); ``joint``: the joint_pca table; ``plot_path(name)``: where a PNG goes.
    """
    kw = params.view_kw()
    methods = list(params.methods)
    out = ViewsOutput(pd.DataFrame(), pd.DataFrame())
    coords, sil = [], []

    def add(view: str, mid: str | None, X, labels, ids, title: str, kw=kw) -> None:
        epoch, lab = (None, "") if mid is None else model_label(models, mid)[::-1]
        vr = compute_view(X, labels, ids, **kw)
        coords.append(coord_rows(view, mid, vr, methods))
        sil.extend(vr.silhouette_rows(view=view, model_id=mid, epoch=epoch,
                                      checkpoint=lab if view != "joint" else ""))  # fmt: skip
        name = f"view_{view}" + (f"_{mid}" if mid and view != "joint" else "")
        out.plots[name] = P.view_panels(
            vr.coords, plot_path(name), title=title, silhouette=vr.silhouette
        )
        log(f"{name}: silhouette {vr.silhouette}")

    for mid, X, meta in slide_sets:
        add("slides", mid, X, meta["tissue"].astype(str), meta["tissue_sample_id"],
            f"Slide embeddings — {mid} ({model_label(models, mid)[0]})")  # fmt: skip
    for mid, X, meta in tile_sets:
        out.n_tiles += len(X)
        add("tiles", mid, X, meta["tissue"].astype(str), meta["tile_id"],
            f"Tile embeddings — {mid} ({model_label(models, mid)[0]})")  # fmt: skip
    Xe, tissue_e, ids_e = expression
    add("expression", None, Xe, tissue_e, ids_e, "Expression (log TPM)")
    samples, img, ex = joint_blocks(joint)
    labels = samples["tissue"].astype(str).to_numpy()
    add("joint", selected, joint_matrix(img, ex), labels, samples["tissue_sample_id"],
        f"Joint: slide PCs ({selected}) ⊕ expression PCs", kw={**kw, "n_components": None})  # fmt: skip
    js = joint_silhouettes(img, ex, labels)
    for space in ("image_only", "expression_only"):
        sil.append({"view": "joint", "model_id": selected, "epoch": model_label(models, selected)[1],
                    "space": f"pca_{space}", "silhouette": js[space], "n_samples": len(labels),
                    "n_labels": int(len(np.unique(labels)))})  # fmt: skip
    out.coords = pd.concat(coords, ignore_index=True)
    s = pd.DataFrame(sil)
    s["epoch"] = s["epoch"].astype("Int64")
    s["checkpoint"] = s["checkpoint"].fillna("")
    out.silhouettes = s
    trend = s[s["view"].isin(["slides", "tiles"])]
    out.plots["silhouette_trend"] = P.silhouette_trend(trend, plot_path("silhouette_trend"))
    return out


def pca_silhouette(sil: pd.DataFrame, view: str, model_id: str | None) -> float:
    """The PCA-space silhouette of one view (and model); NaN when absent."""
    r = sil[(sil["view"] == view) & (sil["space"] == "pca")]
    r = r[r["model_id"] == model_id] if model_id is not None else r
    return float(r["silhouette"].iloc[0]) if len(r) else float("nan")


def view_inputs(meta, vec, models: pl.DataFrame, selected: str, off_the_shelf: str | None, expr,
                tile_dir: Path, params: ViewParams):  # fmt: skip
    """(slide sets in checkpoint order — off the shelf first, then by epoch —, tile sets of the
    selected and off-the-shelf models, expression of every sample with a tissue)."""
    from gtex_assets.lib.analysis.inputs import model_slides

    def key(m: str):
        ep = model_label(models, m)[1]
        return (ep is not None, ep or 0, m)

    slide_sets = []
    for m in sorted(models["model_id"].to_list(), key=key):
        s = model_slides(meta, vec, m)
        slide_sets.append((m, s.vectors, s.meta))
    tile_sets = []
    if params.tiles:
        ids = sorted({selected, off_the_shelf} - {None})
        tm, tv = tile_sample(tile_dir, ids, params.tiles_per_slide, params.random_state)
        for mid, idx in ({} if tm is None else tm.groupby("model_id").indices).items():
            tile_sets.append((mid, tv[idx], tm.iloc[idx]))
    s = expr.samples
    rows = np.flatnonzero(s["tissue"].notna().to_numpy())
    ids = s["tissue_sample_id"].astype("string").fillna(s["aliquot_id"]).iloc[rows]
    ex = (np.asarray(expr.X[rows], dtype=np.float64), s["tissue"].iloc[rows].astype(str), ids)
    return slide_sets, tile_sets, ex


def views_summary(sil: pd.DataFrame, selected: str, off_the_shelf: str | None) -> dict[str, float]:
    """The headline silhouettes: selected vs off-the-shelf slides, the joint space and its parts."""

    def space(name: str) -> float:
        r = sil.loc[sil["space"] == name, "silhouette"]
        return float(r.iloc[0]) if len(r) else float("nan")

    return {
        "silhouette_selected": pca_silhouette(sil, "slides", selected),
        "silhouette_off_the_shelf": pca_silhouette(sil, "slides", off_the_shelf)
        if off_the_shelf
        else float("nan"),
        "silhouette_joint": pca_silhouette(sil, "joint", selected),
        "silhouette_image_only": space("pca_image_only"),
        "silhouette_expression_only": space("pca_expression_only"),
        "silhouette_expression_all_samples": pca_silhouette(sil, "expression", None),
    }
