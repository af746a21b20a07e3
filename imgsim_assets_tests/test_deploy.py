"""deploy/values.yaml against the official chart's schema, Dagster's own config schemas, and the
code's GPU steps and jobs: the deployment cannot drift from either side unnoticed."""

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from imgsim_assets.definitions import build_definitions
from imgsim_assets.policies import GPU_POOL
from imgsim_assets.settings import Settings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
# The chart's schema refers to Kubernetes' own definitions on a site that no longer serves them
# (as Helm's fetch of them would fail too); these objects are checked below by building the pods.
K8S_DEFINITIONS = "https://kubernetesjsonschema.dev/"


@pytest.fixture(scope="module")
def values():
    return yaml.safe_load((DEPLOY / "values.yaml").read_text())


def _chart_validator():
    """The chart's values.schema.json for an override file: Helm merges maps with the chart's defaults
    (so a map's required keys come from there) and replaces lists (so list items must be whole)."""
    schema = json.loads((DEPLOY / "values.schema.json").read_text())
    definitions = schema["definitions"]
    whole = {ref.rsplit("/", 1)[1] for ref in _refs(schema, under_items=True)}
    schema.pop("required")
    for name, definition in definitions.items():
        if name not in whole:
            definition.pop("required", None)
    remote = {}
    for ref in _refs(schema):
        if ref.startswith(K8S_DEFINITIONS):
            url, pointer = ref.split("#")
            node = remote.setdefault(url, {})
            for part in pointer.strip("/").split("/"):
                node = node.setdefault(part, {})
    registry = Registry(retrieve=lambda url: Resource.from_contents(remote[url], default_specification=DRAFT7))
    return jsonschema.Draft7Validator(schema, registry=registry)


def _refs(node, under_items=False, inside_items=False):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and (inside_items or not under_items):
                yield value
            yield from _refs(value, under_items, inside_items or key == "items")
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value, under_items, inside_items)


def test_values_validate_against_the_official_chart_schema(values):
    validator = _chart_validator()
    assert list(validator.iter_errors(values)) == []

    # The validator is not a formality: a misspelt key, a wrong type or a half list item fail.
    typo = copy.deepcopy(values)
    typo["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfg"] = {}
    wrong_type = copy.deepcopy(values)
    wrong_type["dagster-user-deployments"]["deployments"][0]["port"] = "3030"
    half_item = copy.deepcopy(values)
    del half_item["dagster-user-deployments"]["deployments"][0]["image"]
    for broken in (typo, wrong_type, half_item):
        assert list(validator.iter_errors(broken))


def _instance_yaml(values) -> dict:
    """The parts of dagster.yaml the chart renders from these values (its templates
    helpers/instance/_run-launcher.tpl, _run-coordinator.tpl, _concurrency.tpl; camelCase to snake_case)."""
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    k8s_config = {_snake(key): value for key, value in launcher["runK8sConfig"].items()}
    queued = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    concurrency = values["concurrency"]
    retries = values["dagsterDaemon"]["runRetries"]
    return {
        "run_launcher": {
            "module": "dagster_k8s",
            "class": "K8sRunLauncher",
            "config": {
                "load_incluster_config": True,
                "job_namespace": "imgsim",
                "image_pull_policy": "Always",
                "service_account_name": "dagster",
                "dagster_home": {"env": "DAGSTER_HOME"},
                "instance_config_map": {"env": "DAGSTER_K8S_INSTANCE_CONFIG_MAP"},
                "postgres_password_secret": {"env": "DAGSTER_K8S_PG_PASSWORD_SECRET"},
                "env_config_maps": [{"env": "DAGSTER_K8S_PIPELINE_RUN_ENV_CONFIGMAP"}],
                "run_k8s_config": k8s_config,
            },
        },
        "run_coordinator": {
            "module": "dagster._core.run_coordinator",
            "class": "QueuedRunCoordinator",
            "config": {_snake(key): value for key, value in queued.items()},
        },
        "concurrency": {
            "pools": {_snake(key): value for key, value in concurrency["pools"].items()},
            "runs": {_snake(key): value for key, value in concurrency["runs"].items()},
        },
        "run_retries": {"enabled": retries["enabled"], "max_retries": retries["maxRetries"]},
    }


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)


