"""Benchmark: GTEx TPM GCT -> filtered log2(1+TPM) matrix, pandas vs gtex_assets.

Generates (once, cached in ``benchmarks/.cache/``) a GCT shaped like GTEx v8's
``*_gene_tpm.gct.gz`` - by default the full 56,200 genes x 17,382 samples - then, each in its
own subprocess pinned to the same cores, measures:

* ``pandas``: what users do - ``pd.read_csv(path, sep="\\t", skiprows=2)``, then numpy:
  log2(1+TPM), per-gene max and std, the two expression filters;
* ``project``: ``gtex_assets.lib.expression.log_tpm.filter_gct`` (streaming parse + log + filters,
  including the name rules) and, unless ``--no-outputs``, writing every output
  (``.npy`` matrix, gene-major Parquet, tables) as the asset does.

Prints seconds, MB/s (uncompressed text per second), peak RSS (``wait4`` ru_maxrss of the
child) and the ratios, and checks that both keep the same genes by the expression filters.

    python benchmarks/bench_gct.py                       # full scale (~3 GB of text)
    python benchmarks/bench_gct.py --genes 4000          # quick
    python benchmarks/bench_gct.py --skip-pandas         # project only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import queue
import resource
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numba
import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
GTEX_GENES, GTEX_SAMPLES = 56_200, 17_382

# ----------------------------------------------------------------------------- generator

_EMIN, _EMAX = -8, 6  # decimal exponents given 4-significant-digit strings; smaller -> 0


def _token_table() -> tuple[np.ndarray, np.ndarray]:
    """'\\t' + '%.4g' % value for every 4-significant-digit value in [1e-8, 1e7)."""
    toks = []
    for e in range(_EMIN, _EMAX + 1):
        for m in range(1000, 10000):
            toks.append(("\t%.4g" % (m * 10.0 ** (e - 3))).encode())
    width = max(len(t) for t in toks)
    table = np.zeros((len(toks), width), np.uint8)
    lens = np.zeros(len(toks), np.int64)
    for i, t in enumerate(toks):
        table[i, : len(t)] = np.frombuffer(t, np.uint8)
        lens[i] = len(t)
    return table, lens


@numba.njit(nogil=True, cache=True)
def _format_rows(vals, prefixes, prefix_off, table, lens, out):  # pragma: no cover - compiled
    """Write GCT body lines (prefix, then '\\t%.4g' per value, then '\\n') into ``out``."""
    pos = 0
    rows, n = vals.shape
    for r in range(rows):
        for k in range(prefix_off[r], prefix_off[r + 1]):
            out[pos] = prefixes[k]
            pos += 1
        for j in range(n):
            v = vals[r, j]
            if v <= 0.0:
                out[pos] = 9
                out[pos + 1] = 48
                pos += 2
                continue
            e = int(math.floor(math.log10(v)))
            m = int(round(v / 10.0 ** (e - 3)))
            if m >= 10000:
                m = 1000
                e += 1
            elif m < 1000:
                m = 9999 if m > 999 else 1000
            if e < _EMIN:
                out[pos] = 9
                out[pos + 1] = 48
                pos += 2
                continue
            if e > _EMAX:
                e = _EMAX
            t = (e - _EMIN) * 9000 + (m - 1000)
            for k in range(lens[t]):
                out[pos + k] = table[t, k]
            pos += lens[t]
        out[pos] = 10
        pos += 1
    return pos


_FAMILIES = ["Y_RNA", "U6", "Metazoa_SRP", "5S_rRNA", "snoU13", "7SK", "U3", "SNORA70", "U4"]


def _gene_names(n: int, rng: np.random.Generator) -> tuple[list[str], list[str], np.ndarray]:
    """Ensembl-like ids and a GENCODE v26-like mix of symbols; returns a 'named' weight used
    to make well-named genes more often expressed (as in GTEx)."""
    ids = [f"ENSG{100000 + 3 * i:011d}.{1 + i % 9}" for i in range(n)]
    kind = rng.choice(5, size=n, p=[0.42, 0.20, 0.14, 0.05, 0.19])
    syms: list[str] = []
    for i, k in enumerate(kind):
        if k == 0:
            syms.append(f"GENE{i}")
        elif k == 1:
            syms.append(f"RP11-{i % 997}P{i % 13}.{1 + i % 4}")
        elif k == 2:
            syms.append(f"AC{i:06d}.{1 + i % 3}")
        elif k == 3:
            syms.append(_FAMILIES[i % len(_FAMILIES)])
        else:
            syms.append(f"LINC{i:05d}" if i % 3 else f"C{1 + i % 22}orf{i % 200}")
    for i in rng.choice(n, size=max(n // 150, 1), replace=False):  # some repeated real symbols
        syms[i] = f"GENE{(i * 7) % n}"
    named = np.isin(kind, [0, 4])
    return ids, syms, named


def _gene_params(n: int, n_tissues: int, named: np.ndarray, rng: np.random.Generator) -> dict:
    """Three classes: silent (mostly zeros, tiny values), low, expressed (log-normal with
    tissue effects; some tissue-specific)."""
    p_expr = np.where(named, 0.6, 0.12)
    u = rng.random(n)
    cls = np.where(u < p_expr, 2, np.where(u < p_expr + 0.2, 1, 0))
    p_nz = np.choose(
        cls, [rng.uniform(0.0, 0.1, n), rng.uniform(0.1, 0.6, n), rng.uniform(0.95, 1.0, n)]
    )
    mu = np.choose(
        cls, [rng.normal(-3.5, 1.0, n), rng.normal(-0.5, 1.2, n), rng.normal(3.3, 2.2, n)]
    )
    t_sd = np.choose(cls, [np.full(n, 0.5), np.full(n, 1.0), rng.uniform(0.05, 2.5, n)])
    noise = np.choose(cls, [np.full(n, 1.0), np.full(n, 0.8), rng.uniform(0.1, 0.7, n)])
    teff = rng.normal(0, 1, (n, n_tissues)) * t_sd[:, None]
    specific = (cls == 2) & (rng.random(n) < 0.35)
    off = specific[:, None] & (rng.random((n, n_tissues)) < 0.85)
    return {"mu": mu, "teff": teff, "noise": noise, "p_nz": p_nz, "off": off}


def generate_gct(path: Path, n_genes: int, n_samples: int, seed: int = 0, level: int = 1) -> None:
    """Write a GTEx-like ``.gct.gz`` (vectorised values, numba formatting, zlib in a thread)."""
    rng = np.random.default_rng(seed)
    n_tissues = 54
    tissue_w = rng.dirichlet(np.full(n_tissues, 2.0))
    tissue = rng.choice(n_tissues, size=n_samples, p=tissue_w)
    ids, syms, named = _gene_names(n_genes, rng)
    gp = _gene_params(n_genes, n_tissues, named, rng)
    samples = [
        f"GTEX-{10000 + i // 20:05X}-{1000 + i % 20 * 26:04d}-SM-{i:05X}" for i in range(n_samples)
    ]
    table, lens = _token_table()
    tmp = path.with_name(path.name + ".part")
    q: queue.Queue = queue.Queue(maxsize=4)
    err: list[BaseException] = []

    text_bytes = [0]

    def writer() -> None:
        try:
            comp = zlib.compressobj(level, zlib.DEFLATED, 31)
            with open(tmp, "wb") as f:
                while (chunk := q.get()) is not None:
                    text_bytes[0] += len(chunk)
                    f.write(comp.compress(chunk))
                f.write(comp.flush())
        except BaseException as e:  # pragma: no cover
            err.append(e)

    th = threading.Thread(target=writer)
    th.start()
    columns = "\t".join(["Name", "Description", *samples])
    head = f"#1.2\n{n_genes}\t{n_samples}\n{columns}\n"
    q.put(head.encode())
    block = 256
    t0 = time.perf_counter()
    for g0 in range(0, n_genes, block):
        g1 = min(g0 + block, n_genes)
        g = g1 - g0
        z = rng.standard_normal((g, n_samples), dtype=np.float32)
        z *= gp["noise"][g0:g1, None].astype(np.float32)
        z += (gp["mu"][g0:g1, None] + gp["teff"][g0:g1][:, tissue]).astype(np.float32)
        nz = rng.random((g, n_samples), dtype=np.float32) < gp["p_nz"][g0:g1, None]
        nz &= ~gp["off"][g0:g1][:, tissue] | (rng.random((g, n_samples), dtype=np.float32) < 0.05)
        vals = np.where(nz, np.exp2(z), np.float32(0))
        pre = [f"{ids[i]}\t{syms[i]}".encode() for i in range(g0, g1)]
        off = np.zeros(g + 1, np.int64)
        off[1:] = np.cumsum([len(p) for p in pre])
        out = np.empty(int(off[-1]) + g * n_samples * table.shape[1] + g, np.uint8)
        n = _format_rows(vals, np.frombuffer(b"".join(pre), np.uint8), off, table, lens, out)
        q.put(out[:n].tobytes())
        if err:
            break
        if g0 // block % 20 == 0:
            done = g1 / n_genes
            el = time.perf_counter() - t0
            print(f"  generating {path.name}: {done:.0%} ({el:.0f} s)", file=sys.stderr, flush=True)
    q.put(None)
    th.join()
    if err:
        raise err[0]
    path.with_name(path.name + ".size").write_text(str(text_bytes[0]))
    os.replace(tmp, path)


def cached_gct(n_genes: int, n_samples: int, seed: int) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"gtexlike_{n_genes}x{n_samples}_seed{seed}.gct.gz"
    if not path.is_file():
        t = time.perf_counter()
        generate_gct(path, n_genes, n_samples, seed)
        print(f"generated {path} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return path


def text_size(path: Path) -> int:
    """Uncompressed size (from a sidecar, computed once by streaming)."""
    side = path.with_name(path.name + ".size")
    if side.is_file():
        return int(side.read_text())
    d = zlib.decompressobj(31)
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            n += len(d.decompress(chunk))
            while d.unconsumed_tail:
                n += len(d.decompress(d.unconsumed_tail))
    side.write_text(str(n))
    return n


# ----------------------------------------------------------------------------- the two methods


def _vm_hwm_mb() -> float:
    """Peak resident set size of this process so far (MB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(map(str, ids))).encode()).hexdigest()[:16]


