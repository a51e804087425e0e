"""Declarative automation: the conditions that make the asset graph converge by itself.

The GTEx files are observable source assets (`defs/ingest/sources.py`) observed on a cron; an
observation counts as an update only when the file's version (its data version) changed, so an
unchanged GTEx re-runs nothing. Every materialisable asset carries one of the conditions below,
and one automation sensor (`gtex_automation`, shipped RUNNING) evaluates them. Each condition
also builds what is missing when automation is first switched on (an empty or half-built data
root), once its parents exist.

- `eager_gated()` (tables, analysis, catalog): run when a parent updated, once no parent is
  missing or in progress and every parent's blocking checks passed.
- `per_slide()` (raw_slides, slide_tiles, filtered_tiles): the same per `slides` partition, so a
  new slide key (added by `selected_slides`) runs that slide only, in batches (the multi-run
  backfill policy); `selected_slides` re-materialising does not re-run every slide.
- `over_slides()` (balanced_tile_sample, slide_embeddings): after the per-slide parent's batch
  finished (Dagster never puts a per-slide parent and an unpartitioned child in one tick), and
  never while no slide is done.
- `after_checks()` (tile_embeddings): when the classifier or the balanced sample updated, in a
  tick after their runs finished and their blocking checks passed (backfills do not honour
  blocking checks across runs; waiting does). A new slide is embedded only once the balanced
  sample includes it: its own filtered tiles do not trigger it.
- `train_once()` (tissue_classifier): trains when missing or its code version changed; new
  slides alone do not retrain (a retrain is a decision: materialise it, e.g. with `retrain` in
  the settings file); a retrained classifier re-embeds every slide through `after_checks()`.
"""

import os
import warnings
from datetime import timedelta

import dagster as dg

AC = dg.AutomationCondition

DEFAULT_OBSERVE_CRON = "0 * * * *"  # hourly
OBSERVE_CRON_ENV = "GTEX_OBSERVE_CRON"
SENSOR_INTERVAL_ENV = "GTEX_AUTOMATION_INTERVAL_S"
DEFAULT_SENSOR_INTERVAL_S = 30


def observe_cron() -> str:
    """Cron of the GTEx source observations: `$GTEX_OBSERVE_CRON` (read when the code location
    loads, like every definition), hourly by default."""
    return os.environ.get(OBSERVE_CRON_ENV) or DEFAULT_OBSERVE_CRON


def _missing_at_start() -> dg.AutomationCondition:
    # eager() runs only what goes missing *after* its first evaluation; a platform switched on
    # over an empty or half-built data root must also build what is missing then (once: a run
    # that fails is not relaunched every tick).
    return (AC.missing() & AC.initial_evaluation()).with_label("missing when automation started")


def _when(updates: dg.AutomationCondition) -> dg.AutomationCondition:
    return updates.since_last_handled() | _missing_at_start()


def observe_on_cron(cron: str) -> dg.AutomationCondition:
    """Source assets: observe once per cron tick (and at once when never observed)."""
    # Never a second observation while one is queued or running (a busy queue does not pile up).
    return (_when(AC.cron_tick_passed(cron)) & ~AC.in_progress()).with_label(f"observe on {cron}")


def _blocking_checks_passed() -> dg.AutomationCondition:
    # Stricter than AutomationCondition.all_deps_blocking_checks_passed(), which also accepts a
    # check that will merely be requested this tick (safe only inside a single run).
    return AC.all_deps_match(AC.all_checks_match(AC.check_passed(), blocking_only=True)).with_label(
        "parents' blocking checks passed"
    )


def _ready() -> dg.AutomationCondition:
    return ~AC.any_deps_missing() & ~AC.any_deps_in_progress() & ~AC.in_progress()


def _not_with_parents() -> dg.AutomationCondition:
    return ~AC.any_deps_match(AC.will_be_requested()).with_label("no parent requested this tick")


def eager_gated() -> dg.AutomationCondition:
    """AutomationCondition.eager() (without its time-window clause: nothing here is
    time-partitioned), also building what is missing at start, gated by blocking checks."""
    return (
        _when(AC.newly_missing() | AC.any_deps_updated())
        & _ready()
        & AC.all_deps_blocking_checks_passed()
    ).with_label("eager, gated")


