"""Streaming reader for GCT v1.2 expression matrices (GTEx ``*_gene_tpm.gct[.gz]``).

Format::

    line 1   #1.2
    line 2   <n_genes>\\t<n_samples>
    line 3   Name\\tDescription\\t<sample id 1>\\t...\\t<sample id n>
    line 4+  <gene id>\\t<symbol>\\t<value 1>\\t...\\t<value n>

The full GTEx v8 file is 56,200 x 17,382 (2.6 GB of text), so it is never held whole:

* a reader thread decompresses (``isal`` when installed, else ``zlib``; both release the GIL)
  into a bounded queue, so decompression overlaps parsing on another core;
* the main thread cuts the text into blocks of whole lines (``block_bytes`` each);
* worker threads parse each block with a compiled (numba, ``nogil``) scanner straight from the
  bytes into a ``float32`` rows x samples array, then run the caller's ``map_fn`` on it (e.g.
  log-transform and per-gene statistics), so only what ``map_fn`` keeps outlives the block.

Every value is validated on this fast path: the scanner stops at the first bad field and
reports its position, so an error names the file, line, column (1-based, as an editor shows
fields; column 3 is the first sample) and the sample id. Checked: ``#1.2`` magic, the dimension
line against the header and the body, the header's ``Name``/``Description`` and duplicate
sample ids, field counts, non-numeric / empty / negative / non-finite values, duplicate gene
ids, and truncated or corrupt gzip data (naming the last complete line).
"""

from __future__ import annotations

import collections
import queue
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numba
import numpy as np

from gtex_assets.core.errors import InputError

try:  # ISA-L's inflate is ~3x zlib's; optional, same API.
    from isal import isal_zlib as _zlib_impl  # type: ignore[import-not-found]

    DECOMPRESSOR = "isal"
except ImportError:  # pragma: no cover - depends on the environment
    _zlib_impl = zlib
    DECOMPRESSOR = "zlib"
_ZLIB_ERRORS = tuple({zlib.error, getattr(_zlib_impl, "error", zlib.error)})

GCT_MAGIC = "#1.2"
FIRST_BODY_LINE = 4
DEFAULT_BLOCK_BYTES = 16 << 20  # text per parse task: ~350 GTEx rows, ~24 MB of float32
_PIECE = 8 << 20  # decompressed bytes per queue item (at most 6 queued)
_COMPRESSED_READ = 1 << 20

# Kernel result codes.
_OK, _E_FIELDS, _E_NONNUM, _E_NEG, _E_RANGE, _E_EMPTY_LINE, _E_EMPTY_ID = range(7)

_TAB, _NL, _CR, _DOT, _MINUS, _PLUS = 9, 10, 13, 46, 45, 43
_F32_MAX = float(np.finfo(np.float32).max)
_P10 = np.array([10.0**k for k in range(309)], dtype=np.float64)


def _dims_advice(fixed_line: str) -> str:
    """How to proceed when line 2 disagrees with the body (the file is cut short or edited)."""
    return (
        "Most often the file is truncated (an interrupted download or copy): delete it and "
        "download it again (the source sensor or a re-materialisation of gene_log_tpm fetches "
        "it). If the body is complete and was edited on purpose, correct line 2 to "
        f"{fixed_line!r}; nothing was written from this file."
    )


class GCTError(InputError):
    """Malformed GCT input. The message names the file, line (and column) and the problem."""

    def __init__(
        self,
        message: str,
        *,
        path: Path | None = None,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.line = line
        self.column = column


@dataclass(frozen=True)
class GCTHeader:
    path: Path
    n_genes: int  # as declared on line 2
    sample_ids: list[str]

    @property
    def n_samples(self) -> int:
        return len(self.sample_ids)


@dataclass
class GCTBlock:
    """Consecutive gene rows: ``values[i]`` is gene ``gene_ids[i]`` on line ``first_line + i``."""

    first_line: int
    gene_ids: list[str]
    symbols: list[str]
    values: np.ndarray  # float32, rows x samples, raw values as in the file (TPM)
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.gene_ids)


