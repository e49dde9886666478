"""Faults done for real on a local Ray and a real MLflow store: the search driver SIGKILLed and
resumed, a Ray Train worker SIGKILLed mid-trial, a NaN loss in one trial. After each, the MLflow
store holds exactly one run per trial, with the right status, and nothing is left running."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import psutil
import ray
from mlflow.tracking import MlflowClient
from test_search_e2e import child_runs, live_placement_groups, make_space

from pipelines.search import run_search
from pipelines.tracking import tracking_uri

REPO = Path(__file__).resolve().parents[2]


def _wait(predicate, timeout: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _runs(client: MlflowClient, experiment: str, parent: str | None = None) -> list:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    if parent is None:  # the searches themselves (their trials are tagged kind=search too)
        runs = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'search'")
        return [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return child_runs(client, exp.experiment_id, parent)


def _assert_clean_history(client: MlflowClient, run) -> None:
    """Every evaluation logged once: strictly increasing steps, one point per step."""
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "evals")]
    assert steps == sorted(set(steps)), (run.info.run_name, steps)


def test_search_driver_sigkilled_then_resumed(ray_cluster, graphlora_home, tmp_path):
    """SIGKILL `pipelines/search.py` once one trial has finished and another has evaluated, then
    `--resume`: finished trials are not re-run, the interrupted one continues from its
    checkpoint, Optuna keeps its history, MLflow ends with one run per trial, none running."""
    space = make_space(tmp_path, "graphlora", trials=3, experiment="kill")
    env = {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "GRAPHLORA_HOME": str(graphlora_home),
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "pipelines/search.py", "--space", str(tmp_path / "space.yaml")]
    log1 = open(tmp_path / "first.log", "w")  # noqa: SIM115 - closed below
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log1, stderr=subprocess.STDOUT)
    client = MlflowClient(tracking_uri())
    try:
        (parent,) = _wait(lambda: _runs(client, space.experiment), 120, "the search's MLflow run")
        parent_id = parent.info.run_id

        def one_done_one_evaluated():
            runs = _runs(client, space.experiment, parent_id)
            done = [r for r in runs if r.info.status == "FINISHED"]
            going = [
                r
                for r in runs
                if r.info.status == "RUNNING" and r.data.metrics.get("evals", 0) >= 1
            ]
            return (done, going) if done and going else None

        done, going = _wait(one_done_one_evaluated, 420, "one finished and one evaluated trial")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        log1.close()
    finished_before = {r.info.run_id: r.info.end_time for r in done}
    name = parent.data.tags["search_name"]
    # The dead driver's job is cleaned up by Ray: its trials and Train runs go away.
    _wait(lambda: live_placement_groups() == [], 120, "the killed search's placement groups")

    resumed = subprocess.run(
        [sys.executable, "pipelines/search.py", "--resume", name],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, (Path(tmp_path / "first.log").read_text(), out)
    assert f"search {name}: resuming" in out
    assert "resumed at eval" in out

    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["status"] == "completed"
    assert parent.data.tags["resumes"] == "1"
    runs = _runs(client, space.experiment, parent_id)
    trial_ids = [r.data.tags["trial_id"] for r in runs]
    assert len(runs) == 3 == len(set(trial_ids)), [r.info.run_name for r in runs]
    assert all(r.info.status != "RUNNING" for r in runs)
    assert {r.data.tags["status"] for r in runs} <= {"completed", "stopped_early_asha", "failed"}
    for run in runs:
        _assert_clean_history(client, run)
        if run.info.run_id in finished_before:  # not re-run
            assert run.info.end_time == finished_before[run.info.run_id]
    # The interrupted trial went on from its Train checkpoint, not from step 0.
    continued = [r for r in runs if r.info.run_id in {g.info.run_id for g in going}]
    for run in continued:
        if run.data.tags["status"] != "failed":
            assert "resumed from its checkpoint at step" in run.data.tags.get("recovery_log", "")
    # Optuna: one study, its trials = the search's trials, all told.
    storage = f"sqlite:///{graphlora_home / 'searches' / name / 'optuna.db'}"
    (study_name,) = optuna.get_all_study_names(storage)
    study = optuna.load_study(study_name=study_name, storage=storage)
    assert len([t for t in study.trials if t.state.name != "RUNNING"]) >= 2
    assert (graphlora_home / "searches" / name / "best_config.yaml").is_file()


def _train_worker_pids() -> set[int]:
    pids = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "RayTrainWorker" in cmd:
            pids.add(proc.info["pid"])
    return pids


def test_train_worker_sigkilled_mid_trial_restarts_from_checkpoint(ray_cluster, tmp_path):
    space = make_space(tmp_path, "graphlora", trials=1, concurrent=1, experiment="worker")
    box: dict = {}
    out = io.StringIO()

    def search() -> None:
        try:
            box["result"] = run_search(space, output_dir=tmp_path / "out", out=out)
        except BaseException as exc:  # surfaced by the assertion below
            box["error"] = exc

    thread = threading.Thread(target=search)
    thread.start()
    client = MlflowClient(tracking_uri())

    def evaluated_worker():
        parents = _runs(client, space.experiment)
        runs = [r for p in parents for r in _runs(client, space.experiment, p.info.run_id)]
        if any(r.data.metrics.get("evals", 0) >= 1 for r in runs):
            return _train_worker_pids()
        return None

    pids = _wait(evaluated_worker, 300, "a Train worker with one evaluation", poll=0.5)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    thread.join(600)
    assert not thread.is_alive() and "error" not in box, (box, out.getvalue())
    result = box["result"]
    (trial,) = result.trials
    assert trial["status"] in {"completed", "stopped_early_asha"}, trial
    assert live_placement_groups() == []
    (run,) = _runs(client, space.experiment, result.parent_run_id)
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["worker_failures"]) >= 1
    log = run.data.tags["recovery_log"]
    assert "WorkerHealthCheckFailedError" in log or "ActorDiedError" in log, log
    assert "resumed from its checkpoint at step" in log
    _assert_clean_history(client, run)
    assert "worker failure 1, Ray Train restarts it" in out.getvalue()


def test_nan_loss_fails_its_trial_and_the_search_goes_on(ray_cluster, tmp_path):
    """One trial's loss turns NaN at step 3: it ends failed with the reason; the other runs.
    (Seeded TPE proposes inject_nan_at_step 3, then 1000000, for this space.)"""
    path = tmp_path / "space.yaml"
    space = make_space(tmp_path, "graphlora", trials=2, experiment="nan")
    text = path.read_text().replace(
        "  learning_rate: {type: loguniform, low: 1.0e-5, high: 1.0e-1}\n",
        "  inject_nan_at_step: {type: categorical, values: [3, 1000000]}\n",
    )
    path.write_text(text.replace("max_steps: 40", "max_steps: 10"))
    from pipelines.search import load_search_space

    space = load_search_space(path)
    result = run_search(space, output_dir=tmp_path / "out", out=io.StringIO())
    by_status: dict[str, list] = {}
    for t in result.trials:
        by_status.setdefault(t["status"], []).append(t)
    assert "failed" in by_status and set(by_status) - {"failed"}, result.trials
    for t in by_status["failed"]:
        assert t["params"]["inject_nan_at_step"] == 3
        assert "NonFiniteLossError" in t["reason"] and "step 3" in t["reason"], t
    assert result.best is not None and result.best["params"]["inject_nan_at_step"] != 3
    client = MlflowClient(tracking_uri())
    runs = _runs(client, space.experiment, result.parent_run_id)
    assert len(runs) == 2
    for run in runs:
        failed = run.data.tags["status"] == "failed"
        assert (run.info.status == "FAILED") == failed
        if failed:
            assert "training loss is nan" in run.data.tags["status_reason"]
    assert live_placement_groups() == []
