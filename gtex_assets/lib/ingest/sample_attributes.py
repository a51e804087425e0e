"""RNA-seq sample annotations: aliquot id -> tissue sample id (-> tissue).

From GTEx's SampleAttributesDS TSV when it is available, else from the GCT header alone
(its column ids are the aliquot ids).
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable
from pathlib import Path

import polars as pl

from gtex_assets.core.errors import InputError
from gtex_assets.core.ids import aliquot_to_sample_id

COLUMNS = ["aliquot_id", "tissue_sample_id", "subject_id", "smts", "smtsd"]


class SampleAttributesError(InputError):
    pass


def _frame(aliquots: Iterable[str], smts: Iterable[str], smtsd: Iterable[str]) -> pl.DataFrame:
    aliquots = list(aliquots)
    tsid = [aliquot_to_sample_id(a) for a in aliquots]
    return pl.DataFrame(
        {
            "aliquot_id": aliquots,
            "tissue_sample_id": tsid,
            "subject_id": ["-".join(t.split("-")[:2]) if t else None for t in tsid],
            "smts": list(smts),
            "smtsd": list(smtsd),
        },
        schema=dict.fromkeys(COLUMNS, pl.String),
    )


def parse_sample_attributes(path: str | Path) -> pl.DataFrame:
    """Parse ``GTEx_Analysis_v8_Annotations_SampleAttributesDS.txt`` (tab-separated)."""
    path = Path(path)
    # Every field as text, empty fields as "" (not null), as the file means them.
    df = pl.read_csv(path, separator="\t", infer_schema=False).with_columns(pl.all().fill_null(""))
    missing = [c for c in ("SAMPID", "SMTS", "SMTSD") if c not in df.columns]
    if missing:
        raise SampleAttributesError(f"{path}: header lacks column(s) {missing}")
    dup = df.filter(pl.col("SAMPID").is_duplicated())["SAMPID"]
    if len(dup):
        raise SampleAttributesError(f"{path}: SAMPID {dup[0]!r} appears more than once")
    out = _frame(df["SAMPID"], df["SMTS"], df["SMTSD"])
    # Keep only GTEx tissue aliquots (the file also lists e.g. K-562 cell-line controls).
    return out.filter(pl.col("tissue_sample_id").is_not_null())


def read_gct_sample_ids(path: str | Path) -> list[str]:
    """The sample (aliquot) ids from a GCT's header: reads three lines, not the matrix."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        first = f.readline().strip()
        if first != "#1.2":
            raise SampleAttributesError(f"{path}, line 1: expected '#1.2', got {first[:40]!r}")
        f.readline()
        header = f.readline().rstrip("\n").split("\t")
    if header[:2] != ["Name", "Description"]:
        raise SampleAttributesError(f"{path}, line 3: header must start with Name, Description")
    return header[2:]


def attributes_from_gct_header(path: str | Path) -> pl.DataFrame:
    ids = read_gct_sample_ids(path)
    out = _frame(ids, [""] * len(ids), [""] * len(ids))
    return out.filter(pl.col("tissue_sample_id").is_not_null())
