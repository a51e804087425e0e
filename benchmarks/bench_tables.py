"""Benchmark: the tabular-heavy steps at GTEx scale, pandas (the code before the polars move)
vs polars (the code now), in the same run on the same files.

Steps, each timed best-of-``--repeats``:

* ``per-slide scan``: 2,000 slides x ~300 tile rows in one Parquet file per slide (the layout of
  ``filtered_tiles``/``slide_tiles``): read the folder, keep the ``kept`` tiles and count them
  per tissue and slide. pandas: concatenate every file, then filter and group; polars:
  ``scan_parquet`` over the glob with the filter and the projection pushed into the scan.
* ``slide means``: mean tile vector per slide from 2,000 x 100 tiles x 1,280 floats (the
  slide-embedding input), grouped by slide.
* ``sample table``: the GCT's 17,382 aliquots mapped to tissue samples, tissues (attributes)
  and slides (annotations): the join behind ``expression_samples``.
* ``duplicate symbols``: GTEx's 56,200 genes, symbols naming more than one Ensembl gene.

    python benchmarks/bench_tables.py               # full scale
    python benchmarks/bench_tables.py --slides 200  # quick
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl

from gtex_assets.lib.expression.log_tpm import base_gene_id, build_sample_table, duplicate_mask


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


# ----------------------------------------------------------------------------- pandas: before


def pandas_duplicate_mask(gene_ids: list[str], symbols: list[str]) -> np.ndarray:
    df = pd.DataFrame({"gid": gene_ids, "sym": symbols})
    df["base"] = [base_gene_id(g) for g in gene_ids]
    df["par_y"] = df["gid"].str.endswith("_PAR_Y")
    non_par = df[~df["par_y"]]
    per_symbol = non_par.groupby("sym")["base"].nunique()
    dup_symbols = set(per_symbol.index[per_symbol > 1])
    dup = df["sym"].isin(dup_symbols) | (df["par_y"] & df["base"].isin(set(non_par["base"])))
    return dup.to_numpy(dtype=bool)


def pandas_sample_table(ids: list[str], attributes: pd.DataFrame, annotations: pd.DataFrame):
    df = pd.DataFrame({"aliquot_id": pd.array(ids, dtype="string")})
    df["tissue_sample_id"] = pd.array(["-".join(a.split("-")[:3]) for a in ids], dtype="string")
    a = attributes.drop_duplicates("aliquot_id").set_index("aliquot_id")
    smtsd = df["aliquot_id"].map(a["smtsd"]).astype("string").replace("", pd.NA)
    ann = annotations.drop_duplicates("tissue_sample_id").set_index("tissue_sample_id")
    df["tissue"] = smtsd.fillna(df["tissue_sample_id"].map(ann["tissue"]).astype("string"))
    df["has_slide"] = df["tissue_sample_id"].isin(set(ann.index))
    return df


def _group_mean(x: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Mean row per group code, the groups in code order (one sort + add.reduceat)."""
    order = np.argsort(codes, kind="stable")
    sc = codes[order]
    starts = np.flatnonzero(np.r_[True, sc[1:] != sc[:-1]])
    return (
        np.add.reduceat(x[order].astype(np.float64), starts)
        / np.diff(np.r_[starts, len(sc)])[:, None]
    )


# ----------------------------------------------------------------------------- data


def make_tiles(folder: Path, slides: int, rows: int, rng: np.random.Generator) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(slides):
        sid = f"GTEX-{s:05d}-0126"
        pl.DataFrame(
            {
                "tissue_sample_id": [sid] * rows,
                "tissue": [f"Tissue {s % 40}"] * rows,
                "x": np.arange(rows, dtype=np.int64) * 448,
                "y": np.zeros(rows, np.int64),
                "path": [f"tiles/{sid}/{i}.jpg" for i in range(rows)],
                "verdict": rng.choice(
                    ["kept", "small", "half_empty", "dirt"], rows, p=[0.7, 0.1, 0.1, 0.1]
                ),  # fmt: skip
                "tissue_fraction": rng.random(rows, dtype=np.float32),
            }
        ).write_parquet(folder / f"{sid}.parquet")


