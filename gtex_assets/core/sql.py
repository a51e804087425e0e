"""SQL quoting for DuckDB and LanceDB filters: the one place strings become SQL."""

from __future__ import annotations

import re

_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def quote_literal(value: object) -> str:
    """A string literal: single quotes doubled, so any value is safe inside ``'...'``."""
    return "'" + str(value).replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    """An identifier (table/view/column): plain names as they are, anything else double-quoted."""
    return name if _IDENT_RE.match(name) else '"' + name.replace('"', '""') + '"'
