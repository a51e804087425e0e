"""Kubernetes deployment, offline: the Job specs dagster-k8s builds for GPU and CPU steps, and
the deploy/ files checked against what the Helm chart and dagster-k8s really read.

No cluster and no helm here: the pod specs come from dagster-k8s's own job construction
(`construct_dagster_k8s_job` with the steps' tags from the loaded definitions); the instance
config is rendered from deploy/values.yaml the way the chart's templates do
(helpers/instance/_run-launcher.tpl, _concurrency.tpl, _postgresql.tpl) and validated with
Dagster's own instance and run-launcher schemas.
"""

import json
import re
from pathlib import Path

import dagster as dg
import pytest
import tomllib
import yaml

dagster_k8s = pytest.importorskip("dagster_k8s", reason="dagster-k8s not installed (.[k8s])")
from dagster._config import validate_config  # noqa: E402
from dagster._core.instance.config import dagster_instance_config  # noqa: E402
from dagster_k8s.job import (  # noqa: E402
    DagsterK8sJobConfig,
    construct_dagster_k8s_job,
    get_user_defined_k8s_config,
)
from dagster_k8s.launcher import K8sRunLauncher  # noqa: E402

from gtex_assets.cli.runner import REPO_ROOT, load_definitions  # noqa: E402
from gtex_assets.defs.execution import (  # noqa: E402
    EXCLUSIVE_POOLS,
    GPU_IMAGE_ENV,
    GPU_OP_TAGS,
    GPU_POOL,
    gpu_op_tags,
)

DEPLOY = REPO_ROOT / "deploy"
GPU_STEPS = {"tile_embeddings", "tissue_classifier"}


def _yaml(name: str):
    return yaml.safe_load((DEPLOY / name).read_text())


@pytest.fixture(scope="module")
def values() -> dict:
    return _yaml("values.yaml")


@pytest.fixture(scope="module")
def env_configmap() -> dict:
    cm = _yaml("configmap.yaml")
    assert cm["kind"] == "ConfigMap"
    return cm


@pytest.fixture(scope="module")
def asset_job():
    return load_definitions().resolve_implicit_global_asset_job_def()


def _step_job(values: dict, tags: dict, name: str):
    """The Job dagster-k8s builds for one step pod: the run launcher's settings from
    values.yaml, the deployment's image, the step's own dagster-k8s/config tag."""
    rl = values["runLauncher"]["config"]["k8sRunLauncher"]
    deployment = values["dagster-user-deployments"]["deployments"][0]
    image = f"{deployment['image']['repository']}:{deployment['image']['tag']}"
    cfg = DagsterK8sJobConfig(
        job_image=image,
        dagster_home="/opt/dagster/dagster_home",
        image_pull_policy=deployment["image"]["pullPolicy"],
        env_config_maps=[c["name"] for c in rl.get("envConfigMaps", [])],
        env_vars=rl.get("envVars", []),
        volume_mounts=rl["volumeMounts"],
        volumes=rl["volumes"],
    )
    job = construct_dagster_k8s_job(
        cfg,
        args=["dagster", "api", "execute_step"],
        job_name=f"dagster-step-{name.replace('_', '-')}",
        user_defined_k8s_config=get_user_defined_k8s_config(tags),
        component="step_worker",
    )
    return job.spec.template.spec


def test_gpu_steps_carry_the_gpu_tags(asset_job):
    """The GPU steps (and only those) ask for a GPU, with the tags of `gpu_op_tags` for the
    image the environment names. (tissue_classifier_beats_chance shares the gpu pool but has
    no GPU tag: on k8s it evaluates on a CPU pod.)"""
    gpu_nodes = set()
    for node in asset_job.graph.nodes:
        tags = dict(node.tags)
        if node.name in GPU_STEPS:
            assert node.definition.pool == GPU_POOL
            gpu_nodes.add(node.name)
            assert json.loads(tags["dagster-k8s/config"]) == GPU_OP_TAGS["dagster-k8s/config"]
        else:
            assert "nvidia.com/gpu" not in tags.get("dagster-k8s/config", ""), node.name
    assert gpu_nodes >= GPU_STEPS


