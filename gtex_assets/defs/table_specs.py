"""AssetSpecs for tables: key == table name == DuckDB view name, with the column schema known
before the first run (names and types from the lib's schema, descriptions from the registry)."""

import dagster as dg
import polars as pl
import pyarrow as pa

from gtex_assets.core.tables import CATALOG_DATABASE
from gtex_assets.defs.metadata import column_schema


def _empty(schema: pa.Schema | pl.Schema | dict) -> pl.DataFrame:
    if isinstance(schema, pa.Schema):
        return pl.from_arrow(schema.empty_table())
    return pl.DataFrame(schema=dict(schema))


def table_spec_metadata(name: str, schema: pa.Schema | pl.Schema | dict) -> dict:
    """``dagster/column_schema`` and ``dagster/table_name`` of table ``name``."""
    return {
        "dagster/column_schema": column_schema(name, _empty(schema)),
        "dagster/table_name": f"{CATALOG_DATABASE}.main.{name}",
    }


def table_spec(
    name: str, schema: pa.Schema | pl.Schema | dict, description: str, **kwargs
) -> dg.AssetSpec:
    """The spec of the table ``tables/<name>`` (or ``tables/<name>/<slide>.parquet``)."""
    return dg.AssetSpec(
        key=name, description=description, metadata=table_spec_metadata(name, schema), **kwargs
    )
