"""How steps execute: the executor (chosen when the definitions load), the tags that send
accelerator steps to GPU nodes on Kubernetes, and the Celery queues of the exclusive writers.

`GTEX_EXECUTOR`: `multiprocess` (default; one process per step, at most 2 at once on the
embedded default), `in_process`, `celery` (dagster-celery's executor: steps run in Celery
workers fed through a Redis broker; `gtex-assets cluster up` starts Postgres, Redis and the
workers; install with `pip install -e ".[cluster]"`), or `k8s` (dagster-k8s's
`k8s_job_executor`: each step its own Kubernetes Job; `pip install -e ".[k8s]"`).
"""

import os

import dagster as dg

GPU_IMAGE_ENV = "GTEX_K8S_GPU_IMAGE"


def gpu_op_tags(image: str | None) -> dict:
    """Pod settings of steps that use an accelerator (training, embedding): one GPU, the GPU
    node taint tolerated, and ``image`` (the CUDA build of deploy/Dockerfile) instead of the
    deployment's CPU-only image. Ignored by the local and Celery executors."""
    container: dict = {"resources": {"limits": {"nvidia.com/gpu": "1"}}}
    if image:
        container["image"] = image
    return {
        "dagster-k8s/config": {
            "container_config": container,
            "pod_spec_config": {
                "tolerations": [
                    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                ]
            },
        }
    }


# Read when the definitions load, like GTEX_EXECUTOR: the deployment (deploy/values.yaml's
# ConfigMap) names the GPU image; unset, GPU steps run the deployment's own image.
GPU_OP_TAGS = gpu_op_tags(os.environ.get(GPU_IMAGE_ENV))
GPU_POOL = "gpu"

# Pools whose steps must never run twice at once: the DuckDB catalog and LanceDB have a single
# writer, the GPU holds one training/inference job. Dagster's instance enforces them with pool
# slots (`concurrency.pools.default_limit: 1`); under Celery their steps also go to one queue
# served by a single worker with one slot, so a second worker cannot pick one up even if slots
# were misconfigured. The one place that maps pool -> queue.
EXCLUSIVE_POOLS = ("duckdb_catalog", "lancedb_writer", GPU_POOL)
EXCLUSIVE_QUEUE = "gtex-exclusive"
DEFAULT_QUEUE = "dagster"  # dagster-celery's default queue
QUEUE_FOR_POOL = dict.fromkeys(EXCLUSIVE_POOLS, EXCLUSIVE_QUEUE)

try:  # dagster-celery's own broker retry settings, kept
    from dagster_celery.defaults import broker_transport_options
except ImportError:  # without the cluster extra; only GTEX_EXECUTOR=celery needs it
    broker_transport_options = {}

# Celery settings shared by the run's orchestrator (executor config) and every worker
# (`gtex-assets cluster up` writes them into the workers' dagster_celery_config module).
# acks_late + reject_on_worker_lost: a worker process that dies mid-step gives its task back to
# the broker, so another worker re-runs the step instead of the run failing.
CELERY_SETTINGS = {
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1,
    # Redis re-delivers a task whose worker vanished without a word (node lost) after this
    # many seconds; it must exceed the longest step (a GPU embedding batch: ~1 h at most).
    "broker_transport_options": {
        **broker_transport_options,
        "visibility_timeout": 4 * 3600,
    },
}
CELERY_BROKER_ENV = "GTEX_CELERY_BROKER"
CELERY_BACKEND_ENV = "GTEX_CELERY_BACKEND"


class ExecutorChoiceError(RuntimeError):
    pass


def celery_queue(pool: str | None, tags: dict) -> str:
    """The Celery queue of a step: its exclusive pool's queue, else its own
    `dagster-celery/queue` tag, else the default queue."""
    if pool in QUEUE_FOR_POOL:
        return QUEUE_FOR_POOL[pool]
    return tags.get("dagster-celery/queue", DEFAULT_QUEUE)


def _celery_executor() -> dg.ExecutorDefinition:
    try:
        from dagster._core.execution.retries import RetryMode
        from dagster_celery.executor import CELERY_CONFIG, CeleryExecutor, _submit_task
    except ImportError as e:
        raise ExecutorChoiceError(
            "GTEX_EXECUTOR=celery needs dagster-celery: pip install -e '.[cluster]'"
        ) from e

    def submit(app, plan_context, step, queue, priority, known_state):
        return _submit_task(
            app, plan_context, step, celery_queue(step.pool, step.tags), priority, known_state
        )

    class GtexCeleryExecutor(CeleryExecutor):
        """dagster-celery's executor with each exclusive pool's steps on its own queue."""

        def execute(self, plan_context, execution_plan):
            from dagster_celery.core_execution_loop import core_celery_execution_loop

            return core_celery_execution_loop(
                plan_context, execution_plan, step_execution_fn=submit
            )

    @dg.executor(
        name="celery",
        config_schema=CELERY_CONFIG,
        requirements=dg.multiple_process_executor_requirements(),
    )
    def gtex_celery_executor(init_context):
        cfg = init_context.executor_config
        return GtexCeleryExecutor(
            broker=cfg.get("broker"),
            backend=cfg.get("backend"),
            include=cfg.get("include"),
            config_source={**CELERY_SETTINGS, **(cfg.get("config_source") or {})},
            retries=RetryMode.from_config(cfg["retries"]),
        )

    # Broker and result backend come from the environment when a run starts (never at import).
    return gtex_celery_executor.configured(
        {"broker": {"env": CELERY_BROKER_ENV}, "backend": {"env": CELERY_BACKEND_ENV}},
        name="celery",
    )


def executor_for(name: str) -> dg.ExecutorDefinition:
    if name == "multiprocess":
        return dg.multiprocess_executor.configured({"max_concurrent": 2})
    if name == "in_process":
        return dg.in_process_executor
    if name == "celery":
        return _celery_executor()
    if name == "k8s":
        try:
            from dagster_k8s import k8s_job_executor
        except ImportError as e:
            raise ExecutorChoiceError(
                "GTEX_EXECUTOR=k8s needs dagster-k8s: pip install -e '.[k8s]'"
            ) from e
        return k8s_job_executor
    raise ExecutorChoiceError(
        f"GTEX_EXECUTOR={name!r}: expected 'multiprocess', 'in_process', 'celery' or 'k8s'"
    )


@dg.definitions
def execution() -> dg.Definitions:
    # Read when the code location loads (the executor is part of the definitions).
    return dg.Definitions(executor=executor_for(os.environ.get("GTEX_EXECUTOR", "multiprocess")))
