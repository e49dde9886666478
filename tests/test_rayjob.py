"""deploy/rayjob.yaml: a valid KubeRay RayJob (against KubeRay's own CRD schema,
tests/data/kuberay/) that runs the search of cluster.yaml with the same environment, its head
running no trials. No Kubernetes cluster is involved: this checks the manifest, not a run."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT / "tests" / "data" / "kuberay" / "ray.io_rayjobs.yaml.gz"


@pytest.fixture(scope="module")
def job() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "rayjob.yaml").read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # 1.4 MB of YAML: libyaml's is 10x
    crd = yaml.load(gzip.decompress(CRD.read_bytes()), Loader=loader)  # noqa: S506 - safe loader
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module")
def validator(schema):
    import jsonschema

    return jsonschema.Draft7Validator(schema)  # built once: the schema is 1.4 MB


def _unknown_fields(doc, schema: dict, where: str = "") -> list[str]:
    """Keys the schema does not declare (Kubernetes would silently prune them)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(doc, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in doc.items():
            if props is not None and key in props:
                found += _unknown_fields(value, props[key], f"{where}.{key}")
            elif isinstance(extra, dict):
                found += _unknown_fields(value, extra, f"{where}.{key}")
            elif props is not None or extra is False:
                found.append(f"{where}.{key}")
    elif isinstance(doc, list) and isinstance(schema.get("items"), dict):
        for i, value in enumerate(doc):
            found += _unknown_fields(value, schema["items"], f"{where}[{i}]")
    return found


def test_matches_kuberay_rayjob_schema(job, schema, validator):
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    validator.validate(job)
    assert _unknown_fields(job, schema) == []


def test_schema_check_catches_a_misspelt_field(job, schema, validator):
    import copy

    import jsonschema

    bad = copy.deepcopy(job)
    bad["spec"]["shutdownAfterJobFinish"] = True  # KubeRay's is ...Finishes
    assert _unknown_fields(bad, schema) == [".spec.shutdownAfterJobFinish"]
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(bad)


def test_same_search_and_environment_as_cluster_yaml_and_readme(job):
    cluster = (ROOT / "cluster.yaml").read_text()
    readme = (ROOT / "README.md").read_text()
    command = job["spec"]["entrypoint"]
    assert f"-- {command}" in cluster and f"-- {command}" in readme
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert set(env) == {"MLFLOW_TRACKING_URI", "GRAPHLORA_OPTUNA_STORAGE", "GRAPHLORA_STORAGE_PATH"}
    assert env["GRAPHLORA_OPTUNA_STORAGE"] in cluster and env["GRAPHLORA_STORAGE_PATH"] in cluster
    assert not re.search(r"postgresql://[^@\s]*:[^@\s]*@", job["spec"]["runtimeEnvYAML"])


def test_head_runs_no_trials_and_workers_have_gpus(job):
    spec = job["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in spec["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert group["template"]["spec"]["serviceAccountName"]  # the S3 role (IRSA)
