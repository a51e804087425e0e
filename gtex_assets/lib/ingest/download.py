"""Resumable, verified HTTP downloads for multi-GB GTEx files.

Whole-slide images (50 MB-1.5 GB) and the 2.6 GB GCT come over long-lived connections that do
break; a plain ``requests.get`` either restarts from zero on every hiccup or leaves a truncated
file that looks complete. The invariants here:

* bytes stream into ``<dest>.part``; ``dest`` only appears via ``os.replace`` after the size (and
  optional sha256) checks passed, so an existing ``dest`` is always a complete file;
* ``<dest>.part.json`` records which remote version the partial bytes belong to (ETag /
  Last-Modified / size), so a later call can resume with ``Range`` + ``If-Range``. A remote that
  changed meanwhile answers 200 instead of 206 and we restart from zero rather than splice two
  versions together;
* connection errors, 5xx/408/429 and short reads are retried with capped exponential backoff, each
  retry resuming from the current ``.part`` length;
* the ``.part`` is ``flock``-ed for the duration of a call so two processes cannot interleave
  writes into it (the second one fails fast with :class:`DownloadError`).

Library code: no dagster imports.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX platforms simply run without the lock
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DownloadError",
    "DownloadResult",
    "RemoteVersion",
    "download",
    "head",
    "local_version",
    "sha256_file",
]

MiB = 1 << 20
# Byte-exact transfers: a transparently gzip-decoded body would not match Content-Length, ranges
# or the sha256 of the stored object.
_IDENTITY = {"Accept-Encoding": "identity"}
_RETRY_STATUSES = frozenset({408, 425, 429})
_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)\s*/\s*(\d+|\*)\s*$", re.IGNORECASE)
# Errors that mean "the network let us down" while reading a body; disk errors (OSError from
# write) are deliberately not in here so that e.g. ENOSPC is not retried.
_STREAM_ERRORS: tuple[type[BaseException], ...] = (
    requests.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
)

ProgressCallback = Callable[[int, int | None], None]


class DownloadError(Exception):
    """A download or remote lookup failed for good. The message starts with the URL."""

    def __init__(self, url: str, problem: str, *, status: int | None = None) -> None:
        super().__init__(f"{url}: {problem}")
        self.url = url
        self.problem = problem
        self.status = status  # HTTP status when the failure was an HTTP answer

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the exception picklable (run workers ship exceptions across processes).
        return (self.__class__, (self.url, self.problem), {"status": self.status})


class _Retryable(Exception):
    """Internal: a transient failure; the caller may retry from the current .part length."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class RemoteVersion:
    """What the server says about a remote object, for change detection and If-Range."""

    url: str
    size: int | None
    etag: str | None
    last_modified: str | None

    @property
    def token(self) -> str:
        """Stable change-detection token.

        Prefers the ETag (content-derived on GCS/S3), else Last-Modified; always includes the size.
        The URL is left out so the same object behind a moved URL does not count as changed.
        """
        size = "?" if self.size is None else str(self.size)
        if self.etag:
            return f"size={size};etag={self.etag}"
        if self.last_modified:
            return f"size={size};last_modified={self.last_modified}"
        return f"size={size}"

    @property
    def validator(self) -> str | None:
        """Value for ``If-Range``: a strong ETag, else Last-Modified (weak ETags are not allowed)."""
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified

    def differs_from(self, other: RemoteVersion) -> bool:
        """True when the two describe provably different content (compares what both know)."""
        if self.size is not None and other.size is not None and self.size != other.size:
            return True
        if self.etag and other.etag:
            return self.etag != other.etag
        if self.last_modified and other.last_modified:
            return self.last_modified != other.last_modified
        return False

    @classmethod
    def from_headers(cls, url: str, headers: Mapping[str, str], size: int | None) -> RemoteVersion:
        return cls(
            url=url,
            size=size,
            etag=headers.get("ETag") or None,
            last_modified=headers.get("Last-Modified") or None,
        )


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    bytes_total: int  # size of the final file
    bytes_fetched_this_call: int  # body bytes received by this call (all attempts)
    resumed: bool  # the final file was continued via a 206 Range response
    attempts: int  # GET requests made by this call (0 when skipped)
    skipped: bool  # dest already existed and matched; nothing was requested
    sha256: str | None  # hex digest when computed (streamed from zero, or sha256 requested)
    version: RemoteVersion | None  # None when skipped: a no-op does not touch the network


