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
    assert instance_types & {"p4de.24xlarge", "p4d.24xlarge"}
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
    # The store outlives the cluster: PostgreSQL off the head, artifacts on S3 (not the head's
    # disk, which `ray down` terminates).
    assert "--backend-store-uri postgresql://" in head and "--artifacts-destination s3://" in head
    text = (ROOT / "cluster.yaml").read_text()
    assert "0.0.0.0" not in text
    assert "security_group" not in str(cluster["provider"]).lower()  # launcher default: SSH only


def test_workers_join_the_head(cluster):
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in cluster["worker_start_ray_commands"])


def test_documented_servers_bind_to_localhost():
    """Every server the docs and the cluster config start binds to 127.0.0.1 (the job-server
    e2e test passes the same flags: tests/e2e/test_job_server_e2e.py)."""
    for file in (ROOT / "README.md", ROOT / "cluster.yaml", ROOT / "BENCHMARKS.md"):
        text = file.read_text()
        assert "0.0.0.0" not in text, file
        for line in text.splitlines():
            if "mlflow ui " in line or "mlflow server " in line:
                assert "--host 127.0.0.1" in line, (file, line)
            if "ray start --head" in line and "assert" not in line:
                assert "--dashboard-host" in line and "127.0.0.1" in line, (file, line)


def test_secrets_never_become_mlflow_params():
    from pipelines.tracking import redact

    params = {"learning_rate": 0.1, "hf_token": "hf_abc", "aws_secret_access_key": "x"}
    assert redact(params) == {
        "learning_rate": 0.1,
        "hf_token": "***",
        "aws_secret_access_key": "***",
    }


def test_head_runs_no_trials(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}


def test_ray_down_loses_nothing(cluster):
    """Tracking and Optuna on a database off the cluster, artifacts and Ray Train's storage on
    S3 that the GPU workers can write with their instance profile; no password in the file."""
    import re

    text = (ROOT / "cluster.yaml").read_text()
    assert "GRAPHLORA_OPTUNA_STORAGE" in text and "postgresql://graphlora@" in text
    assert "GRAPHLORA_STORAGE_PATH" in text and "s3://YOUR-BUCKET/graphlora" in text
    assert not re.search(r"postgresql://[^@\s]*:[^@\s]*@", text)  # user:password@
    types = cluster["available_node_types"]
    for name, node in types.items():
        if name != cluster["head_node_type"]:
            assert "instance-profile/" in node["node_config"]["IamInstanceProfile"]["Arn"]
    install = " ".join(cluster["setup_commands"])
    assert "-e .'[postgres]'" in install