def run_pandas(path: str) -> dict:
    import pandas as pd

    t0, c0 = time.perf_counter(), time.process_time()
    df = pd.read_csv(path, sep="\t", skiprows=2)
    t_read = time.perf_counter() - t0
    x = df.iloc[:, 2:].to_numpy(dtype=np.float32)
    names = df["Name"].to_numpy()
    del df
    x = np.log2(x + 1, dtype=np.float32)
    mx = x.max(axis=1)
    sd = x.std(axis=1, ddof=1)
    keep = (mx > 5.0) & (sd > 0.5)
    kept = np.ascontiguousarray(x[keep].T)
    return {
        "seconds": time.perf_counter() - t0,
        "work_cpu_s": time.process_time() - c0,
        "read_s": t_read,
        "expr_kept": int(keep.sum()),
        "shape": list(kept.shape),
        "expr_ids": sorted(names[keep].tolist())[:5],
        "expr_hash": _digest(names[keep].tolist()),
    }


def run_project(path: str, workers: int, outputs: bool) -> dict:
    from gtex_assets.lib.expression.gct import DECOMPRESSOR
    from gtex_assets.lib.expression.log_tpm import build_sample_table, filter_gct, write_outputs

    rss_imports = _vm_hwm_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    res = filter_gct(path, workers=workers)
    t_filter = time.perf_counter() - t0
    cpu_filter = time.process_time() - c0
    rss_filter = _vm_hwm_mb()
    g = res.genes
    expr = g[(g["max_log_tpm"] > 5.0) & (g["std_log_tpm"] > 0.5)]["gene_id"].astype(str).tolist()
    info = {
        "seconds": t_filter,
        "work_cpu_s": cpu_filter,
        "timings": res.timings,
        "counts": res.counts,
        "expr_kept": len(expr),
        "shape": list(res.shape),
        "decompressor": DECOMPRESSOR,
        "expr_ids": sorted(expr)[:5],
        "expr_hash": _digest(expr),
        "rss_after_imports_mb": rss_imports,
        "peak_rss_filter_mb": rss_filter,
    }
    if outputs:
        with tempfile.TemporaryDirectory(dir=CACHE) as d:
            t1 = time.perf_counter()
            write_outputs(res, build_sample_table(res.sample_ids), d)
            info["write_s"] = time.perf_counter() - t1
            info["npy_mb"] = (Path(d) / "expression" / "log_tpm.npy").stat().st_size / 1e6
            info["parquet_mb"] = (
                Path(d) / "tables" / "expression_matrix.parquet"
            ).stat().st_size / 1e6
            info["peak_rss_write_mb"] = _vm_hwm_mb()
            info["duckdb_one_gene_s"] = _duckdb_probe(Path(d), res)
        info["total_s"] = time.perf_counter() - t0
    return info


