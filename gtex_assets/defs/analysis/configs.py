"""Run config of the analysis group. Defaults come from the lib dataclasses (SPEC §7–8), so the
UI's defaults and the library's are one source of truth."""

import dataclasses

import dagster as dg
from pydantic import Field

from gtex_assets.lib.analysis.cluster_run import ClusterParams
from gtex_assets.lib.analysis.feature_comparison import ComparisonParams
from gtex_assets.lib.analysis.gene_r2 import GeneR2Params
from gtex_assets.lib.analysis.views import ViewParams

_G = GeneR2Params()


class GeneR2Config(dg.Config):
    features: str = Field(default=_G.features, description="'raw' slide embeddings or their 'pcs'")
    n_pcs: int = Field(default=_G.n_pcs, description="PCA components with features='pcs'")
    alphas: list[float] = Field(
        default=list(_G.alphas), description="Ridge λ grid (inner CV per gene)"
    )
    n_splits: int = Field(
        default=_G.n_splits, description="Outer donor folds (lowered for few donors)"
    )
    inner_splits: int = Field(
        default=_G.inner_splits, description="Inner donor folds (lowered for few donors)"
    )
    tissue_strata: bool = Field(
        default=_G.tissue_strata,
        description="Rank genes (r2, rank) and choose the model by r2_within (tissue fixed "
        "effects); off: by r2_across. Both views are always in the table",
    )
    model: str = Field(
        default=_G.model,
        description="'best': every embedded model on the same donor folds, the one explaining the "
        "most held-out variance (sum over genes of max(R², 0)) is reported (all in gene_r2_by_model); "
        "'selected': the classifier's selected checkpoint only; or a model_id",
    )
    kernel: str = Field(
        default=_G.kernel,
        description="'linear' (ridge) or 'rbf' (kernel ridge: a non-linear model, same CV)",
    )
    top_n: int = Field(default=_G.top_n, description="Top genes shown in the metadata")
    n_boot: int = Field(default=_G.n_boot, description="Donor-bootstrap replicates of the CIs")
    ci_level: float = Field(default=_G.ci_level, description="Confidence level of the CIs")
    random_state: int = Field(
        default=_G.random_state, description="Seed of the folds and bootstrap"
    )

    def params(self) -> GeneR2Params:
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(GeneR2Params)}
        return GeneR2Params(**{**kw, "alphas": tuple(self.alphas)})


_V = ViewParams()


class EmbeddingViewsConfig(dg.Config):
    n_components: int = Field(
        default=_V.n_components,
        description="PCA components before the 2-D maps (and of each joint PCA block)",
    )
    methods: list[str] = Field(
        default=list(_V.methods),
        description="2-D methods after PCA ('umap', 'tsne'); [] = PCA only",
    )
    tiles: bool = Field(default=_V.tiles, description="Also view tile embeddings (subsampled)")
    tiles_per_slide: int = Field(
        default=_V.tiles_per_slide, description="Tiles drawn per slide and model"
    )
    max_points: int = Field(
        default=_V.max_points, description="Most points per 2-D map (label-stratified subset)"
    )
    max_iter: int = Field(
        default=_V.max_iter,
        description="t-SNE iterations (>= 250) / UMAP epochs; 0 = library default",
    )
    selected_model_id: str = Field(default="", description="Override the selected checkpoint")
    random_state: int = Field(
        default=_V.random_state, description="Seed of PCA / UMAP / t-SNE / subsampling"
    )

    def params(self) -> ViewParams:
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(ViewParams)}
        return ViewParams(**{**kw, "methods": tuple(self.methods)})


class JointPCAConfig(dg.Config):
    n_components: int = Field(
        default=_V.n_components, description="PCs of each block (image, expression)"
    )
    selected_model_id: str = Field(default="", description="Override the selected checkpoint")
    random_state: int = Field(default=_V.random_state, description="Seed of the PCAs")


_C = ClusterParams()


class ClusterTranscriptomeConfig(dg.Config):
    n_clusters: int = Field(
        default=_C.n_clusters, description="k-means clusters (capped at training slides)"
    )
    n_components: int = Field(
        default=_C.n_components, description="PCA of the embeddings before clustering"
    )
    method: str = Field(default=_C.method, description="'kmeans' or 'agglomerative'")
    tissue_strata: bool = Field(
        default=_C.tissue_strata,
        description="Report within-tissue R² (as gene_r2's ranking view), for a like-for-like",
    )
    random_state: int = Field(default=_C.random_state, description="Seed of k-means")

    def params(self) -> ClusterParams:
        return ClusterParams(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(ClusterParams)}
        )


_F = ComparisonParams()


class FeatureComparisonConfig(dg.Config):
    n_splits: int = Field(
        default=_F.n_splits, description="Donor folds per repeat (lowered for few donors)"
    )
    inner_splits: int = Field(default=_F.inner_splits, description="Inner donor folds of the ridge")
    n_repeats: int = Field(default=_F.n_repeats, description="CV repeats (Li et al. 2022 used 50)")
    tissue_strata: bool = Field(
        default=_F.tissue_strata, description="Within-tissue expression task (tissue fixed effects)"
    )
    classifier_pcs: int = Field(
        default=_F.classifier_pcs,
        description="PCA components before the tissue classifier (0 = none)",
    )
    fdr: float = Field(default=_F.fdr, description="BH FDR for 'significant' genes")
    selected_model_id: str = Field(
        default=_F.selected_model_id, description="Override the fine-tuned model"
    )
    off_the_shelf_model_id: str = Field(
        default=_F.off_the_shelf_model_id, description="Override the off-the-shelf model"
    )
    random_state: int = Field(
        default=_F.random_state, description="Seed of the repeats' donor shuffles"
    )
    arms: list[str] = Field(
        default=list(_F.arms),
        description="Models compared pairwise (e.g. the ImageNet backbone, a pathology "
        "encoder, the fine-tuned checkpoint); empty = every off-the-shelf model embedded and "
        "the selected fine-tuned one",
    )

    def params(self) -> ComparisonParams:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(ComparisonParams)}
        return ComparisonParams(**{**values, "arms": tuple(values["arms"])})
