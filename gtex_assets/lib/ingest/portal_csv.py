"""Parse the GTEx Portal histology CSV (``GTEx Portal.csv``): every field quoted, free-text
pathology notes with commas and quotes, one row per tissue sample."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

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


class PortalCSVError(ValueError):
    """The histology CSV is malformed; the message names the file, line and problem."""


def parse_portal_csv(path: str | Path) -> pd.DataFrame:
    """Read ``GTEx Portal.csv`` into a typed DataFrame with normalised column names.

    Checks: the required columns exist, every sample id is a GTEx tissue sample id, no id is
    repeated, tissue is non-empty, and the Subject ID agrees with the sample id's donor part.
    Unknown extra columns are kept (snake-cased) so a newer portal export still loads.
    """
    path = Path(path)
    try:
        f = open(path, newline="", encoding="utf-8-sig")  # noqa: SIM115 - closed by the with below
    except OSError as e:
        raise PortalCSVError(f"{path}: cannot open ({e.strerror})") from e
    with f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise PortalCSVError(
                f"{path}: header lacks column(s) {missing}; found {header[:10]} "
                "(is this the GTEx Portal histology CSV?)"
            )
        rename = {c: PORTAL_COLUMNS.get(c, _snake(c)) for c in header}
        rows: list[dict[str, str]] = []
        seen: dict[str, int] = {}
        for row in reader:
            line = reader.line_num
            if None in row:
                raise PortalCSVError(f"{path}, line {line}: more fields than the header has")
            sid = (row["Tissue Sample ID"] or "").strip()
            try:
                validate_sample_id(sid, where=f"{path}, line {line}")
            except InvalidSampleIdError as e:
                raise PortalCSVError(str(e)) from None
            if sid in seen:
                raise PortalCSVError(
                    f"{path}, line {line}: sample {sid} repeated (first on line {seen[sid]})"
                )
            seen[sid] = line
            if not (row["Tissue"] or "").strip():
                raise PortalCSVError(f"{path}, line {line}: sample {sid} has an empty Tissue")
            subj = (row.get("Subject ID") or "").strip()
            if subj and subj != subject_of(sid):
                raise PortalCSVError(
                    f"{path}, line {line}: sample {sid} has Subject ID {subj!r}, "
                    f"but its id says {subject_of(sid)!r}"
                )
            rows.append({rename[k]: (v or "").strip() for k, v in row.items()})
    if not rows:
        raise PortalCSVError(f"{path}: no sample rows")
    df = pd.DataFrame(rows)
    if "subject_id" not in df or (df["subject_id"] == "").any():
        df["subject_id"] = df["tissue_sample_id"].map(subject_of)
    for col in PORTAL_COLUMNS.values():
        if col not in df:
            df[col] = ""
    ordered = list(PORTAL_COLUMNS.values())
    df = df[ordered + [c for c in df.columns if c not in ordered]]
    return df.astype("string").reset_index(drop=True)


def _snake(name: str) -> str:
    return "_".join(name.strip().lower().replace("-", " ").split())
