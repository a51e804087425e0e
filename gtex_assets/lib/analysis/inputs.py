"""The analysis stage's inputs: slide embeddings per model, joined to the logTPM matrix on
``tissue_sample_id``; the planted truth of a generated mirror."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pyarrow.parquet as pq

from gtex_assets.core.errors import InputError
from gtex_assets.core.lake import Lake
from gtex_assets.lib.analysis.projection import align_samples
from gtex_assets.lib.analysis.selection import model_table
from gtex_assets.lib.embeddings import vector_store as V
from gtex_assets.lib.expression.log_tpm import load_log_tpm

SLIDE_TABLE = "slide_embeddings"
MODELS_TABLE = "embedding_models"
CHECKPOINTS_TABLE = "classifier_checkpoints"
TRUTH_LINKED = "truth/image_linked_genes.csv"


@dataclass(frozen=True)
class Slides:
    """One model's slide embeddings: metadata rows and the aligned vectors."""

    model_id: str
    meta: pd.DataFrame  # tissue_sample_id, subject_id, tissue, ...
    vectors: np.ndarray


@dataclass(frozen=True)
class Expression:
    X: np.ndarray  # samples × genes logTPM (memory-mapped)
    genes: pd.DataFrame  # gene_id, symbol, ...
    samples: pd.DataFrame  # aliquot_id, tissue_sample_id, subject_id, tissue, sample_index

    @property
    def gene_ids(self) -> list[str]:
        return self.genes["gene_id"].astype(str).tolist()

    @property
    def symbols(self) -> list[str]:
        return self.genes["symbol"].astype(str).tolist()


def read_slides(lk: Lake) -> tuple[pd.DataFrame, np.ndarray]:
    """Every model's slide rows (metadata) and their vectors (float64)."""
    path = lk.table(SLIDE_TABLE)
    if not path.is_file():
        raise InputError(str(path), "is missing", "materialise slide_embeddings first")
    tbl = pq.read_table(path)
    meta = tbl.drop_columns([V.VECTOR]).to_pandas()
    return meta, V.arrow_to_vectors(tbl.column(V.VECTOR)).astype(np.float64)


def read_models(lk: Lake, model_ids: list[str]) -> pl.DataFrame:
    """``selection.model_table`` from the lake's model cards and checkpoints."""
    cards, ck = lk.table(MODELS_TABLE), lk.table(CHECKPOINTS_TABLE)
    return model_table(
        model_ids,
        pl.read_parquet(cards) if cards.is_file() else None,
        pl.read_parquet(ck) if ck.is_file() else None,
    )


def model_slides(meta: pd.DataFrame, vec: np.ndarray, model_id: str) -> Slides:
    idx = np.flatnonzero((meta["model_id"] == model_id).to_numpy())
    m = meta.iloc[idx].reset_index(drop=True)
    if m["tissue_sample_id"].duplicated().any():
        dup = m.loc[m["tissue_sample_id"].duplicated(), "tissue_sample_id"].iloc[0]
        raise InputError("slide_embeddings", f"{model_id} has {dup!r} twice")
    return Slides(model_id, m, vec[idx])


def aligned(slides: Slides, sample_ids: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(vectors of ``slides`` in the order of ``sample_ids``, mask of the ids it has)."""
    pos = pd.Index(slides.meta["tissue_sample_id"].astype(str)).get_indexer(sample_ids.astype(str))
    return slides.vectors[pos[pos >= 0]], pos >= 0


def read_expression(lk: Lake) -> Expression:
    try:
        return Expression(*load_log_tpm(lk.root))
    except FileNotFoundError as e:
        raise InputError("gene_log_tpm", str(e), "materialise gene_log_tpm first") from e


def paired(slides: Slides, expr: Expression) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Rows of the slide embeddings with expression: (features, logTPM, slide meta)."""
    s = expr.samples.dropna(subset=["tissue_sample_id"]).drop_duplicates("tissue_sample_id")
    ids, ia, ib = align_samples(slides.meta["tissue_sample_id"].astype(str), s["tissue_sample_id"])
    if len(ids) == 0:
        raise InputError(
            "slide_embeddings × gene_log_tpm",
            f"no slide of {slides.model_id} has expression (no shared tissue_sample_id)",
        )
    rows = s["sample_index"].to_numpy()[ib]
    order = np.argsort(rows, kind="stable")  # ascending rows: friendlier to the memory map
    ia, rows = ia[order], rows[order]
    Y = np.asarray(expr.X[rows], dtype=np.float64)
    meta = slides.meta.iloc[ia].reset_index(drop=True)
    bad = meta["tissue"].isna() | meta["subject_id"].isna()
    if bad.any():
        raise InputError(
            "slide_embeddings",
            f"{meta.loc[bad, 'tissue_sample_id'].iloc[0]!r} has no tissue/subject_id",
        )
    return slides.vectors[ia], Y, meta


def candidate_features(
    meta: pd.DataFrame, vec: np.ndarray, first: str, slides: pd.DataFrame, all_models: bool
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Features of ``first`` and (``all_models``) of every other model that embedded all of
    ``slides``, aligned with them: (model_id → features, models skipped for missing slides)."""
    out, skipped = {}, []
    others = sorted(set(meta["model_id"]) - {first}) if all_models else []
    for m in [first, *others]:
        vecs, has = aligned(model_slides(meta, vec, m), slides["tissue_sample_id"])
        if not has.all():
            if m == first:
                raise InputError("slide_embeddings", f"{m} lacks {int((~has).sum())} slide(s)")
            skipped.append(f"{m} ({int((~has).sum())} slide(s) not embedded)")
            continue
        out[m] = vecs
    return out, skipped


def planted_genes(mirror_dir: Path | None) -> list[str] | None:
    """The generator's image-linked genes of a local generated mirror (None elsewhere)."""
    if mirror_dir is None:
        return None
    p = Path(mirror_dir) / TRUTH_LINKED
    return pl.read_csv(p)["gene_id"].cast(pl.String).to_list() if p.is_file() else None
