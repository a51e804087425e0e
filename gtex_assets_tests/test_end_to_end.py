"""The whole pipeline in one go on a tiny generated mirror, as `gtex-assets demo` runs it; the
DuckDB catalog then answers every view and every query the README lists."""

import re

import duckdb
import pytest

from gtex_assets.cli.runner import REPO_ROOT, materialize_all

FAST = {
    "ops": {
        "tissue_classifier": {
            "config": {
                "backbone": "efficientnet_lite0", "weights": "package", "input_size": 64,
                "epochs": 5, "batch_size": 16, "lr": 0.001, "checkpoint_epochs": [1, 5],
            }
        },
        "embedding_views": {"config": {"methods": ["tsne"], "max_iter": 250}},
        "feature_comparison": {"config": {"n_repeats": 2}},
    }
}  # fmt: skip


def readme_queries() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("### Ten useful queries", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sql\n(.*?)\n```", section, flags=re.S)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    import os

    from gtex_assets.lib.synth import generate_mirror

    mirror = tmp_path_factory.mktemp("e2e_mirror")
    root = tmp_path_factory.mktemp("e2e_root")
    generate_mirror(
        mirror, tissues=3, slides_per_tissue=5, seed=11, slide_size=(1344, 1344), n_genes=300
    )
    old = {k: os.environ.get(k) for k in ("GTEX_SOURCE", "GTEX_DATA_ROOT")}
    os.environ.update(GTEX_SOURCE=str(mirror), GTEX_DATA_ROOT=str(root))
    try:
        import dagster as dg

        results = materialize_all(
            run_config=FAST, instance=dg.DagsterInstance.ephemeral(), log=lambda m: None
        )
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return root, results


def test_every_asset_materialised_and_every_view_answers(pipeline):
    root, results = pipeline
    assert results and all(r.success for r in results)
    con = duckdb.connect(str(root / "gtex.duckdb"), read_only=True)
    views = [
        v
        for (v,) in con.execute(
            "SELECT view_name FROM duckdb_views() WHERE NOT internal"
        ).fetchall()
    ]
    expected = {
        "histology_annotations", "selected_slides", "raw_slides", "slide_tiles", "filtered_tiles",
        "balanced_tile_sample", "donor_split", "expression_genes", "gene_expression",
        "classifier_epochs", "classifier_checkpoints", "classifier_confusion", "slide_embeddings",
        "tile_embeddings", "projection_silhouettes", "gene_r2", "cluster_transcriptome_r2",
        "feature_comparison_genes", "feature_comparison_accuracy",
    }  # fmt: skip
    assert expected <= set(views)
    # Every view users query is an asset of the same key (lineage shows each table) and every
    # table the pipeline wrote is in core/tables.py's registry.
    from gtex_assets.cli.runner import load_definitions
    from gtex_assets.core.tables import TABLES

    keys = {
        k.to_user_string() for k in load_definitions().resolve_asset_graph().get_all_asset_keys()
    }
    assert set(views) - keys == set()
    written = {p.stem if p.is_file() else p.name for p in (root / "tables").iterdir()
               if not p.name.startswith(".")}  # fmt: skip
    assert written - set(TABLES) == set()
    for v in views:
        con.execute(f"SELECT * FROM {v} LIMIT 1").fetchall()  # every view binds and reads
    assert con.execute("SELECT count(*) FROM raw_slides WHERE status = 'ok'").fetchone()[0] == 15
    assert con.execute("SELECT count(*) FROM balanced_tile_sample").fetchone()[0] >= 15
    n_models = con.execute("SELECT count(DISTINCT model_id) FROM slide_embeddings").fetchone()[0]
    assert n_models == 3  # two checkpoints + the off-the-shelf backbone
    assert (
        con.execute("SELECT count(*) FROM gene_r2").fetchone()[0]
        == con.execute("SELECT count(*) FROM expression_genes WHERE kept").fetchone()[0]
    )


def test_readme_queries_run(pipeline):
    root, _ = pipeline
    queries = readme_queries()
    assert len(queries) == 10
    con = duckdb.connect(str(root / "gtex.duckdb"), read_only=True)
    for q in queries:
        rows = con.execute(q).fetchall()
        assert rows, f"no rows from: {q[:80]}"
