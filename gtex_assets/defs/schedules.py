"""Weekly refresh of the aggregates (ships RUNNING).

Per-slide work follows new slides through `new_slides_sensor`; changed GTEx files through
`gtex_source_sensor`. The aggregates that pool every slide (balanced sample, classifier, slide
embeddings, analysis, catalog) are refreshed on a schedule: weekly by default, or the cron in
`GTEX_REFRESH_CRON` (read when the code location loads; schedules are part of the definitions).
"""

import os

import dagster as dg

AGGREGATES = dg.AssetSelection.groups("tiles", "model", "embeddings", "analysis", "catalog") - (
    dg.AssetSelection.assets("slide_tiles", "filtered_tiles", "tile_embeddings")
)
DEFAULT_CRON = "0 3 * * 0"  # Sundays 03:00


def refresh_schedule(cron: str) -> dg.ScheduleDefinition:
    job = dg.define_asset_job("refresh_aggregates", selection=AGGREGATES)
    return dg.ScheduleDefinition(
        name="weekly_aggregates_refresh",
        job=job,
        cron_schedule=cron,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Re-materialise the unpartitioned aggregates over all slides done so far.",
    )


@dg.definitions
def schedules() -> dg.Definitions:
    cron = os.environ.get("GTEX_REFRESH_CRON", DEFAULT_CRON)
    sched = refresh_schedule(cron)
    return dg.Definitions(jobs=[sched.job], schedules=[sched])
