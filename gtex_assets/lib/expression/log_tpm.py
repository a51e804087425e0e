"""SPEC §5: the GTEx TPM matrix -> a filtered log2(1+TPM) matrix, in one streaming pass.

Filters, applied in this order (a gene's ``drop_reason`` is the first one it fails):

1. ``lowly_expressed``: keep genes with logTPM > ``min_max_log_tpm`` (5) in at least one
   sample, i.e. ``max_log_tpm > 5``.
2. ``non_variable``: keep genes with ``std_log_tpm > min_std`` (0.5); the standard deviation
   over all samples with ``ddof=1`` (pandas' default, as in the study's notebooks).
3. ``nonstandard_name``: keep genes whose symbol (the GCT ``Description``) is an HGNC-style
   gene symbol; see :func:`name_problem` for the exact rule.
4. ``duplicate_name``: drop every gene whose symbol is carried by more than one Ensembl gene
   in the *whole file* (all copies, whatever their expression: the symbol is ambiguous as a
   key). Ensembl ids are compared without their version (``ENSG00000223972.5`` ->
   ``ENSG00000223972``). A ``<id>_PAR_Y`` row is the Y copy of a pseudoautosomal gene
   (GTEx v8 has 44, all zeros); it is dropped as a duplicate of its X copy and does not make
   the X copy a duplicate.

Name rule (:func:`name_problem`), in order; the first match is the reason:

* ``empty``: empty or whitespace.
* ``clone-based``: contig/clone names, not gene symbols: anything containing ``.``
  (``RP11-34P13.3``, ``AC012345.1``, ``AL627309.1``, ``CTD-2588J6.1``), bare accessions
  (two letters + 6 digits, ``AC012345``) and clone-library prefixes (``RP<n>-``, ``CT[ABCD]-``,
  ``KB-``, ``XXbac-``, ``XXyac-``, ``LL<n>NC<n>-``, ``WI2-``).
* ``RNA family``: Rfam family labels that Ensembl gives to unnamed small RNAs rather than
  genes: ``Y_RNA``, ``U<n>`` (``U1``..``U8``, ``U6atac``...), ``7SK``, ``Metazoa_SRP``,
  ``5S_rRNA``, ``5_8S_rRNA``, ``Vault``, ``snoU13``/``snoZ<n>``/``snoR<n>``, ``ACA<n>``,
  ``scaRNA<n>``, ``uc_338``, bare ``SNORA``/``SNORD``. HGNC-approved small-RNA symbols such
  as ``SNORA70``, ``SNORD3A``, ``RNU6-1``, ``MIR1302-2`` are standard (a repeated one is then
  caught by the duplicate rule).
* ``not HGNC-like``: does not match ``^[A-Z][A-Z0-9]*(orf[0-9]+)?[A-Z0-9]*(-[A-Z0-9]+)*$``
  (upper-case letters and digits, hyphen-joined parts, the only lower case being the
  ``orf`` of ``C1orf112``), e.g. ``hsa-mir-1253``, ``Metazoa_SRP``, ``IGHV1-12_1``.

Outputs (under the data root): the kept matrix ``expression/log_tpm.npy`` (float32, samples x
kept genes, Fortran order so each gene's column is contiguous; ``np.load(mmap_mode="r")``),
``tables/expression_genes.parquet`` (every gene, with max/std and the verdict),
``tables/expression_samples.parquet`` (aliquot -> tissue sample -> tissue, ``sample_index`` =
row of the matrix), the gene-major ``tables/expression_matrix.parquet`` for SQL (one row per kept
gene, ``log_tpm`` a list in sample order) and ``expression/manifest.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numba
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from gtex_assets.core.atomic import atomic_path, params_hash
from gtex_assets.core.ids import aliquot_to_sample_id
from gtex_assets.lib.expression.gct import DECOMPRESSOR, DEFAULT_BLOCK_BYTES, GCTBlock, GCTReader

MIN_MAX_LOG_TPM = 5.0
MIN_STD = 0.5
STD_DDOF = 1
DROP_REASONS = ("lowly_expressed", "non_variable", "nonstandard_name", "duplicate_name")
FORMAT_VERSION = 1

# Value histogram: bin 0 counts exact zeros, then 0.25-wide bins over (0, 21] (log2(1+1e6)
# is 19.93; larger values land in the last bin).
HIST_BIN_WIDTH = 0.25
HIST_NBINS = 84
HIST_EDGES = np.arange(HIST_NBINS + 1, dtype=np.float64) * HIST_BIN_WIDTH

MATRIX_ROW_GROUP_GENES = 32  # expression_matrix.parquet: ~2 MB per row group at 17,382 samples

# ----------------------------------------------------------------------------- names

_HGNC_RE = re.compile(r"^[A-Z][A-Z0-9]*(?:orf[0-9]+)?[A-Z0-9]*(?:-[A-Z0-9]+)*$")
_CLONE_RE = re.compile(
    r"\.|^[A-Z]{2}[0-9]{6}$|^(?:RP[0-9]+|CT[ABCD]|KB|XXbac|XXyac|XXcos|LL[0-9]+NC[0-9]+|WI2)-"
)
_RNA_FAMILY_RE = re.compile(
    r"^(?:Y_RNA|U[0-9]+(?:atac)?|7SK|Metazoa_SRP|5S_rRNA|5_8S_rRNA|Vault|sno[UZR][0-9A-Za-z-]*|"
    r"ACA[0-9]+|scaRNA[0-9]*|uc_[0-9]+|SNOR[AD]?|snoMBII-[0-9A-Z-]+|snosnR[0-9]+|"
    r"Ciliate_telomerase|Plasmodium_snoR[0-9]+)$"
)


def name_problem(symbol: str | None) -> str | None:
    """Why ``symbol`` is not a standard gene symbol (``None`` when it is). See the module doc."""
    if symbol is None or not symbol.strip():
        return "empty"
    if _CLONE_RE.search(symbol):
        return "clone-based"
    if _RNA_FAMILY_RE.match(symbol):
        return "RNA family"
    if not _HGNC_RE.match(symbol):
        return "not HGNC-like"
    return None


def is_standard_symbol(symbol: str | None) -> bool:
    return name_problem(symbol) is None


def base_gene_id(gene_id: str) -> str:
    """Ensembl id without version or PAR suffix: ``ENSG00000002586.18_PAR_Y`` -> ``ENSG00000002586``."""
    gid = gene_id[: -len("_PAR_Y")] if gene_id.endswith("_PAR_Y") else gene_id
    return gid.split(".", 1)[0]


def duplicate_mask(gene_ids: list[str], symbols: list[str]) -> np.ndarray:
    """True for every gene whose symbol names more than one Ensembl gene in the file (all
    copies), and for ``_PAR_Y`` rows whose X copy is in the file."""
    df = pl.DataFrame(
        {"gid": gene_ids, "sym": symbols, "base": [base_gene_id(g) for g in gene_ids]},
        schema={"gid": pl.String, "sym": pl.String, "base": pl.String},
    ).with_columns(par_y=pl.col("gid").str.ends_with("_PAR_Y"))
    non_par = df.filter(~pl.col("par_y"))
    per_symbol = non_par.group_by("sym").agg(pl.col("base").n_unique())
    dup_symbols = per_symbol.filter(pl.col("base") > 1)["sym"]
    dup = pl.col("sym").is_in(dup_symbols.implode()) | (
        pl.col("par_y") & pl.col("base").is_in(non_par["base"].implode())
    )
    return df.select(dup.fill_null(False))["sym"].to_numpy().astype(bool)


# ----------------------------------------------------------------------------- numerics


@dataclass(frozen=True)
class ExpressionParams:
    """SPEC §5 defaults."""

    min_max_log_tpm: float = MIN_MAX_LOG_TPM
    min_std: float = MIN_STD
    drop_nonstandard_names: bool = True
    drop_duplicate_names: bool = True
    std_ddof: int = STD_DDOF

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def log_tpm(tpm: np.ndarray) -> np.ndarray:
    """log2(1 + TPM) in float32, computed in place when ``tpm`` is float32."""
    out = np.asarray(tpm, dtype=np.float32)
    np.add(out, np.float32(1.0), out=out)
    np.log2(out, out=out)
    return out


@numba.njit(nogil=True, cache=True, boundscheck=False, fastmath=True)
def _row_stats(v, hist):  # pragma: no cover - compiled
    """Per row of log values (>= 0): max, sum, sum of squares (float64); ``hist[r]`` gets the
    row's value histogram (bin 0: exact zeros, then ``HIST_BIN_WIDTH`` bins)."""
    rows, n = v.shape
    mx = np.empty(rows, np.float32)
    s1 = np.empty(rows, np.float64)
    s2 = np.empty(rows, np.float64)
    inv = 1.0 / HIST_BIN_WIDTH
    last = HIST_NBINS - 1
    sub = np.zeros((4, HIST_NBINS + 1), np.int64)  # 4 sub-histograms: no store-forward stalls
    for r in range(rows):
        row = v[r]
        m = np.float32(0.0)
        a = 0.0
        b = 0.0
        for j in range(n):  # vectorised reduction (fastmath lets LLVM reorder the sums)
            y = row[j]
            m = max(m, y)
            a += y
            b += np.float64(y) * y
        mx[r] = m
        s1[r] = a
        s2[r] = b
        sub[:] = 0
        j = 0
        while j + 3 < n:
            for u in range(4):
                y = row[j + u]
                k = min(int(y * inv), last) + 1
                if y == 0:
                    k = 0
                sub[u, k] += 1
            j += 4
        while j < n:
            y = row[j]
            k = min(int(y * inv), last) + 1
            if y == 0:
                k = 0
            sub[0, k] += 1
            j += 1
        for u in range(4):
            for k in range(HIST_NBINS + 1):
                hist[r, k] += sub[u, k]
    return mx, s1, s2


