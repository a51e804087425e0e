"""A snapshot of every asset spec (key, deps, group, kinds, partitions, code version, pool,
automation condition, checks), in the style of dagster-open-platform: any change to the graph
shows up as a diff in review. Regenerate with ``GTEX_UPDATE_SNAPSHOTS=1 scripts/test.sh -k snapshot``
and commit the file with the change that caused it."""

import json
import os
from pathlib import Path

import dagster as dg

from gtex_assets.cli.runner import load_definitions
from gtex_assets.core.tables import TABLES

SNAPSHOT = Path(__file__).parent / "snapshots" / "asset_specs.json"


def _condition(spec: dg.AssetSpec) -> str | None:
    cond = spec.automation_condition
    return None if cond is None else cond.get_label() or type(cond).__name__


def _snapshot(defs: dg.Definitions) -> dict:
    graph = defs.resolve_asset_graph()
    checks: dict[str, list[str]] = {}
    for ck in graph.asset_check_keys:
        spec = graph.get_check_spec(ck)
        checks.setdefault(ck.asset_key.to_user_string(), []).append(
            f"{ck.name}{' (blocking)' if spec.blocking else ''}"
        )
    out = {}
    for spec in sorted(defs.resolve_all_asset_specs(), key=lambda s: s.key.to_user_string()):
        key = spec.key.to_user_string()
        node = graph.get(spec.key)
        pdef = spec.partitions_def
        out[key] = {
            "group": spec.group_name,
            "deps": sorted(d.asset_key.to_user_string() for d in spec.deps),
            "kinds": sorted(spec.kinds),
            "partitions": None if pdef is None else getattr(pdef, "name", type(pdef).__name__),
            "code_version": spec.code_version,
            "pool": node.pools and sorted(node.pools) or None,
            "automation": _condition(spec),
            "checks": sorted(checks.get(key, [])),
            "table": key in TABLES,
        }
    return out


def test_asset_specs_match_the_snapshot():
    current = _snapshot(load_definitions())
    if os.environ.get("GTEX_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    assert SNAPSHOT.exists(), f"{SNAPSHOT} missing: generate it with GTEX_UPDATE_SNAPSHOTS=1"
    stored = json.loads(SNAPSHOT.read_text())
    changed = sorted(k for k in current.keys() | stored.keys() if current.get(k) != stored.get(k))
    assert not changed, (
        f"asset specs changed for {changed}; if intended, regenerate {SNAPSHOT.name} with "
        "GTEX_UPDATE_SNAPSHOTS=1 and commit it"
    )


def test_every_registered_table_is_an_asset_and_lineage_is_closed():
    """Each table of the registry is written by an asset of the same key, and no asset depends
    on a key that nothing defines (dangling deps would hide lineage)."""
    defs = load_definitions()
    graph = defs.resolve_asset_graph()
    materializable = {k.to_user_string() for k in graph.get_all_asset_keys()
                      if graph.get(k).is_materializable}  # fmt: skip
    assert set(TABLES) - materializable == set()
    defined = {k.to_user_string() for k in graph.get_all_asset_keys()}
    dangling = {
        d.asset_key.to_user_string()
        for spec in defs.resolve_all_asset_specs()
        for d in spec.deps
        if not graph.get(d.asset_key).is_materializable and not graph.get(d.asset_key).is_observable
    }
    assert dangling == set() and defined
