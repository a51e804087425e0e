import pandas as pd
import pytest

from gtex_assets.core.ids import (
    InvalidSampleIdError,
    aliquot_to_sample_id,
    subject_of,
    validate_sample_id,
)
from gtex_assets.lib.ingest.portal_csv import PortalCSVError, parse_portal_csv


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
    assert len(df) == 300
    assert list(df.columns[:8]) == [
        "tissue_sample_id", "tissue", "subject_id", "sex", "age_bracket", "hardy_scale",
        "pathology_categories", "pathology_notes",
    ]  # fmt: skip
    first = df.iloc[0]
    assert first["tissue_sample_id"] == "GTEX-1117F-0126"
    assert first["tissue"] == "Skin - Sun Exposed (Lower leg)"
    assert first["subject_id"] == "GTEX-1117F"
    # Quoted free text with commas survives intact.
    assert (
        first["pathology_notes"] == "6 pieces, minimal fat, squamous epithelium is ~50-70 microns"
    )
    assert df["tissue_sample_id"].is_unique
    assert (df["subject_id"] == df["tissue_sample_id"].str.rsplit("-", n=1).str[0]).all()
    assert df["tissue"].nunique() == 35
    assert set(df["sex"]) == {"male", "female"}


def _write(tmp_path, text):
    p = tmp_path / "GTEx Portal.csv"
    p.write_text(text)
    return p


HEADER = '"Tissue Sample ID","Tissue","Subject ID","Sex","Age Bracket","Hardy Scale","Pathology Categories","Pathology Notes"\n'


def test_bad_id_names_line(tmp_path):
    p = _write(
        tmp_path,
        HEADER
        + '"GTEX-1117F-0126","Lung","GTEX-1117F","male","60-69","","",""\n"../x","Lung","GTEX-1117F","male","60-69","","",""\n',
    )
    with pytest.raises(PortalCSVError, match=r"line 3: '\.\./x' is not a GTEx tissue sample id"):
        parse_portal_csv(p)


def test_duplicate_and_missing_column_and_subject_mismatch(tmp_path):
    row = '"GTEX-1117F-0126","Lung","GTEX-1117F","male","60-69","","",""\n'
    with pytest.raises(PortalCSVError, match="repeated .first on line 2"):
        parse_portal_csv(_write(tmp_path, HEADER + row + row))
    with pytest.raises(PortalCSVError, match="lacks column"):
        parse_portal_csv(_write(tmp_path, '"Sample","Tissue"\n"GTEX-1117F-0126","Lung"\n'))
    bad_subj = '"GTEX-1117F-0126","Lung","GTEX-9999","male","60-69","","",""\n'
    with pytest.raises(PortalCSVError, match="Subject ID 'GTEX-9999'"):
        parse_portal_csv(_write(tmp_path, HEADER + bad_subj))
    with pytest.raises(PortalCSVError, match="empty Tissue"):
        parse_portal_csv(
            _write(tmp_path, HEADER + '"GTEX-1117F-0126","","GTEX-1117F","","","","",""\n')
        )


def test_parse_result_is_string_typed(portal_csv_sample):
    df = parse_portal_csv(portal_csv_sample)
    assert all(pd.api.types.is_string_dtype(df[c]) for c in df.columns)
