"""SPEC §5 filters, the name rule, the sample table, and the outputs (atomic, SQL-queryable)."""

import gzip
import json

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pytest

from gtex_assets.lib.expression.gct import GCTError
from gtex_assets.lib.expression.log_tpm import (
    GENE_VIEW_SQL,
    HIST_EDGES,
    ExpressionParams,
    ExpressionPaths,
    base_gene_id,
    build_sample_table,
    duplicate_mask,
    filter_gct,
    load_log_tpm,
    name_problem,
    write_outputs,
)
from gtex_assets.lib.expression.plots import (
    plot_max_log_tpm,
    plot_std_log_tpm,
    plot_value_distribution,
)

ALIQUOTS = [
    "GTEX-1117F-0226-SM-5GZZ7",
    "GTEX-1117F-0426-SM-5EGHI",
    "GTEX-111CU-0126-SM-5GZWZ",
    "GTEX-111CU-0326-SM-5GZXO",
    "K-562-SM-26GMQ",  # not a GTEx tissue aliquot
]

# (gene id, symbol, TPMs, expected drop reason or None = kept)
GENES = [
    ("ENSG00000075624.13", "ACTB", [0, 100, 500, 2000, 40], None),
    ("ENSG00000000001.1", "LOWGENE", [0, 1, 10, 31, 3], "lowly_expressed"),  # max = exactly 5
    ("ENSG00000000002.1", "ALMOST", [0, 1, 10, 31.1, 3], None),  # max just above 5
    ("ENSG00000000003.1", "FLAT1", [100, 101, 99, 100, 100], "non_variable"),
    ("ENSG00000243485.5", "RP11-34P13.3", [0, 50, 500, 5, 0], "nonstandard_name"),
    ("ENSG00000000005.1", "AC012345.1", [0, 50, 500, 5, 0], "nonstandard_name"),
    ("ENSG00000000006.1", "Y_RNA", [0, 50, 500, 5, 0], "nonstandard_name"),
    ("ENSG00000000007.1", "hsa-mir-1253", [0, 50, 500, 5, 0], "nonstandard_name"),
    ("ENSG00000000008.1", "DUPA", [0, 50, 500, 5, 0], "duplicate_name"),
    ("ENSG00000000009.2", "DUPA", [1, 60, 400, 5, 0], "duplicate_name"),
    ("ENSG00000000010.1", "DUPB", [0, 0, 1, 0, 0], "lowly_expressed"),  # its twin is expressed,
    ("ENSG00000000011.1", "DUPB", [0, 50, 500, 5, 0], "duplicate_name"),  # still both go
    ("ENSG00000002586.18", "CD99", [30, 200, 80, 400, 10], None),
    ("ENSG00000002586.18_PAR_Y", "CD99", [0, 0, 0, 0, 0], "lowly_expressed"),
    ("ENSG00000000013.1", "C1orf112", [5, 50, 0.5, 70, 1], None),
    ("ENSG00000196126.10", "HLA-DRB1", [900, 20, 300, 0.25, 4], None),
    ("ENSG00000000015.1", "NOTVAR", [33, 33, 33, 33, 32], "non_variable"),
]
KEPT = [g for g, _, _, r in GENES if r is None]


def gct(genes=GENES, samples=ALIQUOTS) -> str:
    lines = ["#1.2", f"{len(genes)}\t{len(samples)}", "\t".join(["Name", "Description", *samples])]
    lines += ["\t".join([g, s, *(f"{v:g}" for v in tpm)]) for g, s, tpm, _ in genes]
    return "\n".join(lines) + "\n"


@pytest.fixture
def gct_path(tmp_path):
    p = tmp_path / "tpm.gct.gz"
    p.write_bytes(gzip.compress(gct().encode()))
    return p


