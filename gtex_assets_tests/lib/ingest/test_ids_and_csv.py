import polars as pl
import pytest

from gtex_assets.core.ids import (
    InvalidSampleIdError,
    aliquot_to_sample_id,
    subject_of,
    validate_sample_id,
)
from gtex_assets.lib.ingest.portal_csv import PortalCSVError, parse_portal_csv, read_portal_csv


@pytest.mark.parametrize("good", ["GTEX-1117F-0126", "GTEX-ZZPU-2626", "GTEX-13OW6-0011"])
def test_valid_sample_ids(good):
    assert validate_sample_id(good) == good


@pytest.mark.parametrize(
    "bad",
    ["../etc/passwd", "GTEX-1117F-0126/x", "GTEX-1117F", "gtex-1117f-0126", "GTEX-1117F-0126 ", ""],
)
def test_invalid_sample_ids_name_the_origin(bad):
    with pytest.raises(InvalidSampleIdError, match="row 5"):
        validate_sample_id(bad, where="row 5")


def test_aliquot_and_subject():
    assert aliquot_to_sample_id("GTEX-1117F-0226-SM-5GZZ7") == "GTEX-1117F-0226"
    assert aliquot_to_sample_id("GTEX-1117F-0226") == "GTEX-1117F-0226"
    assert aliquot_to_sample_id("K-562-SM-26GMQ") is None
    assert subject_of("GTEX-1117F-0226-SM-5GZZ7") == "GTEX-1117F"


def test_parse_real_portal_sample(portal_csv_sample):
    df = parse_portal_csv(portal_csv_sample)
    assert df.height == 300
    assert df.columns[:8] == [
        "tissue_sample_id", "tissue", "subject_id", "sex", "age_bracket", "hardy_scale",
        "pathology_categories", "pathology_notes",
    ]  # fmt: skip
    first = df.row(0, named=True)
    assert first["tissue_sample_id"] == "GTEX-1117F-0126"
    assert first["tissue"] == "Skin - Sun Exposed (Lower leg)"
    assert first["subject_id"] == "GTEX-1117F"
    # Quoted free text with commas survives intact.
    assert (
        first["pathology_notes"] == "6 pieces, minimal fat, squamous epithelium is ~50-70 microns"
    )
    assert df["tissue_sample_id"].is_unique().all()
    assert (df["subject_id"] == df["tissue_sample_id"].str.replace(r"-[0-9]+$", "")).all()
    assert df["tissue"].n_unique() == 35
    assert set(df["sex"].to_list()) == {"male", "female"}
    assert read_portal_csv(portal_csv_sample).rejected.height == 0


def _write(tmp_path, text):
    p = tmp_path / "GTEx Portal.csv"
    p.write_text(text)
    return p


HEADER = '"Tissue Sample ID","Tissue","Subject ID","Sex","Age Bracket","Hardy Scale","Pathology Categories","Pathology Notes"\n'


GOOD = '"GTEX-1117F-0126","Lung","GTEX-1117F","male","60-69","","",""\n'


def test_bad_rows_are_rejected_with_line_and_reason_and_the_rest_kept(tmp_path):
    rows = [
        GOOD,
        '"../../x","Lung","GTEX-1117F","male","60-69","","",""\n',  # line 3
        GOOD,  # line 4: repeated
        '"GTEX-1117F-0226","","GTEX-1117F","","","","",""\n',  # line 5: empty tissue
        '"GTEX-1117F-0326","Lung","GTEX-9999","male","60-69","","",""\n',  # line 6: donor
        '"GTEX-1117F-0426","Lung","GTEX-1117F","male","60-69","","","","extra"\n',  # line 7
        '"GTEX-1117F-0526","Lung","","male","60-69","","","notes, with, commas"\n',  # ok
    ]
    parsed = read_portal_csv(_write(tmp_path, HEADER + "".join(rows)))
    assert parsed.annotations["tissue_sample_id"].to_list() == [
        "GTEX-1117F-0126",
        "GTEX-1117F-0526",
    ]
    assert parsed.annotations["subject_id"].to_list() == ["GTEX-1117F", "GTEX-1117F"]
    rej = parsed.rejected
    assert rej.schema == pl.Schema(
        {"line": pl.Int64, "raw_id": pl.String, "tissue": pl.String, "reason": pl.String}
    )
    assert rej["line"].to_list() == [3, 4, 5, 6, 7]
    assert rej["raw_id"].to_list()[:2] == ["../../x", "GTEX-1117F-0126"]
    reasons = rej["reason"].to_list()
    assert reasons[0].startswith(
        "GTEx Portal.csv, line 3: '../../x' is not a GTEx tissue sample id"
    )
    assert "repeated (first on line 2)" in reasons[1]
    assert "empty Tissue" in reasons[2]
    assert "Subject ID 'GTEX-9999'" in reasons[3]
    assert "more fields than the header" in reasons[4]
    summary = parsed.rejection_summary()
    assert summary.startswith("5 row(s) rejected") and "histology_rejected_rows" in summary


def test_file_level_problems_still_raise(tmp_path):
    with pytest.raises(PortalCSVError, match="lacks column"):
        parse_portal_csv(_write(tmp_path, '"Sample","Tissue"\n"GTEX-1117F-0126","Lung"\n'))
    with pytest.raises(
        PortalCSVError, match=r"no valid sample rows; 1 rejected, first: .*line 2: '\.\./x'"
    ):
        parse_portal_csv(_write(tmp_path, HEADER + '"../x","Lung","","","","","",""\n'))
    with pytest.raises(PortalCSVError, match="cannot open"):
        parse_portal_csv(tmp_path / "absent.csv")


def test_parse_result_is_string_typed(portal_csv_sample):
    df = parse_portal_csv(portal_csv_sample)
    assert all(dtype == pl.String for dtype in df.schema.values())