def per_slide(ignore: tuple[str, ...] = ()) -> dg.AutomationCondition:
    """Per-slide assets: new partitions and per-slide parent updates; `ignore` names unpartitioned
    parents whose updates must not re-run every slide."""
    cond = eager_gated()
    if ignore:
        cond = cond.ignore(dg.AssetSelection.assets(*ignore))
    return cond.with_label("per slide")


def over_slides(per_slide_parents: tuple[str, ...]) -> dg.AutomationCondition:
    """Aggregates over every slide (balanced_tile_sample, slide_embeddings): run when slides of
    the per-slide parent updated, never with no slide done yet (a platform that starts empty does
    not launch runs bound to fail). Dagster never puts a per-slide parent and an unpartitioned
    child in one tick, so the aggregate runs in the tick after the slides' batch finished."""
    parent = dg.AssetSelection.assets(*per_slide_parents)
    some_slide_done = AC.any_deps_match(~AC.missing()).allow(parent).with_label("a slide is done")
    return (
        (
            AC.any_deps_updated().allow(parent).since_last_handled()
            | (_missing_at_start() & some_slide_done)
        )
        & _ready()
        & AC.all_deps_blocking_checks_passed()
    ).with_label(f"over the slides of {', '.join(per_slide_parents)}")


def after_checks(wait_for: tuple[str, ...] | None = None) -> dg.AutomationCondition:
    """Children of assets with blocking checks. ``wait_for`` names a per-slide parent whose
    updates do not trigger this asset (nor does a new partition): its new slides reach this asset
    through the unpartitioned parent that follows it (Dagster's will_be_requested does not see
    a parent of another partitioning, so this is what keeps tile_embeddings after
    balanced_tile_sample). The parent still counts for missing / in progress."""
    updates = AC.any_deps_updated()
    if wait_for:
        updates = updates.ignore(dg.AssetSelection.assets(*wait_for))
    else:
        updates = AC.newly_missing() | updates
    return (_when(updates) & _ready() & _not_with_parents() & _blocking_checks_passed()).with_label(
        "after parents' checks"
    )


def _missing_and_parent_updated() -> dg.AutomationCondition:
    # a platform that started empty: the classifier was missing before its sample existed
    return (AC.missing() & AC.any_deps_updated()).with_label("missing, parent updated")


def train_once() -> dg.AutomationCondition:
    return (
        _when(AC.newly_missing() | AC.code_version_changed() | _missing_and_parent_updated())
        & _ready()
        & _not_with_parents()
        & _blocking_checks_passed()
    ).with_label("train when missing or code changed")


# Aggregates over every slide: warn when one has not been rebuilt for 30 days, fail at 90. An
# unchanged GTEx rebuilds nothing, so this flags a deployment whose automation stopped (daemon
# off, a failing blocking check nobody looked at) rather than a merely quiet source.
AGGREGATE_FRESHNESS = dg.FreshnessPolicy.time_window(
    fail_window=timedelta(days=90), warn_window=timedelta(days=30)
)

# Downloads: transient network errors are retried (the download itself resumes).
DOWNLOAD_RETRY = dg.RetryPolicy(
    max_retries=3, delay=30, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)


# The GTEx file each op reads (its source asset becomes a dep of the op's outputs).
SOURCE_DEPS = {
    "histology_annotations": "gtex_portal_csv",
    "sample_attributes": "gtex_sample_attributes_file",
    "gene_log_tpm": "gtex_gene_tpm_gct",
}
TRAIN_ONCE_OPS = {"tissue_classifier"}


def _closure(graph, roots, attr: str) -> set:
    """Every asset reachable from ``roots`` through ``parent_keys`` / ``child_keys``."""
    out, todo = set(), list(roots)
    while todo:
        for k in getattr(graph.get(todo.pop()), attr):
            if k not in out and graph.has(k):
                out.add(k)
                todo.append(k)
    return out


def _names(keys) -> tuple[str, ...]:
    return tuple(sorted(k.to_user_string() for k in keys))


def _op_keys(defs: dg.Definitions) -> dict[dg.AssetKey, tuple[str, frozenset]]:
    out = {}
    for a in defs.assets or []:
        if isinstance(a, dg.AssetsDefinition) and a.is_executable:
            keys = frozenset(a.keys)
            for k in keys:
                out[k] = (a.node_def.name, keys)
    return out