def _log(tpm) -> np.ndarray:
    return np.log2(1 + np.asarray(tpm, dtype=np.float64))


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "symbol,problem",
    [
        ("ACTB", None),
        ("C1orf112", None),
        ("CXorf21", None),
        ("HLA-DRB1", None),
        ("MT-ND1", None),
        ("KRTAP5-AS1", None),
        ("LINC00115", None),
        ("MIR1302-2HG", None),
        ("SNORA70", None),
        ("SNORD3A", None),
        ("RNU6-1", None),
        ("", "empty"),
        ("  ", "empty"),
        ("RP11-34P13.3", "clone-based"),
        ("AC012345.1", "clone-based"),
        ("AL627309.1", "clone-based"),
        ("CTD-2588J6.1", "clone-based"),
        ("AC012345", "clone-based"),
        ("RP11-34P13", "clone-based"),
        ("XXbac-B461K10", "clone-based"),
        ("Y_RNA", "RNA family"),
        ("U6", "RNA family"),
        ("U6atac", "RNA family"),
        ("7SK", "RNA family"),
        ("Metazoa_SRP", "RNA family"),
        ("5S_rRNA", "RNA family"),
        ("snoU13", "RNA family"),
        ("Vault", "RNA family"),
        ("uc_338", "RNA family"),
        ("hsa-mir-1253", "not HGNC-like"),
        ("Actb", "not HGNC-like"),
        ("IGHV1-12_1", "not HGNC-like"),
        ("1-Mar", "not HGNC-like"),
    ],
)
def test_name_rule(symbol, problem):
    assert name_problem(symbol) == problem


def test_duplicate_rule_counts_ensembl_genes_not_rows_and_par_y():
    ids = ["ENSG1.1", "ENSG2.1", "ENSG3.1", "ENSG3.1_PAR_Y", "ENSG4.2", "ENSG5.1_PAR_Y", "ENSG6.1"]
    syms = ["A", "A", "CD99", "CD99", "B", "LONELY", "C"]
    assert duplicate_mask(ids, syms).tolist() == [True, True, False, True, False, False, False]
    assert base_gene_id("ENSG00000002586.18_PAR_Y") == "ENSG00000002586"


# ----------------------------------------------------------------------------- filters


def test_exact_kept_set_and_drop_reasons(gct_path):
    res = filter_gct(gct_path, workers=2, block_bytes=64)
    g = res.genes.to_pandas()
    assert g["gene_id"].tolist() == [x[0] for x in GENES]
    assert g.loc[g["kept"], "gene_id"].tolist() == KEPT
    reasons = [None if pd.isna(r) else r for r in g["drop_reason"]]
    assert reasons == [r for _, _, _, r in GENES]
    assert res.kept_matrix().shape == (len(ALIQUOTS), len(KEPT))


def test_counts_funnel(gct_path):
    c = filter_gct(gct_path).counts
    assert (
        c["genes_in"],
        c["after_expression"],
        c["after_variance"],
        c["after_name"],
        c["kept"],
    ) == (
        17,
        14,
        12,
        8,
        len(KEPT),
    )
    assert c["dropped_lowly_expressed"] == 3 and c["dropped_non_variable"] == 2
    assert c["dropped_nonstandard_name"] == 4 and c["dropped_duplicate_name"] == 3
    assert c["samples"] == len(ALIQUOTS)


def test_log_values_max_std_and_matrix(gct_path):
    res = filter_gct(gct_path)
    tpm = {gid: t for gid, _, t, _ in GENES}
    g = res.genes.to_pandas().set_index("gene_id")
    for gid, t in tpm.items():
        assert g.loc[gid, "max_log_tpm"] == pytest.approx(_log(t).max(), abs=1e-6)
        assert g.loc[gid, "std_log_tpm"] == pytest.approx(_log(t).std(ddof=1), abs=1e-6)
        assert g.loc[gid, "mean_log_tpm"] == pytest.approx(_log(t).mean(), abs=1e-6)
    x = res.kept_matrix()
    assert x.shape == (5, len(KEPT)) == res.shape and x.dtype == np.float32
    expect = np.stack([_log(tpm[gid]) for gid in KEPT], axis=1)
    np.testing.assert_allclose(x, expect, rtol=0, atol=1e-6)
    assert g.loc[KEPT, "matrix_index"].tolist() == list(range(len(KEPT)))
    assert g["matrix_index"].isna().sum() == len(GENES) - len(KEPT)


