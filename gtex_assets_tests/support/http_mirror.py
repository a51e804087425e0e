"""Serve a local directory over HTTP with Range/If-Range support and fault injection.

A test/dev helper (stdlib only) that behaves like the parts of a GCS bucket that
:mod:`gtex_assets.lib.ingest.download` relies on: HEAD, single byte ranges (206 / 416), strong ETags,
Last-Modified and ``If-Range``. A :class:`MirrorController` lets tests cut response bodies after N
bytes (a dropped connection mid-transfer), answer the next requests with error statuses, and
inspect which requests arrived.

    ctl = MirrorController()
    with serve_directory(tmp_path, controller=ctl) as base_url:
        ctl.break_next(1 << 20)          # the next GET body stops after 1 MiB
        download(f"{base_url}/slide.svs", dest, retries=0)
"""

from __future__ import annotations

import contextlib
import logging
import mimetypes
import os
import re
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

__all__ = ["MirrorController", "RecordedRequest", "etag_for", "serve_directory"]

log = logging.getLogger(__name__)

_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")
_COPY_CHUNK = 64 * 1024


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # percent-decoded URL path, query dropped
    headers: dict[str, str]


@dataclass
class MirrorController:
    """Mutable knobs shared with the handler threads; change them between requests.

    ``fail_after_bytes``/``fail_times``: the next ``fail_times`` GET responses send only that many
    body bytes, then the server shuts the socket down (the client sees a short read).
    ``error_statuses``: answered, in order, to the next requests (any method) instead of serving.
    """

    fail_after_bytes: int | None = None
    fail_times: int = 0
    error_statuses: list[int] = field(default_factory=list)
    requests: list[RecordedRequest] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def break_next(self, after_bytes: int, times: int = 1) -> None:
        with self._lock:
            self.fail_after_bytes, self.fail_times = after_bytes, times

    def fail_next_with(self, *statuses: int) -> None:
        with self._lock:
            self.error_statuses.extend(statuses)

    def gets(self) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.method == "GET"]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self.error_statuses.clear()
            self.fail_after_bytes, self.fail_times = None, 0

    def _record(self, req: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(req)

    def _take_error(self) -> int | None:
        with self._lock:
            return self.error_statuses.pop(0) if self.error_statuses else None

    def _take_fault(self) -> int | None:
        with self._lock:
            if self.fail_after_bytes is None or self.fail_times <= 0:
                return None
            self.fail_times -= 1
            return self.fail_after_bytes


def etag_for(st: os.stat_result) -> str:
    """Strong ETag of a file: changes when it is replaced (inode), resized or touched."""
    return f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'


class _MirrorServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], root: Path, controller: MirrorController):
        self.root = root
        self.controller = controller
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients hanging up mid-body is normal (and provoked by fault injection): stay quiet.
        exc = sys.exc_info()[1]
        if not isinstance(exc, ConnectionError | TimeoutError):
            log.exception("http_mirror: error while serving %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _MirrorServer
    protocol_version = "HTTP/1.1"  # keep-alive with Content-Length framing, like real servers
    server_version = "gtex-http-mirror/1"
    sys_version = ""

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: tests provoke errors on purpose

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def do_GET(self) -> None:
        self._serve(send_body=True)

    # -- helpers -----------------------------------------------------------------------------

    def _send_status(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _resolve(self, rel: str) -> Path | None:
        """Map a decoded URL path under root; None when it tries to escape (``..``, NUL, ``\\``)."""
        parts = rel.split("/")
        if any(p == ".." for p in parts) or "\x00" in rel or "\\" in rel:
            return None
        return self.server.root.joinpath(*[p for p in parts if p not in ("", ".")])

    def _wanted_range(
        self, size: int, etag: str, last_modified: str
    ) -> tuple[int, int] | str | None:
        """(start, end) inclusive, ``"unsatisfiable"``, or None to send the whole file."""
        value = self.headers.get("Range")
        if not value:
            return None
        if_range = self.headers.get("If-Range")
        if if_range is not None and if_range.strip() not in (etag, last_modified):
            return None  # validator mismatch: the client's bytes are stale, send everything
        m = _RANGE_RE.fullmatch(value.strip())
        if not m or not (m[1] or m[2]):
            return None  # multi-range or garbage: ignoring Range is allowed
        if m[1]:
            start = int(m[1])
            if m[2] and int(m[2]) < start:
                return None  # syntactically invalid range: ignore it
            if start >= size:
                return "unsatisfiable"
            return start, min(int(m[2]) if m[2] else size - 1, size - 1)
        suffix = int(m[2])
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - suffix), size - 1

    def _serve(self, *, send_body: bool) -> None:
        ctl = self.server.controller
        rel = unquote(urlsplit(self.path).path).lstrip("/")
        ctl._record(RecordedRequest(self.command, "/" + rel, dict(self.headers.items())))

        status = ctl._take_error()
        if status is not None:
            self._send_status(status)
            return
        path = self._resolve(rel)
        if path is None:
            self._send_status(403)
            return
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed in the finally below
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            self._send_status(404)
            return
        try:
            st = os.fstat(f.fileno())
            size = st.st_size
            etag = etag_for(st)
            last_modified = formatdate(st.st_mtime, usegmt=True)
            common = {
                "Accept-Ranges": "bytes",
                "ETag": etag,
                "Last-Modified": last_modified,
            }
            rng = self._wanted_range(size, etag, last_modified)
            if rng == "unsatisfiable":
                self._send_status(416, {**common, "Content-Range": f"bytes */{size}"})
                return
            if isinstance(rng, tuple):
                start, end = rng
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            else:
                start, end = 0, size - 1
                self.send_response(200)
            length = end - start + 1
            ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            for k, v in {**common, "Content-Type": ctype, "Content-Length": str(length)}.items():
                self.send_header(k, v)
            self.end_headers()
            if send_body:
                self._send_body(f, start, length, ctl._take_fault())
        finally:
            f.close()

    def _send_body(self, f: BinaryIO, start: int, length: int, budget: int | None) -> None:
        f.seek(start)
        remaining = length
        try:
            while remaining > 0:
                n = min(_COPY_CHUNK, remaining)
                if budget is not None:
                    n = min(n, budget)
                    if n <= 0:
                        break
                data = f.read(n)
                if not data:
                    break  # file shrank under us
                self.wfile.write(data)
                remaining -= len(data)
                if budget is not None:
                    budget -= len(data)
            if remaining > 0:
                # Injected fault (or shrinking file): hang up so the client sees a short body.
                self.wfile.flush()
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


@contextlib.contextmanager
def serve_directory(
    root: str | Path,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    controller: MirrorController | None = None,
) -> Iterator[str]:
    """Serve ``root`` in a daemon thread; yields the base URL (no trailing slash)."""
    server = _MirrorServer((host, port), Path(root).resolve(), controller or MirrorController())
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        bound_host, bound_port = server.server_address[:2]
        if ":" in str(bound_host):
            bound_host = f"[{bound_host}]"
        yield f"http://{bound_host}:{bound_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
