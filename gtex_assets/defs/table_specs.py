"""AssetSpecs for tables: key == table name == DuckDB view name, with the column schema."""

import dagster as dg
import polars as pl
import pyarrow as pa


def table_schema(schema: pa.Schema | pl.Schema | dict) -> dg.TableSchema:
    """Dagster's column schema of an Arrow or polars schema (name -> type)."""
    if isinstance(schema, pa.Schema):
        cols = [(f.name, str(f.type)) for f in schema]
    else:
        cols = [(name, str(dtype)) for name, dtype in dict(schema).items()]
    return dg.TableSchema(columns=[dg.TableColumn(name=n, type=t) for n, t in cols])


def table_spec(
    name: str, schema: pa.Schema | pl.Schema | dict, description: str, **kwargs
) -> dg.AssetSpec:
    """The spec of the table ``tables/<name>`` (or ``tables/<name>/<slide>.parquet``)."""
    return dg.AssetSpec(
        key=name,
        description=description,
        metadata={
            "dagster/column_schema": table_schema(schema),
            "dagster/table_name": name,
        },
        **kwargs,
    )


def table_result_metadata(df: pl.DataFrame, path) -> dict[str, dg.MetadataValue]:
    """Row count, path and a short preview of a written (polars) table."""
    return {
        "dagster/row_count": dg.MetadataValue.int(df.height),
        "path": dg.MetadataValue.path(str(path)),
        "preview": dg.MetadataValue.md(_markdown(df.head(10))),
    }


def counts_metadata(df: pl.DataFrame, column: str, label: str) -> dg.MetadataValue:
    """A markdown table of the row counts per value of ``column``."""
    counts = df.group_by(column).agg(pl.len().alias(label)).sort(column)
    return dg.MetadataValue.md(_markdown(counts))


def _markdown(df: pl.DataFrame) -> str:
    if df.is_empty():
        return "none"
    head = "| " + " | ".join(df.columns) + " |"
    rule = "|" + "|".join(" --- " for _ in df.columns) + "|"
    rows = ["| " + " | ".join(str(v).replace("|", "\\|") for v in r) + " |" for r in df.iter_rows()]
    return "\n".join([head, rule, *rows])
