"""The one registry of the tables the platform writes: name, stage, what it holds, its columns.

Every name here is a Parquet table under ``tables/`` (``<name>.parquet``, or one file per slide
under ``<name>/`` when ``partitioned``), a view of the same name in the DuckDB catalog, and the
key of the Dagster asset that writes it. Column descriptions feed ``dagster/column_schema``;
the types come from the data as written. A test checks that what the pipeline writes is
registered here and that the catalog's views are asset keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

CATALOG_DATABASE = "gtex"  # the DuckDB file gtex.duckdb: views are gtex.main.<name>

# Columns that mean the same thing in every table.
COMMON: dict[str, str] = {
    "tissue_sample_id": "GTEx Tissue Sample ID (GTEX-<donor>-<sample>), the slide's id",
    "subject_id": "GTEx donor id (GTEX-<donor>)",
    "tissue": "Tissue (the portal's Tissue column / SMTSD)",
    "aliquot_id": "RNA-seq aliquot id (GCT column)",
    "model_id": "Image model: a fine-tuned checkpoint (<backbone>-ft-eNNN-<run>) or an "
    "off-the-shelf backbone",
    "run_id": "Training run (hash of the trajectory config and the data)",
    "gene_id": "Ensembl gene id (versioned, as in the GCT)",
    "gene": "Ensembl gene id (versioned, as in the GCT)",
    "symbol": "HGNC gene symbol",
    "x": "Tile's left edge in level-0 pixels",
    "y": "Tile's top edge in level-0 pixels",
    "level": "Pyramid level the tile was read from",
    "tile_size": "Tile edge in pixels as written (covers footprint_px level-0 pixels)",
    "path": "File path under the data root",
    "split": "Donor-level split: train or test",
    "status": "ok, or why not (quarantined, error ...)",
    "reason": "Why the status is not ok (names the fix)",
    "params_hash": "Hash of the parameters that produced the row (changed params re-run)",
    "content_hash": "Hash of the input content (unchanged input is not recomputed)",
    "epoch": "Training epoch (1-based)",
    "seconds": "Wall time in seconds",
    "vector": "Embedding vector (float32)",
    "row_id": "Stable row id (<model_id>/<tile or slide id>)",
    "cluster": "k-means cluster of the slide embedding",
    "fold": "Cross-validation fold",
    "rank": "Rank (1 = best)",
}


@dataclass(frozen=True)
class Table:
    name: str
    stage: str  # the lib/defs folder that writes it
    description: str
    columns: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    partitioned: bool = False  # one Parquet file per slide under tables/<name>/


def _t(name: str, stage: str, description: str, columns: dict[str, str | None], **kw) -> Table:
    cols = {c: d or COMMON.get(c, "") for c, d in columns.items()}
    return Table(name, stage, description, MappingProxyType(cols), **kw)


def _c(*names: str, **described: str) -> dict[str, str | None]:
    """Column list: shared names take COMMON's description, the rest their own."""
    return {**dict.fromkeys(names), **described}


_ANNOT = _c(
    "tissue_sample_id",
    "tissue",
    "subject_id",
    sex="Donor sex",
    age_bracket="Donor age bracket (e.g. 60-69)",
    hardy_scale="Hardy scale death classification",
    pathology_categories="Pathologist's categories (comma-separated)",
    pathology_notes="Pathologist's free-text notes",
)

