"""Parse the GTEx Portal histology CSV (``GTEx Portal.csv``): every field quoted, free-text
pathology notes with commas and quotes, one row per tissue sample.

A row that fails validation (malformed id, repeated id, empty tissue, donor mismatch, too many
fields) is set aside with its line number and reason instead of failing the file: one bad row
of 25,713 must not stop the others, nor fail every hourly run. Only a file that is not the
histology CSV at all (no header, no valid row) is an error.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from gtex_assets.core.errors import InputError
from gtex_assets.core.ids import InvalidSampleIdError, subject_of, validate_sample_id

# Portal header -> normalised column name.
PORTAL_COLUMNS: dict[str, str] = {
    "Tissue Sample ID": "tissue_sample_id",
    "Tissue": "tissue",
    "Subject ID": "subject_id",
    "Sex": "sex",
    "Age Bracket": "age_bracket",
    "Hardy Scale": "hardy_scale",
    "Pathology Categories": "pathology_categories",
    "Pathology Notes": "pathology_notes",
}
REQUIRED = ("Tissue Sample ID", "Tissue")

# The rejected-rows table (``histology_rejected_rows``): what was wrong with which line.
REJECTED_SCHEMA: dict[str, pl.DataType] = {
    "line": pl.Int64,
    "raw_id": pl.String,
    "tissue": pl.String,
    "reason": pl.String,
}


class PortalCSVError(InputError):
    """The histology CSV is unusable as a whole; the message names the file and problem."""


@dataclass(frozen=True)
class PortalCSV:
    """The parsed CSV: the valid rows and the rows set aside (with line and reason)."""

    annotations: pl.DataFrame
    rejected: pl.DataFrame

    def rejection_summary(self, limit: int = 3) -> str:
        """One line for a log warning: how many rows were rejected and the first reasons."""
        if self.rejected.is_empty():
            return "no rows rejected"
        first = "; ".join(self.rejected["reason"].head(limit).to_list())
        more = f" (+{len(self.rejected) - limit} more)" if len(self.rejected) > limit else ""
        return (
            f"{len(self.rejected)} row(s) rejected and left out: {first}{more}. "
            "Query the histology_rejected_rows view; fix or remove them in GTEx Portal.csv"
        )


def _row_problem(row: dict, line: int, seen: dict[str, int]) -> str | None:
    """Why the row cannot be used, or None. ``seen`` (id -> first line) is updated."""
    if None in row:
        return "more fields than the header has"
    sid = (row["Tissue Sample ID"] or "").strip()
    try:
        validate_sample_id(sid)
    except InvalidSampleIdError as e:
        return str(e)
    if sid in seen:
        return f"sample {sid} repeated (first on line {seen[sid]}); the first row is kept"
    if not (row["Tissue"] or "").strip():
        return f"sample {sid} has an empty Tissue"
    subj = (row.get("Subject ID") or "").strip()
    if subj and subj != subject_of(sid):
        return f"sample {sid} has Subject ID {subj!r}, but its id says {subject_of(sid)!r}"
    seen[sid] = line
    return None


def read_portal_csv(path: str | Path) -> PortalCSV:
    """Read ``GTEx Portal.csv``: valid rows as a string-typed frame with normalised column
    names, the others in ``rejected`` (``line``, ``raw_id``, ``tissue``, ``reason``; each reason
    starts with ``<file>, line <n>:``).

    Checks per row: the sample id is a GTEx tissue sample id, it is not repeated (the first
    row wins), the tissue is non-empty, the Subject ID agrees with the id's donor part, and the
    row has no more fields than the header. Unknown extra columns are kept (snake-cased) so a
    newer portal export still loads. Raises :class:`PortalCSVError` only when the file cannot
    be opened, lacks the required columns, or has no valid row.
    """
    path = Path(path)
    try:
        f = open(path, newline="", encoding="utf-8-sig")  # noqa: SIM115 - closed by the with below
    except OSError as e:
        raise PortalCSVError(str(path), f"cannot open ({e.strerror})") from e
    with f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise PortalCSVError(
                str(path),
                f"header lacks column(s) {missing}; found {header[:10]}",
                "is this the GTEx Portal histology CSV? Export it again from the portal",
            )
        rename = {c: PORTAL_COLUMNS.get(c, _snake(c)) for c in header}
        rows: list[dict[str, str]] = []
        rejected: list[dict] = []
        seen: dict[str, int] = {}
        for row in reader:
            line = reader.line_num
            problem = _row_problem(row, line, seen)
            if problem is not None:
                rejected.append(
                    {
                        "line": line,
                        "raw_id": str(row.get("Tissue Sample ID") or ""),
                        "tissue": str(row.get("Tissue") or ""),
                        "reason": f"{path.name}, line {line}: {problem}",
                    }
                )
                continue
            rows.append({rename[k]: (v or "").strip() for k, v in row.items()})
    rejected_df = pl.DataFrame(rejected, schema=REJECTED_SCHEMA)
    if not rows:
        detail = f"; {len(rejected)} rejected, first: {rejected[0]['reason']}" if rejected else ""
        raise PortalCSVError(
            str(path), f"no valid sample rows{detail}", "fix the rows or export the CSV again"
        )
    return PortalCSV(annotations=_annotations_frame(rows), rejected=rejected_df)


def parse_portal_csv(path: str | Path) -> pl.DataFrame:
    """The valid rows of ``GTEx Portal.csv`` (see :func:`read_portal_csv`)."""
    return read_portal_csv(path).annotations


def _annotations_frame(rows: list[dict[str, str]]) -> pl.DataFrame:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    df = pl.DataFrame(rows, schema=dict.fromkeys(columns, pl.String))
    if "subject_id" not in df.columns:
        df = df.with_columns(pl.lit("").alias("subject_id"))
    # The donor part of the id fills a blank Subject ID (the row checks made them agree).
    df = df.with_columns(
        pl.when(pl.col("subject_id") == "")
        .then(pl.col("tissue_sample_id").str.replace(r"-[^-]*$", ""))
        .otherwise(pl.col("subject_id"))
        .alias("subject_id")
    )
    ordered = list(PORTAL_COLUMNS.values())
    df = df.with_columns(pl.lit("").alias(c) for c in ordered if c not in df.columns)
    return df.select([*ordered, *(c for c in df.columns if c not in ordered)])


def _snake(name: str) -> str:
    return "_".join(name.strip().lower().replace("-", " ").split())


# Columns every ``histology_annotations`` table has (a newer export may add more, as strings).
ANNOTATIONS_SCHEMA: dict[str, pl.DataType] = dict.fromkeys(PORTAL_COLUMNS.values(), pl.String)


def tissue_lookup(annotations_path: str | Path) -> dict[str, str]:
    """Sample id -> tissue from a written ``histology_annotations`` table ({} if absent)."""
    path = Path(annotations_path)
    if not path.is_file():
        return {}
    df = pl.read_parquet(path, columns=["tissue_sample_id", "tissue"])
    return dict(zip(df["tissue_sample_id"].to_list(), df["tissue"].to_list(), strict=True))
