"""How steps execute: the executor (chosen when the definitions load) and the tags that send
accelerator steps to GPU nodes on Kubernetes.

`GTEX_EXECUTOR`: `multiprocess` (default; one process per step, at most 2 at once on the
embedded default), `in_process`, or `k8s` (dagster-k8s's `k8s_job_executor`: each step its own
Kubernetes Job; install with `pip install -e ".[k8s]"`).
"""

import os

import dagster as dg

# Pod resources for steps that use an accelerator (training, embedding). Ignored by the local
# executors; with the K8s run launcher / k8s_job_executor the step's pod requests one GPU.
GPU_OP_TAGS = {
    "dagster-k8s/config": {
        "container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}},
        "pod_spec_config": {
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        },
    }
}
GPU_POOL = "gpu"


class ExecutorChoiceError(RuntimeError):
    pass


def executor_for(name: str) -> dg.ExecutorDefinition:
    if name == "multiprocess":
        return dg.multiprocess_executor.configured({"max_concurrent": 2})
    if name == "in_process":
        return dg.in_process_executor
    if name == "k8s":
        try:
            from dagster_k8s import k8s_job_executor
        except ImportError as e:
            raise ExecutorChoiceError(
                "GTEX_EXECUTOR=k8s needs dagster-k8s: pip install -e '.[k8s]'"
            ) from e
        return k8s_job_executor
    raise ExecutorChoiceError(
        f"GTEX_EXECUTOR={name!r}: expected 'multiprocess', 'in_process' or 'k8s'"
    )


@dg.definitions
def execution() -> dg.Definitions:
    # Read when the code location loads (the executor is part of the definitions).
    return dg.Definitions(executor=executor_for(os.environ.get("GTEX_EXECUTOR", "multiprocess")))