# --------------------------------------------------------------------------- the scanner


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _long_decimal(buf, pos):  # pragma: no cover - compiled
    """``(mantissa, exp10)`` of the digits[.digits] at ``pos``, keeping 18 significant digits."""
    mant = 0
    nd = 0
    exp10 = 0
    c = buf[pos]
    while c >= 48 and c <= 57:
        if nd < 18:
            mant = mant * 10 + (c - 48)
            if mant != 0:
                nd += 1
        else:
            exp10 += 1
        pos += 1
        c = buf[pos]
    if c == _DOT:
        pos += 1
        c = buf[pos]
        while c >= 48 and c <= 57:
            if nd < 18:
                mant = mant * 10 + (c - 48)
                if mant != 0:
                    nd += 1
                exp10 -= 1
            pos += 1
            c = buf[pos]
    return mant, exp10


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _parse_block(buf, n_samples, out, spans):  # pragma: no cover - compiled
    """Parse whole lines (``buf`` ends with ``\\n``) into ``out`` rows; ``spans[r]`` gets the
    byte ranges of the id and the description. Returns ``(rows, code, field, start, end, n)``:
    on error ``rows`` is the failing row, ``field`` its 0-based field, ``start:end`` the bad
    text and ``n`` the number of fields found (for field-count errors)."""
    n = buf.size
    pos = 0
    row = 0
    while pos < n:
        line_start = pos
        # Name
        while buf[pos] != _TAB and buf[pos] != _NL:
            pos += 1
        if buf[pos] == _NL:
            end = pos
            if end > line_start and buf[end - 1] == _CR:
                end -= 1
            if end == line_start:
                return row, _E_EMPTY_LINE, 0, line_start, end, 0
            return row, _E_FIELDS, 0, line_start, end, 1
        if pos == line_start:
            return row, _E_EMPTY_ID, 0, line_start, pos, 0
        spans[row, 0] = line_start
        spans[row, 1] = pos
        pos += 1
        # Description
        start = pos
        while buf[pos] != _TAB and buf[pos] != _NL:
            pos += 1
        if buf[pos] == _NL:
            return row, _E_FIELDS, 1, start, pos, 2
        spans[row, 2] = start
        spans[row, 3] = pos
        pos += 1
        # Values
        orow = out[row]
        for j in range(n_samples):
            start = pos
            c = buf[pos]
            neg = False
            if c == _MINUS:
                neg = True
                pos += 1
                c = buf[pos]
            elif c == _PLUS:
                pos += 1
                c = buf[pos]
            mant = 0
            exp10 = 0
            if c == 48 and (buf[pos + 1] == _TAB or buf[pos + 1] == _NL):
                pos += 1  # "0": most GTEx values; skip the general path
                c = buf[pos]
                ndig = 1
            else:
                dstart = pos
                while c >= 48 and c <= 57:
                    mant = mant * 10 + (c - 48)
                    pos += 1
                    c = buf[pos]
                ndig = pos - dstart
                if c == _DOT:
                    pos += 1
                    fstart = pos
                    c = buf[pos]
                    while c >= 48 and c <= 57:
                        mant = mant * 10 + (c - 48)
                        pos += 1
                        c = buf[pos]
                    exp10 = fstart - pos
                    ndig += pos - fstart
                if ndig > 18:  # would overflow int64: keep 18 significant digits
                    mant, exp10 = _long_decimal(buf, dstart)
            bad = ndig == 0
            if not bad and (c == 101 or c == 69):  # e / E
                pos += 1
                c = buf[pos]
                eneg = False
                if c == _MINUS:
                    eneg = True
                    pos += 1
                    c = buf[pos]
                elif c == _PLUS:
                    pos += 1
                    c = buf[pos]
                ev = 0
                edig = 0
                while c >= 48 and c <= 57:
                    if ev < 100000:
                        ev = ev * 10 + (c - 48)
                    edig += 1
                    pos += 1
                    c = buf[pos]
                if edig == 0:
                    bad = True
                exp10 += -ev if eneg else ev
            if c == _CR and buf[pos + 1] == _NL:
                pos += 1
                c = _NL
            if bad or (c != _TAB and c != _NL):
                while buf[pos] != _TAB and buf[pos] != _NL:
                    pos += 1
                end = pos
                if end > start and buf[end - 1] == _CR:
                    end -= 1
                return row, _E_NONNUM, 2 + j, start, end, 0
            if mant == 0:
                v = 0.0
            elif exp10 >= 0:
                if exp10 > 308:
                    return row, _E_RANGE, 2 + j, start, pos, 0
                v = mant * _P10[exp10]
            else:
                e = -exp10
                if e <= 22:
                    v = mant / _P10[e]
                elif e <= 330:
                    v = mant / _P10[22] / _P10[e - 22]
                else:
                    v = 0.0
            if neg and v != 0.0:
                return row, _E_NEG, 2 + j, start, pos, 0
            if v > _F32_MAX:
                return row, _E_RANGE, 2 + j, start, pos, 0
            orow[j] = v
            if j < n_samples - 1:
                if c == _NL:
                    end = pos
                    if buf[end - 1] == _CR:
                        end -= 1
                    return row, _E_FIELDS, 3 + j, line_start, end, 3 + j
                pos += 1
            else:
                if c == _TAB:
                    k = 2 + n_samples
                    while buf[pos] != _NL:
                        if buf[pos] == _TAB:
                            k += 1
                        pos += 1
                    return row, _E_FIELDS, 2 + n_samples, line_start, pos, k
                pos += 1
        row += 1
    return row, _OK, 0, 0, 0, 0