# --------------------------------------------------------------------------------------------
# small helpers


def sha256_file(path: str | Path, chunk_size: int = MiB) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def local_version(path: str | Path) -> str:
    """Cheap fingerprint of a (possibly huge) local file: ``<size>-<mtime_ns>-<partial sha256>``.

    Hashing a 1.5 GB slide on every sensor tick would cost seconds per file across a mirror of
    thousands. Size + mtime_ns catch ordinary rewrites; the sha256 over the first and last MiB
    catches same-size in-place replacements that preserve mtime (``cp -p``, ``rsync -t``), where
    the differences show up in the TIFF header/IFDs at the start and tile data or trailer at the
    end. Files up to 2 MiB are hashed whole. Not a substitute for :func:`sha256_file` when
    integrity matters.
    """
    p = Path(path)
    h = hashlib.sha256()
    with open(p, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_size <= 2 * MiB:
            h.update(f.read())
        else:
            h.update(f.read(MiB))
            f.seek(-MiB, os.SEEK_END)
            h.update(f.read(MiB))
    return f"{st.st_size}-{st.st_mtime_ns}-{h.hexdigest()[:32]}"


def _parse_content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """``bytes a-b/N`` -> (a, b, N); ``bytes */N`` -> (None, None, N); unknown parts are None."""
    if not value:
        return None, None, None
    m = _CONTENT_RANGE_RE.match(value)
    if not m:
        return None, None, None
    start = int(m[1]) if m[1] is not None else None
    end = int(m[2]) if m[2] is not None else None
    total = int(m[3]) if m[3] != "*" else None
    return start, end, total


def _content_length(resp: requests.Response) -> int | None:
    """Body length in bytes as stored, or None when unknown or content-encoded."""
    if resp.headers.get("Content-Encoding", "identity").lower() not in ("identity", ""):
        return None
    try:
        return int(resp.headers["Content-Length"])
    except (KeyError, ValueError):
        return None


def _retry_after(resp: requests.Response) -> float | None:
    try:
        return max(0.0, float(resp.headers["Retry-After"]))
    except (KeyError, ValueError):
        return None  # absent, or an HTTP date: fall back to our own backoff


def _same_resource(a: str, b: str) -> bool:
    """URL equality ignoring the query, so re-signed URLs of one object may resume."""
    sa, sb = urlsplit(a), urlsplit(b)
    return urlunsplit(sa._replace(query="", fragment="")) == urlunsplit(
        sb._replace(query="", fragment="")
    )


@contextlib.contextmanager
def _session_scope(session: requests.Session | None) -> Iterator[requests.Session]:
    if session is not None:
        yield session
        return
    with requests.Session() as s:
        yield s


def _fsync_dir(path: Path) -> None:
    # Makes the rename durable; best-effort because not every filesystem allows it.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _part_paths(dest: Path) -> tuple[Path, Path]:
    return dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.json")


# --------------------------------------------------------------------------------------------
# HEAD


def head(
    url: str, *, session: requests.Session | None = None, timeout: float = 30
) -> RemoteVersion:
    """Size/ETag/Last-Modified of ``url``.

    Falls back to ``GET`` with ``Range: bytes=0-0`` when HEAD is refused (405/501, or 403 on
    GET-only signed URLs) or does not report a size; the size then comes from Content-Range.
    """
    with _session_scope(session) as s:
        head_version: RemoteVersion | None = None
        try:
            r = s.head(url, headers=_IDENTITY, allow_redirects=True, timeout=timeout)
        except requests.RequestException as e:
            raise DownloadError(url, f"HEAD failed: {e}") from e
        if r.status_code in (404, 410):
            raise DownloadError(url, f"HTTP {r.status_code} {r.reason}", status=r.status_code)
        if r.ok:
            head_version = RemoteVersion.from_headers(url, r.headers, _content_length(r))
            if head_version.size is not None:
                return head_version
        try:
            g = s.get(
                url,
                headers={**_IDENTITY, "Range": "bytes=0-0"},
                stream=True,
                allow_redirects=True,
                timeout=timeout,
            )
        except requests.RequestException as e:
            if head_version is not None:
                return head_version
            raise DownloadError(url, f"HEAD answered {r.status_code}, GET failed: {e}") from e
        with g:  # closing without reading drops any 200 body instead of downloading it
            if g.status_code == 206:
                size = _parse_content_range(g.headers.get("Content-Range"))[2]
            elif g.status_code == 200:
                size = _content_length(g)
            elif head_version is not None:
                return head_version
            else:
                raise DownloadError(url, f"HTTP {g.status_code} {g.reason}", status=g.status_code)
            return RemoteVersion.from_headers(url, g.headers, size)


# --------------------------------------------------------------------------------------------
# download


def download(
    url: str,
    dest: str | Path,
    *,
    expected_size: int | None = None,
    sha256: str | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    max_backoff: float = 60.0,
    chunk_size: int = MiB,
    timeout: float = 60,
    session: requests.Session | None = None,
    progress: ProgressCallback | None = None,
) -> DownloadResult:
    """Download ``url`` to ``dest`` resumably and verified; see the module docstring.

    ``retries`` counts failed attempts allowed after the first (0 = one try). Backoff before retry
    n is ``min(max_backoff, backoff * 2**(n-1))`` unless the server sent a numeric Retry-After.
    ``progress(done_bytes, total_or_None)`` is called after every chunk written. Without
    ``expected_size`` and without a length from the server, the size cannot be verified.

    An existing ``dest`` is trusted when it matches ``expected_size``/``sha256`` (whichever are
    given; with neither, existence suffices because ``dest`` is only ever created complete) and
    the call returns ``skipped=True`` without touching the network.
    """
    dest = Path(dest)
    want_sha = sha256.lower() if sha256 else None
    if dest.is_file():
        done = _existing_result(dest, expected_size, want_sha)
        if done is not None:
            return done
    dest.parent.mkdir(parents=True, exist_ok=True)
    part, meta = _part_paths(dest)
    with _session_scope(session) as s, open(part, "a+b") as fh:
        if fcntl is not None:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DownloadError(
                    url, f"{part} is locked by another download in progress"
                ) from None
        transfer = _Transfer(
            url=url,
            dest=dest,
            part=part,
            meta=meta,
            fh=fh,
            session=s,
            expected_size=expected_size,
            want_sha=want_sha,
            retries=retries,
            backoff=backoff,
            max_backoff=max_backoff,
            chunk_size=chunk_size,
            timeout=timeout,
            progress=progress,
        )
        try:
            return transfer.run()
        except BaseException:
            # Don't leave an empty .part (e.g. after a 404) lying around; keep real progress.
            if part.exists() and os.fstat(fh.fileno()).st_size == 0:
                part.unlink(missing_ok=True)
                meta.unlink(missing_ok=True)
            raise


def _existing_result(
    dest: Path, expected_size: int | None, want_sha: str | None
) -> DownloadResult | None:
    size = dest.stat().st_size
    if expected_size is not None and size != expected_size:
        return None
    digest = sha256_file(dest) if want_sha else None
    if want_sha and digest != want_sha:
        return None
    return DownloadResult(
        path=dest,
        bytes_total=size,
        bytes_fetched_this_call=0,
        resumed=False,
        attempts=0,
        skipped=True,
        sha256=digest,
        version=None,
    )


class _Transfer:
    """State of one ``download`` call; ``fh`` is the open (append-mode, locked) ``.part``."""

    def __init__(
        self,
        *,
        url: str,
        dest: Path,
        part: Path,
        meta: Path,
        fh: IO[bytes],
        session: requests.Session,
        expected_size: int | None,
        want_sha: str | None,
        retries: int,
        backoff: float,
        max_backoff: float,
        chunk_size: int,
        timeout: float,
        progress: ProgressCallback | None,
    ) -> None:
        self.url, self.dest, self.part, self.meta, self.fh = url, dest, part, meta, fh
        self.session = session
        self.expected_size, self.want_sha = expected_size, want_sha
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.chunk_size, self.timeout, self.progress = chunk_size, timeout, progress
        self.attempts = 0
        self.failures = 0
        self.fetched = 0
        self.resumed = False
        self.known: RemoteVersion | None = None  # version the bytes in .part belong to
        # Streaming hash; valid only while it has seen exactly the bytes now in .part.
        self.hasher: Any = None
        self.hashed = 0
        self._adopt_existing_part()

    # -- .part bookkeeping ---------------------------------------------------------------

    def size(self) -> int:
        self.fh.flush()
        return os.fstat(self.fh.fileno()).st_size

    def _adopt_existing_part(self) -> None:
        """Trust a leftover .part only if its sidecar says which remote version it holds."""
        have = self.size()
        if have == 0:
            self._restart()
            return
        try:
            info = json.loads(self.meta.read_text())
            known = RemoteVersion(
                url=self.url,
                size=info.get("size"),
                etag=info.get("etag"),
                last_modified=info.get("last_modified"),
            )
            ok = _same_resource(info["url"], self.url)
        except (OSError, ValueError, KeyError, TypeError):
            ok, known = False, None
        if known is not None and known.size is not None:
            ok = ok and have <= known.size
            if self.expected_size is not None:
                ok = ok and known.size == self.expected_size
        if ok:
            self.known = known
        else:
            self._restart()

    def _restart(self) -> None:
        self.fh.truncate(0)
        self.fh.seek(0)
        self.hasher, self.hashed = hashlib.sha256(), 0
        self.known = None
        self.resumed = False
        self.meta.unlink(missing_ok=True)

    def _remember(self, version: RemoteVersion) -> None:
        if self.known == version and self.meta.exists():
            return
        self.known = version
        tmp = self.meta.with_name(self.meta.name + ".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "url": self.url,
                    "size": version.size,
                    "etag": version.etag,
                    "last_modified": version.last_modified,
                }
            )
        )
        os.replace(tmp, self.meta)

    def _fail(self, problem: str) -> DownloadError:
        """Verification failure: the bytes are wrong, so drop them."""
        self.fh.truncate(0)
        self.part.unlink(missing_ok=True)
        self.meta.unlink(missing_ok=True)
        return DownloadError(self.url, problem)

    # -- main loop ----------------------------------------------------------------------

    def run(self) -> DownloadResult:
        while True:
            try:
                complete = self._attempt()
            except _Retryable as e:
                self.failures += 1
                if self.failures > self.retries:
                    raise DownloadError(
                        self.url,
                        f"{e} (gave up after {self.attempts} attempt(s); "
                        f"{self.size()} bytes kept in {self.part.name} for resuming)",
                    ) from e
                delay = self.backoff * 2 ** (self.failures - 1)
                if e.retry_after is not None:
                    delay = e.retry_after
                time.sleep(min(self.max_backoff, delay))
                continue
            if complete:
                return self._finish()
            # else: we restarted from zero for a reason that is not a failure; go again.

    def _attempt(self) -> bool:
        """One GET. True when .part is complete; False to go again; raises _Retryable."""
        self.attempts += 1
        offset = self.size()
        if self.hasher is not None and self.hashed != offset:
            self.hasher = None
        headers = dict(_IDENTITY)
        if offset:
            headers["Range"] = f"bytes={offset}-"
            validator = self.known.validator if self.known else None
            if validator:
                headers["If-Range"] = validator
        try:
            resp = self.session.get(self.url, headers=headers, stream=True, timeout=self.timeout)
        except (requests.ConnectionError, requests.Timeout) as e:
            raise _Retryable(f"request failed: {e}") from e
        except requests.RequestException as e:  # bad URL, redirect loop, ...: retrying won't help
            raise DownloadError(self.url, f"request failed: {e}") from e
        with resp:
            return self._consume(resp, offset)

    def _consume(self, resp: requests.Response, offset: int) -> bool:
        status = resp.status_code
        if status == 416 and offset:
            return self._on_416(resp, offset)
        if status in _RETRY_STATUSES or status >= 500:
            raise _Retryable(f"HTTP {status} {resp.reason}", retry_after=_retry_after(resp))
        if status not in (200, 206):
            raise DownloadError(self.url, f"HTTP {status} {resp.reason}", status=status)

        if status == 206:
            cr = resp.headers.get("Content-Range")
            start, end, total = _parse_content_range(cr)
            version = RemoteVersion.from_headers(self.url, resp.headers, total)
            if start is None or end is None or start != offset:
                if not offset:
                    raise DownloadError(self.url, f"unexpected 206 with Content-Range {cr!r}")
                # A proxy/server that mangles ranges: our bytes can't be continued safely.
                self._restart()
                raise _Retryable(f"asked for bytes={offset}-, got Content-Range {cr!r}")
            if offset and self.known is not None and version.differs_from(self.known):
                # Server ignored If-Range although the object changed.
                self._restart()
                return False
            body_len: int | None = end - start + 1
            self.resumed = self.resumed or offset > 0
        else:
            if offset:
                # If-Range did not match (remote changed) or no Range support: start over.
                self._restart()
                offset = 0
            body_len = _content_length(resp)
            version = RemoteVersion.from_headers(self.url, resp.headers, body_len)

        if (
            self.expected_size is not None
            and version.size is not None
            and version.size != self.expected_size
        ):
            # Checked before streaming: no point fetching 1.5 GB of the wrong object.
            raise self._fail(
                f"size mismatch, remote has {version.size} bytes, expected {self.expected_size}"
            )
        self._remember(version)

        received = self._stream(resp, offset, version.size)
        if body_len is not None and received < body_len:
            raise _Retryable(f"short read, got {received} of {body_len} body bytes")
        return True

    def _on_416(self, resp: requests.Response, offset: int) -> bool:
        total = _parse_content_range(resp.headers.get("Content-Range"))[2]
        if total is None and self.known is not None:
            total = self.known.size
        if total is None:
            total = self.expected_size
        if total is not None and offset == total:
            # The .part already holds everything (crash between last write and rename).
            known = self.known or RemoteVersion(self.url, total, None, None)
            self.known = RemoteVersion(
                self.url,
                total,
                resp.headers.get("ETag") or known.etag,
                resp.headers.get("Last-Modified") or known.last_modified,
            )
            self.resumed = True
            return True
        self._restart()
        return False

    def _stream(self, resp: requests.Response, offset: int, total: int | None) -> int:
        received = 0
        try:
            for chunk in resp.iter_content(self.chunk_size):
                if not chunk:
                    continue
                self.fh.write(chunk)
                if self.hasher is not None:
                    self.hasher.update(chunk)
                    self.hashed += len(chunk)
                received += len(chunk)
                self.fetched += len(chunk)
                if self.progress is not None:
                    self.progress(offset + received, total)
        except _STREAM_ERRORS as e:
            raise _Retryable(f"connection broke after {received} body bytes: {e}") from e
        finally:
            self.fh.flush()
        return received

    def _finish(self) -> DownloadResult:
        size = self.size()
        if self.expected_size is not None and size != self.expected_size:
            raise self._fail(f"size mismatch, got {size} bytes, expected {self.expected_size}")
        total = self.known.size if self.known is not None else None
        if total is not None and size != total:
            raise self._fail(f"size mismatch, got {size} bytes, expected {total}")
        if self.hasher is not None and self.hashed == size:
            digest: str | None = self.hasher.hexdigest()
        elif self.want_sha:
            digest = sha256_file(self.part)  # resumed: hash what is on disk
        else:
            digest = None
        if self.want_sha and digest != self.want_sha:
            raise self._fail(f"sha256 mismatch, got {digest}, expected {self.want_sha}")
        self.fh.flush()
        os.fsync(self.fh.fileno())
        os.replace(self.part, self.dest)
        _fsync_dir(self.dest.parent)
        self.meta.unlink(missing_ok=True)
        return DownloadResult(
            path=self.dest,
            bytes_total=size,
            bytes_fetched_this_call=self.fetched,
            resumed=self.resumed,
            attempts=self.attempts,
            skipped=False,
            sha256=digest,
            version=self.known,
        )
