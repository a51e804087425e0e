"""Materialise `gene_log_tpm` on the generated mirror: the planted filter truth, the sample
mapping, the outputs and their atomic replacement when a run fails."""

import gzip
import json

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from gtex_assets.defs.expression.assets import gene_log_tpm
from gtex_assets.defs.ingest.assets import gtex_histology_annotations, gtex_sample_attributes
from gtex_assets.lib.expression.log_tpm import ExpressionPaths, load_log_tpm
from gtex_assets.lib.expression.plots import PLOT_FILES
from gtex_assets.lib.ingest.sources import GENE_TPM_GCT
from gtex_assets.resources import DataLakeResource, GTExSourceResource


def _resources(root, mirror):
    return {
        "lake": DataLakeResource(root=str(root)),
        "gtex_source": GTExSourceResource(source=str(mirror)),
    }


@pytest.fixture(scope="module")
def materialised(tmp_path_factory, tiny_mirror):
    root = tmp_path_factory.mktemp("expr_root")
    r = dg.materialize(
        [gtex_histology_annotations, gtex_sample_attributes, gene_log_tpm],
        resources=_resources(root, tiny_mirror),
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert r.success
    return root, r


def _gct_frame(mirror) -> pd.DataFrame:
    with gzip.open(mirror / GENE_TPM_GCT, "rt") as f:
        return pd.read_csv(f, sep="\t", skiprows=2)


def test_kept_genes_match_the_planted_truth(materialised, tiny_mirror):
    root, _ = materialised
    truth = json.loads((tiny_mirror / "truth" / "summary.json").read_text())["expression_filters"]
    genes = pd.read_parquet(ExpressionPaths.under(root).genes)
    assert len(genes) == 300
    assert set(genes.loc[genes["kept"], "gene_id"]) == set(truth["expected_kept"])
    reason = genes.set_index("gene_id")["drop_reason"]
    assert set(reason[truth["planted"]["lowly"]]) == {"lowly_expressed"}
    assert set(reason[truth["planted"]["nonvariable"]]) == {"non_variable"}
    assert set(reason[truth["planted"]["nonstandard"]]) == {"nonstandard_name"}
    # RNA-family labels (Y_RNA, U6, ...) are non-standard as well as repeated (the first
    # failing rule is the reason); HGNC-style repeated symbols (SNORA70) are duplicates.
    assert set(reason[truth["planted"]["duplicate"]]) <= {"nonstandard_name", "duplicate_name"}


def test_matrix_values_and_sample_mapping(materialised, tiny_mirror):
    root, _ = materialised
    x, genes, samples = load_log_tpm(root)
    df = _gct_frame(tiny_mirror)
    aliquots = list(df.columns[2:])
    assert samples["aliquot_id"].tolist() == aliquots
    assert x.shape == (len(aliquots), len(genes)) and x.dtype == np.float32
    tpm = df.set_index("Name").loc[genes["gene_id"], aliquots].to_numpy(np.float64)
    np.testing.assert_allclose(np.asarray(x), np.log2(1 + tpm).T, rtol=0, atol=1e-6)

    attrs = pd.read_parquet(root / "tables" / "sample_attributes.parquet").set_index("aliquot_id")
    ann = pd.read_parquet(root / "tables" / "histology_annotations.parquet")
    for _, s in samples.iterrows():
        assert s["tissue_sample_id"] == "-".join(s["aliquot_id"].split("-")[:3])
        assert s["tissue"] == attrs.loc[s["aliquot_id"], "smtsd"]
        assert s["has_slide"] == (s["tissue_sample_id"] in set(ann["tissue_sample_id"]))
    assert samples["has_slide"].any() and not samples["has_slide"].all()  # extra RNA-only samples


def test_metadata_counts_and_plots(materialised):
    root, r = materialised
    md = r.asset_materializations_for_node("gene_log_tpm")[0].metadata
    genes = pd.read_parquet(ExpressionPaths.under(root).genes)
    assert md["genes_in"].value == 300
    assert md["genes_kept"].value == int(genes["kept"].sum())
    assert md["genes_in"].value >= md["after_expression"].value >= md["after_variance"].value
    assert md["after_variance"].value >= md["after_name"].value >= md["genes_kept"].value
    assert md["after_expression"].value == int(
        (genes["drop_reason"].fillna("") != "lowly_expressed").sum()
    )
    assert "duplicate_name" in md["filter_funnel"].value
    for name in PLOT_FILES.values():
        png = root / "plots" / name
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert md["plot_max_log_tpm"].value.startswith(
        "![expression_max_log_tpm.png](data:image/png;base64,"
    )


def test_failed_run_leaves_previous_outputs(materialised, tmp_path, tiny_mirror):
    root, _ = materialised
    paths = ExpressionPaths.under(root)
    before = {p: p.read_bytes() for p in paths.all()}
    bad = tmp_path / "bad_mirror"
    bad.mkdir()
    raw = (tiny_mirror / GENE_TPM_GCT).read_bytes()
    (bad / GENE_TPM_GCT).write_bytes(raw[: len(raw) * 2 // 3])  # a truncated download
    r = dg.materialize(
        [gene_log_tpm],
        resources=_resources(root, bad),
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    assert not r.success
    failure = next(e for e in r.all_events if e.is_step_failure)
    err = failure.step_failure_data.error
    text = err.message + "".join(c.message for c in [err.cause] if c is not None)
    assert "truncated gzip stream" in text and GENE_TPM_GCT in text and "last complete line" in text
    assert {p: p.read_bytes() for p in paths.all()} == before
    # Raised to the caller as a Dagster failure whose description is the parser's message.
    with pytest.raises(dg.Failure, match="truncated gzip stream"):
        dg.materialize(
            [gene_log_tpm], resources=_resources(root, bad), instance=dg.DagsterInstance.ephemeral()
        )
    assert {p: p.read_bytes() for p in paths.all()} == before


def test_data_version_is_the_gct_version(materialised, tiny_mirror):
    """Automation compares it with the GCT source asset's observed version."""
    from gtex_assets.lib.ingest.sources import GTExSource, Kind

    _, r = materialised
    mat = r.asset_materializations_for_node("gene_log_tpm")[0]
    assert mat.tags["dagster/data_version"] == GTExSource(str(tiny_mirror)).version(Kind.GCT)
