"""SPEC §8 spatial maps: where on a slide a gene's predicted expression comes from.

The per-gene model is ridge regression, linear in the slide embedding, and a slide embedding
is the mean of its tiles' embeddings. So every tile has a prediction of its own,
``ŷ_tile = ȳ_tissue + (x_tile − x̄_tissue) β_g``, and the mean over the slide's (sampled) tiles
is exactly the slide's prediction (linearity). Mapped over the slide it shows which regions
push a gene's predicted expression up or down, as RNAPath does on GTEx.

The map model (:func:`fit_map_model`) is the ridge of `gene_r2` refitted on every paired slide:
the same slide embeddings and log-TPM targets, tissue fixed effects (X and Y centred within
tissue, the within-tissue view: a map is variation *within* one slide, i.e. within a tissue),
and each gene's penalty λ from gene_r2's table (its nested donor CV chose it). gene_r2 keeps no
coefficients, so they are refitted here: one eigendecomposition for all genes
(:func:`regression.fit_ridge`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from gtex_assets.core.atomic import atomic_path, write_json
from gtex_assets.lib.analysis.regression import _Centering, fit_ridge

MAP_DIR = "tile_gene_maps"  # models/tile_gene_maps/<model_id>.npz + .json


@dataclass(frozen=True)
class MapParams:
    """Which genes and slides get maps (SPEC §8 defaults; the asset's config)."""

    top_n: int = 20  # genes with the best gene_r2 rank (within-tissue R² where reported)
    genes: tuple[str, ...] = ()  # or these gene ids / symbols (planted genes, markers ...)
    slides_per_tissue: int = 2  # example heatmaps per tissue in the UI metadata
    plot_genes: int = 3  # genes drawn per example slide


def _rank_column(cols: Sequence[str]) -> tuple[str, str]:
    """(R² column, λ column) of gene_r2's table: the within-tissue view where it is reported
    separately, else the table's one R²."""
    for r2, alpha in (("r2_within", "alpha_within"), ("r2", "alpha")):
        if r2 in cols:
            return r2, alpha if alpha in cols else "alpha"
    raise ValueError(f"gene_r2 table has no R² column (columns: {list(cols)})")


def choose_map_genes(gene_r2: pl.DataFrame, params: MapParams) -> pl.DataFrame:
    """gene, symbol, alpha, r2 of the genes to map: ``params.genes`` (ids or symbols) if given,
    else the ``top_n`` by within-tissue R²; a named gene missing from the table is an error."""
    r2, alpha = _rank_column(gene_r2.columns)
    if alpha not in gene_r2.columns:
        raise ValueError("gene_r2 table has no penalty (alpha) column to refit the map model")
    t = gene_r2.select(
        pl.col("gene").cast(pl.Utf8), pl.col("symbol").cast(pl.Utf8),
        pl.col(alpha).cast(pl.Float64).alias("alpha"), pl.col(r2).cast(pl.Float64).alias("r2"),
    )  # fmt: skip
    if params.genes:
        wanted = list(params.genes)
        hit = t.filter(pl.col("gene").is_in(wanted) | pl.col("symbol").is_in(wanted))
        found = set(hit["gene"]) | set(hit["symbol"])
        missing = [g for g in wanted if g not in found]
        if missing:
            raise ValueError(f"genes {missing} are not in gene_r2's table")
        return hit
    return t.filter(pl.col("r2").is_not_nan()).sort("r2", descending=True).head(params.top_n)


@dataclass
class MapModel:
    """Per-gene linear maps of one embedding model: ``predict`` tiles or slides."""

    model_id: str
    genes: list[str]
    symbols: list[str]
    coef: np.ndarray  # features × genes
    tissues: np.ndarray  # sorted tissue labels seen in the fit
    x_means: np.ndarray  # tissues × features
    y_means: np.ndarray  # tissues × genes
    x_mean: np.ndarray  # overall means (a tissue the fit never saw)
    y_mean: np.ndarray
    card: dict

    def _centering(self) -> tuple[_Centering, _Centering]:
        return (_Centering(self.x_mean, self.tissues, self.x_means),
                _Centering(self.y_mean, self.tissues, self.y_means))  # fmt: skip

    def predict(self, vectors: np.ndarray, tissue: str | Sequence[str] | None) -> np.ndarray:
        """Predicted log TPM (rows × genes) of tile or slide vectors of ``tissue`` (one label or
        one per row; None or an unseen tissue: the overall means)."""
        v = np.asarray(vectors, dtype=np.float64)
        if v.ndim != 2 or v.shape[1] != self.coef.shape[0]:
            raise ValueError(
                f"vectors of shape {v.shape}: the map model of {self.model_id} expects "
                f"{self.coef.shape[0]} features"
            )
        xc, yc = self._centering()
        s = np.full(len(v), "" if tissue is None else tissue, dtype=object) if (
            tissue is None or isinstance(tissue, str)) else np.asarray(tissue, dtype=object)  # fmt: skip
        s = s.astype(str)
        return (v - xc.offsets(s, len(v))) @ self.coef + yc.offsets(s, len(v))

    def gene_index(self, gene: str) -> int:
        """Column of a gene id or symbol (ValueError listing the mapped genes)."""
        for names in (self.genes, self.symbols):
            if gene in names:
                return names.index(gene)
        raise ValueError(
            f"gene {gene!r} has no map for model {self.model_id}; mapped genes: "
            + ", ".join(f"{s} ({g})" for g, s in zip(self.genes, self.symbols, strict=True))
        )


def fit_map_model(
    X: np.ndarray,
    Y: np.ndarray,
    tissues: Sequence[str],
    genes: pl.DataFrame,
    *,
    model_id: str,
) -> MapModel:
    """Ridge of every chosen gene on all paired slides (``X`` slide embeddings, ``Y`` their
    log TPM of ``genes``' rows, tissue fixed effects, per-gene λ from ``genes['alpha']``)."""
    s = np.asarray(tissues, dtype=str)
    m = fit_ridge(X, Y, genes["alpha"].to_numpy(), strata=s)
    if np.any(m.x_scale != 1.0) or m.coef is None:
        raise ValueError("the map model must be the linear, unstandardised ridge")
    xc, yc = m.x_center, m.y_center
    card = {"model_id": model_id, "n_slides": int(len(X)), "n_genes": int(Y.shape[1]),
            "features": int(X.shape[1]), "tissue_fixed_effects": True,
            "alpha_from": "gene_r2 (nested donor CV per gene)"}  # fmt: skip
    return MapModel(model_id, genes["gene"].to_list(), genes["symbol"].to_list(), m.coef,
                    xc.strata, xc.means, yc.means, xc.mean, yc.mean, card)  # fmt: skip


def map_model_path(models_dir: Path, model_id: str) -> Path:
    return Path(models_dir) / MAP_DIR / f"{model_id}.npz"


def save_map_model(model: MapModel, path: Path) -> Path:
    """The model as ``.npz`` (arrays) + ``.json`` (card, genes), both written atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, coef=model.coef, tissues=model.tissues.astype(str), x_means=model.x_means,
                 y_means=model.y_means, x_mean=model.x_mean, y_mean=model.y_mean)  # fmt: skip
    write_json({**model.card, "genes": model.genes, "symbols": model.symbols},
               path.with_suffix(".json"))  # fmt: skip
    return path


def load_map_model(path: Path) -> MapModel:
    path = Path(path)
    if not path.is_file() or not path.with_suffix(".json").is_file():
        raise FileNotFoundError(
            f"no map model at {path}: materialise the `tile_gene_predictions` asset (after gene_r2)"
        )
    card = json.loads(path.with_suffix(".json").read_text())
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    genes, symbols = card.pop("genes"), card.pop("symbols")
    return MapModel(card["model_id"], genes, symbols, arrays["coef"], arrays["tissues"],
                    arrays["x_means"], arrays["y_means"], arrays["x_mean"], arrays["y_mean"],
                    card)  # fmt: skip


def tile_predictions(
    model: MapModel, tiles: pl.DataFrame, vectors: np.ndarray, tissue: str | None
) -> pl.DataFrame:
    """Long table of one slide: its tile rows (tissue_sample_id, x, y, tile_size, sampled) ×
    mapped genes with ``predicted_log_tpm``."""
    pred = model.predict(vectors, tissue)
    n, g = pred.shape
    base = tiles.select("tissue_sample_id", "x", "y", "tile_size", "sampled")
    return (
        base.select(pl.all().repeat_by(g).explode()).with_columns(
            gene=pl.Series(np.tile(model.genes, n)),
            symbol=pl.Series(np.tile(model.symbols, n)),
            predicted_log_tpm=pl.Series(pred.reshape(-1).astype(np.float32)),
            model_id=pl.lit(model.model_id),
        )  # fmt: skip
    )


@dataclass(frozen=True)
class Coverage:
    """How much of a slide its map covers (said on the map)."""

    mapped: int  # tiles with a prediction
    kept: int | None  # filtered 'kept' tiles of the slide (None: unknown)

    def note(self) -> str:
        if self.kept is None or self.mapped >= self.kept:
            return f"{self.mapped} tiles"
        return (f"{self.mapped} of {self.kept} kept tiles (the balanced sample; embed every "
                "kept tile with tile_embeddings all_filtered_tiles=true for a full map)")  # fmt: skip


def tile_mosaic(tiles: pl.DataFrame, scale: float) -> tuple[np.ndarray, float]:
    """A thumbnail from the tile JPEGs themselves (``path``, ``x``, ``y``, ``tile_size``),
    downsampled by ``scale``: (RGB canvas, the scale used). Untiled area is white."""
    from PIL import Image

    size = tiles["tile_size"].fill_null(448).cast(pl.Int64)
    w = int((tiles["x"].cast(pl.Int64) + size).max())
    h = int((tiles["y"].cast(pl.Int64) + size).max())
    scale = max(scale, max(w, h) / 2048)  # a bounded canvas for any slide
    canvas = Image.new("RGB", (max(1, round(w / scale)), max(1, round(h / scale))), "white")
    for r in tiles.select("path", "x", "y", "tile_size").iter_rows(named=True):
        px = max(1, round((r["tile_size"] or 448) / scale))
        try:
            with Image.open(r["path"]) as im:
                im.draft("RGB", (px, px))  # JPEG DCT scaling: cheap
                canvas.paste(im.convert("RGB").resize((px, px)),
                             (round(r["x"] / scale), round(r["y"] / scale)))  # fmt: skip
        except (OSError, ValueError, TypeError):
            continue  # an unreadable tile leaves its square white; its prediction still shows
    return np.asarray(canvas), scale


def heatmap_png(
    tiles: pl.DataFrame,
    values: np.ndarray,
    out: Path,
    *,
    title: str,
    note: str,
    scale: float = 16.0,
) -> Path:
    """The slide (a mosaic of its tiles) with each tile coloured by ``values`` (its predicted
    log TPM), side by side with the plain thumbnail; ``note`` says what the map covers."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    thumb, scale = tile_mosaic(tiles, scale)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2), constrained_layout=True)
    for ax in axes:
        ax.imshow(thumb)
        ax.set_axis_off()
    cmap = plt.get_cmap("magma")
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    norm = matplotlib.colors.Normalize(lo, hi if hi > lo else lo + 1e-6)
    for (x, y, s), v in zip(tiles.select("x", "y", "tile_size").iter_rows(), values, strict=True):
        px = (s or 448) / scale
        axes[1].add_patch(Rectangle((x / scale, y / scale), px, px, color=cmap(norm(v)),
                                    alpha=0.75, linewidth=0))  # fmt: skip
    fig.colorbar(matplotlib.cm.ScalarMappable(norm, cmap), ax=axes[1], shrink=0.8,
                 label="predicted log2(1 + TPM)")  # fmt: skip
    axes[0].set_title("tiles")
    axes[1].set_title(title, fontsize=10)
    fig.text(0.01, 0.01, note, fontsize=8)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(out)) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return Path(out)


