"""A search as a team runs it, for real on one machine over loopback: an `mlflow server` backed by
PostgreSQL with proxied artifacts, the search's Optuna study in the same PostgreSQL server,
PostgreSQL stopped under the search once a trial has evaluated (it exits 75 saying so, its state
saved), `--resume` from a second driver process on a fresh local Ray once PostgreSQL is back
(nothing lost, nothing twice), then promotion and `mlflow.pyfunc.load_model("models:/...@champion")`
through the server. Every trial is recorded once in MLflow and once in Optuna, none left RUNNING.
(A driver SIGKILLed with its Ray and resumed: `test_faults_e2e.py`, on the embedded stores; the
resume is the same with these.)

The commands are the README's ("Use a cluster"); the PostgreSQL server is `tests/postgres.py`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from postgres import free_port
from test_faults_e2e import (
    REPO,
    _evaluated,
    _first_log,
    _resume,
    _runs,
    _search_env,
    _small_space,
    _wait,
)

from graphlora.data import load_task
from pipelines.tracking import tracking_uri

HANDFUL = 8


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 with a PostgreSQL backend store and artifacts proxied to a
    folder (an S3 URI in production); its http:// URL."""
    backend = postgres.create_database("mlflow")
    artifacts = tmp_path_factory.mktemp("mlartifacts")
    port = free_port()
    log = open(artifacts.parent / "mlflow-server.log", "w")  # noqa: SIM115 - the server holds it
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
         "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # MLflow's job runner (GenAI jobs, 7 worker processes) is not needed by a search.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if server.poll() is not None:
            raise AssertionError(Path(log.name).read_text()[-2000:])
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return True
        except OSError:
            return False

    try:
        _wait(healthy, 600, "the MLflow server", poll=0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker
        server.wait(60)
        log.close()


def test_shared_server_outage_resume_promote_serve(
    postgres, mlflow_server, graphlora_home, tmp_path
):
    space = _small_space(tmp_path, "shared")
    study_url = postgres.create_database("optuna")
    shared = {"MLFLOW_TRACKING_URI": mlflow_server, "GRAPHLORA_OPTUNA_STORAGE": study_url}
    client = MlflowClient(mlflow_server)

    # The first driver, on its own local Ray, loses PostgreSQL (behind both the MLflow server
    # and the study) once a trial has evaluated. MLflow's HTTP retries are cut to seconds
    # (default: about two minutes of riding it out).
    env = {
        **_search_env(graphlora_home, Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))),
        **shared,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    }
    first = subprocess.Popen(
        [sys.executable, "pipelines/search.py", "--space", str(tmp_path / "space.yaml")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        (parent,) = _wait(lambda: _runs(client, space.experiment), 300, "the search's run")
        parent_id, name = parent.info.run_id, parent.data.tags["search_name"]
        _wait(
            lambda: _evaluated(client, space, parent_id, need_done=False),
            300,
            "a trial with one evaluation",
            poll=0.25,
        )
        postgres.stop()
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        postgres.start()
    (tmp_path / "first.log").write_text(out + "\n--- stderr ---\n" + err)
    assert first.returncode == 75, out[-3000:] + err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the ") and "stopped answering" in last, err[-3000:]
    assert f"--resume {name}" in last and "graphlora-test" not in out + err
    assert "View run" not in out, out  # MLflow's links to each ended run stay off the console
    folder = graphlora_home / "searches" / name
    state = json.loads((folder / "search.json").read_text())
    assert state["optuna_storage"] == study_url.replace(":graphlora-test@", ":***@")
    assert not (folder / "optuna.db").exists()  # the study is in PostgreSQL, not on this disk

    # A second driver, PostgreSQL back: what MLflow missed is written first, then it finishes.
    env2 = {
        **_search_env(graphlora_home, Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))),
        **shared,
    }
    resumed = _resume(name, env2, tmp_path)  # exits 0, says "resuming"
    assert "records MLflow had missed" in resumed, resumed[-3000:]
    assert not (folder / "unrecorded.jsonl").exists()

    runs = _runs(client, space.experiment, parent_id)
    trial_ids = [r.data.tags["trial_id"] for r in runs]
    assert len(runs) == 3 == len(set(trial_ids)), [r.info.run_name for r in runs]
    assert all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    assert client.get_run(parent_id).data.tags["status"] == "completed"
    assert client.get_run(parent_id).data.tags["resumes"] == "1"
    for run in runs:  # no evaluation lost to the outage: steps 10, 20, ... without a gap
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "evals")]
        assert steps == [10 * (i + 1) for i in range(len(steps))], (run.info.run_name, steps)
    study = optuna.load_study(study_name=name, storage=study_url)
    states = [t.state.name for t in study.trials]
    assert "RUNNING" not in states, states
    told = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(told) == len(runs), (states, _first_log(tmp_path)[-2000:])
    assert len({t.number for t in study.trials}) == len(study.trials)
    ran = sorted(float(r.data.params["training.learning_rate"]) for r in runs)
    assert sorted(t.params["learning_rate"] for t in told) == pytest.approx(ran)

    # Promotion through the server, and the registered model served from it.
    model = f"shared-{tmp_path.name}"
    promote_env = {
        **_search_env(graphlora_home, Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))),
        **shared,
    }
    promoted = subprocess.run(
        [sys.executable, "pipelines/promote.py", "--from-search", parent_id, "--seeds", "1",
         "--max-steps", "10", "--max-test-examples", str(HANDFUL), "--model-name", model,
         "--output-dir", str(tmp_path / "final")],
        cwd=REPO, env=promote_env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert promoted.returncode == 0, promoted.stdout[-3000:] + promoted.stderr[-3000:]
    assert f"registered: models:/{model}@champion = version 1" in promoted.stdout
    (version,) = client.search_model_versions(f"name = '{model}'")
    assert client.get_run(version.run_id).info.artifact_uri.startswith("mlflow-artifacts:")
    before = os.environ.get("MLFLOW_TRACKING_URI")  # set_tracking_uri exports it
    mlflow.set_tracking_uri(mlflow_server)
    try:
        served = mlflow.pyfunc.load_model(f"models:/{model}@champion")
    finally:  # the next test's store is the session's again, as `tracking_uri()` says
        mlflow.set_tracking_uri(before or tracking_uri())
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
    handful = load_task("synthetic").test[:HANDFUL]
    prompts = {"prompt": [e.prompt for e in handful]}
    answers = served.predict(
        pd.DataFrame({**prompts, "candidates": [list(e.candidates) for e in handful]})
    )
    assert list(answers["prediction"]) == [
        e.candidates[p] for p, e in zip(answers["prediction_index"], handful, strict=True)
    ]
