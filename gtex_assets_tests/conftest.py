"""Shared fixtures: everything offline, under tmp paths, on small generated data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path_factory):
    """No test reads the user's data root, source or Dagster instance."""
    monkeypatch.delenv("GTEX_SOURCE", raising=False)
    monkeypatch.setenv("GTEX_DATA_ROOT", str(tmp_path_factory.mktemp("root")))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def cmu_slide() -> Path:
    return FIXTURES / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def portal_csv_sample() -> Path:
    return FIXTURES / "GTEx_Portal.head300.csv"


@pytest.fixture(scope="session")
def tiny_mirror(tmp_path_factory) -> Path:
    """A generated mirror: 3 tissues x 3 slides, small slides, a few hundred genes."""
    from gtex_assets.lib.synth import generate_mirror

    out = tmp_path_factory.mktemp("mirror")
    generate_mirror(
        out, tissues=3, slides_per_tissue=3, seed=7, slide_size=(1344, 896), n_genes=300
    )
    return out
