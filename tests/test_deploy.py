"""deploy/: the KubeRay and cluster-launcher YAML are valid, agree with each other and run a real recipe.

KubeRay's CRDs are not installed here, so the KubeRay checks are small JSON schemas written from
the ray.io/v1 API reference (required fields, and no field KubeRay does not know). The launcher
YAML is checked against the schema Ray itself ships.
"""

import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from rayalign.config import load_config, validate_stages
from rayalign.plugins import get_plugin_manager

from conftest import REPO

DEPLOY = REPO / "deploy"
VERSION = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
IMAGE_HOME = "/opt/rayalign"  # where deploy/Dockerfile puts the repository

STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
QUANTITY = {"type": ["string", "integer"]}
CONTAINER = {
    "type": "object",
    "required": ["name", "image", "resources"],
    "properties": {
        "name": {"type": "string"},
        "image": {"type": "string", "pattern": r"^\S+:\S+$"},
        "resources": {
            "type": "object",
            "required": ["requests", "limits"],
            "properties": {k: {"type": "object", "required": ["cpu", "memory"], "additionalProperties": QUANTITY}
                           for k in ("requests", "limits")},
        },
    },
}
POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {"spec": {"type": "object", "required": ["containers"], "properties": {
        "containers": {"type": "array", "minItems": 1, "items": CONTAINER}}}},
}
HEAD_GROUP = {
    "type": "object",
    "required": ["rayStartParams", "template"],
    "properties": {"rayStartParams": STRING_MAP, "template": POD_TEMPLATE, "labels": STRING_MAP,
                   "resources": STRING_MAP, "serviceType": {"type": "string"}, "headService": {"type": "object"},
                   "enableIngress": {"type": "boolean"}, "ingressOptions": {"type": "object"}},
    "additionalProperties": False,
}
WORKER_GROUP = {
    "type": "object",
    "required": ["groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"],
    "properties": {"groupName": {"type": "string"}, "replicas": {"type": "integer", "minimum": 0},
                   "minReplicas": {"type": "integer", "minimum": 0}, "maxReplicas": {"type": "integer", "minimum": 1},
                   "rayStartParams": STRING_MAP, "template": POD_TEMPLATE, "labels": STRING_MAP,
                   "resources": STRING_MAP, "idleTimeoutSeconds": {"type": "integer"}, "priority": {"type": "integer"},
                   "numOfHosts": {"type": "integer"}, "suspend": {"type": "boolean"}, "scaleStrategy": {"type": "object"}},
    "additionalProperties": False,
}
CLUSTER_SPEC = {
    "type": "object",
    "required": ["rayVersion", "headGroupSpec", "workerGroupSpecs"],
    "properties": {
        "rayVersion": {"type": "string"},
        "authOptions": {"type": "object", "properties": {"mode": {"enum": ["disabled", "token"]}}},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {"type": "object"},
        "headGroupSpec": HEAD_GROUP,
        "workerGroupSpecs": {"type": "array", "minItems": 1, "items": WORKER_GROUP},
        "suspend": {"type": "boolean"}, "managedBy": {"type": "string"}, "headServiceAnnotations": STRING_MAP,
        "gcsFaultToleranceOptions": {"type": "object"}, "upgradeStrategy": {"type": "object"},
    },
    "additionalProperties": False,
}
METADATA = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
RAYCLUSTER = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayCluster"}, "metadata": METADATA,
                   "spec": CLUSTER_SPEC},
}
RAYJOB = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"}, "metadata": METADATA,
        "spec": {
            "type": "object",
            "required": ["entrypoint", "rayClusterSpec"],
            "properties": {
                "entrypoint": {"type": "string"}, "rayClusterSpec": CLUSTER_SPEC,
                "shutdownAfterJobFinishes": {"type": "boolean"}, "ttlSecondsAfterFinished": {"type": "integer"},
                "activeDeadlineSeconds": {"type": "integer"}, "backoffLimit": {"type": "integer"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                "runtimeEnvYAML": {"type": "string"}, "jobId": {"type": "string"}, "suspend": {"type": "boolean"},
                "entrypointNumCpus": {"type": "number"}, "entrypointNumGpus": {"type": "number"},
                "entrypointResources": {"type": "string"}, "metadata": STRING_MAP,
                "submitterPodTemplate": {"type": "object"}, "submitterConfig": {"type": "object"},
            },
            "additionalProperties": False,
        },
    },
}


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def cluster_specs() -> list[tuple[str, dict]]:
    return [("raycluster.yaml", load("raycluster.yaml")["spec"]), ("rayjob.yaml", load("rayjob.yaml")["spec"]["rayClusterSpec"])]


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("name, schema", [("raycluster.yaml", RAYCLUSTER), ("rayjob.yaml", RAYJOB)])
def test_kuberay_manifests_match_the_v1_api(name, schema):
    jsonschema.validate(load(name), schema)