# --------------------------------------------------------------------------- byte source


class _Truncated(Exception):
    pass


class _Corrupt(Exception):
    pass


_EOF = object()


class _ByteSource:
    """Decompressed bytes of ``path`` in pieces, produced by a background thread."""

    def __init__(self, path: Path, max_pieces: int = 6) -> None:
        self.path = path
        self.gz = _is_gzip(path)
        self._q: queue.Queue = queue.Queue(maxsize=max_pieces)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"gct-read:{path.name}", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            with open(self.path, "rb", buffering=0) as f:
                if self.gz:
                    self._inflate(f)
                else:
                    while not self._stop.is_set():
                        piece = f.read(_PIECE)
                        if not piece:
                            break
                        if not self._put(piece):
                            return
            self._put(_EOF)
        except BaseException as e:  # handed to the consumer, which raises it
            self._put(e)

    def _inflate(self, f) -> None:
        d = _zlib_impl.decompressobj(31)
        member_done = False
        total_in = 0
        while not self._stop.is_set():
            comp = f.read(_COMPRESSED_READ)
            if not comp:
                break
            chunk_at = total_in
            total_in += len(comp)
            while comp:
                if member_done:  # concatenated gzip members (as `cat a.gz b.gz`)
                    if not comp.strip(b"\0"):
                        comp = b""  # zero padding after the last member
                        break
                    d = _zlib_impl.decompressobj(31)
                    member_done = False
                try:
                    out = d.decompress(comp, _PIECE)
                except _ZLIB_ERRORS as e:
                    raise _Corrupt(f"{e} (compressed bytes {chunk_at:,}-{total_in:,})") from e
                if out and not self._put(out):
                    return
                if d.eof:
                    member_done = True
                    comp = d.unused_data
                else:
                    comp = d.unconsumed_tail
        if not member_done and not self._stop.is_set():
            raise _Truncated()

    def pieces(self) -> Iterator[bytes]:
        while True:
            item = self._q.get()
            if item is _EOF:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