def test_instance_blocks_validate_against_dagsters_config_schemas(values, tmp_path):
    from dagster._config import validate_config
    from dagster._core.instance.config import dagster_instance_config
    from dagster._core.run_coordinator import QueuedRunCoordinator
    from dagster_k8s import K8sRunLauncher

    instance = _instance_yaml(values)
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(instance))
    config, _ = dagster_instance_config(str(tmp_path))  # what Dagster runs on loading the instance
    assert config["concurrency"]["runs"]["tag_concurrency_limits"] == [{"key": "imgsim/gpu", "value": "true", "limit": 1}]

    for cls, block in ((K8sRunLauncher, "run_launcher"), (QueuedRunCoordinator, "run_coordinator")):
        result = validate_config(cls.config_type(), instance[block]["config"])
        assert result.success, (cls.__name__, [e.message for e in result.errors])

    # The run queue's limits live in one place: Dagster refuses them in both.
    both = copy.deepcopy(instance)
    both["run_coordinator"]["config"]["tag_concurrency_limits"] = instance["concurrency"]["runs"]["tag_concurrency_limits"]
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(both))
    with pytest.raises(Exception, match="incompatible"):
        dagster_instance_config(str(tmp_path))


@pytest.fixture(scope="module")
def deployed_defs(values, tmp_path_factory):
    """The code location as the deployment's code server loads it: its environment from the values."""
    env = values["dagster-user-deployments"]["deployments"][0]["env"]
    settings = Settings.from_env({**env, "IMGSIM_DATA_DIR": str(tmp_path_factory.mktemp("data"))})
    return build_definitions(settings)


def test_every_gpu_step_gets_a_gpu_pod(values, deployed_defs):
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import (
        DagsterK8sJobConfig,
        UserDefinedDagsterK8sConfig,
        construct_dagster_k8s_job,
        get_user_defined_k8s_config,
    )

    assert deployed_defs.resolve_job_def("embed_batch").executor_def.name == "k8s"
    launcher = K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(
        _instance_yaml(values)["run_launcher"]["config"]["run_k8s_config"]))
    job_config = DagsterK8sJobConfig(job_image="imgsim:test", dagster_home="/opt/dagster/dagster_home")

    def step_pod(asset):
        # As the k8s_job_executor does: the launcher's config, then the step's op tags on top.
        tags = deployed_defs.get_assets_def(asset).op.tags
        context = launcher.merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(tags)))
        job = construct_dagster_k8s_job(job_config, ["dagster", "api", "execute_step"], f"dagster-step-{asset}",
                                        user_defined_k8s_config=context.run_k8s_config)
        return job.spec.template.spec.containers[0]

    pooled = {key.to_user_string() for assets_def in deployed_defs.resolve_asset_graph().assets_defs
              if assets_def.is_executable and assets_def.op.pool == GPU_POOL for key in assets_def.keys}
    assert pooled == {"image_embeddings", "cluster_centroids"}
    for asset in pooled:
        resources = step_pod(asset).resources
        assert str(resources.limits["nvidia.com/gpu"]) == "1"
        assert resources.requests["memory"] == "4Gi"  # the launcher's requests still apply
    cpu_step = step_pod("pca_model").resources
    assert "nvidia.com/gpu" not in (cpu_step.limits or {}) and cpu_step.requests["cpu"] == "2"


def test_the_runs_with_gpu_steps_carry_the_limited_tag(values, deployed_defs):
    limits = {(limit["key"], limit["value"]): limit["limit"] for limit in values["concurrency"]["runs"]["tagConcurrencyLimits"]}
    gpu_assets = {"image_embeddings", "cluster_centroids"}
    for job in deployed_defs.resolve_all_job_defs():
        if job.name.startswith("__"):
            continue  # the implicit asset job: its GPU steps are held by the pool alone
        keys = {key.to_user_string() for key in job.asset_layer.selected_asset_keys}
        carried = {(key, value) for key, value in job.tags.items()} & set(limits)
        assert bool(keys & gpu_assets) == bool(carried), job.name
    assert values["concurrency"]["pools"]["defaultLimit"] >= 1