def example_slides(slides: pl.DataFrame, per_tissue: int) -> list[str]:
    """The slides shown in the UI: the first ``per_tissue`` slides (by id) of each tissue."""
    return (
        slides.sort("tissue", "tissue_sample_id")
        .group_by("tissue", maintain_order=True)
        .head(per_tissue)["tissue_sample_id"]
        .to_list()
    )


# --------------------------------------------------------------------------------------------
# The asset's run: fit on the stored slides, predict every stored tile
# --------------------------------------------------------------------------------------------

TILE_DIR = "tile_embeddings"
TABLE = "tile_gene_predictions"


def paired_slides(
    slides: pl.DataFrame, vectors: np.ndarray, samples: pl.DataFrame
) -> tuple[np.ndarray, np.ndarray, pl.DataFrame]:
    """(slide vectors, matrix rows, slide rows) of the slides with expression, in slide order;
    ``samples``: gene_log_tpm's tissue_sample_id → sample_index."""
    s = samples.drop_nulls("tissue_sample_id").unique("tissue_sample_id", keep="first")
    m = slides.with_row_index("_i").join(
        s.select("tissue_sample_id", "sample_index"), on="tissue_sample_id", how="inner"
    ).sort("_i")  # fmt: skip
    if m.is_empty():
        raise ValueError("no slide of the model has expression (no shared tissue_sample_id)")
    return vectors[m["_i"].to_numpy()], m["sample_index"].to_numpy(), m.drop("_i")


