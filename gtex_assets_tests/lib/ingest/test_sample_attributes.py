"""SampleAttributesDS parsing: aliquot -> tissue sample -> donor, controls dropped, bad files
named with what is wrong; the GCT-header fallback."""

import gzip

import pytest

from gtex_assets.core.errors import InputError
from gtex_assets.lib.ingest.sample_attributes import (
    SampleAttributesError,
    attributes_from_gct_header,
    parse_sample_attributes,
)

HEADER = "SAMPID\tSMATSSCR\tSMTS\tSMTSD\n"


def test_parse_maps_aliquots_and_drops_controls(tmp_path):
    p = tmp_path / "attrs.txt"
    p.write_text(
        HEADER
        + "GTEX-1117F-0226-SM-5GZZ7\t0\tAdipose Tissue\tAdipose - Subcutaneous\n"
        + "GTEX-1117F-0426-SM-5EGHI\t\tMuscle\tMuscle - Skeletal\n"
        + "K-562-SM-26GMQ\t\tBone Marrow\tCells - Leukemia cell line (CML)\n"
        + 'GTEX-111CU-0126-SM-5GZWZ\t1\tThyroid\t"Thyroid"\n'
    )
    df = parse_sample_attributes(p)
    assert df.columns == ["aliquot_id", "tissue_sample_id", "subject_id", "smts", "smtsd"]
    assert df["tissue_sample_id"].to_list() == [
        "GTEX-1117F-0226", "GTEX-1117F-0426", "GTEX-111CU-0126"
    ]  # fmt: skip
    assert df["subject_id"].to_list() == ["GTEX-1117F", "GTEX-1117F", "GTEX-111CU"]
    assert df["smtsd"].to_list()[:2] == ["Adipose - Subcutaneous", "Muscle - Skeletal"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("SAMPID\tSMTS\n", r"header lacks column\(s\) \['SMTSD'\]"),
        (HEADER + "GTEX-1117F-0226-SM-1\t\tA\tB\n" * 2, "SAMPID 'GTEX-1117F-0226-SM-1' appears"),
    ],
)
def test_bad_files_name_the_file_and_the_problem(tmp_path, text, match):
    p = tmp_path / "attrs.txt"
    p.write_text(text)
    with pytest.raises(SampleAttributesError, match=match) as e:
        parse_sample_attributes(p)
    assert isinstance(e.value, InputError) and str(p) in str(e.value)


def test_gct_header_fallback(tmp_path):
    p = tmp_path / "x.gct.gz"
    with gzip.open(p, "wt") as f:
        f.write("#1.2\n1\t2\nName\tDescription\tGTEX-1117F-0226-SM-1\tK-562-SM-2\n")
    df = attributes_from_gct_header(p)
    assert df["tissue_sample_id"].to_list() == ["GTEX-1117F-0226"]
    assert df["smtsd"].to_list() == [""]