def _duckdb_probe(root: Path, res) -> float:
    """Seconds for `this gene across tissues` through the catalog view SQL."""
    import duckdb

    from gtex_assets.lib.expression.log_tpm import GENE_VIEW_SQL

    con = duckdb.connect()
    for name in ("expression_matrix", "expression_samples"):
        con.execute(
            f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{root}/tables/{name}.parquet')"
        )
    con.execute(f"CREATE VIEW gene_expression AS {GENE_VIEW_SQL}")
    sym = res.genes[res.genes["kept"]]["symbol"].iloc[-1]
    t = time.perf_counter()
    rows = con.execute(
        "SELECT count(*), avg(log_tpm) FROM gene_expression WHERE symbol = ?", [sym]
    ).fetchone()
    dt = time.perf_counter() - t
    assert rows[0] == len(res.sample_ids), rows
    return dt


# ----------------------------------------------------------------------------- driver


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(
    method: str, path: Path, cores: list[int], workers: int, outputs: bool, mem_limit: int = 0
) -> dict:
    """Run one method in a subprocess pinned to ``cores``; peak RSS and CPU from wait4."""
    cmd = [sys.executable, __file__, "--_child", method, "--_file", str(path)]
    cmd += ["--workers", str(workers)] + ([] if outputs else ["--no-outputs"])
    n = str(len(cores))
    env = {**os.environ, "OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "NUMBA_NUM_THREADS": n}

    def setup() -> None:
        os.sched_setaffinity(0, cores)
        if mem_limit:  # fail with MemoryError rather than let the OOM killer pick a victim
            resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))

    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, preexec_fn=setup)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    code = os.waitstatus_to_exitcode(status)
    base = {
        "peak_rss_mb": ru.ru_maxrss / 1024,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "process_wall_s": wall,
    }
    if code != 0:
        return {**base, "failed": f"exit code {code} after {wall:.0f} s"}
    return {**json.loads(out.decode().strip().splitlines()[-1]), **base}