@dataclass
class MapsRun:
    model: MapModel
    predictions: pl.DataFrame  # the tile_gene_predictions rows
    slides: pl.DataFrame  # tissue_sample_id, tissue, tiles mapped, kept tiles
    pngs: list[Path]


def slide_tile_rows(tiles_dir: Path, model_id: str, slide_ids: Sequence[str]) -> pl.DataFrame:
    """The stored tile embeddings of ``model_id`` for ``slide_ids`` (scan over the folder)."""
    files = [
        tiles_dir / f"{s}.parquet" for s in slide_ids if (tiles_dir / f"{s}.parquet").is_file()
    ]
    if not files:
        return pl.DataFrame()
    cols = ["tissue_sample_id", "x", "y", "tile_size", "sampled", "path", "vector"]
    return (
        pl.scan_parquet(files, missing_columns="insert")
        .filter(pl.col("model_id") == model_id)
        .select(cols)
        .collect()
    )


def kept_tiles(lk_partition_table, sid: str) -> int | None:
    """The number of filtered 'kept' tiles of a slide (None when its table is missing)."""
    p = lk_partition_table("filtered_tiles", sid)
    if not Path(p).is_file():
        return None
    return int(
        pl.scan_parquet(p).filter(pl.col("verdict") == "kept").select(pl.len()).collect().item()
    )


