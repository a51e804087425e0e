"""lib.nearest.predict_transcriptome + `gtex-assets nearest SAMPLE --transcriptome` on the
analysis assets' planted inputs (42 slides, 60 genes; no image pipeline, no model loading)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from gtex_assets.cli.nearest import add_nearest_subcommand
from gtex_assets.core.lake import Lake
from gtex_assets.lib.embeddings import vector_store as V
from gtex_assets.lib.expression.log_tpm import load_log_tpm
from gtex_assets.lib.lookup.nearest import NearestError, predict_transcriptome
from gtex_assets_tests.defs import test_analysis_assets as fx

SID = "GTEX-03E9-1126"  # donor 1's second tissue in the planted inputs


def _store_slides(root) -> None:
    """What slide_embeddings does besides the Parquet file: the LanceDB slide table."""
    lk = Lake.at(root)
    V.VectorStore(lk.lancedb).overwrite(V.SLIDE_TABLE, pq.read_table(lk.table(V.SLIDE_TABLE)))


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    base = tmp_path_factory.mktemp("clustered")
    root, mirror = base / "data", base / "mirror"
    fx._write_inputs(root, mirror)
    _store_slides(root)
    result = fx.materialize_clusters(root, mirror)
    assert result.success
    return root


def _run_cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gtex-assets")
    add_nearest_subcommand(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.fn(args)


def test_stored_sample_gets_its_clusters_mean_transcriptome(clustered):
    lk = Lake.at(clustered)
    members = pd.read_parquet(lk.table("cluster_members"))
    X, genes, samples = load_log_tpm(clustered)
    row = samples.set_index("tissue_sample_id")["sample_index"]
    for sid in members["tissue_sample_id"].iloc[::7]:
        res = predict_transcriptome(sid, data_root=clustered)
        q = res.query
        assert q["model_id"] == fx.E5 and q["source"] == "stored slide embedding"
        own = int(members.set_index("tissue_sample_id").loc[sid, "cluster"])
        assert q["cluster"] == own and q["member"] is True and q["member_of_cluster"] == own
        ids = members[members["cluster"] == own]["tissue_sample_id"]
        assert q["n_slides"] == len(ids)
        want = np.asarray(X[row.loc[ids].to_numpy()], dtype=np.float64).mean(0)
        tx = res.transcriptome
        assert list(tx.columns) == ["gene_id", "symbol", "log_tpm"] and len(tx) == fx.N_GENES
        assert tx["gene_id"].tolist() == genes["gene_id"].tolist()
        np.testing.assert_allclose(tx["log_tpm"], want, rtol=1e-5)
        # distance = Euclidean distance to the cluster centroid in the PCA space
        d = members.set_index("tissue_sample_id").loc[sid, "distance"]
        assert q["distance"] == pytest.approx(d, rel=1e-3, abs=1e-4)
    top = res.top(5)
    assert top["rank"].tolist() == [1, 2, 3, 4, 5] and top["log_tpm"].is_monotonic_decreasing
    assert top["log_tpm"].iloc[0] == pytest.approx(res.transcriptome["log_tpm"].max())


def test_clear_errors_without_clusters_or_for_a_model_without_them(clustered, tmp_path):
    with pytest.raises(NearestError, match="has no clusters.*model='run1-e01'"):
        predict_transcriptome(SID, model_id=fx.E1, data_root=clustered)
    root, mirror = tmp_path / "data", tmp_path / "mirror"
    fx._write_inputs(root, mirror)
    _store_slides(root)
    with pytest.raises(NearestError, match="materialise the `cluster_transcriptome` asset"):
        predict_transcriptome(SID, data_root=root)
    with pytest.raises(ValueError, match="exactly one"):
        predict_transcriptome(SID, tile="x.jpg", data_root=clustered)


def test_cli_transcriptome_table_json_and_out(clustered, capsys, tmp_path):
    root = str(clustered)
    sid = SID
    assert _run_cli(["nearest", sid, "--transcriptome", "--top", "4", "--data-root", root]) == 0
    out = capsys.readouterr().out
    assert f"query: sample {sid}" in out and "nearest cluster" in out
    assert f"top 4 of {fx.N_GENES} genes" in out and "own expression is in the mean" in out
    header = next(line for line in out.splitlines() if line.strip("| ").startswith("rank"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "rank",
        "gene_id",
        "symbol",
        "log_tpm",
    ]
    assert sum(1 for line in out.splitlines() if line.startswith("|")) == 2 + 4

    csv = tmp_path / "tx.csv"
    argv = ["nearest", sid, "--transcriptome", "--json", "--out", str(csv), "--data-root", root]
    assert _run_cli(argv) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["query"]["sample_id"] == sid and payload["query"]["model_id"] == fx.E5
    assert {"cluster", "n_slides", "majority_tissue", "distance"} <= set(payload["query"])
    tx = pd.DataFrame(payload["transcriptome"])
    assert len(tx) == fx.N_GENES and list(tx.columns) == ["gene_id", "symbol", "log_tpm"]
    direct = predict_transcriptome(sid, data_root=clustered).transcriptome
    np.testing.assert_allclose(tx["log_tpm"], direct["log_tpm"])
    np.testing.assert_allclose(pd.read_csv(csv)["log_tpm"], direct["log_tpm"], rtol=1e-6)
    pq_out = tmp_path / "tx.parquet"
    argv = ["nearest", sid, "--transcriptome", "--out", str(pq_out), "--data-root", root]
    assert _run_cli(argv) == 0
    assert f"wrote {fx.N_GENES} genes to {pq_out}" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_parquet(pq_out), direct)

    argv = ["nearest", sid, "--transcriptome", "--model-id", fx.OTS, "--data-root", root]
    assert _run_cli(argv) == 2
    assert "has no clusters" in capsys.readouterr().err
    assert _run_cli(["nearest", sid, "--transcriptome", "--tiles", "--data-root", root]) == 2
    assert _run_cli(["nearest", sid, "--out", "x.txt", "--data-root", root]) == 2
    assert "--out needs --transcriptome" in capsys.readouterr().err
