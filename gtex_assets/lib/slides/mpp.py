"""Where a slide's resolution (µm per pixel, MPP) comes from: the documented policy.

1. ``description``: the MPP the scanner wrote into the slide (Aperio ``|MPP = 0.4990|``).
2. ``override``: a per-slide table under the data root (default ``<root>/mpp_overrides.csv``,
   CSV or Parquet, columns ``tissue_sample_id,mpp``) for slides whose file lacks it (SPEC §2
   order: a slide's own description is trusted first).
3. ``fallback``: one configured MPP assumed for every slide that has neither (off by default:
   guessing 0.5 µm/px for a 40x slide would silently halve its tiles' field of view).

A slide with none is quarantined with a reason that names these three fixes. The slide's
``mpp_source`` column in ``raw_slides`` records which one was used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from gtex_assets.core.ids import InvalidSampleIdError, validate_sample_id

DEFAULT_OVERRIDES_FILE = "mpp_overrides.csv"
# Plausible brightfield scans: 100x oil (~0.1) to 5x (~2); outside is a typo (nm vs µm).
MPP_RANGE = (0.05, 20.0)


class MppSource:
    DESCRIPTION = "description"
    OVERRIDE = "override"
    FALLBACK = "fallback"


@dataclass(frozen=True)
class MppPolicy:
    """The override table (relative paths are under the data root) and the fallback MPP."""

    overrides_path: str = DEFAULT_OVERRIDES_FILE
    fallback_mpp: float | None = None  # None = off

    def __post_init__(self) -> None:
        if self.fallback_mpp is not None and not _plausible(self.fallback_mpp):
            raise ValueError(
                f"fallback_mpp {self.fallback_mpp} is not a plausible µm/px "
                f"(expected {MPP_RANGE[0]}..{MPP_RANGE[1]}; GTEx 20x is ~0.5)"
            )

    def overrides_file(self, data_root: str | Path) -> Path:
        p = Path(self.overrides_path).expanduser()
        return p if p.is_absolute() else Path(data_root) / p


DEFAULT_POLICY = MppPolicy()


@dataclass(frozen=True)
class MppOverrides:
    """Valid overrides (id -> MPP) of one table, and one message per row that was left out."""

    path: Path
    mpp: dict[str, float]
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class MppDecision:
    mpp: float | None
    source: str | None  # an MppSource value, None when no MPP is known
    reason: str = ""  # why there is none (the quarantine reason)


def _plausible(v: float) -> bool:
    return MPP_RANGE[0] <= v <= MPP_RANGE[1]


def load_overrides(path: str | Path) -> MppOverrides:
    """Read the override table (``.csv`` or ``.parquet``; absent file = no overrides).

    A row with a malformed id or an implausible MPP is left out with a message naming the file
    and row; a repeated id keeps its first row. A file without the two columns raises.
    """
    path = Path(path)
    if not path.is_file():
        return MppOverrides(path, {})
    try:
        if path.suffix.lower() == ".parquet":
            df = pl.read_parquet(path)
        else:
            df = pl.read_csv(path, infer_schema=False)
    except Exception as e:
        raise ValueError(f"MPP override table {path}: cannot read it ({e})") from None
    if not {"tissue_sample_id", "mpp"} <= set(df.columns):
        raise ValueError(
            f"MPP override table {path}: needs columns tissue_sample_id,mpp; found {df.columns}"
        )
    out: dict[str, float] = {}
    problems: list[str] = []
    for i, (sid, raw) in enumerate(
        zip(df["tissue_sample_id"].to_list(), df["mpp"].to_list(), strict=True)
    ):
        where = f"{path.name} row {i + 1}"
        try:
            validate_sample_id(str(sid or "").strip(), where=where)
            value = float(raw)
        except InvalidSampleIdError as e:
            problems.append(str(e))
            continue
        except (TypeError, ValueError):
            problems.append(f"{where}: mpp {raw!r} is not a number")
            continue
        if not _plausible(value):
            problems.append(f"{where}: mpp {value} is not a plausible µm/px {MPP_RANGE}")
            continue
        out.setdefault(str(sid).strip(), value)
    return MppOverrides(path, out, tuple(problems))


def resolve_mpp(
    sample_id: str,
    description_mpp: float | None,
    overrides: MppOverrides,
    policy: MppPolicy = DEFAULT_POLICY,
) -> MppDecision:
    """The slide's MPP and its source by the policy above, or the reason there is none."""
    if description_mpp is not None and description_mpp > 0:
        return MppDecision(float(description_mpp), MppSource.DESCRIPTION)
    if sample_id in overrides.mpp:
        return MppDecision(overrides.mpp[sample_id], MppSource.OVERRIDE)
    if policy.fallback_mpp is not None:
        return MppDecision(float(policy.fallback_mpp), MppSource.FALLBACK)
    return MppDecision(
        None,
        None,
        f"no resolution (MPP) in the slide description; fix one of: (1) add the row "
        f"'{sample_id},<mpp>' to the MPP override table {overrides.path} (CSV or Parquet, "
        "columns tissue_sample_id,mpp), (2) set raw_slides config fallback_mpp (e.g. 0.5 for "
        "GTEx 20x scans) to assume one for every slide without MPP, (3) re-export the slide "
        "with its MPP in the description",
    )
