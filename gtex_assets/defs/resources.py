import dagster as dg

from gtex_assets.resources import (
    DataLakeResource,
    DuckDBCatalogResource,
    GTExSourceResource,
    LanceDBResource,
    TorchDeviceResource,
)


@dg.definitions
def resources() -> dg.Definitions:
    # The data root is read from the environment of the process that runs the step; binding it
    # as an EnvVar shows that in the UI (Deployment > Resources) instead of a baked-in path.
    return dg.Definitions(
        resources={
            "lake": DataLakeResource(root=dg.EnvVar("GTEX_DATA_ROOT")),
            "gtex_source": GTExSourceResource(),
            "lancedb": LanceDBResource(),
            "duckdb": DuckDBCatalogResource(),
            "torch_device": TorchDeviceResource(),
        }
    )