def conditions(defs: dg.Definitions) -> dict[dg.AssetKey, dg.AutomationCondition]:
    """The condition of every materialisable asset, from its place in the graph:

    - a per-slide asset with an unpartitioned parent that pools slides (tile_embeddings:
      classifier, balanced sample) -> `after_checks(wait_for=<its per-slide parents>)`;
    - another per-slide asset -> `per_slide(ignore=<its unpartitioned parents>)`;
    - an unpartitioned asset whose parents are per-slide assets or their ancestors (the
      balanced sample, slide embeddings) -> `over_slides(<per-slide parents>)`;
    - the classifier's outputs -> `train_once()`; everything else -> `eager_gated()`.
    A key whose parents are all outputs of its own op gets no condition: it runs with the op.
    """
    graph = defs.resolve_asset_graph()
    ops = _op_keys(defs)
    part = {k for k in graph.get_all_asset_keys() if graph.get(k).partitions_def is not None}
    below_slides = _closure(graph, part, "child_keys") - part  # unpartitioned, pool slides
    # Optional outputs (e.g. classifier_sweep, only with a sweep configured) may stay missing
    # for good: they run with their op, never trigger it.
    optional = {spec.key for spec in defs.resolve_all_asset_specs() if spec.skippable}
    out = {}
    for key, (op, siblings) in ops.items():
        if key in optional:
            continue
        parents = {p for p in graph.get(key).parent_keys if p not in siblings}
        if op in SOURCE_DEPS:
            parents.add(dg.AssetKey(SOURCE_DEPS[op]))
        if not parents and graph.get(key).parent_keys:
            continue  # fed only by its own op's outputs: runs with the op
        per_slide_parents = parents & part
        pooled = parents & below_slides
        if op in TRAIN_ONCE_OPS:
            out[key] = train_once()
        elif key in part and pooled:
            out[key] = after_checks(wait_for=_names(per_slide_parents) or None)
        elif key in part:
            out[key] = per_slide(ignore=_names(parents - part))
        elif per_slide_parents and not pooled:
            out[key] = over_slides(_names(per_slide_parents))
        else:
            out[key] = eager_gated()
    return out


def apply_automation(defs: dg.Definitions) -> dg.Definitions:
    """The loaded definitions with every asset's condition, its GTEx source dep, and a
    freshness policy on the aggregates over slides and their analyses."""
    conds = conditions(defs)
    graph = defs.resolve_asset_graph()
    ops = _op_keys(defs)
    part = {k for k in graph.get_all_asset_keys() if graph.get(k).partitions_def is not None}
    pooled = _closure(graph, part, "child_keys") - part

    def spec(s: dg.AssetSpec) -> dg.AssetSpec:
        op = ops.get(s.key, ("", None))[0]
        if op in SOURCE_DEPS:
            s = s.merge_attributes(deps=[SOURCE_DEPS[op]])
        extra = {}
        if s.key in pooled and s.freshness_policy is None:
            extra["freshness_policy"] = AGGREGATE_FRESHNESS
        if s.key in conds:
            extra["automation_condition"] = conds[s.key]
        return s.replace_attributes(**extra) if extra else s

    # map_asset_specs takes no SourceAsset: map the rest, then put everything back together.
    # The folder loader lists an asset once per module that imports it: dedupe by identity.
    unique = list({id(a): a for a in defs.assets or []}.values())
    sources = [a for a in unique if isinstance(a, dg.SourceAsset)]
    others = [a for a in unique if not isinstance(a, dg.SourceAsset)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)  # map_asset_specs is "preview"
        mapped = dg.Definitions(assets=others).map_asset_specs(func=spec)
    return dg.Definitions(
        assets=[*(mapped.assets or []), *sources],
        asset_checks=defs.asset_checks,
        sensors=defs.sensors,
        schedules=defs.schedules,
        jobs=defs.jobs,
        resources=defs.resources,
        executor=defs.executor,
        loggers=defs.loggers,
        metadata=defs.metadata,
    )


def sensor_interval_s() -> int:
    return int(os.environ.get(SENSOR_INTERVAL_ENV) or DEFAULT_SENSOR_INTERVAL_S)


@dg.definitions
def automation() -> dg.Definitions:
    return dg.Definitions(
        sensors=[
            dg.AutomationConditionSensorDefinition(
                "gtex_automation",
                target=dg.AssetSelection.all(include_sources=True),
                default_status=dg.DefaultSensorStatus.RUNNING,
                minimum_interval_seconds=sensor_interval_s(),
                description="Evaluates every asset's automation condition (see defs/automation.py)",
            )
        ]
    )