_TABLES = (
    # ingest
    _t("histology_annotations", "ingest", "The portal histology CSV, one row per slide", _ANNOT),
    _t(
        "histology_rejected_rows",
        "ingest",
        "Rows of GTEx Portal.csv left out (malformed/repeated id, empty tissue, donor mismatch)",
        _c(
            "tissue",
            "reason",
            line="Line number in GTEx Portal.csv (1 = header)",
            raw_id="The row's Tissue Sample ID as written (never used as a path)",
        ),  # fmt: skip
    ),
    _t(
        "sample_attributes",
        "ingest",
        "RNA-seq aliquot -> tissue sample -> tissue",
        _c(
            "aliquot_id",
            "tissue_sample_id",
            "subject_id",
            smts="Tissue type (SMTS)",
            smtsd="Tissue detail (SMTSD)",
        ),  # fmt: skip
    ),
    _t(
        "selected_slides",
        "ingest",
        "SPEC §1 selection: slides per tissue, those with RNA-seq first",
        {
            **_ANNOT,
            "has_rna": "The sample has RNA-seq in the GCT",
            "rank_in_tissue": "Selection order within the tissue",
        },  # fmt: skip
    ),
    _t(
        "raw_slides",
        "slides",
        "Per slide: fetched and opened, its geometry and MPP, or quarantined with the reason",
        _c(
            "tissue_sample_id",
            "tissue",
            "status",
            "reason",
            "path",
            source_version="Version of the source file (ETag/size+mtime)",
            width="Level-0 width (px)",
            height="Level-0 height (px)",
            mpp_x="Microns per pixel, x (by the MPP policy: see mpp_source)",
            mpp_y="Microns per pixel, y",
            mpp_source="Where the MPP came from: description, override or fallback",
            description_mpp="MPP in the slide's own description (null: none)",
            magnification="Objective magnification (AppMag)",
            levels="Pyramid levels",
            level_downsamples="Downsample of each level",
            channels="Colour channels",
            file_bytes="Slide file size",
            fetched_at="When the slide was fetched",
        ),  # fmt: skip
        partitioned=True,
    ),
    # expression
    _t(
        "expression_genes",
        "expression",
        "SPEC §5: every GCT gene with its statistics, kept or why dropped",
        _c(
            "gene_id",
            "symbol",
            max_log_tpm="Max log2(1+TPM) over samples",
            mean_log_tpm="Mean log2(1+TPM)",
            std_log_tpm="Std of log2(1+TPM)",
            kept="Passes all four filters",
            drop_reason="First filter that dropped it",
            name_problem="Why the symbol is non-standard",
            matrix_index="Column in log_tpm.npy (kept genes)",
        ),  # fmt: skip
    ),
    _t(
        "expression_samples",
        "expression",
        "GCT samples: aliquot -> tissue sample -> tissue; sample_index = matrix row",
        _c(
            "aliquot_id",
            "tissue_sample_id",
            "subject_id",
            "tissue",
            smts="Tissue type",
            has_slide="A slide exists for the sample",
            sample_index="Row in log_tpm.npy",
        ),  # fmt: skip
    ),
    _t(
        "expression_matrix",
        "expression",
        "Gene-major log-TPM matrix for SQL (one list per gene, indexed by sample_index + 1)",
        _c(
            "gene_id",
            "symbol",
            matrix_index="Column in log_tpm.npy",
            log_tpm="log2(1+TPM) of every sample",
        ),  # fmt: skip
    ),
    # tiles
    _t(
        "slide_tiles",
        "tiles",
        "SPEC §2: every tile over tissue with its measured values",
        _c(
            "tissue_sample_id",
            "tissue",
            "x",
            "y",
            "level",
            "tile_size",
            "path",
            "status",
            "params_hash",
            error="Decoder error naming the stored tile",
            jpeg_bytes="Tile JPEG size",
            tissue_fraction="Share of tissue pixels",
            min_piece_std="Lowest colour std over the tile's pieces",
            std_r="Std of red",
            std_g="Std of green",
            std_b="Std of blue",
            mean_r="Mean red",
            mean_g="Mean green",
            mean_b="Mean blue",
            read_px="Pixels read per tile side at the read level (resized to tile_size if not equal)",
            footprint_px="Tile side in level-0 pixels (tile_size x target_mpp / slide MPP)",
            mpp="Microns per pixel of the written tile",
        ),  # fmt: skip
        partitioned=True,
    ),
    _t(
        "tiling_status",
        "tiles",
        "One row per slide: how tiling went (mask, counts, errors, reader)",
        _c(
            "tissue_sample_id",
            "tissue",
            "status",
            "reason",
            "params_hash",
            "seconds",
            slide_path="Slide file",
            width="Level-0 width",
            height="Level-0 height",
            n_grid_tiles="Tiles in the full grid",
            n_tissue_tiles="Grid tiles over tissue",
            n_tiles="Tiles written",
            n_errors="Tiles that could not be read",
            mask_source="Level/thumbnail the tissue mask came from",
            mask_downsample="Downsample of the mask",
            mask_threshold="Otsu threshold",
            reader="Slide reader used",
            slide_mpp="The slide's MPP (raw_slides, by the MPP policy)",
            mpp="Microns per pixel of its tiles",
            read_level="Pyramid level the tiles were read from",
            read_px="Pixels read per tile side at that level",
            footprint_px="Tile side in level-0 pixels",
            tiled_at="When tiled",
        ),  # fmt: skip
        partitioned=True,
    ),
    _t(
        "filtered_tiles",
        "tiles",
        "SPEC §3: a verdict per tile after the size, half-empty and dirt filters",
        _c(
            "tissue_sample_id",
            "tissue",
            "x",
            "y",
            "path",
            verdict="kept, or the filter that removed the tile",
            size_threshold="JPEG size threshold of the tile's tissue",
            filter_hash="Hash of the thresholds that judged the tile",
        ),  # fmt: skip
        partitioned=True,
    ),
    _t(
        "balanced_tile_sample",
        "tiles",
        "SPEC §4: tiles per slide (small tissues topped up), seeded, with the donor split",
        _c(
            "tissue_sample_id",
            "subject_id",
            "tissue",
            "x",
            "y",
            "level",
            "tile_size",
            "path",
            "split",
            tile_id="Tile id (<slide>/<x>_<y>)",
        ),  # fmt: skip
    ),
    _t(
        "donor_split",
        "tiles",
        "Donor-level train/test split (no donor on both sides)",
        _c(
            "subject_id",
            "split",
            n_slides="The donor's slides",
            n_tiles="The donor's sampled tiles",
            tissues="The donor's tissues",
        ),  # fmt: skip
    ),
    # model
    _t(
        "classifier_epochs",
        "model",
        "Per-epoch train/test metrics of every training run",
        _c(
            "run_id",
            "model_id",
            "epoch",
            "seconds",
            train_loss="Train cross-entropy",
            train_acc="Train tile accuracy",
            test_loss="Test cross-entropy",
            test_acc="Test tile accuracy",
            test_balanced_acc="Test balanced accuracy",
            test_macro_f1="Test macro F1",
            slide_test_acc="Test slide accuracy (mean probs)",
            lr="Learning rate",
        ),  # fmt: skip
    ),
    _t(
        "classifier_checkpoints",
        "model",
        "Kept checkpoints; exactly one is selected over all runs (the model of record)",
        _c(
            "run_id",
            "model_id",
            "epoch",
            "path",
            backbone="Backbone architecture",
            card_path="JSON model card",
            selected="The checkpoint downstream stages use",
            test_acc="Test tile accuracy",
            slide_test_acc="Test slide accuracy",
        ),  # fmt: skip
    ),
    _t(
        "classifier_confusion",
        "model",
        "Tile- and slide-level test confusion of every checkpoint",
        _c(
            "run_id",
            "model_id",
            "epoch",
            level="tile or slide",
            true_tissue="Label",
            pred_tissue="Prediction",
            count="Tiles or slides",
        ),  # fmt: skip
    ),
    _t(
        "classifier_sweep",
        "model",
        "Learning-rate x backbone sweep on the same split and seed",
        _c(
            "epoch",
            sweep_id="Sweep id",
            backbone="Backbone",
            lr="Learning rate",
            weights_source="Where the initial weights came from",
        ),  # fmt: skip
    ),
    # embeddings
    _t(
        "tile_embeddings",
        "embeddings",
        "SPEC §7: pooled tile features per model (also in LanceDB)",
        _c(
            "row_id",
            "model_id",
            "tissue_sample_id",
            "subject_id",
            "tissue",
            "x",
            "y",
            "level",
            "tile_size",
            "split",
            "path",
            "content_hash",
            "vector",
            tile_id="Tile id",
            sampled="In the balanced sample",
            precision="Numeric precision of the engine",
        ),  # fmt: skip
        partitioned=True,
    ),
    _t(
        "slide_embeddings",
        "embeddings",
        "SPEC §7: mean of a slide's tile embeddings per model, with its k-means cluster",
        _c(
            "row_id",
            "model_id",
            "tissue_sample_id",
            "subject_id",
            "tissue",
            "split",
            "cluster",
            "content_hash",
            "vector",
            n_tiles="Tiles averaged",
        ),  # fmt: skip
    ),
    _t(
        "embedding_models",
        "embeddings",
        "Every model that embedded tiles: fine-tuned checkpoints and off-the-shelf backbones",
        _c(
            "model_id",
            "path",
            "epoch",
            "run_id",
            kind="finetuned or off_the_shelf",
            backbone="Architecture",
            weights="Weights source",
            input_size="Input pixels",
            selected="The classifier's selected checkpoint",
            fingerprint="Hash of the weights",
            encoder="timm encoder config string (backbones.parse_encoder); empty for torchvision",
            feature_dim="The model's own feature width (stored vectors are zero-padded to the "
            "widest model's; the first feature_dim values are the model's)",
            normalization="Input normalisation the model applies (imagenet, or its mean/std)",
        ),  # fmt: skip
    ),
    # analysis
    _t(
        "tile_gene_predictions",
        "analysis",
        "SPEC §8 spatial maps: each stored tile's predicted log TPM of the mapped genes, "
        "ȳ_tissue + (x_tile − x̄_tissue)·β_gene (ridge on slide embeddings, tissue fixed effects, "
        "gene_r2's per-gene λ); the mean over a slide's sampled tiles is its prediction",
        _c(
            "tissue_sample_id",
            "x",
            "y",
            "tile_size",
            "gene",
            "symbol",
            "model_id",
            sampled="In the balanced sample (these average to the slide's prediction)",
            predicted_log_tpm="The tile's predicted log2(1 + TPM)",
        ),  # fmt: skip
    ),
    _t(
        "projection_coords",
        "analysis",
        "2-D coordinates of tiles/slides/expression/joint views (PCA, UMAP, t-SNE)",
        _c(
            "model_id",
            "tissue",
            view="tiles, slides, expression or joint",
            sample_id="Tile or sample id",
            method="pca, umap or tsne",
            x="First coordinate",
            y="Second coordinate",
        ),  # fmt: skip
    ),
    _t(
        "joint_pca",
        "analysis",
        "SPEC §7 joint PCA: the selected model's slide-embedding PCs and the expression PCs of "
        "the samples with both (long: one row per sample, block and component)",
        _c(
            "tissue_sample_id",
            "subject_id",
            "tissue",
            "model_id",
            block="image (PCA of the slide embeddings) or expression (PCA of log TPM)",
            component="Principal component (1-based) within the block",
            score="The sample's score on that component",
        ),  # fmt: skip
    ),
    _t(
        "projection_silhouettes",
        "analysis",
        "Tissue silhouette of each view and space (do clusters sharpen with training?)",
        _c(
            "model_id",
            "epoch",
            view="Which view",
            checkpoint="Checkpoint label",
            space="pca or the 2-D method",
            silhouette="Silhouette by tissue",
            n_samples="Points",
            n_labels="Tissues",
        ),  # fmt: skip
    ),
    _t(
        "gene_r2",
        "analysis",
        "SPEC §8: per-gene R² of expression from the image (the reported model), both views: "
        "across tissues and within tissue, each with Pearson r, the no-image baseline and a "
        "donor-bootstrap CI",
        _c(
            "gene",
            "symbol",
            "model_id",
            r2="R² of the ranking view (= r2_within by default, r2_across with "
            "tissue_strata off); what rank and the model choice use",
            pearson_r="Pearson r of the ranking view",
            alpha="Ridge penalty of the ranking view: lower median over outer folds of the "
            "per-fold inner-CV choice",
            rank="Rank by r2 (1 = best; NaN genes last)",
            r2_baseline="No-image baseline of the ranking view (= r2_within_baseline or "
            "r2_across_baseline)",
            r2_across="Across tissues: 1 - Σ(y - ŷ)² / Σ(y - ȳ)² over all held-out slides, "
            "ȳ the overall mean; out-of-fold predictions of ridge with one intercept (no tissue "
            "term) pooled over the outer donor folds",
            r2_across_ci_low="Lower end of the 95 % donor-bootstrap percentile interval of "
            "r2_across (donors resampled, predictions fixed)",
            r2_across_ci_high="Upper end of that interval",
            pearson_r_across="Pearson r of held-out predictions vs logTPM over all slides",
            r2_across_baseline="r2_across of the no-image predictor: each held-out slide "
            "predicted by the training folds' overall mean (below 0)",
            r2_across_tissue_only="r2_across of the tissue-only predictor (training folds' "
            "tissue means): what knowing the tissue alone explains",
            rank_across="Rank by r2_across (1 = best)",
            r2_within="Within tissue: 1 - Σ(y - ŷ)² / Σ(y - ȳ_tissue)², ȳ_tissue the tissue "
            "mean; ridge with tissue fixed effects (X and Y centred within tissue in each "
            "training fold), same slides and folds as r2_across",
            r2_within_ci_low="Lower end of the 95 % donor-bootstrap percentile interval of "
            "r2_within",
            r2_within_ci_high="Upper end of that interval",
            pearson_r_within="Pearson r of held-out predictions vs logTPM, each centred by "
            "its tissue mean",
            r2_within_baseline="r2_within of the no-image predictor (training folds' tissue "
            "means; below 0)",
            rank_within="Rank by r2_within (1 = best)",
            n_slides="Slides both views rest on (tissues with < 3 donors left out of both)",
            n_donors="Donors both views rest on",
        ),  # fmt: skip
    ),
    _t(
        "gene_r2_by_model",
        "analysis",
        "gene_r2 for every embedded model on the same folds",
        _c(
            "gene",
            "symbol",
            "rank",
            "model_id",
            r2="Cross-validated R²",
            pearson_r="Pearson r",
            alpha="Ridge penalty",
            r2_baseline="No-image baseline R²",
        ),  # fmt: skip
    ),
    _t(
        "gene_r2_models",
        "analysis",
        "One row per model: how much expression its embeddings explain; the reported one",
        _c(
            "model_id",
            "epoch",
            kind="finetuned or off_the_shelf",
            mean_r2="Mean R²",
            sum_positive_r2="Sum of positive R²",
            median_r2="Median R²",
            **{"genes_r2_above_0.1": "Genes with R² > 0.1"},
            top_r2="Best gene's R²",
            planted_recall_at_k="Planted image genes in the top k (generated mirrors)",
            reported="The model gene_r2 reports",
        ),  # fmt: skip
    ),
    _t(
        "gene_r2_folds",
        "analysis",
        "The donor folds gene_r2 used (tissue-stratified)",
        _c("tissue_sample_id", "subject_id", "tissue", "fold", "model_id"),
    ),
    _t(
        "cluster_members",
        "analysis",
        "Slides per cluster and their distance to the centroid",
        _c(
            "model_id",
            "tissue_sample_id",
            "subject_id",
            "tissue",
            "cluster",
            fit_id="Clustering fit",
            distance="Distance to the centroid",
        ),  # fmt: skip
    ),
    _t(
        "cluster_transcriptomes",
        "analysis",
        "Each cluster's mean transcriptome (long: one row per cluster and gene)",
        _c(
            "model_id",
            "cluster",
            "gene_id",
            "symbol",
            fit_id="Clustering fit",
            n_slides="Slides in the cluster",
            majority_tissue="Most common tissue",
            log_tpm="Mean log2(1+TPM)",
        ),  # fmt: skip
    ),
    _t(
        "cluster_transcriptome_r2",
        "analysis",
        "Per-gene R² of the nearest-cluster transcriptome beside gene_r2's ridge",
        _c(
            "gene",
            "symbol",
            r2_ridge="Ridge R²",
            r2_cluster="Cluster-mean R²",
            pearson_ridge="Ridge Pearson r",
            pearson_cluster="Cluster Pearson r",
            delta_r2="r2_cluster - r2_ridge",
            rank_ridge="Rank by ridge R²",
        ),  # fmt: skip
    ),
    _t(
        "cluster_centroids",
        "analysis",
        "Cluster centroids served from LanceDB for new-slide lookup",
        _c("model_id", "cluster", "vector"),
    ),
    _t(
        "feature_comparison_accuracy",
        "analysis",
        "Li et al. 2022: per-repeat tissue accuracy of feature sets A and B",
        _c(
            repeat="CV repeat",
            accuracy_a="Accuracy with A",
            accuracy_b="Accuracy with B",
            model_a="Feature set A",
            model_b="Feature set B",
        ),  # fmt: skip
    ),
    _t(
        "feature_comparison_genes",
        "analysis",
        "Li et al. 2022: per-gene R² of A vs B over repeats with paired tests, for every pair "
        "of compared feature sets",
        _c(
            "gene",
            "symbol",
            model_a="Feature set A of the pair",
            model_b="Feature set B of the pair (the later arm, e.g. fine-tuned)",
            r2_a_mean="Mean R² with A",
            r2_b_mean="Mean R² with B",
            r2_a_sd="Sd over repeats (A)",
            r2_b_sd="Sd over repeats (B)",
            delta_mean="Mean R² difference B - A",
            frac_repeats_b_better="Share of repeats where B beats A",
            p_wilcoxon="Paired Wilcoxon signed-rank p",
            q_wilcoxon="BH q of p_wilcoxon",
            p_ttest="Paired t-test p",
            p_corrected="Corrected resampled t-test p",
            q_corrected="BH q of p_corrected",
            p_assoc_a="p of R² > 0 with A",
            q_assoc_a="BH q",
            p_assoc_b="p of R² > 0 with B",
            q_assoc_b="BH q",
            significant="Significant after BH",
            improved="B significantly better",
        ),  # fmt: skip
    ),
)

TABLES: MappingProxyType = MappingProxyType({t.name: t for t in _TABLES})


def table(name: str) -> Table:
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(f"table {name!r} is not in core/tables.py's registry") from None


def column_descriptions(name: str) -> dict[str, str]:
    """Column -> description for a table (shared names described even if unregistered)."""
    own = dict(TABLES[name].columns) if name in TABLES else {}
    return {**COMMON, **{c: d for c, d in own.items() if d}}