def test_log_precision_over_the_tpm_range(tmp_path):
    tpm = [0, 1e-4, 0.01234, 0.5, 1, 3.14159, 31, 1234.5, 99999, 1e6]
    p = tmp_path / "r.gct"
    samples = [f"S{i}" for i in range(len(tpm))]
    p.write_text(gct([("G1.1", "ACTB", tpm, None)], samples))
    res = filter_gct(p)
    np.testing.assert_allclose(res.kept_matrix()[:, 0], _log(tpm), rtol=0, atol=1e-6)


def test_thresholds_and_name_switches(gct_path):
    res = filter_gct(gct_path, ExpressionParams(min_max_log_tpm=4.9, min_std=0.0))
    kept = set(res.genes.to_pandas().loc[res.genes.to_pandas()["kept"], "gene_id"])
    assert {"ENSG00000000001.1", "ENSG00000000003.1", "ENSG00000000015.1"} <= kept
    res = filter_gct(
        gct_path, ExpressionParams(drop_nonstandard_names=False, drop_duplicate_names=False)
    )
    kept = res.genes.to_pandas().loc[res.genes.to_pandas()["kept"], "symbol"].tolist()
    assert {"RP11-34P13.3", "Y_RNA", "hsa-mir-1253", "DUPA"} <= set(kept)
    assert kept.count("DUPA") == 2


def test_value_histograms_count_every_value(gct_path):
    res = filter_gct(gct_path)
    assert res.hist_before.sum() == len(GENES) * 5
    assert res.hist_after.sum() == len(KEPT) * 5
    all_logs = np.concatenate([_log(t) for _, _, t, _ in GENES])
    assert res.hist_before[0] == (all_logs == 0).sum()
    assert len(res.hist_before) == len(HIST_EDGES)  # zero bin + one per edge interval


def test_bad_input_is_a_gct_error(tmp_path):
    p = tmp_path / "bad.gct"
    p.write_text(gct().replace("\t2000\t", "\t-2000\t"))
    with pytest.raises(
        GCTError,
        match=r"line 4, column 6 \(sample GTEX-111CU-0326-SM-5GZXO\): negative value '-2000'",
    ):
        filter_gct(p)


# ----------------------------------------------------------------------------- samples


def test_sample_table_maps_aliquots_to_samples_and_tissues():
    attrs = pd.DataFrame(
        {
            "aliquot_id": ALIQUOTS[:3],
            "smts": ["Lung", "Liver", ""],
            "smtsd": ["Lung", "Liver", ""],
        }
    )
    ann = pd.DataFrame(
        {
            "tissue_sample_id": ["GTEX-111CU-0126", "GTEX-111CU-0326", "GTEX-9999X-0001"],
            "tissue": ["Thyroid", "Spleen", "Lung"],
        }
    )
    s = build_sample_table(ALIQUOTS, pl.from_pandas(attrs), pl.from_pandas(ann)).to_pandas()
    assert s["aliquot_id"].tolist() == ALIQUOTS
    assert s["tissue_sample_id"].tolist()[:4] == [
        "GTEX-1117F-0226",
        "GTEX-1117F-0426",
        "GTEX-111CU-0126",
        "GTEX-111CU-0326",
    ]
    assert pd.isna(s["tissue_sample_id"].iloc[4])
    assert s["subject_id"].tolist()[:4] == ["GTEX-1117F"] * 2 + ["GTEX-111CU"] * 2
    # SMTSD first; empty/missing SMTSD falls back to the histology annotation.
    assert s["tissue"].tolist()[:4] == ["Lung", "Liver", "Thyroid", "Spleen"]
    assert pd.isna(s["tissue"].iloc[4])
    assert s["has_slide"].tolist() == [False, False, True, True, False]
    assert s["sample_index"].tolist() == [0, 1, 2, 3, 4]
    bare = build_sample_table(ALIQUOTS).to_pandas()
    assert bare["tissue"].isna().all() and bare["has_slide"].isna().all()


# ----------------------------------------------------------------------------- outputs


def _write(res, root, **kw):
    return write_outputs(res, build_sample_table(res.sample_ids), root, source_version="v1", **kw)