class _Lines:
    """Lines and blocks of whole lines over a piece iterator, counting lines as it goes."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self._buf = b""
        self._pos = 0
        self.eof = False

    def _more(self) -> bool:
        if self.eof:
            return False
        try:
            piece = next(self._pieces)
        except StopIteration:
            self.eof = True
            return False
        self._buf = self._buf[self._pos :] + piece
        self._pos = 0
        return True

    def readline(self) -> bytes | None:
        """One line without its line ending; None at end of input."""
        while True:
            i = self._buf.find(b"\n", self._pos)
            if i >= 0:
                line = self._buf[self._pos : i]
                self._pos = i + 1
                return line[:-1] if line.endswith(b"\r") else line
            if not self._more():
                if self._pos < len(self._buf):
                    line = self._buf[self._pos :]
                    self._pos = len(self._buf)
                    return line
                return None

    def blocks(self, block_bytes: int) -> Iterator[tuple[bytes, int, int]]:
        """Yield ``(data, length, n_lines)``: ``data[:length]`` holds whole lines, each ending
        with ``\\n`` (not sliced, to save a copy of every block).

        On a truncated or corrupt gzip stream the whole lines before the fault are yielded
        first, then ``_StreamEnd`` is raised (a partial last line is never parsed)."""
        pending: list[bytes] = [self._buf[self._pos :]]
        size = len(pending[0])
        self._buf, self._pos = b"", 0
        stream_error: _StreamEnd | None = None
        while True:
            got = False
            if not self.eof:
                try:
                    piece = next(self._pieces)
                    pending.append(piece)
                    size += len(piece)
                    got = True
                except StopIteration:
                    self.eof = True
                except _StreamEnd as e:
                    self.eof = True
                    stream_error = e
            if got and size < block_bytes:
                continue
            data = b"".join(pending) if len(pending) > 1 else pending[0]
            if stream_error is not None:
                cut = data.rfind(b"\n") + 1
                if cut:
                    yield data, cut, data.count(b"\n", 0, cut)
                stream_error.partial = cut < len(data)
                raise stream_error
            if self.eof:
                tail = data.rstrip(b"\r\n")
                if tail:
                    yield tail + b"\n", len(tail) + 1, tail.count(b"\n") + 1
                return
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # one line longer than a block: keep reading
                pending, size = [data], len(data)
                continue
            rest = data[cut:]
            pending, size = [rest], len(rest)
            yield data, cut, data.count(b"\n", 0, cut)


# --------------------------------------------------------------------------- reader


def _decode(raw: bytes, path: Path, line: int, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GCTError(
            f"{path}, line {line}: {what} is not valid UTF-8 ({e.reason})", path=path, line=line
        ) from None


def _parse_header(lines: _Lines, path: Path) -> GCTHeader:
    first = lines.readline()
    if first is None:
        raise GCTError(
            f"{path}: empty file (expected a GCT starting with '#1.2')", path=path, line=1
        )
    magic = first.decode("utf-8", "replace").strip()
    if magic != GCT_MAGIC:
        raise GCTError(
            f"{path}, line 1: expected '{GCT_MAGIC}' (GCT v1.2), got {magic[:40]!r}",
            path=path,
            line=1,
        )
    dims_raw = lines.readline()
    if dims_raw is None:
        raise GCTError(f"{path}: ends after line 1 (no dimension line)", path=path, line=2)
    dims = dims_raw.decode("utf-8", "replace").strip().split("\t")
    try:
        n_genes, n_samples = (int(x) for x in dims)
        if n_genes < 0 or n_samples < 0:
            raise ValueError
    except ValueError:
        raise GCTError(
            f"{path}, line 2: expected '<n_genes>\\t<n_samples>', got {dims_raw[:60]!r}",
            path=path,
            line=2,
        ) from None
    header_raw = lines.readline()
    if header_raw is None:
        raise GCTError(f"{path}: ends after line 2 (no header line)", path=path, line=3)
    header = _decode(header_raw, path, 3, "the header").split("\t")
    if header[:2] != ["Name", "Description"]:
        raise GCTError(
            f"{path}, line 3: header must start with 'Name\\tDescription', got {header[:2]}",
            path=path,
            line=3,
        )
    samples = header[2:]
    if not samples:
        raise GCTError(f"{path}, line 3: the header has no sample columns", path=path, line=3)
    if len(samples) != n_samples:
        raise GCTError(
            f"{path}, line 2: declares {n_samples} samples but the header on line 3 has "
            f"{len(samples)} sample columns. {_dims_advice(f'<n_genes>{chr(9)}{len(samples)}')}",
            path=path,
            line=2,
        )
    seen: dict[str, int] = {}
    for col, sid in enumerate(samples, start=3):
        if not sid.strip():
            raise GCTError(
                f"{path}, line 3, column {col}: empty sample id", path=path, line=3, column=col
            )
        if sid in seen:
            raise GCTError(
                f"{path}, line 3: duplicate sample id {sid!r} in columns {seen[sid]} and {col}",
                path=path,
                line=3,
                column=col,
            )
        seen[sid] = col
    return GCTHeader(path=path, n_genes=n_genes, sample_ids=samples)


def read_gct_header(path: str | Path) -> GCTHeader:
    """The header (declared dimensions and sample ids) without reading the matrix."""
    path = Path(path)
    with GCTReader(path) as r:
        return r.header


def _guard(pieces: Iterator[bytes], path: Path) -> Iterator[bytes]:
    """Translate the reader thread's exceptions."""
    try:
        yield from pieces
    except _Truncated:
        raise _StreamEnd("truncated") from None
    except _Corrupt as e:
        raise _StreamEnd("corrupt", str(e)) from None
    except OSError as e:
        raise GCTError(f"{path}: cannot read ({e})", path=path) from e


