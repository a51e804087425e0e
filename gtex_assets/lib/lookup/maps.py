"""A spatial map of one gene for a new slide file (`gtex-assets nearest --slide FILE --map GENE`).

The slide is tiled with the project's tiler and quality filters (every kept tile up to
``max_tiles``), each tile embedded with the map model's embedding model, and each tile's
predicted log TPM computed by the map model that `tile_gene_predictions` saved
(:mod:`gtex_assets.lib.analysis.maps`). The tissue fixed effect needs the slide's tissue: given,
or the majority tissue of its nearest stored slides.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from gtex_assets.lib.analysis import maps as MP
from gtex_assets.lib.embeddings.vector_store import SLIDE_TABLE, VectorStore, sql_str
from gtex_assets.lib.lookup.nearest import (
    NearestError,
    _Embedders,
    _lake,
    _stored_precision,
    slide_file_tile_frame,
    store_width_vector,
)

DEFAULT_MAP_TILES = 5000  # every kept tile of a GTEx slide (a few thousand at 448 px)


@dataclass
class SlideMap:
    query: dict[str, Any]
    tiles: pl.DataFrame  # x, y, tile_size, predicted_log_tpm
    png: Path


def map_models(models_dir: Path) -> list[str]:
    d = Path(models_dir) / MP.MAP_DIR
    return sorted(p.stem for p in d.glob("*.npz")) if d.is_dir() else []


def _majority_tissue(store: VectorStore, model_id: str, vec: np.ndarray, k: int = 10) -> str | None:
    if not store.has_table(SLIDE_TABLE):
        return None
    hits = store.search(SLIDE_TABLE, vec, k=k, where=f"model_id = {sql_str(model_id)}",
                        columns=["tissue"])  # fmt: skip
    top = Counter(hits["tissue"].dropna()).most_common(1)
    return top[0][0] if top else None


def slide_map(
    slide: str | Path,
    gene: str,
    out: str | Path,
    *,
    model_id: str | None = None,
    tissue: str | None = None,
    data_root: str | Path | None = None,
    max_tiles: int = DEFAULT_MAP_TILES,
    device: str = "auto",
) -> SlideMap:
    """Tile, embed and map ``gene`` over a slide file; writes the heatmap PNG to ``out``."""
    lk = _lake(data_root)
    have = map_models(lk.models)
    if not have:
        raise NearestError(
            f"no map models under {lk.models / MP.MAP_DIR}: materialise `tile_gene_predictions` "
            "(after gene_r2)"
        )
    mid = model_id or (have[0] if len(have) == 1 else None)
    if mid is None or mid not in have:
        raise NearestError(f"model {model_id!r}: maps exist for {', '.join(have)}; pass --model-id")
    try:
        model = MP.load_map_model(MP.map_model_path(lk.models, mid))
        col = model.gene_index(gene)
    except (FileNotFoundError, ValueError) as e:
        raise NearestError(str(e)) from e
    store = VectorStore(lk.lancedb)
    emb = _Embedders(lk, mid, device, _stored_precision(store, mid))
    with tempfile.TemporaryDirectory(prefix="gtex_map_") as tmp:
        frame, how = slide_file_tile_frame(slide, Path(tmp), max_tiles, "")
        feats, ok = emb.get().embed_paths(list(frame["path"]), skip_errors=True)
        if not ok.any():
            raise NearestError(f"slide file {slide}: no tile could be embedded")
        tiles = pl.from_pandas(frame[ok].reset_index(drop=True))
        vecs = store_width_vector(store, feats)
        slide_tissue = tissue or _majority_tissue(store, mid, vecs.mean(0))
        pred = model.predict(vecs, slide_tissue)[:, col]
        tiles = tiles.with_columns(predicted_log_tpm=pl.Series(pred.astype(np.float32)))
        sym = model.symbols[col]
        note = (f"{len(tiles)} kept tiles of the slide ({how}); tissue effect: "
                f"{slide_tissue or 'overall mean (tissue unknown)'}")  # fmt: skip
        png = MP.heatmap_png(tiles, pred, Path(out), note=note,
                             title=f"{sym} predicted from {mid}\n{Path(slide).name}")  # fmt: skip
    query = {"kind": "slide_file", "slide": str(slide), "model_id": mid, "gene": model.genes[col],
             "symbol": sym, "tissue": slide_tissue, "n_tiles": len(tiles), "how": how,
             "slide_prediction": float(pred.mean()), "png": str(png)}  # fmt: skip
    return SlideMap(query, tiles.drop("path"), png)


__all__ = ["DEFAULT_MAP_TILES", "SlideMap", "map_models", "slide_map"]
