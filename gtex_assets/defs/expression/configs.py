"""Run config of the expression group; defaults from ``ExpressionParams`` (SPEC §5)."""

import dagster as dg
from pydantic import Field

from gtex_assets.lib.expression.log_tpm import ExpressionParams

_P = ExpressionParams()


class GeneLogTpmConfig(dg.Config):
    """SPEC §5 thresholds and the name rules; the parser's parallelism."""

    min_max_log_tpm: float = Field(
        default=_P.min_max_log_tpm, description="Keep genes with logTPM above this in >= 1 sample"
    )
    min_std: float = Field(default=_P.min_std, description="Keep genes with logTPM std above this")
    drop_nonstandard_names: bool = Field(
        default=_P.drop_nonstandard_names,
        description="Drop clone-based / RNA-family / non-HGNC-style symbols",
    )
    drop_duplicate_names: bool = Field(
        default=_P.drop_duplicate_names,
        description="Drop every gene whose symbol names more than one Ensembl gene",
    )
    n_workers: int = Field(default=2, description="Parse threads (one more thread decompresses)")

    def params(self) -> ExpressionParams:
        return ExpressionParams(
            min_max_log_tpm=self.min_max_log_tpm,
            min_std=self.min_std,
            drop_nonstandard_names=self.drop_nonstandard_names,
            drop_duplicate_names=self.drop_duplicate_names,
        )
