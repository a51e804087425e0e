"""The UI serves the whole asset graph: start the webserver on a free loopback port, ask
GraphQL for the asset nodes, compare with the definitions, stop it by pid. Then a real
browser renders the asset graph page and a screenshot is saved under the data root."""

import os

import pytest

from gtex_assets.cli.runner import REPO_ROOT, load_definitions
from gtex_assets.cli.ui_check import (
    find_chromium,
    graphql,
    running_webserver,
    screenshot_asset_graph,
)

QUERY = "{ assetNodes { assetKey { path } groupName kinds } }"


@pytest.fixture
def dagster_home(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO_ROOT / "dagster.yaml").read_text())
    return home


def test_ui_serves_every_asset(dagster_home):
    expected = {
        k.to_user_string() for k in load_definitions().resolve_asset_graph().get_all_asset_keys()
    }
    with running_webserver(dagster_home) as port:
        nodes = graphql(port, QUERY)["data"]["assetNodes"]
    served = {"/".join(n["assetKey"]["path"]) for n in nodes}
    assert served == expected
    groups = {"/".join(n["assetKey"]["path"]): n["groupName"] for n in nodes}
    assert groups["raw_slides"] == "ingest" and groups["duckdb_catalog"] == "catalog"
    assert all(n["kinds"] for n in nodes)


@pytest.mark.skipif(
    find_chromium() is None,
    reason="Chromium is not installed: scripts/test.sh installs Debian's chromium when it runs as "
    "root with apt; elsewhere install it (apt-get install chromium) to run the browser check",
)
def test_browser_renders_the_asset_graph(dagster_home):
    root = os.environ["GTEX_DATA_ROOT"]
    out = os.path.join(root, "plots", "ui_asset_graph.png")
    from pathlib import Path

    png, dom = screenshot_asset_graph(dagster_home, Path(out))
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a rendered page, not a blank
    # the graph's nodes were rendered (the group is larger than the window: raw_slides lies outside)
    assert "histology_annotations" in dom and "selected_slides" in dom
