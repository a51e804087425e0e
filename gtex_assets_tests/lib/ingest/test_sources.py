import shutil
from pathlib import Path

import pytest

from gtex_assets.lib.ingest.sources import (
    GENE_TPM_GCT,
    PORTAL_ATTRIBUTES_URL,
    PORTAL_GCT_URL,
    GTExSource,
    Kind,
    SourceError,
)
from gtex_assets_tests.support.http_mirror import serve_directory


@pytest.fixture
def mirror(tmp_path, cmu_slide, portal_csv_sample) -> Path:
    m = tmp_path / "mirror"
    (m / "slides").mkdir(parents=True)
    shutil.copy(portal_csv_sample, m / "GTEx Portal.csv")
    shutil.copy(cmu_slide, m / "slides" / "GTEX-1117F-0126.svs")
    (m / GENE_TPM_GCT).write_bytes(b"not really gzip")
    return m


def test_portal_addresses_are_the_real_ones(tmp_path):
    src = GTExSource("portal")
    assert (
        src.location(Kind.SLIDE, "GTEX-1117F-0126")
        == "https://brd.nci.nih.gov/brd/imagedownload/GTEX-1117F-0126"
    )
    assert src.location(Kind.GCT) == PORTAL_GCT_URL
    assert PORTAL_GCT_URL.endswith("/adult-gtex/bulk-gex/v8/rna-seq/" + GENE_TPM_GCT)
    assert src.location(Kind.ATTRIBUTES) == PORTAL_ATTRIBUTES_URL
    # The histology CSV has no URL: a clear message says where to get it and where to put it.
    with pytest.raises(SourceError, match="histologyPage"):
        src.fetch(Kind.HISTOLOGY, tmp_path / "raw")


def test_slide_ids_are_validated_before_becoming_paths(mirror):
    src = GTExSource(str(mirror))
    with pytest.raises(ValueError, match="not a GTEx tissue sample id"):
        src.location(Kind.SLIDE, "../../etc/passwd")


def test_local_mirror_in_place_and_versions(mirror):
    for source in (str(mirror), f"file://{mirror}"):
        src = GTExSource(source)
        assert src.mode == "local"
        p = src.fetch(Kind.SLIDE, mirror / "unused", "GTEX-1117F-0126")
        assert p == mirror / "slides" / "GTEX-1117F-0126.svs"  # used in place, not copied
    src = GTExSource(str(mirror))
    v1 = src.version(Kind.HISTOLOGY)
    assert v1 == src.version(Kind.HISTOLOGY)
    with open(mirror / "GTEx Portal.csv", "a") as f:
        f.write('"GTEX-1117F-9926","Lung","GTEX-1117F","female","60-69","","",""\n')
    assert src.version(Kind.HISTOLOGY) != v1
    with pytest.raises(SourceError, match="does not exist"):
        src.fetch(Kind.ATTRIBUTES, mirror)


def test_http_mirror_downloads_into_raw(mirror, tmp_path, cmu_slide):
    with serve_directory(mirror) as url:
        src = GTExSource(url)
        assert src.mode == "http"
        raw = tmp_path / "raw"
        csv_path = src.fetch(Kind.HISTOLOGY, raw)  # file name with a space
        assert csv_path == raw / "GTEx Portal.csv"
        assert csv_path.read_bytes() == (mirror / "GTEx Portal.csv").read_bytes()
        slide = src.fetch(Kind.SLIDE, raw, "GTEX-1117F-0126")
        assert slide.read_bytes() == cmu_slide.read_bytes()
        assert "size=1938955" in src.version(Kind.SLIDE, "GTEX-1117F-0126")
        with pytest.raises(SourceError, match="404"):
            src.fetch(Kind.SLIDE, raw, "GTEX-1117F-0226")


def test_unsupported_scheme():
    with pytest.raises(SourceError, match="unsupported scheme"):
        _ = GTExSource("ftp://example.org/gtex").mode


def test_slide_download_from_http_mirror_resumes_after_a_broken_transfer(
    mirror, tmp_path, cmu_slide
):
    """The server drops the connection mid-slide: the first fetch fails leaving a .part, the
    next resumes with a Range request, and the slide is byte-identical."""
    from gtex_assets_tests.support.http_mirror import MirrorController

    ctl = MirrorController()
    raw = tmp_path / "raw"
    with serve_directory(mirror, controller=ctl) as url:
        ctl.break_next(after_bytes=700_000)
        opts = {"retries": 0, "backoff": 0.01, "chunk_size": 64 * 1024}
        src = GTExSource(url, download_options=opts)
        with pytest.raises(SourceError):
            src.fetch(Kind.SLIDE, raw, "GTEX-1117F-0126")
        part = raw / "slides" / "GTEX-1117F-0126.svs.part"
        kept = part.stat().st_size  # whole chunks received before the break
        assert 0 < kept <= 700_000
        assert not (raw / "slides" / "GTEX-1117F-0126.svs").exists()
        ctl.clear()
        p = src.fetch(Kind.SLIDE, raw, "GTEX-1117F-0126")
        ranges = [r.headers.get("Range") for r in ctl.gets()]
        assert ranges == [f"bytes={kept}-"]
    assert p.read_bytes() == cmu_slide.read_bytes()
    assert not part.exists()
