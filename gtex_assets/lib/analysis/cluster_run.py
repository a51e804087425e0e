"""One run of the SPEC §8 cluster-average transcriptome: the held-out evaluation on gene_r2's
donor folds (nearest centroid found through LanceDB, as served) and the predictor fitted on
every paired slide, with the tables it serves. Dagster-free; the asset writes what this returns."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from gtex_assets.core.errors import InputError
from gtex_assets.lib.analysis import cluster_transcriptome as CP
from gtex_assets.lib.embeddings.vector_store import VectorStore

METHODS = ("kmeans", "agglomerative")
R2_TABLE = "cluster_transcriptome_r2"
TRANSCRIPTOMES_TABLE = "cluster_transcriptomes"  # served: the clusters' mean transcriptomes
MEMBERS_TABLE = "cluster_members"  # served: the final fit's slides and their cluster


@dataclass(frozen=True)
class ClusterParams:
    """SPEC defaults of cluster_transcriptome (its Config takes them from here)."""

    n_clusters: int = 20  # capped at the training slides
    n_components: int = 40  # PCA of the embeddings before clustering
    method: str = "kmeans"
    tissue_strata: bool = True  # within-tissue R², like gene_r2's ranking view
    random_state: int = 0


@dataclass(frozen=True)
class ClusterRun:
    r2: pd.DataFrame  # per gene: ridge vs cluster R²
    evaluation: CP.ClusterEvalResult
    final: CP.ClusterPredictor
    fit_id: str
    card: dict
    summary: pd.DataFrame  # per cluster
    transcriptomes: pd.DataFrame
    members: pd.DataFrame
    centroids: object  # pyarrow table for LanceDB


def eval_rows(slides: pd.DataFrame, folds: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(mask of ``slides`` in gene_r2's folds, their fold ids in that order). gene_r2 may have
    left out rare tissues; a slide of the folds table that is no longer paired means the inputs
    changed since gene_r2 ran."""
    rows = slides["tissue_sample_id"].isin(set(folds["tissue_sample_id"])).to_numpy()
    f = slides.loc[rows, ["tissue_sample_id"]].merge(folds, on="tissue_sample_id", how="left")
    if f["fold"].isna().any() or len(f) != len(folds):
        raise InputError(
            "gene_r2_folds", "slides or expression changed since gene_r2", "re-materialise gene_r2"
        )
    return rows, f["fold"].to_numpy(dtype=np.int64)


def run_cluster_transcriptome(
    F: np.ndarray,
    Y: np.ndarray,
    slides: pd.DataFrame,
    folds: pd.DataFrame,
    ridge: pd.DataFrame,
    gene_ids: list[str],
    symbols: list[str],
    model_id: str,
    params: ClusterParams,
) -> ClusterRun:
    """(1) held-out donors on gene_r2's folds and slides, each fold's centroids in a throwaway
    LanceDB table searched as lookups are; (2) the served predictor on every paired slide."""
    if params.method not in METHODS:
        raise InputError(
            "cluster_transcriptome config", f"method {params.method!r}", f"use one of {METHODS}"
        )
    rows, fold_ids = eval_rows(slides, folds)
    ev_slides = slides[rows].reset_index(drop=True)
    fit_kw = {"n_components": params.n_components, "method": params.method}
    strata = ev_slides["tissue"].astype(str).to_numpy() if params.tissue_strata else None
    with tempfile.TemporaryDirectory(prefix="gtex_cluster_cv_") as tmp:
        ev = CP.evaluate_cluster_predictor(
            F[rows], Y[rows], ev_slides["subject_id"].astype(str).to_numpy(),
            n_clusters=params.n_clusters, folds=fold_ids, random_state=params.random_state,
            strata=strata, nearest_factory=CP.lancedb_nearest_factory(VectorStore(Path(tmp) / "lancedb"), model_id),
            **fit_kw,
        )  # fmt: skip
    table = CP.compare_gene_r2(ridge, ev, gene_ids)
    final = CP.fit_cluster_predictor(
        F, Y, params.n_clusters, random_state=params.random_state, **fit_kw
    )
    fp = {"model_id": model_id, "n_clusters": params.n_clusters, "random_state": params.random_state,
          **fit_kw, "samples": slides["tissue_sample_id"].astype(str).tolist(), "genes": gene_ids}  # fmt: skip
    fit_id = CP.fit_fingerprint(final, fp)
    summary = CP.cluster_summary(final, slides["tissue"].astype(str).to_numpy())
    card = {k: v for k, v in fp.items() if k not in ("samples", "genes")}
    card.update(fit_id=fit_id, n_slides=len(slides), n_genes=len(gene_ids), dim=int(F.shape[1]),
                space_dim=int(final.centroids.shape[1]), clusters=int(final.n_clusters))  # fmt: skip
    cents = CP.centroid_table(
        model_id, final.centroids, fit_id=fit_id,
        n_slides=summary["n_slides"], majority_tissue=summary["majority_tissue"],
    )  # fmt: skip
    tx = CP.transcriptome_table(final, gene_ids, symbols, summary, model_id=model_id, fit_id=fit_id)
    members = CP.member_table(final, slides, model_id=model_id, fit_id=fit_id)
    return ClusterRun(table, ev, final, fit_id, card, summary, tx, members, cents)


def merge_models(
    old: pd.DataFrame | None, new: pd.DataFrame, model_id: str, drop: list[str]
) -> pd.DataFrame:
    """``new`` rows for ``model_id`` + the other models' rows of ``old`` (minus ``drop``): one
    served table holds every model's latest fit. An older layout is replaced by this fit."""
    if old is None or "model_id" not in old.columns or list(old.columns) != list(new.columns):
        return new
    old = old[~old["model_id"].isin([model_id, *drop])]
    return pd.concat([old, new], ignore_index=True) if len(old) else new


def evaluation_summary(run: ClusterRun) -> dict:
    """The held-out comparison's headline numbers (plain values)."""
    t, ev = run.r2, run.evaluation
    return {
        "median_r2_cluster": float(np.nanmedian(t["r2_cluster"])),
        "median_r2_ridge": float(np.nanmedian(t["r2_ridge"])),
        "median_delta_r2": float(np.nanmedian(t["delta_r2"])),
        "genes_cluster_better": int((t["delta_r2"] > 0).sum()),
        "median_sample_r": float(np.nanmedian(ev.sample_r)),
        "nearest_lookup": "LanceDB (exact L2 scan of each fold's centroids, the served search)",
        "held_out_assignments": len(ev.clusters),
        "assignments_agree_exact": int(ev.n_agree_exact),
    }
