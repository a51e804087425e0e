"""Run config of the analysis group. Defaults come from the lib dataclasses (SPEC §7–8), so the
UI's defaults and the library's are one source of truth."""

import dataclasses

import dagster as dg
from pydantic import Field

from gtex_assets.lib.analysis.gene_r2 import GeneR2Params

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