def row_std(s1: np.ndarray, s2: np.ndarray, n: int, ddof: int = STD_DDOF) -> np.ndarray:
    """Standard deviation from per-row sums (float64; values are small logs, so the one-pass
    formula loses nothing that matters at float32 output precision)."""
    if n - ddof <= 0:
        return np.full(s1.shape, np.nan)
    var = (s2 - s1 * s1 / n) / (n - ddof)
    return np.sqrt(np.maximum(var, 0.0))


@dataclass
class _BlockResult:
    gene_ids: list[str]
    symbols: list[str]
    max_log: np.ndarray
    mean_log: np.ndarray
    std_log: np.ndarray
    hist_sum: np.ndarray  # value histogram of the whole block
    cand: np.ndarray  # rows (within the block) that pass the per-gene filters
    cand_hist: np.ndarray  # their value histograms (for the "after" distribution)
    values: np.ndarray | None  # the block's log values (rows x samples), float32


def _process_block(blk: GCTBlock, params: ExpressionParams) -> _BlockResult:
    """In a worker thread: log2(1+TPM) in place, per-gene stats, the per-gene filters."""
    v = log_tpm(blk.values)
    n = v.shape[1]
    hist = np.zeros((v.shape[0], 1 + HIST_NBINS), dtype=np.int64)
    mx, s1, s2 = _row_stats(v, hist)
    std = row_std(s1, s2, n, params.std_ddof)
    keep = (mx > params.min_max_log_tpm) & (std > params.min_std)
    if params.drop_nonstandard_names:
        keep &= np.fromiter((is_standard_symbol(s) for s in blk.symbols), bool, len(blk.symbols))
    cand = np.flatnonzero(keep)
    return _BlockResult(
        gene_ids=blk.gene_ids,
        symbols=blk.symbols,
        max_log=mx,
        mean_log=s1 / max(n, 1),
        std_log=std,
        hist_sum=hist.sum(axis=0),
        cand=cand,
        cand_hist=hist[cand],
        values=v,
    )


