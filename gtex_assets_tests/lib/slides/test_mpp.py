"""The MPP policy: description, else override table, else configured fallback, else none."""

import polars as pl
import pytest

from gtex_assets.lib.slides.mpp import MppPolicy, load_overrides, resolve_mpp

SID = "GTEX-1117F-0126"


def test_order_description_override_fallback(tmp_path):
    path = tmp_path / "mpp_overrides.csv"
    path.write_text(f"tissue_sample_id,mpp\n{SID},0.2520\n")
    ov = load_overrides(path)
    assert ov.mpp == {SID: 0.252} and ov.problems == ()
    # The slide's own description first (SPEC §2 order), then the override, then the fallback.
    assert (resolve_mpp(SID, 0.499, ov).mpp, resolve_mpp(SID, 0.499, ov).source) == (
        0.499,
        "description",
    )
    d = resolve_mpp(SID, None, ov)
    assert (d.mpp, d.source) == (0.252, "override")
    other = "GTEX-1117F-0226"
    assert resolve_mpp(other, 0.0, ov).mpp is None
    fb = resolve_mpp(other, None, ov, MppPolicy(fallback_mpp=0.5))
    assert (fb.mpp, fb.source) == (0.5, "fallback")


def test_no_mpp_reason_names_the_three_fixes(tmp_path):
    d = resolve_mpp(SID, None, load_overrides(tmp_path / "absent.csv"))
    assert d.mpp is None and d.source is None
    assert f"'{SID},<mpp>'" in d.reason and "absent.csv" in d.reason
    assert "fallback_mpp" in d.reason and "re-export" in d.reason


def test_bad_override_rows_are_left_out_with_the_row(tmp_path):
    path = tmp_path / "o.parquet"
    pl.DataFrame(
        {"tissue_sample_id": [SID, "../x", "GTEX-1117F-0226", SID, "GTEX-1117F-0326"],
         "mpp": ["0.25", "0.5", "abc", "0.9", "250"]}
    ).write_parquet(path)  # fmt: skip
    ov = load_overrides(path)
    assert ov.mpp == {SID: 0.25}  # a repeated id keeps its first row
    assert len(ov.problems) == 3
    assert "o.parquet row 2" in ov.problems[0] and "not a GTEx tissue sample id" in ov.problems[0]
    assert "row 3: mpp 'abc' is not a number" in ov.problems[1]
    assert "row 5: mpp 250.0 is not a plausible" in ov.problems[2]
    (tmp_path / "bad.csv").write_text("sample,res\nx,1\n")
    with pytest.raises(ValueError, match="needs columns tissue_sample_id,mpp"):
        load_overrides(tmp_path / "bad.csv")


def test_policy_paths_and_validation(tmp_path):
    assert MppPolicy().overrides_file(tmp_path) == tmp_path / "mpp_overrides.csv"
    assert (
        MppPolicy(overrides_path="/abs/x.csv").overrides_file(tmp_path).as_posix() == "/abs/x.csv"
    )
    with pytest.raises(ValueError, match="not a plausible"):
        MppPolicy(fallback_mpp=500)
