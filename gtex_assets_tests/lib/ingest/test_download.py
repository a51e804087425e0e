"""Offline tests for gtex_assets.lib.ingest.download against the local http_mirror (127.0.0.1 only)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import pickle
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
import requests

from gtex_assets.lib.ingest.download import (
    DownloadError,
    RemoteVersion,
    download,
    head,
    local_version,
    sha256_file,
)
from gtex_assets_tests.support.http_mirror import MirrorController, etag_for, serve_directory

SIZE = 3 * (1 << 20) + 12345  # a few MiB, deliberately not chunk-aligned
CHUNK = 64 * 1024
CUT = 1 << 20  # where injected faults cut the body; a multiple of CHUNK so the .part is exact
FAST = {"backoff": 0.01, "chunk_size": CHUNK, "timeout": 10}


def _data(seed: int, size: int = SIZE) -> bytes:
    return random.Random(seed).randbytes(size)


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@dataclass
class Mirror:
    root: Path
    base: str
    ctl: MirrorController

    def put(self, name: str, data: bytes, *, mtime_ns: int | None = None) -> str:
        """(Re)place a remote file atomically (new inode, so the ETag changes); return its URL."""
        path = self.root / name
        tmp = path.with_name(path.name + ".tmp-upload")
        tmp.write_bytes(data)
        if mtime_ns is not None:
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
        os.replace(tmp, path)
        return f"{self.base}/{quote(name)}"


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[Mirror]:
    root = tmp_path / "remote"
    root.mkdir()
    ctl = MirrorController()
    with serve_directory(root, controller=ctl) as base:
        yield Mirror(root, base, ctl)


@pytest.fixture
def out(tmp_path: Path) -> Path:
    d = tmp_path / "local"
    d.mkdir()
    return d


def _part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def test_plain_download_is_byte_identical(mirror: Mirror, out: Path) -> None:
    data = _data(1)
    url = mirror.put("GTEX-1117F-0126.svs", data)
    dest = out / "sub" / "GTEX-1117F-0126.svs"  # parent created on demand
    seen: list[tuple[int, int | None]] = []

    res = download(url, dest, progress=lambda done, total: seen.append((done, total)), **FAST)

    assert dest.read_bytes() == data
    assert not _part(dest).exists()
    assert not dest.with_name(dest.name + ".part.json").exists()
    assert res.path == dest
    assert res.bytes_total == SIZE
    assert res.bytes_fetched_this_call == SIZE
    assert (res.resumed, res.skipped, res.attempts) == (False, False, 1)
    assert res.sha256 == _sha(data)  # hashed while streaming, even though none was requested
    assert res.version is not None and res.version.size == SIZE
    assert res.version.etag == etag_for((mirror.root / "GTEX-1117F-0126.svs").stat())
    assert seen[-1] == (SIZE, SIZE)
    assert len(seen) == -(-SIZE // CHUNK)
    (get,) = mirror.ctl.gets()
    assert "Range" not in get.headers


def test_dropped_connection_then_resume_in_next_call(mirror: Mirror, out: Path) -> None:
    data = _data(2)
    url = mirror.put("slide.svs", data)
    dest = out / "slide.svs"
    mirror.ctl.break_next(CUT)

    with pytest.raises(DownloadError) as ei:
        download(url, dest, retries=0, **FAST)
    assert str(ei.value).startswith(f"{url}: ")
    assert "gave up after 1 attempt" in str(ei.value)
    assert not dest.exists()
    assert _part(dest).stat().st_size == CUT
    assert _part(dest).read_bytes() == data[:CUT]

    res = download(url, dest, retries=0, sha256=_sha(data), **FAST)

    last = mirror.ctl.gets()[-1]
    assert last.headers["Range"] == f"bytes={CUT}-"
    assert last.headers["If-Range"] == res.version.etag  # type: ignore[union-attr]
    assert res.resumed is True
    assert res.bytes_fetched_this_call == SIZE - CUT
    assert res.attempts == 1
    assert res.sha256 == _sha(data)  # computed over the file because the call resumed
    assert sha256_file(dest) == _sha(data)
    assert not _part(dest).exists()


def test_retries_resume_within_one_call(mirror: Mirror, out: Path) -> None:
    data = _data(3)
    url = mirror.put("big.gct.gz", data)
    dest = out / "big.gct.gz"
    mirror.ctl.break_next(CUT, times=2)

    res = download(url, dest, retries=3, expected_size=SIZE, sha256=_sha(data), **FAST)

    assert res.attempts == 3
    assert res.resumed is True
    assert res.bytes_fetched_this_call == SIZE
    assert res.sha256 == _sha(data)  # streaming hash carried across the in-call resumes
    assert dest.read_bytes() == data
    ranges = [g.headers.get("Range") for g in mirror.ctl.gets()]
    assert ranges == [None, f"bytes={CUT}-", f"bytes={2 * CUT}-"]


def test_5xx_is_retried_and_gives_up_after_retries(mirror: Mirror, out: Path) -> None:
    data = _data(4, 1000)
    url = mirror.put("a.bin", data)
    mirror.ctl.fail_next_with(503, 500)
    res = download(url, out / "a.bin", retries=2, **FAST)
    assert res.attempts == 3 and (out / "a.bin").read_bytes() == data

    mirror.ctl.fail_next_with(503, 502)
    with pytest.raises(DownloadError, match=r"HTTP 502 .*gave up after 2 attempt"):
        download(url, out / "b.bin", retries=1, **FAST)
    assert not (out / "b.bin").exists()
    assert not _part(out / "b.bin").exists()  # nothing fetched: no empty .part left behind


def test_remote_changed_between_calls_restarts(mirror: Mirror, out: Path) -> None:
    old, new = _data(5), _data(6)  # same size: only the validator can tell them apart
    url = mirror.put("x.svs", old)
    dest = out / "x.svs"
    mirror.ctl.break_next(CUT)
    with pytest.raises(DownloadError):
        download(url, dest, retries=0, **FAST)
    old_etag = json.loads(dest.with_name("x.svs.part.json").read_text())["etag"]

    mirror.put("x.svs", new, mtime_ns=(mirror.root / "x.svs").stat().st_mtime_ns + 10**9)
    res = download(url, dest, retries=0, sha256=_sha(new), **FAST)

    last = mirror.ctl.gets()[-1]
    assert last.headers["Range"] == f"bytes={CUT}-"
    assert last.headers["If-Range"] == old_etag != res.version.etag  # type: ignore[union-attr]
    assert res.resumed is False
    assert res.bytes_fetched_this_call == SIZE
    assert res.sha256 == _sha(new)
    assert dest.read_bytes() == new


def test_remote_changed_during_retries_restarts(mirror: Mirror, out: Path) -> None:
    old, new = _data(7), _data(8, SIZE + 777)
    url = mirror.put("y.svs", old)
    dest = out / "y.svs"
    mirror.ctl.break_next(CUT)
    swapped: list[bool] = []

    def swap_remote(done: int, total: int | None) -> None:
        if not swapped:  # replace the remote while the first (doomed) transfer runs
            mirror.put("y.svs", new)
            swapped.append(True)

    res = download(url, dest, retries=2, progress=swap_remote, **FAST)

    assert res.attempts == 2
    assert res.resumed is False
    assert res.bytes_fetched_this_call == CUT + len(new)
    assert res.sha256 == _sha(new)
    assert dest.read_bytes() == new


def test_complete_part_with_416_is_finished_without_refetch(mirror: Mirror, out: Path) -> None:
    data = _data(9)
    url = mirror.put("z.svs", data)
    dest = out / "z.svs"
    mirror.ctl.break_next(CUT)
    with pytest.raises(DownloadError):
        download(url, dest, retries=0, **FAST)
    with open(_part(dest), "ab") as f:  # as if we crashed after the last write, before rename
        f.write(data[CUT:])

    res = download(url, dest, retries=0, sha256=_sha(data), **FAST)

    assert mirror.ctl.gets()[-1].headers["Range"] == f"bytes={SIZE}-"
    assert res.bytes_fetched_this_call == 0
    assert res.resumed is True
    assert res.bytes_total == SIZE
    assert dest.read_bytes() == data


def test_sha256_mismatch_removes_part(mirror: Mirror, out: Path) -> None:
    data = _data(10)
    url = mirror.put("s.svs", data)
    dest = out / "s.svs"
    wrong = "0" * 64

    with pytest.raises(DownloadError) as ei:
        download(url, dest, sha256=wrong, **FAST)

    assert str(ei.value) == f"{url}: sha256 mismatch, got {_sha(data)}, expected {wrong}"
    assert not dest.exists()
    assert not _part(dest).exists()
    assert not dest.with_name("s.svs.part.json").exists()


def test_expected_size_mismatch_fails_before_streaming(mirror: Mirror, out: Path) -> None:
    url = mirror.put("GTEX-1117F-0126", _data(11))
    dest = out / "GTEX-1117F-0126"
    fetched: list[int] = []

    with pytest.raises(DownloadError) as ei:
        download(url, dest, expected_size=456, progress=lambda d, t: fetched.append(d), **FAST)

    assert str(ei.value) == f"{url}: size mismatch, remote has {SIZE} bytes, expected 456"
    assert fetched == []
    assert not dest.exists() and not _part(dest).exists()


def test_404_names_url_and_is_not_retried(mirror: Mirror, out: Path) -> None:
    url = f"{mirror.base}/missing/GTEX-0000.svs"
    with pytest.raises(DownloadError) as ei:
        download(url, out / "m.svs", retries=5, **FAST)
    assert str(ei.value) == f"{url}: HTTP 404 Not Found"
    assert ei.value.status == 404 and ei.value.url == url
    assert len(mirror.ctl.requests) == 1
    assert not _part(out / "m.svs").exists()

    again = pickle.loads(pickle.dumps(ei.value))
    assert (str(again), again.status) == (str(ei.value), 404)


def test_existing_complete_dest_is_skipped(mirror: Mirror, out: Path) -> None:
    data = _data(12, 5000)
    url = mirror.put("k.bin", data)
    dest = out / "k.bin"
    download(url, dest, **FAST)
    n_requests = len(mirror.ctl.requests)

    res = download(url, dest, expected_size=len(data), sha256=_sha(data), **FAST)
    assert res.skipped is True
    assert (res.attempts, res.bytes_fetched_this_call, res.bytes_total) == (0, 0, len(data))
    assert res.sha256 == _sha(data) and res.version is None
    assert len(mirror.ctl.requests) == n_requests

    # A dest that does not match is fetched again and replaced.
    dest.write_bytes(b"stale")
    res = download(url, dest, expected_size=len(data), **FAST)
    assert res.skipped is False and dest.read_bytes() == data


def test_head_reports_size_and_etag(mirror: Mirror) -> None:
    url = mirror.put("h.svs", _data(13, 4321))
    etag = etag_for((mirror.root / "h.svs").stat())

    v = head(url)
    assert (v.url, v.size, v.etag) == (url, 4321, etag)
    assert v.last_modified
    assert v.token == f"size=4321;etag={etag}"
    assert head(url).token == v.token

    # HEAD refused -> one-byte GET; size comes from Content-Range.
    mirror.ctl.fail_next_with(405)
    v2 = head(url)
    assert v2 == v
    assert [(r.method, r.headers.get("Range")) for r in mirror.ctl.requests[-2:]] == [
        ("HEAD", None),
        ("GET", "bytes=0-0"),
    ]

    mirror.put("h.svs", _data(14, 4321), mtime_ns=1_700_000_000_000_000_000)
    assert head(url).token != v.token

    with pytest.raises(DownloadError, match="HTTP 404"):
        head(f"{mirror.base}/nope")


def test_remote_version_without_etag() -> None:
    v = RemoteVersion("http://x/a", 10, None, "Tue, 01 Oct 2024 00:00:00 GMT")
    assert v.token == "size=10;last_modified=Tue, 01 Oct 2024 00:00:00 GMT"
    assert v.validator == v.last_modified
    weak = RemoteVersion("http://x/a", 10, 'W/"abc"', None)
    assert weak.validator is None  # weak ETags are not allowed in If-Range


def test_file_names_with_spaces(mirror: Mirror, out: Path) -> None:
    data = b"tissue,slide\nLung,GTEX-1117F-0526\n"
    url = mirror.put("GTEx Portal.csv", data)
    assert url.endswith("/GTEx%20Portal.csv")

    res = download(url, out / "GTEx Portal.csv", **FAST)
    assert (out / "GTEx Portal.csv").read_bytes() == data
    assert res.bytes_total == len(data)
    assert mirror.ctl.gets()[-1].path == "/GTEx Portal.csv"
    assert head(url).size == len(data)


def test_server_refuses_path_traversal(mirror: Mirror, out: Path) -> None:
    (mirror.root.parent / "secret.txt").write_bytes(b"do not serve")
    mirror.put("ok.txt", b"fine")
    netloc = urlsplit(mirror.base).netloc
    for raw in ("/../secret.txt", "/%2e%2e/secret.txt", "/sub/..%2F..%2Fsecret.txt"):
        conn = http.client.HTTPConnection(netloc, timeout=5)
        try:
            conn.request("GET", raw)
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        assert resp.status == 403, raw
        assert b"do not serve" not in body

    with pytest.raises(DownloadError, match="HTTP 403"):
        download(f"{mirror.base}/%2E%2E/secret.txt", out / "secret.txt", **FAST)
    assert requests.get(f"{mirror.base}/ok.txt", timeout=5).content == b"fine"


def test_server_range_semantics(mirror: Mirror) -> None:
    data = _data(15, 1000)
    url = mirror.put("r.bin", data)
    etag = etag_for((mirror.root / "r.bin").stat())

    def get(**headers: str) -> requests.Response:
        return requests.get(url, headers=headers, timeout=5)

    r = get(Range="bytes=10-19")
    assert (r.status_code, r.content, r.headers["Content-Range"]) == (
        206,
        data[10:20],
        "bytes 10-19/1000",
    )
    assert get(Range="bytes=990-").content == data[990:]
    assert get(Range="bytes=-5").content == data[-5:]
    r = get(Range="bytes=1000-")
    assert (r.status_code, r.headers["Content-Range"]) == (416, "bytes */1000")
    assert get(Range="bytes=10-", **{"If-Range": etag}).status_code == 206
    stale = get(Range="bytes=10-", **{"If-Range": '"stale"'})
    assert (stale.status_code, stale.content) == (200, data)
    assert requests.head(url, timeout=5).headers["Accept-Ranges"] == "bytes"


def test_local_version_tracks_content(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    data = bytearray(_data(16))
    big.write_bytes(data)
    st = big.stat()
    v1 = local_version(big)
    assert v1.startswith(f"{SIZE}-{st.st_mtime_ns}-")
    assert local_version(big) == v1

    data[-1] ^= 0xFF  # same size, same mtime, last byte differs: the tail hash catches it
    big.write_bytes(data)
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert local_version(big) != v1

    small = tmp_path / "small.bin"
    small.write_bytes(b"abc")
    assert local_version(small).endswith(_sha(b"abc")[:32])