class RowStore:
    """Append-only float32 rows in large slabs. Slabs of >= 64 MB are always memory-mapped by
    glibc (its mmap threshold tops out at 32 MB), so holding ~1 GB of rows while blocks come
    and go never fragments the heap, and a row, once stored, is never copied again."""

    def __init__(self, n_cols: int, slab_bytes: int = 64 << 20) -> None:
        self.n_cols = n_cols
        self.rows_per_slab = max(1, slab_bytes // max(4 * n_cols, 1))
        self.slabs: list[np.ndarray] = []
        self._used = 0  # rows used in the last slab
        self.n_rows = 0

    def append(self, values: np.ndarray, rows: np.ndarray) -> None:
        """Copy ``values[rows]`` to the end of the store."""
        i = 0
        while i < len(rows):
            if not self.slabs or self._used == self.rows_per_slab:
                self.slabs.append(np.empty((self.rows_per_slab, self.n_cols), np.float32))
                self._used = 0
            take = min(self.rows_per_slab - self._used, len(rows) - i)
            slab = self.slabs[-1]
            np.take(values, rows[i : i + take], axis=0, out=slab[self._used : self._used + take])
            self._used += take
            self.n_rows += take
            i += take

    def runs(self, keep: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Views of the stored rows where ``keep`` (one flag per stored row) is true, as
        ``(stored row numbers, rows)`` for each run of consecutive kept rows in a slab."""
        out: list[tuple[np.ndarray, np.ndarray]] = []
        for k, slab in enumerate(self.slabs):
            base = k * self.rows_per_slab
            n = min(self.rows_per_slab, self.n_rows - base)
            flags = keep[base : base + n].astype(np.int8)
            edges = np.flatnonzero(np.diff(np.concatenate([[0], flags, [0]])))
            for a, b in zip(edges[::2], edges[1::2], strict=True):
                out.append((np.arange(base + a, base + b), slab[a:b]))
        return out


@dataclass
class ExpressionResult:
    """The filtered matrix (kept genes' rows, gene-major, in chunks) and everything about it."""

    source: Path
    sample_ids: list[str]
    genes: pl.DataFrame  # every gene: gene_id, symbol, max/mean/std, kept, drop_reason, ...
    chunks: list[tuple[np.ndarray, np.ndarray]]  # (gene indices, float32 rows) of kept genes
    counts: dict[str, int]
    hist_before: np.ndarray
    hist_after: np.ndarray
    params: ExpressionParams
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def n_kept(self) -> int:
        return int(self.genes["kept"].sum())

    def funnel(self) -> pl.DataFrame:
        """Genes left after each SPEC §5 filter, and the drop reason each filter records."""
        c, p = self.counts, self.params
        return pl.DataFrame(
            {
                "filter": ["genes in the GCT", f"max logTPM > {p.min_max_log_tpm:g}",
                           f"std > {p.min_std:g}", "standard symbol", "unique symbol (kept)"],
                "genes": [c["genes_in"], c["after_expression"], c["after_variance"],
                          c["after_name"], c["kept"]],
                "drop_reason": ["", *DROP_REASONS],
            }
        )  # fmt: skip

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the kept matrix, samples x genes."""
        return (len(self.sample_ids), self.n_kept)

    def iter_kept_rows(self) -> Iterator[np.ndarray]:
        """Kept genes' log values (one float32 row over samples each), in gene order."""
        for _, rows in self.chunks:
            yield from rows

    def kept_matrix(self) -> np.ndarray:
        """The kept matrix as one samples x genes array (a copy; fine for small data)."""
        if not self.chunks:
            return np.empty((len(self.sample_ids), 0), np.float32)
        return np.concatenate([rows for _, rows in self.chunks]).T


def filter_gct(
    path: str | Path,
    params: ExpressionParams | None = None,
    *,
    workers: int = 2,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> ExpressionResult:
    """Stream ``path`` once: log2(1+TPM), per-gene max/std, the four filters.

    Memory: the rows of genes that pass the per-gene filters (float32; the duplicate-name
    rule needs the whole file, so its few victims are dropped at the end without copying),
    plus a few blocks in flight."""
    params = params or ExpressionParams()
    t0 = time.perf_counter()
    gene_ids: list[str] = []
    symbols: list[str] = []
    stats: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    cand_idx: list[np.ndarray] = []
    cand_hist: list[np.ndarray] = []
    hist_before = np.zeros(1 + HIST_NBINS, np.int64)
    with GCTReader(path, workers=workers, block_bytes=block_bytes) as reader:
        sample_ids = list(reader.header.sample_ids)
        store = RowStore(len(sample_ids))
        for res in reader.blocks(lambda b: _process_block(b, params)):
            store.append(res.values, res.cand)
            res.values = None  # the block's array goes back before the next one arrives
            cand_idx.append(res.cand + len(gene_ids))
            cand_hist.append(res.cand_hist)
            hist_before += res.hist_sum
            gene_ids += res.gene_ids
            symbols += res.symbols
            stats.append((res.max_log, res.mean_log, res.std_log))
    t_parse = time.perf_counter() - t0

    ng = len(gene_ids)
    max_log = _cat([s[0] for s in stats], np.float32)
    mean_log = _cat([s[1] for s in stats], np.float64)
    std_log = _cat([s[2] for s in stats], np.float64)
    pass_expr = max_log > params.min_max_log_tpm
    pass_var = std_log > params.min_std
    problems = [name_problem(s) for s in symbols]
    standard = np.array([p is None for p in problems], dtype=bool)
    dup = duplicate_mask(gene_ids, symbols) if ng else np.zeros(0, bool)
    pass_name = standard | (not params.drop_nonstandard_names)
    pass_dup = ~dup | (not params.drop_duplicate_names)

    reason = np.full(ng, None, dtype=object)
    reason[~pass_dup] = "duplicate_name"
    reason[~pass_name] = "nonstandard_name"
    reason[~pass_var] = "non_variable"
    reason[~pass_expr] = "lowly_expressed"
    kept = pass_expr & pass_var & pass_name & pass_dup

    stored = _cat(cand_idx, np.int64)  # gene index of each stored row
    keep_stored = kept[stored]
    if int(keep_stored.sum()) != int(kept.sum()):  # pragma: no cover - internal invariant
        raise AssertionError("kept genes missing from the candidate rows")
    chunks = [(stored[rows], values) for rows, values in store.runs(keep_stored)]
    all_cand_hist = (
        np.concatenate(cand_hist) if cand_hist else np.zeros((0, 1 + HIST_NBINS), np.int64)
    )
    hist_after = all_cand_hist[keep_stored].sum(axis=0)

    matrix_index = np.full(ng, -1, dtype=np.int64)
    matrix_index[kept] = np.arange(int(kept.sum()))
    genes = pl.DataFrame(
        {
            "gene_id": pl.Series(gene_ids, dtype=pl.String),
            "symbol": pl.Series(symbols, dtype=pl.String),
            "max_log_tpm": max_log.astype(np.float32),
            "mean_log_tpm": mean_log.astype(np.float32),
            "std_log_tpm": std_log.astype(np.float32),
            "kept": kept,
            "drop_reason": pl.Series(list(reason), dtype=pl.String),
            "name_problem": pl.Series(list(problems), dtype=pl.String),
            "matrix_index": pl.Series(matrix_index, dtype=pl.Int64),
        }
    ).with_columns(pl.col("matrix_index").replace(-1, None))
    counts = {
        "genes_in": ng,
        "after_expression": int(pass_expr.sum()),
        "after_variance": int((pass_expr & pass_var).sum()),
        "after_name": int((pass_expr & pass_var & pass_name).sum()),
        "kept": int(kept.sum()),
        "samples": len(sample_ids),
        **{f"dropped_{r}": int((reason == r).sum()) for r in DROP_REASONS},
    }
    total = time.perf_counter() - t0
    return ExpressionResult(
        source=Path(path),
        sample_ids=sample_ids,
        genes=genes,
        chunks=chunks,
        counts=counts,
        hist_before=hist_before,
        hist_after=hist_after,
        params=params,
        seconds=total,
        timings={"parse_filter_s": t_parse, "finalise_s": total - t_parse},
    )


def _cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.empty(0, dtype)


# ----------------------------------------------------------------------------- samples


def build_sample_table(
    sample_ids: list[str],
    attributes: pl.DataFrame | None = None,
    annotations: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """One row per matrix row: aliquot id -> tissue sample id, subject, tissue.

    ``tissue`` is the SampleAttributes SMTSD of the aliquot when present and non-empty, else
    the histology annotation's tissue of its tissue sample. ``has_slide``: the tissue sample is
    in the histology annotations (null when those are not available).
    """
    tsid = [aliquot_to_sample_id(a) for a in sample_ids]
    df = pl.DataFrame(
        {
            "aliquot_id": pl.Series(sample_ids, dtype=pl.String),
            "tissue_sample_id": pl.Series(tsid, dtype=pl.String),
            "subject_id": pl.Series(
                ["-".join(t.split("-")[:2]) if t else None for t in tsid], dtype=pl.String
            ),
        }
    )
    attr_cols = [c for c in ("smtsd", "smts") if attributes is not None and c in attributes.columns]
    if attr_cols:
        a = attributes.unique("aliquot_id", keep="first", maintain_order=True).select(
            "aliquot_id", *(pl.col(c).cast(pl.String).replace("", None) for c in attr_cols)
        )
        df = df.join(a, on="aliquot_id", how="left", maintain_order="left")
    for c in ("smtsd", "smts"):
        if c not in df.columns:
            df = df.with_columns(pl.lit(None, dtype=pl.String).alias(c))
    if annotations is not None and annotations.height:
        ann = annotations.unique("tissue_sample_id", keep="first", maintain_order=True).select(
            "tissue_sample_id", hist_tissue=pl.col("tissue").cast(pl.String)
        )
        df = df.join(ann, on="tissue_sample_id", how="left", maintain_order="left")
        has_slide = pl.col("tissue_sample_id").is_in(ann["tissue_sample_id"].implode())
        df = df.with_columns(
            tissue=pl.coalesce("smtsd", "hist_tissue"), has_slide=has_slide.fill_null(False)
        )
    else:
        df = df.with_columns(tissue=pl.col("smtsd"), has_slide=pl.lit(None, dtype=pl.Boolean))
    return df.with_row_index("sample_index").select(
        "aliquot_id",
        "tissue_sample_id",
        "subject_id",
        "tissue",
        "smts",
        "has_slide",
        pl.col("sample_index").cast(pl.Int64),
    )


# ----------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class ExpressionPaths:
    matrix_npy: Path
    manifest: Path
    genes: Path
    samples: Path
    matrix_parquet: Path

    @classmethod
    def under(cls, root: str | Path) -> ExpressionPaths:
        root = Path(root)
        return cls(
            matrix_npy=root / "expression" / "log_tpm.npy",
            manifest=root / "expression" / "manifest.json",
            genes=root / "tables" / "expression_genes.parquet",
            samples=root / "tables" / "expression_samples.parquet",
            matrix_parquet=root / "tables" / "expression_matrix.parquet",
        )

    def all(self) -> list[Path]:
        return [self.matrix_npy, self.genes, self.samples, self.matrix_parquet, self.manifest]


def _npy_header(shape: tuple[int, int], fortran: bool) -> bytes:
    d = {"descr": "<f4", "fortran_order": fortran, "shape": tuple(int(x) for x in shape)}
    text = repr(d).encode("latin1")
    total = 10 + len(text) + 1
    pad = (-total) % 64
    text = text + b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text


def write_log_tpm_npy(result: ExpressionResult, dest: Path) -> None:
    """The kept matrix as ``.npy``: samples x genes, float32, Fortran order. The bytes are
    the gene rows one after another, so it is written straight from the chunks."""
    with open(dest, "wb") as f:
        f.write(_npy_header(result.shape, fortran=True))
        for _, rows in result.chunks:
            f.write(np.ascontiguousarray(rows, dtype="<f4").data)


def write_matrix_parquet(
    result: ExpressionResult, dest: Path, row_group_genes: int = MATRIX_ROW_GROUP_GENES
) -> None:
    """Gene-major table for SQL: gene_id, symbol, matrix_index, log_tpm list<float32> (sample
    order = ``sample_index``). Small row groups, so a one-gene query reads little."""
    schema = pa.schema(
        [
            ("gene_id", pa.string()),
            ("symbol", pa.string()),
            ("matrix_index", pa.int64()),
            ("log_tpm", pa.list_(pa.float32())),
        ]
    )
    kept = result.genes.filter(pl.col("kept"))
    gids = kept["gene_id"].cast(pl.String).to_list()
    syms = kept["symbol"].cast(pl.String).to_list()
    ns = len(result.sample_ids)
    with pq.ParquetWriter(
        dest,
        schema,
        compression="zstd",
        compression_level=1,
        use_dictionary=["gene_id", "symbol"],
        write_statistics=["gene_id", "symbol", "matrix_index"],
        data_page_size=1 << 20,
    ) as w:
        start = 0
        buf: list[np.ndarray] = []
        nbuf = 0

        def flush() -> None:
            nonlocal start, buf, nbuf
            if not nbuf:
                return
            vals = np.concatenate(buf) if len(buf) > 1 else buf[0]
            flat = pa.array(np.ascontiguousarray(vals).reshape(-1), type=pa.float32())
            offsets = pa.array(np.arange(nbuf + 1, dtype=np.int32) * ns, type=pa.int32())
            lists = pa.ListArray.from_arrays(offsets, flat)
            end = start + nbuf
            batch = pa.record_batch(
                [
                    pa.array(gids[start:end], pa.string()),
                    pa.array(syms[start:end], pa.string()),
                    pa.array(np.arange(start, end, dtype=np.int64)),
                    lists,
                ],
                schema=schema,
            )
            w.write_batch(batch, row_group_size=nbuf)
            start, buf, nbuf = end, [], 0

        for _, rows in result.chunks:
            i = 0
            while i < len(rows):
                take = min(row_group_genes - nbuf, len(rows) - i)
                buf.append(rows[i : i + take])
                nbuf += take
                i += take
                if nbuf == row_group_genes:
                    flush()
        flush()


GENE_VIEW_SQL = (
    "SELECT s.aliquot_id, s.tissue_sample_id, s.tissue, m.gene_id, m.symbol, "
    "m.log_tpm[s.sample_index + 1] AS log_tpm "
    "FROM expression_matrix m CROSS JOIN expression_samples s"
)


def write_outputs(
    result: ExpressionResult,
    samples: pl.DataFrame,
    root: str | Path,
    *,
    source_version: str | None = None,
    extra_files: dict[Path, Any] | None = None,
) -> dict[str, Any]:
    """Write every output atomically as a set: all are built under temp names and renamed
    only when every one of them is complete, so a failure leaves the previous set intact.

    ``extra_files`` maps more destinations to a ``callable(tmp_path)`` that writes them (the
    plots). Returns the manifest."""
    paths = ExpressionPaths.under(root)
    if (
        samples.height != len(result.sample_ids)
        or samples["aliquot_id"].to_list() != result.sample_ids
    ):
        raise ValueError("sample table does not match the matrix's sample order")
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": str(result.source),
        "source_version": source_version,
        "shape": list(result.shape),
        "dtype": "float32",
        "order": "F (samples x genes; each gene's column contiguous)",
        "counts": result.counts,
        "params": result.params.as_dict(),
        "params_hash": params_hash({**result.params.as_dict(), "source_version": source_version}),
        "files": {k: str(v) for k, v in asdict(paths).items()},
        "view_sql": GENE_VIEW_SQL,
        "decompressor": DECOMPRESSOR,
        "seconds": round(result.seconds, 3),
    }
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        tmp = {p: stack.enter_context(atomic_path(p)) for p in paths.all()}
        extra = {p: stack.enter_context(atomic_path(p)) for p in (extra_files or {})}
        write_log_tpm_npy(result, tmp[paths.matrix_npy])
        write_matrix_parquet(result, tmp[paths.matrix_parquet])
        pq.write_table(result.genes.to_arrow(), tmp[paths.genes], compression="zstd")
        pq.write_table(samples.to_arrow(), tmp[paths.samples], compression="zstd")
        for p, writer in (extra_files or {}).items():
            writer(extra[p])
        manifest["write_s"] = round(time.perf_counter() - t0, 3)
        tmp[paths.manifest].write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        # ExitStack renames in reverse order of entry: extras, then the manifest last of the set.
    return manifest


def load_log_tpm(
    root: str | Path, mmap: bool = True
) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    """``(matrix samples x genes, kept genes table, samples table)`` for later stages; the
    matrix is memory-mapped read-only by default. The tables are pandas because their readers
    hand them to scikit-learn beside the matrix."""
    paths = ExpressionPaths.under(root)
    if not paths.matrix_npy.is_file():
        raise FileNotFoundError(f"{paths.matrix_npy}: materialise the gene_log_tpm asset first")
    x = np.load(paths.matrix_npy, mmap_mode="r" if mmap else None)
    genes = pl.read_parquet(paths.genes).filter(pl.col("kept")).sort("matrix_index").to_pandas()
    samples = pl.read_parquet(paths.samples).sort("sample_index").to_pandas()
    if x.shape != (len(samples), len(genes)):
        raise ValueError(
            f"{paths.matrix_npy}: shape {x.shape} disagrees with the tables "
            f"({len(samples)} samples x {len(genes)} kept genes); re-materialise gene_log_tpm"
        )
    return x, genes, samples


def hist_summary(hist: np.ndarray) -> dict[str, float]:
    """Fraction of zeros and the mean of a value histogram (bin centres)."""
    total = int(hist.sum())
    if not total:
        return {"values": 0, "zero_fraction": math.nan, "mean": math.nan}
    centres = np.concatenate([[0.0], HIST_EDGES[:-1] + HIST_BIN_WIDTH / 2])
    return {
        "values": total,
        "zero_fraction": float(hist[0] / total),
        "mean": float((hist * centres).sum() / total),
    }


def expression_summary(result: ExpressionResult, samples: pl.DataFrame) -> dict[str, Any]:
    """The numbers the asset reports: the filter funnel's counts, samples, zeros before/after."""
    c = result.counts
    before, after = hist_summary(result.hist_before), hist_summary(result.hist_after)
    return {
        "genes_in": c["genes_in"],
        "after_expression": c["after_expression"],
        "after_variance": c["after_variance"],
        "after_name": c["after_name"],
        "genes_kept": c["kept"],
        "samples": len(result.sample_ids),
        "samples_with_slide": int(samples["has_slide"].fill_null(False).sum()),
        "samples_per_tissue": dict(
            samples["tissue"].fill_null("(unknown)").value_counts().sort("tissue").rows()
        ),
        "zero_fraction_before": round(before["zero_fraction"], 6),
        "zero_fraction_after": round(after["zero_fraction"], 6),
        "matrix_shape": f"{result.shape[0]} samples x {result.shape[1]} genes",
        "parse_seconds": round(result.seconds, 3),
    }