def test_outputs_npy_tables_manifest_and_load(gct_path, tmp_path):
    res = filter_gct(gct_path)
    root = tmp_path / "root"
    manifest = _write(res, root)
    paths = ExpressionPaths.under(root)
    x = np.load(paths.matrix_npy, mmap_mode="r")
    assert x.shape == (5, len(KEPT)) and x.dtype == np.float32 and x.flags.f_contiguous
    np.testing.assert_array_equal(np.asarray(x), res.kept_matrix())
    genes = pd.read_parquet(paths.genes)
    assert set(genes.columns) >= {
        "gene_id",
        "symbol",
        "max_log_tpm",
        "std_log_tpm",
        "kept",
        "drop_reason",
    }
    assert len(genes) == len(GENES) and genes["kept"].sum() == len(KEPT)
    on_disk = json.loads(paths.manifest.read_text())
    assert on_disk["shape"] == [5, len(KEPT)] == manifest["shape"]
    assert on_disk["params"]["min_max_log_tpm"] == 5.0 and on_disk["source_version"] == "v1"
    m, kept_genes, samples = load_log_tpm(root)
    assert kept_genes["gene_id"].tolist() == KEPT and samples["aliquot_id"].tolist() == ALIQUOTS
    np.testing.assert_array_equal(np.asarray(m), res.kept_matrix())


def test_duckdb_long_view_answers_one_gene_across_samples(gct_path, tmp_path):
    res = filter_gct(gct_path)
    attrs = pd.DataFrame(
        {
            "aliquot_id": ALIQUOTS[:4],
            "smts": ["Lung"] * 2 + ["Liver"] * 2,
            "smtsd": ["Lung"] * 2 + ["Liver"] * 2,
        }
    )
    samples = build_sample_table(res.sample_ids, pl.from_pandas(attrs))
    root = tmp_path / "root"
    write_outputs(res, samples, root)
    paths = ExpressionPaths.under(root)
    mat = pd.read_parquet(paths.matrix_parquet)
    assert mat["gene_id"].tolist() == KEPT
    np.testing.assert_array_equal(np.stack(mat["log_tpm"].to_list()), res.kept_matrix().T)
    con = duckdb.connect()
    con.execute(
        f"CREATE VIEW expression_matrix AS SELECT * FROM read_parquet('{paths.matrix_parquet}')"
    )
    con.execute(f"CREATE VIEW expression_samples AS SELECT * FROM read_parquet('{paths.samples}')")
    con.execute(f"CREATE VIEW gene_expression AS {GENE_VIEW_SQL}")
    rows = con.execute(
        "SELECT aliquot_id, tissue_sample_id, tissue, log_tpm FROM gene_expression "
        "WHERE symbol = 'HLA-DRB1' ORDER BY aliquot_id"
    ).fetchall()
    tpm = dict(zip(ALIQUOTS, GENES[15][2], strict=True))
    assert [r[0] for r in rows] == sorted(ALIQUOTS)
    tissues = {ALIQUOTS[0]: "Lung", ALIQUOTS[1]: "Lung", ALIQUOTS[2]: "Liver", ALIQUOTS[3]: "Liver"}
    for aliquot, tsid, tissue, value in rows:
        assert value == pytest.approx(np.log2(1 + tpm[aliquot]), abs=1e-6)
        assert tissue == tissues.get(aliquot)
        assert tsid == (aliquot[:15] if aliquot.startswith("GTEX") else None)
    by_tissue = dict(
        con.execute(
            "SELECT tissue, round(avg(log_tpm), 4) FROM gene_expression WHERE symbol = 'ACTB' "
            "AND tissue IS NOT NULL GROUP BY tissue"
        ).fetchall()
    )
    assert by_tissue == {
        "Lung": round(float(np.mean(_log([0, 100]))), 4),
        "Liver": round(float(np.mean(_log([500, 2000]))), 4),
    }
    n = con.execute("SELECT count(*) FROM gene_expression").fetchone()[0]
    assert n == len(KEPT) * len(ALIQUOTS)


