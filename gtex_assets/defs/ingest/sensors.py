"""Keep the platform current when GTEx changes (both sensors ship RUNNING).

- `gtex_source_sensor`: compares each source file's version (ETag/Last-Modified/size for HTTP,
  size+mtime+partial hash for a mirror) with the data version recorded by the asset that last
  read it, and requests only the assets whose input changed (plus their unpartitioned
  downstream aggregates). An unchanged source requests nothing.
- `new_slides_sensor`: every slide partition without a `raw_slides` materialisation is
  requested, in contiguous batches of up to 50 slides per run, through every per-slide asset.
"""

import hashlib

import dagster as dg

from gtex_assets.core.batching import contiguous_batches
from gtex_assets.defs.partitions import slide_partitions
from gtex_assets.lib.ingest.sources import Kind, SourceError
from gtex_assets.resources import DataLakeResource, GTExSourceResource

# source file -> the asset that reads it (and records its version as the data version).
WATCHED = {
    Kind.HISTOLOGY: dg.AssetKey("gtex_histology_annotations"),
    Kind.ATTRIBUTES: dg.AssetKey("gtex_sample_attributes"),
    Kind.GCT: dg.AssetKey("gene_log_tpm"),
}
SLIDE_BATCH_SIZE = 50
DATA_VERSION_TAG = "dagster/data_version"


def _recorded_version(instance: dg.DagsterInstance, key: dg.AssetKey) -> str | None:
    event = instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        return None
    return (event.asset_materialization.tags or {}).get(DATA_VERSION_TAG)


def _unpartitioned_downstream(graph, roots: set[dg.AssetKey]) -> list[dg.AssetKey]:
    """Roots plus every unpartitioned asset downstream of them (per-slide assets are the
    new-slides sensor's job)."""
    out, todo = set(roots), list(roots)
    while todo:
        for child in graph.get(todo.pop()).child_keys:
            if child not in out and graph.get(child).partitions_def is None:
                out.add(child)
                todo.append(child)
    return sorted(out, key=str)


@dg.sensor(
    minimum_interval_seconds=3600,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Re-materialise what reads a GTEx source file when that file changes.",
)
def gtex_source_sensor(
    context: dg.SensorEvaluationContext, gtex_source: GTExSourceResource, lake: DataLakeResource
):
    graph = context.repository_def.asset_graph
    src, raw = gtex_source.spec(), lake.lake().raw
    changed: dict[dg.AssetKey, str] = {}
    for kind, key in WATCHED.items():
        if not graph.has(key):
            continue
        try:
            current = src.version(kind, raw_dir=raw)
        except SourceError as e:
            if kind is Kind.ATTRIBUTES:
                current = "absent"  # optional in a mirror: the GCT header stands in
            else:
                context.log.warning(f"cannot read the version of {kind.value}: {e}")
                continue
        if current != _recorded_version(context.instance, key):
            changed[key] = current
    if not changed:
        return dg.SkipReason("no GTEx source changed")
    selection = _unpartitioned_downstream(graph, set(changed))
    token = hashlib.sha256(
        repr(sorted((str(k), v) for k, v in changed.items())).encode()
    ).hexdigest()[:16]
    context.log.info(f"changed: {', '.join(k.to_user_string() for k in changed)}")
    return dg.RunRequest(run_key=f"sources-{token}", asset_selection=selection)


@dg.sensor(
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Run every per-slide asset for slides that have none yet, in batches of 50.",
)
def new_slides_sensor(context: dg.SensorEvaluationContext):
    graph = context.repository_def.asset_graph
    slide_assets = sorted(
        (k for k in graph.get_all_asset_keys()
         if graph.get(k).is_materializable and graph.get(k).partitions_def == slide_partitions),
        key=str,
    )  # fmt: skip
    keys = context.instance.get_dynamic_partitions(slide_partitions.name)
    done = context.instance.get_materialized_partitions(dg.AssetKey("raw_slides"))
    missing = [k for k in keys if k not in done]
    if not missing:
        return dg.SkipReason("every slide partition has been fetched")
    requests = []
    for batch in contiguous_batches(keys, missing, SLIDE_BATCH_SIZE):
        requests.append(
            dg.RunRequest(
                # The same batch is never launched twice, however many ticks see it missing.
                run_key=f"slides-{batch[0]}-{batch[-1]}-{len(batch)}",
                asset_selection=slide_assets,
                tags={
                    "dagster/asset_partition_range_start": batch[0],
                    "dagster/asset_partition_range_end": batch[-1],
                },
            )
        )
    return requests