@pytest.mark.parametrize("name, spec", cluster_specs(), ids=["raycluster", "rayjob"])
def test_cluster_spec_has_gpu_pools_token_auth_metrics_and_the_pinned_image(name, spec):
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]["rayStartParams"]
    assert head["dashboard-host"] == "0.0.0.0" and head["num-gpus"] == "0"
    ports = {p["name"]: p["containerPort"] for p in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ports["dashboard"] == 8265 and ports["metrics"] == int(head["metrics-export-port"])
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        assert group["rayStartParams"]["metrics-export-port"] == head["metrics-export-port"]
        pod = group["template"]["spec"]
        gpus = pod["containers"][0]["resources"]
        assert int(gpus["limits"]["nvidia.com/gpu"]) == int(gpus["requests"]["nvidia.com/gpu"]) > 0, group["groupName"]
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        assert "rayalign.io/pool" in group["labels"]
    for container in containers(spec):
        assert container["image"].rsplit(":", 1)[1] == VERSION, f"{name}: image tag is not the project version"
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["shared"] == "/shared"
    claims = {v["persistentVolumeClaim"]["claimName"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
              for v in g["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v}
    pvc = load("shared-pvc.yaml")
    assert claims == {pvc["metadata"]["name"]} and pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_rayjob_runs_an_existing_recipe_with_a_valid_config():
    job = load("rayjob.yaml")
    args = shlex.split(job["spec"]["entrypoint"])  # KubeRay hands the entrypoint to a shell
    assert args[0] == "python" and args[1].startswith(IMAGE_HOME + "/recipes/")
    recipe = REPO / args[1][len(IMAGE_HOME) + 1 :]
    assert recipe.is_file(), f"{args[1]}: no such recipe in recipes/"
    config_path = REPO / "recipes" / "configs" / f"{recipe.stem}.yaml"
    cfg = load_config(config_path, args[2:])  # every override names a real key with a valid value
    validate_stages(cfg, get_plugin_manager().stages, str(config_path))
    assert cfg.output_dir.startswith("/shared/") and cfg.model.startswith("/shared/")
    # Every node label a role asks for is carried by some worker group of the job's cluster.
    offered = [g["labels"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    for role in ("trainer", "reference", "rollout"):
        for selector in getattr(cfg.resources, role).placement:
            assert any(selector.labels.items() <= labels.items() for labels in offered), (role, selector.labels)
    gpus = {g["labels"]["rayalign.io/pool"]: int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
            for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    rollout = cfg.resources.rollout
    assert rollout.num_gpus * rollout.tensor_parallel_size <= gpus["rollout"]  # one engine fits one node


def test_cluster_launcher_config_matches_rays_schema_and_the_kuberay_layout():
    cfg = load("cluster-launcher.yaml")
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(cfg, json.loads(schema_path.read_text()))
    assert {"cluster_name", "provider", "available_node_types", "head_node_type",
            "head_start_ray_commands", "worker_start_ray_commands"} <= set(cfg)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert cfg["docker"]["image"].rsplit(":", 1)[1] == VERSION
    pools = {t["labels"]["rayalign.io/pool"] for name, t in types.items() if name != cfg["head_node_type"]}
    assert pools == {g["labels"]["rayalign.io/pool"] for g in load("raycluster.yaml")["spec"]["workerGroupSpecs"]}
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head_start and "--metrics-export-port=8080" in head_start
    assert "ray start --address=$RAY_HEAD_IP:6379" in " ".join(cfg["worker_start_ray_commands"])
    assert "-e RAY_AUTH_MODE=token" in cfg["docker"]["run_options"] and "~/.ray/auth_token" in cfg["file_mounts"]


def test_dockerfile_pins_the_stack_the_manifests_expect():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+)-py(\d)(\d+)-cu\d+", dockerfile, re.M)
    assert base and base.group(1) == ray.__version__
    torch_pin = re.search(r'"torch==([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert f"torch=={torch_pin}" in dockerfile
    assert re.search(rf"^WORKDIR {IMAGE_HOME}$", dockerfile, re.M)
    assert "COPY --chown=ray:users recipes/ recipes/" in dockerfile and 'pip install --no-cache-dir -e ".[gpu]"' in dockerfile
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and "runs" in ignored
