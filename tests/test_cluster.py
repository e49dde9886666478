"""cluster.yaml: a valid Ray cluster-launcher config that installs this project and keeps the
dashboard and MLflow off the network."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_matches_ray_launcher_schema(cluster):
    import json

    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)


def test_head_and_gpu_workers(cluster):
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    gpu = [t for name, t in types.items() if name != cluster["head_node_type"]]
    assert gpu, "no worker node type"
    instance_types = {t["node_config"]["InstanceType"] for t in gpu}
    assert instance_types & {"g5.2xlarge", "p4d.24xlarge"}
    assert all(t["max_workers"] >= 1 for t in gpu)
    assert cluster["provider"]["type"] == "aws"


def test_installs_this_project_from_the_synced_folder(cluster):
    ((remote, local),) = cluster["file_mounts"].items()
    assert local == "."
    install = " ".join(cluster["setup_commands"])
    assert f"cd {remote}" in install and "pip install" in install and "-e ." in install
    assert "torch==" in install
    assert ".venv" in cluster["rsync_exclude"]


def test_dashboard_and_mlflow_bound_to_localhost(cluster):
    head = " ".join(cluster["head_start_ray_commands"])
    assert "ray start --head" in head and "--dashboard-host=127.0.0.1" in head
    assert "mlflow server --host 127.0.0.1" in head
    assert "--backend-store-uri sqlite:////" in head and "--artifacts-destination /" in head
    text = (ROOT / "cluster.yaml").read_text()
    assert "0.0.0.0" not in text
    assert "security_group" not in str(cluster["provider"]).lower()  # launcher default: SSH only


def test_workers_join_the_head(cluster):
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in cluster["worker_start_ray_commands"])
