"""The GTEx files as observable source assets (group ``ingest``).

Each observation records the file's version as its data version (ETag/Last-Modified/size over
HTTP, size+mtime+partial hash for a mirror; `GTExSource.version`). Dagster counts an observation
as an update only when that version changed, so the assets that read a file re-run exactly when
the file changed. Observed on `$GTEX_OBSERVE_CRON` (hourly by default) by the automation sensor;
"Observe sources" in the UI does it at once.

The slide list is the `slides` dynamic partitions: `selected_slides` adds a key per slide it
selects from the portal CSV, so a CSV with new rows (observed here) ends in new partitions that
the per-slide assets pick up (`defs/automation.py`).
"""

import dagster as dg

from gtex_assets.defs.automation import observe_cron, observe_on_cron
from gtex_assets.lib.ingest.sources import FILE_NAMES, Kind, SourceError
from gtex_assets.resources import DataLakeResource, GTExSourceResource

GROUP = "ingest"
ABSENT = "absent"  # data version of an optional file a mirror lacks


def _observe(
    context: dg.AssetExecutionContext,
    kind: Kind,
    lake: DataLakeResource,
    gtex_source: GTExSourceResource,
    optional: bool = False,
) -> dg.ObserveResult:
    src, raw = gtex_source.spec(), lake.lake().raw
    try:
        version = src.version(kind, raw_dir=raw)
    except SourceError as e:
        if not optional:
            raise dg.Failure(description=f"cannot observe {FILE_NAMES[kind]}: {e}") from e
        context.log.info(f"{FILE_NAMES[kind]} absent ({e}); recorded as {ABSENT!r}")
        version = ABSENT
    return dg.ObserveResult(
        data_version=dg.DataVersion(version),
        metadata={
            "location": dg.MetadataValue.text(src.location(kind, raw_dir=raw)),
            "version": dg.MetadataValue.text(version),
        },
    )


# The asset that reads each file depends on its key.
PORTAL_CSV_SOURCE = dg.AssetKey("gtex_portal_csv")
ATTRIBUTES_SOURCE = dg.AssetKey("gtex_sample_attributes_file")
GCT_SOURCE = dg.AssetKey("gtex_gene_tpm_gct")
SOURCES = {
    PORTAL_CSV_SOURCE: (
        Kind.HISTOLOGY,
        False,
        "GTEx Portal.csv (the histology sample list)",
        "csv",
    ),
    ATTRIBUTES_SOURCE: (Kind.ATTRIBUTES, True, "RNA-seq sample attributes (optional)", "tsv"),
    GCT_SOURCE: (Kind.GCT, False, "The gene TPM GCT of GTEx v8", "gct"),
}


def source_asset(key: dg.AssetKey, cron: str) -> dg.SourceAsset:
    kind, optional, description, file_kind = SOURCES[key]

    @dg.observable_source_asset(
        key=key,
        group_name=GROUP,
        tags={f"dagster/kind/{file_kind}": ""},  # the asset's kind (no kinds= on sources)
        automation_condition=observe_on_cron(cron),
        description=f"{description}: {FILE_NAMES[kind]}",
    )
    def _source(
        context: dg.AssetExecutionContext, lake: DataLakeResource, gtex_source: GTExSourceResource
    ) -> dg.ObserveResult:
        return _observe(context, kind, lake, gtex_source, optional=optional)

    return _source


@dg.definitions
def sources() -> dg.Definitions:
    # The cron is read when the code location loads (`$GTEX_OBSERVE_CRON`, hourly by default).
    cron = observe_cron()
    return dg.Definitions(assets=[source_asset(key, cron) for key in SOURCES])
