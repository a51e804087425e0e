import dagster as dg

from gtex_assets.resources import DataLakeResource, GTExSourceResource


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(
        resources={"lake": DataLakeResource(), "gtex_source": GTExSourceResource()}
    )