@pytest.mark.parametrize("step", sorted(GPU_STEPS))
def test_gpu_step_job_spec(step, values, env_configmap, asset_job):
    gpu_image = env_configmap["data"][GPU_IMAGE_ENV]
    node = asset_job.graph.node_named(step)
    assert node.definition.pool == GPU_POOL
    # The tags the step gets when the deployment's ConfigMap sets the GPU image.
    tags = {k: json.dumps(v) for k, v in gpu_op_tags(gpu_image).items()}
    pod = _step_job(values, tags, step)
    (c,) = pod.containers
    assert c.image == gpu_image and gpu_image.endswith("-gpu")
    assert c.resources.limits == {"nvidia.com/gpu": "1"}
    assert [(t.key, t.operator, t.effect) for t in pod.tolerations] == [
        ("nvidia.com/gpu", "Exists", "NoSchedule")
    ]
    _shared_pod_settings(pod, c)


def test_cpu_step_job_spec(values, asset_job):
    node = asset_job.graph.node_named("slide_tiles")
    assert node.definition.pool is None
    pod = _step_job(values, dict(node.tags), "slide_tiles")
    (c,) = pod.containers
    assert c.image.endswith("-cpu")  # the CPU-only torch build of deploy/Dockerfile
    assert not (c.resources and c.resources.limits and "nvidia.com/gpu" in c.resources.limits)
    assert not pod.tolerations
    _shared_pod_settings(pod, c)


def _shared_pod_settings(pod, c) -> None:
    """Every step pod: the data volume at /data, the gtex env ConfigMap, DAGSTER_HOME."""
    (vol,) = pod.volumes
    assert vol.name == "gtex-data" and vol.persistent_volume_claim.claim_name == "gtex-data"
    assert [(m.name, m.mount_path) for m in c.volume_mounts] == [("gtex-data", "/data")]
    assert [e.config_map_ref.name for e in c.env_from if e.config_map_ref] == ["gtex-assets-env"]
    env = {e.name: e.value for e in c.env}
    assert env["DAGSTER_HOME"] == "/opt/dagster/dagster_home"


def test_configmap_carries_every_setting_the_code_reads(env_configmap):
    data = env_configmap["data"]
    assert data["GTEX_DATA_ROOT"].startswith("/data")  # on the mounted volume
    assert data["GTEX_SOURCE"] and data["GTEX_EXECUTOR"] == "k8s"
    assert all(isinstance(v, str) for v in data.values())  # ConfigMap data must be strings


# -- values.yaml as the chart reads it -------------------------------------------------------


def _render_instance(values: dict) -> dict:
    """The parts of the chart's `<release>-instance` ConfigMap (dagster.yaml) these values
    drive, following its templates key by key."""
    rl = values["runLauncher"]["config"]["k8sRunLauncher"]
    launcher_cfg = {
        "load_incluster_config": True,
        "job_namespace": "dagster",
        "service_account_name": "dagster",
        "dagster_home": {"env": "DAGSTER_HOME"},
        "instance_config_map": {"env": "DAGSTER_K8S_INSTANCE_CONFIG_MAP"},
        "postgres_password_secret": {"env": "DAGSTER_K8S_PG_PASSWORD_SECRET"},
        "env_config_maps": [{"env": "DAGSTER_K8S_PIPELINE_RUN_ENV_CONFIGMAP"}]
        + [c["name"] for c in rl.get("envConfigMaps", []) if "name" in c],
    }
    if rl.get("envSecrets"):
        launcher_cfg["env_secrets"] = [s["name"] for s in rl["envSecrets"] if "name" in s]
    for key, out in (("envVars", "env_vars"), ("volumeMounts", "volume_mounts"),
                     ("volumes", "volumes")):  # fmt: skip
        if rl.get(key):
            launcher_cfg[out] = rl[key]
    pg = values["postgresql"]
    pg_db = {"username": "test", "password": {"env": "DAGSTER_PG_PASSWORD"},
             "hostname": "dagster-postgresql", "db_name": "test", "port": 5432}  # fmt: skip
    if pg.get("postgresqlScheme"):
        pg_db["scheme"] = pg["postgresqlScheme"]
    storage = {"postgres_db": pg_db}
    out = {
        "run_launcher": {
            "module": "dagster_k8s",
            "class": "K8sRunLauncher",
            "config": launcher_cfg,
        },  # fmt: skip
        "run_storage": {
            "module": "dagster_postgres.run_storage",
            "class": "PostgresRunStorage",
            "config": storage,
        },  # fmt: skip
        "event_log_storage": {
            "module": "dagster_postgres.event_log",
            "class": "PostgresEventLogStorage",
            "config": storage,
        },  # fmt: skip
        "schedule_storage": {
            "module": "dagster_postgres.schedule_storage",
            "class": "PostgresScheduleStorage",
            "config": storage,
        },  # fmt: skip
    }
    rc = values["dagsterDaemon"]["runCoordinator"]
    if rc.get("enabled") and rc["type"] == "QueuedRunCoordinator":
        qrc = rc.get("config", {}).get("queuedRunCoordinator", {})
        conc = values.get("concurrency", {})
        # _concurrency.tpl refuses run limits in both places.
        assert not ("maxConcurrentRuns" in conc.get("runs", {}) and "maxConcurrentRuns" in qrc)
        out["run_coordinator"] = {"module": "dagster.core.run_coordinator",
                                  "class": "QueuedRunCoordinator"}  # fmt: skip
    conc = values.get("concurrency", {})
    pools = conc.get("pools", {})
    rendered: dict = {}
    if pools:
        rendered["pools"] = {k: pools[v] for k, v in (("default_limit", "defaultLimit"),
                             ("granularity", "granularity")) if v in pools}  # fmt: skip
    if conc.get("runs", {}).get("maxConcurrentRuns") is not None:
        rendered["runs"] = {"max_concurrent_runs": conc["runs"]["maxConcurrentRuns"]}
    if rendered:
        out["concurrency"] = rendered
    return out


