"""The definitions load, and every asset spec follows the conventions (group = domain folder,
kinds, description); slide-level assets share the slide partitions and batch their backfills."""

import dagster as dg

from gtex_assets.cli.runner import load_definitions

DOMAINS = {"ingest", "tiles", "expression", "model", "embeddings", "analysis", "catalog"}


def test_definitions_load_and_asset_specs_follow_conventions():
    defs = load_definitions()
    graph = defs.resolve_asset_graph()
    keys = list(graph.get_all_asset_keys())
    assert dg.AssetKey("raw_slides") in keys and dg.AssetKey("duckdb_catalog") in keys
    for spec in defs.resolve_all_asset_specs():
        name = spec.key.to_user_string()
        assert spec.group_name in DOMAINS, name
        assert spec.kinds, f"{name} has no kinds"
        assert spec.description and len(spec.description) > 30, f"{name} lacks a description"
        if spec.partitions_def is not None:
            assert isinstance(spec.partitions_def, dg.DynamicPartitionsDefinition)
            assert spec.partitions_def.name == "slides"
    for key in keys:
        node = graph.get(key)
        if node.partitions_def is not None:
            assert (
                node.backfill_policy is not None and node.backfill_policy.max_partitions_per_run > 1
            )


def test_resources_are_bound():
    defs = load_definitions()
    assert {"lake", "gtex_source"} <= set(defs.resources)


def test_catalog_is_the_only_duckdb_writer_and_pooled():
    defs = load_definitions()
    ad = defs.resolve_assets_def("duckdb_catalog")
    assert ad.op.pool == "duckdb_catalog"
