"""The user's day through a real job server, with the README's commands on a fresh home folder:
a Ray token generated, `ray start --head` on 127.0.0.1 with token authentication on, a second node
joining it, `ray job submit --working-dir . -- python pipelines/search.py --space
search_spaces/quickstart.yaml` (budget cut down by flags), records in the MLflow store; a client
without the token is refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(args: list[str], env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    deadline = time.monotonic() + 120
    while True:
        proc = subprocess.run(
            [RAY, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
        )
        # Right after `ray start` the job server may have no agent yet; it says so at once.
        if "No available agent" not in proc.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr, sep="\n")  # shown by pytest with the failure
    assert proc.returncode == 0, args
    return proc


def _kill_cluster(temp_dir: Path) -> None:
    """Stop only this test's cluster (`ray stop` would stop every Ray on the machine)."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if str(temp_dir) in cmd:
            try:
                os.kill(proc.info["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass


def _node_ports() -> list[str]:
    """Free ports for a node's agents: the defaults (e.g. 52365) may be held by another Ray on
    this machine (the e2e session's own cluster), and an agent that cannot bind leaves the job
    server with "No available agent"."""
    flags = (
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
    )
    return [x for flag in flags for x in (flag, str(_free_port()))]


@pytest.fixture
def two_node_cluster(tmp_path):
    # Short paths: Ray's socket paths have a length limit. One temp dir per node, as on real
    # machines: nodes sharing one would share (and garbage-collect) the job's working_dir copy.
    temp_dirs = [Path("/tmp") / f"gl-ray-{os.getpid()}-{i}" for i in (0, 1)]
    for temp_dir in temp_dirs:
        shutil.rmtree(temp_dir, ignore_errors=True)
    gcs, dashboard = _free_port(), _free_port()
    # A fresh home folder with no Ray token in it, as on a new machine; the README's commands
    # create the token there and turn token authentication on for the servers and clients.
    home = tmp_path / "user-home"
    home.mkdir()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HOME": str(home)}
    # Nothing of this test process's own Ray or MLflow may leak into the cluster's processes
    # (mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; the job must use its default store).
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "GRAPHLORA_HOME", "RAY_AUTH_TOKEN"):
        env.pop(key, None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    try:
        _ray(["get-auth-token", "--generate"], env)
        assert (home / ".ray" / "auth_token").is_file()
        env["RAY_AUTH_MODE"] = "token"
        _ray(
            [
                "start",
                "--head",
                "--node-ip-address",
                "127.0.0.1",
                "--port",
                str(gcs),
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(dashboard),
                "--num-cpus",
                "1",
                "--temp-dir",
                str(temp_dirs[0]),
                "--disable-usage-stats",
                *_node_ports(),
            ],
            env,
        )
        _ray(
            [
                "start",
                "--address",
                f"127.0.0.1:{gcs}",
                "--node-ip-address",
                "127.0.0.1",
                "--num-cpus",
                "1",
                "--temp-dir",
                str(temp_dirs[1]),
                *_node_ports(),
            ],
            env,
        )
        yield {"dashboard": f"http://127.0.0.1:{dashboard}", "env": env}
    finally:
        for temp_dir in temp_dirs:
            _kill_cluster(temp_dir)
            shutil.rmtree(temp_dir, ignore_errors=True)


def test_search_through_ray_job_submit(two_node_cluster, tmp_path):
    home = tmp_path / "home"  # where the job's MLflow store and results land, outliving the job
    runtime_env = {"env_vars": {"GRAPHLORA_HOME": str(home), "HF_HUB_OFFLINE": "1"}}
    env = two_node_cluster["env"]
    job = _ray(
        [
            "job",
            "submit",
            "--address",
            two_node_cluster["dashboard"],
            "--working-dir",
            ".",
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            "python",
            "pipelines/search.py",
            "--space",
            "search_spaces/quickstart.yaml",
            "--trials",
            "2",
            "--max-steps",
            "20",
            "--eval-every",
            "10",
            "--stability-configs",
            "0",
            # Two 1-CPU nodes: a host of 1 slot on each (the quickstart's 2-slot host needs 2).
            "--trials-per-host",
            "1",
        ],
        env,
        timeout=900,
    )
    log = job.stdout + job.stderr
    assert "succeeded" in log, log[-4000:]
    assert "Ray: 2 nodes, 2 CPU" in log, log[-4000:]  # the job saw both nodes
    assert "packed on 2 trial host(s) of 1 slots" in log, log[-4000:]
    assert "results:" in log and "MLflow runs:" in log

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("graphlora-quickstart")
    assert exp is not None and exp.artifact_location.startswith(f"file://{home}")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'search'")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED" and parent.data.tags["status"] == "completed"
    trials = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(trials) == 2
    assert all(
        "val_accuracy" in r.data.metrics and "trainable_params" in r.data.metrics for r in trials
    )
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"space.yaml", "results.csv", "best_config.yaml"} <= artifacts
    # Artifacts live under the fixed home, not in the job's temporary copy of the project.
    assert list((home / "mlartifacts").rglob("best_config.yaml"))

    # The job server refuses a client without the token (and one with a wrong token).
    for headers in ({}, {"Authorization": "Bearer not-the-token"}):
        request = urllib.request.Request(
            f"{two_node_cluster['dashboard']}/api/jobs/", headers=headers
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code in (401, 403), refused.value