def make_vectors(folder: Path, slides: int, rows: int, dim: int, rng) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(slides):
        sid = f"GTEX-{s:05d}-0126"
        vec = rng.standard_normal((rows, dim), dtype=np.float32)
        pl.DataFrame({"tissue_sample_id": [sid] * rows}).with_columns(
            vector=pl.Series(vec, dtype=pl.Array(pl.Float32, dim))
        ).write_parquet(folder / f"{sid}.parquet")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slides", type=int, default=2000)
    ap.add_argument("--tile-rows", type=int, default=300)
    ap.add_argument("--sample-tiles", type=int, default=100)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--genes", type=int, default=56200)
    ap.add_argument("--aliquots", type=int, default=17382)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tiles, vecs = Path(tmp) / "filtered_tiles", Path(tmp) / "tile_embeddings"
        t0 = time.perf_counter()
        make_tiles(tiles, args.slides, args.tile_rows, rng)
        make_vectors(vecs, args.slides, args.sample_tiles, args.dim, rng)
        print(f"data: {args.slides} slides in {time.perf_counter() - t0:.0f} s")

        def pd_scan():
            df = pd.concat([pd.read_parquet(f) for f in sorted(tiles.glob("*.parquet"))])
            kept = df[df["verdict"] == "kept"]
            return kept.groupby(["tissue", "tissue_sample_id"]).size().sort_index()

        def pl_scan():
            return (
                pl.scan_parquet(tiles / "*.parquet")
                .filter(pl.col("verdict") == "kept")
                .group_by("tissue", "tissue_sample_id")
                .len()
                .sort("tissue", "tissue_sample_id")
                .collect()
            )

        t_pd, a = _best(pd_scan, args.repeats)
        t_pl, b = _best(pl_scan, args.repeats)
        assert a.to_numpy().tolist() == b["len"].to_list()
        rows.append(("per-slide scan + filter + group", t_pd, t_pl))

        def pd_means():
            df = pd.concat([pd.read_parquet(f) for f in sorted(vecs.glob("*.parquet"))])
            x = np.stack(df["vector"].to_numpy())
            codes, _ = pd.factorize(df["tissue_sample_id"])
            return _group_mean(x, codes)

        def pl_means():
            df = pl.scan_parquet(vecs / "*.parquet").collect()
            x = df["vector"].to_numpy()
            codes = df["tissue_sample_id"].rank("dense").to_numpy() - 1
            return _group_mean(x, codes)

        t_pd, a = _best(pd_means, args.repeats)
        t_pl, b = _best(pl_means, args.repeats)
        np.testing.assert_allclose(a, b, rtol=1e-5)
        rows.append(("slide means of tile vectors", t_pd, t_pl))

    ids = [f"GTEX-{i // 30:05d}-{i % 30:04d}-SM-{i:05d}" for i in range(args.aliquots)]
    attrs = pd.DataFrame(
        {"aliquot_id": ids, "smts": "T", "smtsd": [f"T{i % 54}" for i in range(len(ids))]}
    )
    ann = pd.DataFrame({"tissue_sample_id": ["-".join(a.split("-")[:3]) for a in ids[::2]],
                        "tissue": "H"})  # fmt: skip
    attrs_pl, ann_pl = pl.from_pandas(attrs), pl.from_pandas(ann)
    t_pd, a = _best(lambda: pandas_sample_table(ids, attrs, ann), args.repeats)
    t_pl, b = _best(lambda: build_sample_table(ids, attrs_pl, ann_pl), args.repeats)
    assert a["tissue"].tolist() == b["tissue"].to_list()
    rows.append((f"sample table ({args.aliquots} aliquots)", t_pd, t_pl))

    gids = [f"ENSG{i:011d}.{i % 9}" for i in range(args.genes)]
    syms = [f"S{i % (args.genes - 500)}" for i in range(args.genes)]
    t_pd, a = _best(lambda: pandas_duplicate_mask(gids, syms), args.repeats)
    t_pl, b = _best(lambda: duplicate_mask(gids, syms), args.repeats)
    assert (a == b).all()
    rows.append((f"duplicate symbols ({args.genes} genes)", t_pd, t_pl))

    print(f"\n{'step':44s} {'pandas s':>9s} {'polars s':>9s} {'ratio':>7s}")
    for name, t_pd, t_pl in rows:
        print(f"{name:44s} {t_pd:9.3f} {t_pl:9.3f} {t_pd / t_pl:6.1f}x")


if __name__ == "__main__":
    main()
