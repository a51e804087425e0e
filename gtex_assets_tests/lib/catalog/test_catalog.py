import subprocess
import sys

import duckdb
import pandas as pd
import pytest

from gtex_assets.core.atomic import write_parquet
from gtex_assets.lib.catalog.views import build_catalog, connect_readonly, discover_tables


def test_views_over_tables_and_per_slide_globs(tmp_path):
    tables = tmp_path / "tables"
    write_parquet(pd.DataFrame({"a": [1, 2, 3]}), tables / "selected_slides.parquet")
    for sid, status in [("GTEX-1117F-0126", "ok"), ("GTEX-1117F-0226", "quarantined")]:
        write_parquet(
            pd.DataFrame({"tissue_sample_id": [sid], "tissue": ["Lung"], "status": [status],
                          "reason": ["" if status == "ok" else "bad"], "path": ["x"]}),
            tables / "raw_slides" / f"{sid}.parquet",
        )  # fmt: skip
    (tables / ".selected_slides.parquet.123.tmp").write_bytes(b"junk")  # a killed writer's temp
    assert set(discover_tables(tables)) == {"selected_slides", "raw_slides"}
    views = {v.name: v.rows for v in build_catalog(tmp_path / "gtex.duckdb", tables)}
    assert views == {"selected_slides": 3, "raw_slides": 2, "slide_quarantine": 1}
    con = connect_readonly(tmp_path / "gtex.duckdb")
    assert con.execute("SELECT reason FROM slide_quarantine").fetchall() == [("bad",)]
    # New per-slide files are visible without rebuilding the catalog.
    write_parquet(
        pd.DataFrame({"tissue_sample_id": ["GTEX-1117F-0326"], "tissue": ["Lung"], "status": ["ok"],
                      "reason": [""], "path": ["y"]}),
        tables / "raw_slides" / "GTEX-1117F-0326.parquet",
    )  # fmt: skip
    assert con.execute("SELECT count(*) FROM raw_slides").fetchone()[0] == 3
    with pytest.raises(duckdb.Error):
        con.execute("CREATE TABLE t (x INT)")  # read-only


def test_rebuild_while_a_reader_holds_the_old_file(tmp_path):
    tables = tmp_path / "tables"
    write_parquet(pd.DataFrame({"a": [1]}), tables / "one.parquet")
    build_catalog(tmp_path / "gtex.duckdb", tables)
    reader = connect_readonly(tmp_path / "gtex.duckdb")
    write_parquet(pd.DataFrame({"b": [1, 2]}), tables / "two.parquet")
    views = {v.name for v in build_catalog(tmp_path / "gtex.duckdb", tables)}
    assert views == {"one", "two"}
    assert reader.execute("SELECT count(*) FROM one").fetchone()[0] == 1  # old snapshot still works
    # Another process (a user's duckdb shell) sees the new catalog; duckdb caches open
    # databases per process, so check from a fresh one.
    code = f"import duckdb; print(duckdb.connect({str(tmp_path / 'gtex.duckdb')!r}, read_only=True).execute('SELECT count(*) FROM two').fetchone()[0])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "2"


def test_missing_catalog_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="duckdb_catalog"):
        connect_readonly(tmp_path / "gtex.duckdb")
