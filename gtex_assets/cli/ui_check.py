"""Start the Dagster webserver on a free loopback port, wait until it serves the code location,
and (optionally) screenshot the asset graph with headless Chromium. Used by the UI tests and
`gtex-assets ui --screenshot`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from gtex_assets.cli.runner import REPO_ROOT

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def graphql(port: int, query: str, timeout: float = 10) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


@contextlib.contextmanager
def running_webserver(
    dagster_home: Path, env: dict | None = None, timeout: float = 120
) -> Iterator[int]:
    """Yield the port of a webserver serving this repo's workspace; stopped by pid on exit."""
    port = free_port()
    full_env = {**os.environ, **(env or {}), "DAGSTER_HOME": str(dagster_home)}
    exe = Path(sys.executable).parent / "dagster-webserver"
    proc = subprocess.Popen(
        [str(exe), "-w", str(REPO_ROOT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO_ROOT, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"webserver exited: {proc.stderr.read().decode()[-2000:]}")
            with contextlib.suppress(OSError):
                nodes = (graphql(port, "{ assetNodes { id } }").get("data") or {}).get("assetNodes")
                if nodes:
                    break
            if time.time() > deadline:
                raise TimeoutError(f"webserver did not serve the asset graph within {timeout:.0f}s")
            time.sleep(0.5)
        yield port
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def find_chromium() -> str | None:
    for name in CHROMIUM_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium_capture(
    url: str, out_png: Path, *, chromium: str, budget_ms: int = 20000, size: str = "1600,1000"
) -> str:
    """Screenshot ``url`` into ``out_png`` and return the rendered DOM (after scripts ran)."""
    out_png.parent.mkdir(parents=True, exist_ok=True)
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--hide-scrollbars", f"--window-size={size}", f"--virtual-time-budget={budget_ms}",
    ]  # fmt: skip
    with contextlib.ExitStack() as stack:
        import tempfile

        profile = stack.enter_context(tempfile.TemporaryDirectory())
        base = [chromium, *flags, f"--user-data-dir={profile}"]
        subprocess.run(
            [*base, f"--screenshot={out_png}", url], check=True, capture_output=True, timeout=120
        )
        dom = subprocess.run(
            [*base, "--dump-dom", url], check=True, capture_output=True, timeout=120, text=True
        )
    return dom.stdout


def screenshot_asset_graph(
    dagster_home: Path, out_png: Path, env: dict | None = None, group: str = "ingest"
) -> tuple[Path, str]:
    """Screenshot one asset group's lineage graph (``group=""``: the global lineage of every
    asset); returns the PNG path and the rendered DOM."""
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium found (apt-get install chromium)")
    with running_webserver(dagster_home, env) as port:
        # Mark the first-visit community dialog as seen so it does not cover the graph.
        graphql(port, "mutation { setNuxSeen }")
        if group:
            url = f"http://127.0.0.1:{port}/locations/gtex_assets/asset-groups/{group}"
            # The graph's layout runs in a web worker: give it the budget of the full graph.
            dom = chromium_capture(url, out_png, chromium=chromium, budget_ms=90000)
        else:
            url = f"http://127.0.0.1:{port}/asset-groups"
            dom = chromium_capture(
                url, out_png, chromium=chromium, size="2600,1500", budget_ms=90000
            )
    return out_png, dom
