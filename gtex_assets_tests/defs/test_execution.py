import dagster as dg
import pytest

from gtex_assets.cli.runner import load_definitions
from gtex_assets.defs.execution import ExecutorChoiceError, executor_for


def test_default_executor_is_multiprocess(monkeypatch):
    monkeypatch.delenv("GTEX_EXECUTOR", raising=False)
    defs = load_definitions()
    assert defs.executor.name == "multiprocess"


def test_executor_choices():
    assert executor_for("in_process") is dg.in_process_executor
    with pytest.raises(ExecutorChoiceError, match="expected 'multiprocess'"):
        executor_for("spark")
    try:
        import dagster_k8s  # noqa: F401
    except ImportError:
        with pytest.raises(ExecutorChoiceError, match=r"pip install -e '\.\[k8s\]'"):
            executor_for("k8s")
    else:
        assert executor_for("k8s").name == "k8s"