def test_values_render_a_valid_instance(values, tmp_path, monkeypatch):
    instance = _render_instance(values)
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(instance))
    config, _ = dagster_instance_config(str(tmp_path))  # Dagster's instance schema
    # The run launcher's own schema, as the daemon instantiates it.
    res = validate_config(K8sRunLauncher.config_type(), config["run_launcher"]["config"])
    assert res.success, res.errors
    # Every pool the code treats as a single writer is limited to 1 slot.
    assert config["concurrency"]["pools"]["default_limit"] == 1
    assert set(EXCLUSIVE_POOLS) >= {GPU_POOL, "duckdb_catalog", "lancedb_writer"}
    # dagster-postgres builds its SQLAlchemy URL with this scheme; its driver is installed.
    assert config["run_storage"]["config"]["postgres_db"]["scheme"] == "postgresql+psycopg2"
    import psycopg2  # noqa: F401

    # The env a run pod gets resolves without the daemon's own environment.
    for k in ("GTEX_DATA_ROOT", "GTEX_SOURCE", "GTEX_EXECUTOR"):
        monkeypatch.delenv(k, raising=False)
    job_cfg = DagsterK8sJobConfig(
        job_image="x",
        dagster_home="/opt/dagster/dagster_home",
        env_vars=config["run_launcher"]["config"].get("env_vars", []),
    )
    assert job_cfg.env is not None  # a key-only envVars entry raises here


def test_helm_command_pins_the_chart_to_the_dagster_version():
    readme = (DEPLOY / "README.md").read_text()
    header = (DEPLOY / "values.yaml").read_text()
    for text in (readme, header):
        cmds = re.findall(r"helm upgrade --install dagster dagster/dagster[^\n`]*", text)
        assert cmds, "no helm install command"
        for cmd in cmds:
            assert f"--version {dg.__version__}" in cmd, cmd
    # The chart writes the instance config itself; no file in deploy/ claims to be it.
    assert not (DEPLOY / "dagster.yaml").exists()
    assert "deploy/dagster.yaml" not in readme


def test_dockerfile_has_a_cpu_only_torch_target():
    text = (DEPLOY / "Dockerfile").read_text()
    pins = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(p for p in pins if p.startswith("torch=="))
    vision_pin = next(p for p in pins if p.startswith("torchvision=="))
    stages = dict(re.findall(r"^FROM \S+ AS (\w+)\n(.*?)(?=^FROM |\Z)", text, re.M | re.S))
    assert {"cpu", "gpu"} <= set(stages)
    assert "download.pytorch.org/whl/cpu" in stages["cpu"]
    assert torch_pin in stages["cpu"] and vision_pin in stages["cpu"]
    assert "whl/cpu" not in stages["gpu"]


def test_readme_documents_both_engines():
    text = Path(DEPLOY / "README.md").read_text()
    assert "GTEX_EXECUTOR=celery" in text and "gtex-assets cluster up" in text
    assert "configmap.yaml" in text
