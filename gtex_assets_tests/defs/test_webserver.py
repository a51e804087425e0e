"""The UI serves the whole asset graph: start the webserver on a free loopback port, ask
GraphQL for the asset nodes, compare with the definitions, stop it by pid."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from gtex_assets.runner import REPO_ROOT, load_definitions

QUERY = "{ assetNodes { assetKey { path } groupName kinds } }"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port: int, query: str) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


@pytest.fixture
def webserver(tmp_path):
    port = _free_port()
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO_ROOT / "dagster.yaml").read_text())
    env = {**os.environ, "DAGSTER_HOME": str(home), "GTEX_DATA_ROOT": str(tmp_path / "root")}
    exe = Path(sys.executable).parent / "dagster-webserver"
    proc = subprocess.Popen(
        [str(exe), "-w", str(REPO_ROOT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"webserver exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                data = _graphql(port, "{ version }")
                if data.get("data"):
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise TimeoutError("webserver did not answer within 120 s")
            time.sleep(0.5)
        yield port
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def test_ui_serves_every_asset(webserver):
    expected = {
        k.to_user_string() for k in load_definitions().resolve_asset_graph().get_all_asset_keys()
    }
    deadline = time.time() + 60
    while True:  # the code location may still be loading on the first answers
        nodes = (_graphql(webserver, QUERY).get("data") or {}).get("assetNodes") or []
        if nodes or time.time() > deadline:
            break
        time.sleep(0.5)
    served = {"/".join(n["assetKey"]["path"]) for n in nodes}
    assert served == expected
    groups = {"/".join(n["assetKey"]["path"]): n["groupName"] for n in nodes}
    assert groups["raw_slides"] == "ingest" and groups["duckdb_catalog"] == "catalog"
    assert all(n["kinds"] for n in nodes)