def run_maps(
    *,
    gene_r2: pl.DataFrame,
    slides: pl.DataFrame,
    slide_vectors: np.ndarray,
    expression: np.ndarray,
    expression_genes: Sequence[str],
    samples: pl.DataFrame,
    tiles_dir: Path,
    partition_table,
    plots_dir: Path,
    params: MapParams = MapParams(),
) -> MapsRun:
    """Fit the map model of gene_r2's reported model on its paired slides, predict every stored
    tile of every slide of that model, and draw example heatmaps (``slides_per_tissue`` per
    tissue, ``plot_genes`` genes each)."""
    model_id = str(gene_r2["model_id"][0])
    genes = choose_map_genes(gene_r2, params)
    pos = {g: i for i, g in enumerate(expression_genes)}
    cols = np.array([pos[g] for g in genes["gene"]])
    mine = slides.with_row_index("_i").filter(pl.col("model_id") == model_id)
    if mine.is_empty():
        raise ValueError(f"slide_embeddings has no rows of gene_r2's model {model_id}")
    vec = slide_vectors[mine["_i"].to_numpy()]
    X, rows, paired = paired_slides(mine.drop("_i"), vec, samples)
    order = np.argsort(rows, kind="stable")  # ascending rows: friendlier to the memory map
    Y = np.empty((len(rows), len(cols)))
    Y[order] = np.asarray(expression[rows[order]][:, cols], dtype=np.float64)
    model = fit_map_model(X, Y, paired["tissue"].to_list(), genes, model_id=model_id)
    tissue_of = dict(mine.select("tissue_sample_id", "tissue").iter_rows())
    tiles = slide_tile_rows(tiles_dir, model_id, list(tissue_of))
    parts, info = [], []
    for (sid,), t in tiles.group_by("tissue_sample_id", maintain_order=True) if len(tiles) else []:
        v = np.stack(t["vector"].to_numpy()) if len(t) else np.zeros((0, X.shape[1]))
        parts.append(tile_predictions(model, t, v, tissue_of.get(sid)))
        info.append({"tissue_sample_id": sid, "tissue": tissue_of.get(sid), "tiles_mapped": len(t),
                     "kept_tiles": kept_tiles(partition_table, sid)})  # fmt: skip
    preds = pl.concat(parts) if parts else pl.DataFrame()
    slide_info = pl.DataFrame(info, schema_overrides={"kept_tiles": pl.Int64})
    pngs = []
    for sid in example_slides(slide_info, params.slides_per_tissue) if info else []:
        t = tiles.filter(pl.col("tissue_sample_id") == sid)
        r = slide_info.filter(pl.col("tissue_sample_id") == sid).row(0, named=True)
        note = Coverage(r["tiles_mapped"], r["kept_tiles"]).note()
        p = preds.filter(pl.col("tissue_sample_id") == sid)
        for g, sym in list(zip(model.genes, model.symbols, strict=True))[: params.plot_genes]:
            vals = p.filter(pl.col("gene") == g)["predicted_log_tpm"].to_numpy()
            pngs.append(heatmap_png(
                t, vals, plots_dir / f"{sid}_{sym}.png", note=note,
                title=f"{sym} predicted from {model_id}\n{sid} ({r['tissue']})",
            ))  # fmt: skip
    return MapsRun(model, preds, slide_info, pngs)


__all__ = [
    "MAP_DIR",
    "TABLE",
    "MapsRun",
    "paired_slides",
    "run_maps",
    "slide_tile_rows",
    "Coverage",
    "MapModel",
    "MapParams",
    "choose_map_genes",
    "example_slides",
    "fit_map_model",
    "heatmap_png",
    "load_map_model",
    "map_model_path",
    "save_map_model",
    "tile_mosaic",
    "tile_predictions",
]
