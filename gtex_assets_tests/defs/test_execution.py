import dagster as dg
import pytest

from gtex_assets.cli.runner import load_definitions
from gtex_assets.defs.execution import (
    DEFAULT_QUEUE,
    EXCLUSIVE_POOLS,
    EXCLUSIVE_QUEUE,
    ExecutorChoiceError,
    celery_queue,
    executor_for,
)


def test_default_executor_is_multiprocess(monkeypatch):
    monkeypatch.delenv("GTEX_EXECUTOR", raising=False)
    defs = load_definitions()
    assert defs.executor.name == "multiprocess"


def test_executor_choices():
    assert executor_for("in_process") is dg.in_process_executor
    with pytest.raises(ExecutorChoiceError, match="expected 'multiprocess'.*'celery'"):
        executor_for("spark")
    try:
        import dagster_k8s  # noqa: F401
    except ImportError:
        with pytest.raises(ExecutorChoiceError, match=r"pip install -e '\.\[k8s\]'"):
            executor_for("k8s")
    else:
        assert executor_for("k8s").name == "k8s"


def test_celery_executor_is_selected(monkeypatch):
    pytest.importorskip("dagster_celery", reason="dagster-celery not installed (.[cluster])")
    monkeypatch.setenv("GTEX_EXECUTOR", "celery")
    monkeypatch.delenv("GTEX_CELERY_BROKER", raising=False)  # read when a run starts, not here
    assert load_definitions().executor.name == "celery"


def test_every_pool_in_the_definitions_is_routed(monkeypatch):
    """Each pool an asset or check declares is an exclusive pool with its own queue; a new
    pool would otherwise silently share the general queue."""
    job = load_definitions().resolve_implicit_global_asset_job_def()
    pools = {n.definition.pool for n in job.graph.nodes} - {None}
    assert pools and pools <= set(EXCLUSIVE_POOLS)
    for pool in pools:
        assert celery_queue(pool, {}) == EXCLUSIVE_QUEUE
    assert celery_queue(None, {}) == DEFAULT_QUEUE
    assert celery_queue(None, {"dagster-celery/queue": "big-memory"}) == "big-memory"
