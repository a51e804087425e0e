"""The `gtex-assets` command as a user runs it."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import slideio

from gtex_assets.cli import main

EXE = Path(sys.executable).parent / "gtex-assets"


def test_help_lists_the_subcommands():
    out = subprocess.run([str(EXE), "--help"], capture_output=True, text=True, check=True).stdout
    for sub in ("synth", "demo", "sql", "nearest", "ui"):
        assert sub in out


def test_synth_writes_a_mirror_slideio_opens(tmp_path, capsys):
    out = tmp_path / "m"
    rc = main(["synth", "--out", str(out), "--tissues", "2", "--slides-per-tissue", "2",
               "--seed", "3", "--slide-size", "896x896", "--genes", "200"])  # fmt: skip
    assert rc == 0
    assert "4 slides, 2 tissues" in capsys.readouterr().out
    slides = sorted((out / "slides").glob("*.svs"))
    assert len(slides) == 4
    scene = slideio.open_slide(str(slides[0]), "SVS").get_scene(0)
    assert scene.magnification == 20 and abs(scene.resolution[0] - 0.499e-6) < 1e-9


def test_demo_on_a_mirror_then_sql(tmp_path, mini_mirror, capsys):
    mirror, ids, _ = mini_mirror
    root = tmp_path / "root"
    rc = main(["demo", "--source", str(mirror), "--data-root", str(root),
               "--select", "histology_annotations", "histology_rejected_rows", "sample_attributes",
               "selected_slides", "raw_slides", "duckdb_catalog"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert re.search(r"slides quarantined +1\n", out) and re.search(r"selected slides +12\n", out)
    assert (root / "dagster_home" / "dagster.yaml").is_file()  # runs recorded for the UI

    assert (
        main(
            [
                "sql",
                "SELECT count(*) AS n FROM raw_slides WHERE status = 'ok'",
                "--data-root",
                str(root),
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out) == [{"n": 11}]
    assert (
        main(
            [
                "sql",
                "SELECT tissue_sample_id FROM slide_quarantine",
                "--data-root",
                str(root),
                "--csv",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.splitlines() == ["tissue_sample_id", ids[-1]]
    assert main(["sql", "SELECT * FROM no_such_table", "--data-root", str(root)]) == 2
    assert "no_such_table" in capsys.readouterr().err


def test_sql_without_catalog_says_what_to_do(tmp_path, capsys):
    assert main(["sql", "SELECT 1", "--data-root", str(tmp_path / "empty")]) == 2
    assert "duckdb_catalog" in capsys.readouterr().err


def test_environment_contract(tmp_path, mini_mirror):
    """GTEX_DATA_ROOT and GTEX_SOURCE drive a plain run with no flags."""
    mirror, _, _ = mini_mirror
    env = {**os.environ, "GTEX_DATA_ROOT": str(tmp_path / "r"), "GTEX_SOURCE": str(mirror)}
    env.pop("DAGSTER_HOME", None)
    subprocess.run([str(EXE), "demo", "--select", "histology_annotations",
                    "histology_rejected_rows", "duckdb_catalog"],
                   env=env, check=True, capture_output=True)  # fmt: skip
    assert (tmp_path / "r" / "tables" / "histology_annotations.parquet").is_file()
    assert (tmp_path / "r" / "gtex.duckdb").is_file()


def test_demo_reports_a_failed_step_plainly(tmp_path, mini_mirror, capsys):
    mirror, _, _ = mini_mirror
    # A bad row is set aside (histology_rejected_rows); a file that is not the portal CSV fails.
    (mirror / "GTEx Portal.csv").write_text('"Sample","Tissue"\n"GTEX-1117F-0126","Lung"\n')
    rc = main(["demo", "--source", str(mirror), "--data-root", str(tmp_path / "r"),
               "--select", "histology_annotations", "histology_rejected_rows"])  # fmt: skip
    assert rc == 1
    err = capsys.readouterr().err
    assert "[demo] failed:" in err and "GTEx Portal.csv: header lacks column(s)" in err