class _StreamEnd(Exception):
    """Internal: the gzip stream is truncated or corrupt; the reader turns it into a GCTError
    naming the last complete line."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(kind, detail)
        self.kind = kind
        self.detail = detail
        self.partial = False

    def error(self, path: Path, last_line: int, last_gene: str) -> GCTError:
        gene = f" (gene {last_gene})" if last_gene else ""
        where = f"the last complete line is {last_line}{gene}"
        if self.partial:
            where += f"; line {last_line + 1} is cut off"
        if self.kind == "truncated":
            msg = (
                f"{path}: truncated gzip stream (the file ends before the gzip end marker); "
                f"{where}. Re-download the file."
            )
        else:
            msg = f"{path}: corrupt gzip data: {self.detail}; {where}. Re-download the file."
        return GCTError(msg, path=path, line=last_line + 1)


class GCTReader:
    """Stream a GCT: ``with GCTReader(path) as r: r.header; for blk in r.blocks(): ...``.

    ``workers`` threads parse blocks (and run ``map_fn``) while one more thread decompresses.
    """

    def __init__(
        self, path: str | Path, *, workers: int = 2, block_bytes: int = DEFAULT_BLOCK_BYTES
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise GCTError(f"{self.path}: no such file", path=self.path)
        self.workers = max(1, int(workers))
        self.block_bytes = max(1, int(block_bytes))
        self._src = _ByteSource(self.path)
        self._lines = _Lines(_guard(self._src.pieces(), self.path))
        try:
            self.header = _parse_header(self._lines, self.path)
        except _StreamEnd as e:
            self.close()
            raise GCTError(
                f"{self.path}: gzip stream {e.kind} inside the header lines: {e.detail}".rstrip(
                    ": "
                ),
                path=self.path,
                line=1,
            ) from None
        except BaseException:
            self.close()
            raise
        self.rows = 0

    def __enter__(self) -> GCTReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._src.close()

    def blocks(self, map_fn: Callable[[GCTBlock], Any] | None = None) -> Iterator[Any]:
        """Yield each block (or ``map_fn(block)``, computed in a worker) in file order."""
        path, hdr = self.path, self.header
        seen_ids: dict[str, int] = {}
        last_gene = ""
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="gct-parse")
        pending: collections.deque[tuple[Future, int, int]] = collections.deque()

        def finish(item: tuple[Future, int, int]) -> Any:
            nonlocal last_gene
            fut, first, n = item
            blk, result = fut.result()
            for i, gid in enumerate(blk.gene_ids):
                if gid in seen_ids:
                    raise GCTError(
                        f"{path}, line {first + i}: gene id {gid!r} repeats line {seen_ids[gid]}",
                        path=path,
                        line=first + i,
                        column=1,
                    )
                seen_ids[gid] = first + i
            last_gene = blk.gene_ids[-1] if blk.gene_ids else last_gene
            self.rows += n
            return result

        line = FIRST_BODY_LINE
        try:
            try:
                for data, length, n in self._lines.blocks(self.block_bytes):
                    if line - FIRST_BODY_LINE + n > hdr.n_genes:
                        raise GCTError(
                            f"{path}, line 2: declares {hdr.n_genes} genes but the body has more "
                            f"(line {FIRST_BODY_LINE + hdr.n_genes} is gene {hdr.n_genes + 1}). "
                            + _dims_advice(f"<n_genes>{chr(9)}{hdr.n_samples}"),
                            path=path,
                            line=2,
                        )
                    pending.append(
                        (pool.submit(self._task, data, length, n, line, map_fn), line, n)
                    )
                    line += n
                    while len(pending) > self.workers:
                        yield finish(pending.popleft())
            except _StreamEnd as e:
                while pending:  # errors earlier in the file come first
                    yield finish(pending.popleft())
                raise e.error(path, FIRST_BODY_LINE - 1 + self.rows, last_gene) from None
            while pending:
                yield finish(pending.popleft())
        finally:
            for fut, _, _ in pending:
                fut.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
        n_body = line - FIRST_BODY_LINE
        if n_body != hdr.n_genes:
            raise GCTError(
                f"{path}, line 2: declares {hdr.n_genes} genes but the body has {n_body} gene rows "
                f"(lines {FIRST_BODY_LINE}-{line - 1}). "
                + _dims_advice(f"{n_body}{chr(9)}{hdr.n_samples}"),
                path=path,
                line=2,
            )

    def _task(
        self, data: bytes, length: int, n: int, first: int, map_fn: Callable | None
    ) -> tuple[GCTBlock, Any]:
        blk = parse_lines(data, n, first, self.header, self.path, length=length)
        return blk, (map_fn(blk) if map_fn is not None else blk)


def parse_lines(
    data: bytes,
    n_lines: int,
    first_line: int,
    header: GCTHeader,
    path: Path,
    length: int | None = None,
) -> GCTBlock:
    """Parse ``n_lines`` whole body lines, ``data[:length]`` (ending with ``\\n``), into a block."""
    ns = header.n_samples
    buf = np.frombuffer(data, dtype=np.uint8, count=len(data) if length is None else length)
    out = np.empty((n_lines, ns), dtype=np.float32)
    spans = np.empty((n_lines, 4), dtype=np.int64)
    rows, code, fld, start, end, nf = _parse_block(buf, ns, out, spans)
    if code != _OK:
        _raise(code, first_line + rows, fld, data[start:end], nf, header, path)
    ids = [
        _decode(data[s:e], path, first_line + i, "the gene id")
        for i, (s, e) in enumerate(spans[:, :2].tolist())
    ]
    syms = [
        _decode(data[s:e], path, first_line + i, "the description")
        for i, (s, e) in enumerate(spans[:, 2:].tolist())
    ]
    return GCTBlock(first_line=first_line, gene_ids=ids, symbols=syms, values=out)


def _raise(
    code: int, line: int, fld: int, raw: bytes, nf: int, header: GCTHeader, path: Path
) -> None:
    text = raw.decode("utf-8", "replace")
    col = fld + 1
    where = f"{path}, line {line}"
    if fld >= 2 and fld - 2 < header.n_samples:
        where_col = f"{where}, column {col} (sample {header.sample_ids[fld - 2]})"
    else:
        where_col = f"{where}, column {col}"
    expected = 2 + header.n_samples
    if code == _E_FIELDS:
        gene = text.split("\t", 1)[0]
        msg = (
            f"{where}: {nf} fields, expected {expected} (Name, Description and the "
            f"{header.n_samples} samples of the header)" + (f"; gene {gene!r}" if gene else "")
        )
        raise GCTError(msg, path=path, line=line, column=min(nf, expected) + 1)
    if code == _E_EMPTY_LINE:
        raise GCTError(f"{where}: empty line inside the matrix", path=path, line=line)
    if code == _E_EMPTY_ID:
        raise GCTError(f"{where}, column 1: empty gene id (Name)", path=path, line=line, column=1)
    if code == _E_NONNUM:
        what = "empty value" if not text else f"non-numeric value {text[:40]!r}"
        raise GCTError(
            f"{where_col}: {what} (expected a number >= 0)", path=path, line=line, column=col
        )
    if code == _E_NEG:
        raise GCTError(
            f"{where_col}: negative value {text!r} (TPM must be >= 0)",
            path=path,
            line=line,
            column=col,
        )
    if code == _E_RANGE:
        raise GCTError(
            f"{where_col}: value {text!r} is out of float32 range", path=path, line=line, column=col
        )
    raise GCTError(f"{where}: parse error {code}", path=path, line=line)  # pragma: no cover


def read_gct(
    path: str | Path, *, workers: int = 1, block_bytes: int = DEFAULT_BLOCK_BYTES
) -> tuple[GCTHeader, list[str], list[str], np.ndarray]:
    """Whole GCT in memory: ``(header, gene_ids, symbols, values genes x samples float32)``.
    For small files and tests; large files should stream with :class:`GCTReader`."""
    with GCTReader(path, workers=workers, block_bytes=block_bytes) as r:
        blocks = list(r.blocks())
        header = r.header
    ids = [g for b in blocks for g in b.gene_ids]
    syms = [s for b in blocks for s in b.symbols]
    values = (
        np.concatenate([b.values for b in blocks])
        if blocks
        else np.empty((0, header.n_samples), np.float32)
    )
    return header, ids, syms, values