def test_failed_write_leaves_previous_outputs_intact(gct_path, tmp_path):
    root = tmp_path / "root"
    first = filter_gct(gct_path)
    _write(first, root)
    paths = ExpressionPaths.under(root)
    before = {p: p.read_bytes() for p in paths.all()}

    second = filter_gct(gct_path, ExpressionParams(min_max_log_tpm=1.0))
    assert second.n_kept != first.n_kept

    def boom(path):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _write(second, root, extra_files={root / "plots" / "x.png": boom})
    assert {p: p.read_bytes() for p in paths.all()} == before
    leftovers = [p for p in root.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]
    assert leftovers == []
    assert not (root / "plots" / "x.png").exists()

    _write(second, root)  # a complete write replaces the whole set
    assert np.load(paths.matrix_npy).shape == second.shape
    assert json.loads(paths.manifest.read_text())["shape"] == list(second.shape)


def test_sample_table_must_match_the_matrix(gct_path, tmp_path):
    res = filter_gct(gct_path)
    with pytest.raises(ValueError, match="sample order"):
        write_outputs(res, build_sample_table(res.sample_ids[::-1]), tmp_path)


def test_plots_are_pngs(gct_path, tmp_path):
    res = filter_gct(gct_path)
    g = res.genes.to_pandas()
    paths = [
        plot_max_log_tpm(g["max_log_tpm"], 5.0, tmp_path / "a.png"),
        plot_std_log_tpm(g["std_log_tpm"], g["max_log_tpm"] > 5, 0.5, tmp_path / "b.png"),
        plot_value_distribution(
            HIST_EDGES, res.hist_before, res.hist_after, (17, 5), (5, 5), tmp_path / "c.png"
        ),
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_row_store_runs_across_slabs():
    from gtex_assets.lib.expression.log_tpm import RowStore

    store = RowStore(3, slab_bytes=4 * 3 * 4)  # 4 rows per slab
    values = np.arange(30, dtype=np.float32).reshape(10, 3)
    store.append(values, np.array([0, 2, 3, 5, 6]))
    store.append(values, np.array([7, 8, 9]))
    assert store.n_rows == 8 and len(store.slabs) == 2
    keep = np.array([True, True, False, True, True, True, False, True])
    runs = store.runs(keep)
    assert [r.tolist() for r, _ in runs] == [[0, 1], [3], [4, 5], [7]]
    got = np.concatenate([v for _, v in runs])
    np.testing.assert_array_equal(got, values[[0, 2, 5, 6, 7, 9]])
    assert all(v.base is not None for _, v in runs)  # views into the slabs, not copies


def test_no_gene_kept_still_writes_consistent_outputs(tmp_path):
    p = tmp_path / "low.gct"
    p.write_text(gct([g for g in GENES if g[3] == "lowly_expressed"]))
    res = filter_gct(p)
    assert res.n_kept == 0 and res.counts["genes_in"] == 3
    _write(res, tmp_path / "root")
    x, genes, samples = load_log_tpm(tmp_path / "root")
    assert x.shape == (len(ALIQUOTS), 0) and len(genes) == 0 and len(samples) == len(ALIQUOTS)


def _colour_columns(png, rgb, tol=40):
    """Column indices (x) of pixels close to ``rgb`` in a PNG."""
    from PIL import Image

    a = np.asarray(Image.open(png).convert("RGB")).astype(int)
    near = np.abs(a - np.array(rgb)).sum(axis=2) < tol
    return np.flatnonzero(near.any(axis=0)), int(near.sum())


def test_max_log_tpm_plot_draws_the_bars_and_the_threshold_where_they_belong(tmp_path):
    """Content, not only a PNG: the blue bars are drawn, and the red threshold line moves right
    when the threshold does."""
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 10, 2000)
    cols = {}
    for t in (2.0, 8.0):
        png = plot_max_log_tpm(values, t, tmp_path / f"t{t}.png")
        red_x, red_n = _colour_columns(png, (0xC4, 0x4E, 0x52))
        _, blue_n = _colour_columns(png, (0x4C, 0x72, 0xB0))
        assert blue_n > 5000 and red_n > 100
        cols[t] = np.median(red_x)
    assert cols[8.0] - cols[2.0] > 150  # 6 logTPM units apart on a ~600 px axis
