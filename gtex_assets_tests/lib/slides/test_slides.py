import shutil

import pytest

from gtex_assets.lib.ingest.sources import GTExSource
from gtex_assets.lib.slides.raw import fetch_and_inspect
from gtex_assets.lib.slides.reader import SlideReadError, inspect_slide


def test_real_cmu_slide_opens_with_mpp_and_magnification(cmu_slide):
    info = inspect_slide(cmu_slide)
    assert (info.width, info.height) == (2220, 2967)
    assert info.mpp_x == pytest.approx(0.499, abs=1e-3)
    assert info.mpp_y == pytest.approx(0.499, abs=1e-3)
    assert info.magnification == 20
    assert info.levels >= 1 and info.level_downsamples[0] == 1.0
    assert info.channels == 3


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (b"<html>404 not found</html>", "not a TIFF"),
        (b"II*\x00" + b"\x00" * 64, "slideio cannot open it"),
    ],
)
def test_corrupt_slides_give_readable_reasons(tmp_path, content, reason):
    p = tmp_path / "GTEX-1117F-0126.svs"
    p.write_bytes(content)
    with pytest.raises(SlideReadError, match=reason) as e:
        inspect_slide(p)
    assert "GTEX-1117F-0126.svs" in str(e.value)


def test_truncated_slide_is_quarantined(tmp_path, cmu_slide):
    """A slide cut short (an interrupted copy) is quarantined with the reason, not a crash."""
    mirror = tmp_path / "m"
    (mirror / "slides").mkdir(parents=True)
    good = mirror / "slides" / "GTEX-1117F-0126.svs"
    shutil.copy(cmu_slide, good)
    bad = mirror / "slides" / "GTEX-1117F-0226.svs"
    bad.write_bytes(cmu_slide.read_bytes()[:20000])
    src = GTExSource(str(mirror))
    ok = fetch_and_inspect(src, "GTEX-1117F-0126", "Lung", tmp_path / "raw", tmp_path / "q")
    assert ok["status"] == "ok" and ok["width"] == 2220 and ok["reason"] == ""
    q = fetch_and_inspect(src, "GTEX-1117F-0226", "Lung", tmp_path / "raw", tmp_path / "q")
    assert q["status"] == "quarantined"
    assert "GTEX-1117F-0226.svs" in q["reason"]
    missing = fetch_and_inspect(src, "GTEX-1117F-0326", "Lung", tmp_path / "raw", tmp_path / "q")
    assert missing["status"] == "quarantined" and "does not exist" in missing["reason"]
    # Unchanged source: the previous row is reused, not recomputed.
    again = fetch_and_inspect(
        src, "GTEX-1117F-0126", "Lung", tmp_path / "raw", tmp_path / "q", previous=ok
    )
    assert again is ok
