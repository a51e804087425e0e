"""GTEx identifiers: validation before an id touches a path, and the id relationships.

Tissue sample id ``GTEX-1117F-0126`` = subject ``GTEX-1117F`` + tissue site ``0126``.
RNA-seq aliquot ``GTEX-1117F-0226-SM-5GZZ7``: its first three dash-fields are the tissue
sample id that matches a slide.
"""

from __future__ import annotations

import re

# Donor codes are 4-6 upper-case alphanumerics in v8; site codes are 4 digits.
SAMPLE_ID_RE = re.compile(r"^GTEX-[A-Z0-9]{4,6}-[0-9]{4}$")
SUBJECT_ID_RE = re.compile(r"^GTEX-[A-Z0-9]{4,6}$")
ALIQUOT_ID_RE = re.compile(r"^(GTEX-[A-Z0-9]{4,6}-[0-9]{4})(-[A-Za-z0-9.]+)+$")


class InvalidSampleIdError(ValueError):
    """An id that is not a GTEx tissue sample id (and so must never become a file name)."""


def validate_sample_id(sample_id: str, *, where: str = "") -> str:
    """Return ``sample_id`` if it is a well-formed tissue sample id, else raise.

    ``where`` names the origin (file and row) for the error message.
    """
    if not isinstance(sample_id, str) or not SAMPLE_ID_RE.match(sample_id):
        prefix = f"{where}: " if where else ""
        raise InvalidSampleIdError(
            f"{prefix}{sample_id!r} is not a GTEx tissue sample id "
            "(expected like 'GTEX-1117F-0126': no path separators, spaces or suffixes)"
        )
    return sample_id


def subject_of(sample_id: str) -> str:
    """Subject (donor) id of a tissue sample id or aliquot id."""
    parts = sample_id.split("-")
    if len(parts) < 2:
        raise InvalidSampleIdError(f"{sample_id!r} has no GTEx subject part")
    return "-".join(parts[:2])


def aliquot_to_sample_id(aliquot_id: str) -> str | None:
    """Tissue sample id of an RNA-seq aliquot id; None for ids that are not GTEx aliquots."""
    m = ALIQUOT_ID_RE.match(aliquot_id)
    if m:
        return m.group(1)
    # Some tables list the tissue sample id itself.
    return aliquot_id if SAMPLE_ID_RE.match(aliquot_id) else None