PANDAS_RSS_PER_TEXT = 7.5  # measured: pandas' peak RSS is ~7.2x the GCT text size


def _print_rows(rows: list[tuple[str, dict]], text_mb: float) -> None:
    print(f"{'method':30s} {'wall s':>8s} {'MB/s':>7s} {'CPU s':>7s} {'peak RSS MB':>12s}")
    for name, r in rows:
        if "failed" in r:
            print(f"{name:30s} FAILED ({r['failed']}; peak RSS {r['peak_rss_mb']:,.0f} MB)")
            continue
        sec = r["seconds"]
        print(
            f"{name:30s} {sec:8.2f} {text_mb / sec:7.0f} {r['work_cpu_s']:7.1f} "
            f"{r['peak_rss_mb']:12,.0f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--genes", type=int, default=GTEX_GENES)
    ap.add_argument("--samples", type=int, default=GTEX_SAMPLES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="parse threads of the project")
    ap.add_argument("--cores", type=int, default=2, help="CPUs both children are pinned to")
    ap.add_argument("--skip-pandas", action="store_true")
    ap.add_argument("--no-outputs", action="store_true", help="project: parse+filter only")
    ap.add_argument(
        "--pandas-budget-gb",
        type=float,
        default=0.0,
        help="memory pandas may use (default: half of MemAvailable). When pandas would need "
        "more at --genes, both methods are also compared on a 1/2, 1/4 ... gene subset file",
    )
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_file", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._child:
        if a._child == "pandas":
            info = run_pandas(a._file)
        else:
            info = run_project(a._file, a.workers, not a.no_outputs)
        print(json.dumps(info, default=str))
        return

    cores = sorted(os.sched_getaffinity(0))[: a.cores]
    path = cached_gct(a.genes, a.samples, a.seed)
    text_mb = text_size(path) / 1e6
    print(
        f"== this project: {path.name}: {a.genes:,} genes x {a.samples:,} samples, "
        f"{text_mb:,.0f} MB text, {path.stat().st_size / 1e6:,.0f} MB gzip; "
        f"{len(cores)} cores {cores}; load average {os.getloadavg()[0]:.1f}"
    )
    proj = _child("project", path, cores, a.workers, not a.no_outputs)
    if "failed" in proj:
        raise SystemExit(f"project failed: {proj}")
    kept_mb = proj["shape"][0] * proj["shape"][1] * 4 / 1e6
    _print_rows([("project (parse+log+filters)", proj)], text_mb)
    if "write_s" in proj:
        print(
            f"{'project + write all outputs':30s} {proj['total_s']:8.2f} "
            f"{text_mb / proj['total_s']:7.0f}   (same process)"
        )
    print(f"decompressor {proj['decompressor']}; timings {proj['timings']}")
    print(f"counts: {proj['counts']}")
    print(
        f"kept matrix {proj['shape'][0]} x {proj['shape'][1]} float32 = {kept_mb:,.0f} MB; "
        f"peak RSS {proj['peak_rss_mb']:,.0f} MB = kept matrix + "
        f"{proj['peak_rss_mb'] - kept_mb:,.0f} MB (target <= +1024; "
        f"{proj['rss_after_imports_mb']:,.0f} MB of it is the interpreter and imports)"
    )
    if "write_s" in proj:
        print(
            f"outputs written in {proj['write_s']:.2f} s (npy {proj['npy_mb']:,.0f} MB, "
            f"parquet {proj['parquet_mb']:,.0f} MB); one gene across all samples through the "
            f"DuckDB view: {proj['duckdb_one_gene_s'] * 1000:.0f} ms"
        )
    if a.skip_pandas:
        return

    budget = a.pandas_budget_gb * 1e9 if a.pandas_budget_gb else 0.5 * _mem_available()
    frac = 1
    while PANDAS_RSS_PER_TEXT * text_mb * 1e6 / frac > budget and a.genes // frac > 1000:
        frac *= 2
    if frac == 1:
        cmp_path, cmp_mb, proj_cmp = path, text_mb, proj
    else:
        cmp_path = cached_gct(a.genes // frac, a.samples, a.seed)
        cmp_mb = text_size(cmp_path) / 1e6
        print(
            f"\npandas would need ~{PANDAS_RSS_PER_TEXT * text_mb / 1e3:,.0f} GB at full scale; "
            f"budget {budget / 1e9:.1f} GB -> comparing on 1/{frac} of the genes"
        )
        proj_cmp = _child("project", cmp_path, cores, a.workers, False)
    print(
        f"\n== pandas vs this project: {cmp_path.name}: {cmp_mb:,.0f} MB text; same file, "
        f"same {len(cores)} cores; load average {os.getloadavg()[0]:.1f}"
    )
    limit = int(min(budget * 2 + 3e9, _mem_available() - 1.5e9))  # address space > RSS
    pand = _child("pandas", cmp_path, cores, a.workers, False, mem_limit=max(limit, 1 << 30))
    _print_rows(
        [("pandas read_csv + numpy", pand), ("project (parse+log+filters)", proj_cmp)], cmp_mb
    )
    if "failed" in pand:
        return
    same = pand["expr_hash"] == proj_cmp["expr_hash"] and pand["expr_kept"] == proj_cmp["expr_kept"]
    print(
        f"speed ratio pandas/project: {pand['seconds'] / proj_cmp['seconds']:.1f}x wall "
        f"(target >= 7x), {pand['work_cpu_s'] / proj_cmp['work_cpu_s']:.1f}x CPU time; peak RSS "
        f"ratio {pand['peak_rss_mb'] / proj_cmp['peak_rss_mb']:.1f}x; pandas peak RSS = "
        f"{pand['peak_rss_mb'] / cmp_mb:.1f}x the text size"
    )
    print(f"same genes pass the expression filters: {same} ({proj_cmp['expr_kept']:,})")
    if not same:
        raise SystemExit("MISMATCH between pandas and project")


if __name__ == "__main__":
    main()
