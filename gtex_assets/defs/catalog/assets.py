"""The DuckDB catalog: a view over every table, so everything is queryable with SQL. The derived
views (quarantined slides, tiling problems, the long expression view ...) are assets of their
own, drawn from the tables they read."""

import dagster as dg
import polars as pl

from gtex_assets.core.tables import CATALOG_DATABASE, TABLES
from gtex_assets.defs.metadata import md_table
from gtex_assets.lib.catalog.views import DERIVED_VIEWS, build_catalog
from gtex_assets.resources import DataLakeResource, DuckDBCatalogResource

GROUP = "catalog"


def _specs() -> list[dg.AssetSpec]:
    # A function, not a module-level list: the defs loader would take bare specs as assets.
    return [
        dg.AssetSpec(
            "duckdb_catalog",
            group_name=GROUP,
            kinds={"duckdb"},
            deps=sorted(TABLES),
            description="`gtex.duckdb` under the data root: a view per Parquet table (per-slide "
            "tables read by glob, so new slides show up without a rebuild). Open it with "
            "`gtex-assets sql` or `duckdb -readonly gtex_data/gtex.duckdb`.",
        ),
        *(
            dg.AssetSpec(
                name,
                group_name=GROUP,
                kinds={"duckdb"},
                deps=["duckdb_catalog", *needs],
                skippable=True,  # created once every table it reads exists
                description=f"Derived view: `{sql}`",
                metadata={"dagster/table_name": f"{CATALOG_DATABASE}.main.{name}"},
            )
            for name, (needs, sql) in DERIVED_VIEWS.items()
        ),
    ]


@dg.multi_asset(name="duckdb_catalog", specs=_specs(), pool="duckdb_catalog")
def duckdb_catalog(context: dg.AssetExecutionContext, lake: DataLakeResource,
                   duckdb: DuckDBCatalogResource):  # fmt: skip
    # pool: the only writer of gtex.duckdb; dagster.yaml limits every pool to 1.
    lk = lake.lake()
    path = duckdb.catalog_path(lk)
    views = pl.DataFrame(
        [{"view": v.name, "rows": v.rows, "source": v.source} for v in build_catalog(path, lk.tables)],
        schema={"view": pl.String, "rows": pl.Int64, "source": pl.String},
    )  # fmt: skip
    context.log.info(f"catalog {path}: {views.height} views")
    yield dg.MaterializeResult(
        asset_key="duckdb_catalog",
        metadata={
            "path": dg.MetadataValue.path(str(path)),
            "views": md_table(views),
            "view_count": views.height,
        },  # fmt: skip
    )
    rows = dict(zip(views["view"], views["rows"], strict=True))
    for name in DERIVED_VIEWS:
        if name in rows:  # a derived view exists once every table it reads does
            yield dg.MaterializeResult(asset_key=name, metadata={"dagster/row_count": rows[name]})
