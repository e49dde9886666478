"""Faults done for real on a local Ray and a real MLflow store: a search stopped as users stop
one (Ctrl-C to its terminal, or the machine stopping: SIGKILL to the search and to the local Ray
it started) and resumed, a Ray Train worker SIGKILLed mid-trial, a NaN loss in one trial (ended,
not retried). After each, the MLflow store holds exactly one run per trial, with the right status,
and nothing is left running."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
import psutil
from mlflow.tracking import MlflowClient
from test_search_e2e import child_runs, live_placement_groups, make_space

from pipelines.search import load_search_space, run_search
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


STALE_CLUSTER = "127.0.0.1:1"  # what a Ray head killed without `ray stop` leaves behind

# Reads a saved Tune experiment with plain pickle, in a process with no Ray cluster, and lists
# every live Ray object (actor handle, object reference) the pickles would recreate.
_SCAN = r"""
import json, pickle, sys
from pathlib import Path
live = []
LIVE = ("ActorHandle", "ObjectRef", "_actor_handle_deserializer", "_object_ref_deserializer")
class Scan(pickle.Unpickler):
    def find_class(self, module, name):
        if name in LIVE or "ObjectRef" in name:
            live.append(f"{module}.{name}")
            return lambda *args, **kwargs: None  # recreating it needs that cluster
        return super().find_class(module, name)
def scan(data, where):
    n = len(live)
    Scan(__import__("io").BytesIO(data)).load()
    if len(live) > n:
        print(where, live[n:])
def walk(doc, where):
    if isinstance(doc, dict):
        if doc.get("_type") == "CLOUDPICKLE_FALLBACK":
            scan(bytes.fromhex(doc["value"]), where)
        for v in doc.values():
            walk(v, where)
    elif isinstance(doc, list):
        for v in doc:
            walk(v, where)
    elif isinstance(doc, str) and doc.lstrip().startswith(("{", "[")):
        try:
            walk(json.loads(doc), where)
        except ValueError:
            pass
folder = Path(sys.argv[1])
files = sorted(folder.glob("*.pkl")) + sorted(folder.glob("*.json"))
assert any(f.name == "tuner.pkl" for f in files), files
for f in files:
    data = f.read_bytes()
    try:
        doc = json.loads(data)
    except ValueError:  # some of Tune's "*.json" files are pickles
        scan(data, f.name)
    else:
        walk(doc, f.name)
print("live Ray objects:", len(live))
sys.exit(1 if live else 0)
"""


def _search_env(graphlora_home: Path, ray_tmp: Path) -> dict[str, str]:
    """The default a user runs: no RAY_ADDRESS (the search starts its own local Ray), here in
    its own Ray temp folder, which holds a stale `ray_current_cluster` pointing at nothing."""
    (ray_tmp / "ray").mkdir(parents=True, exist_ok=True)
    (ray_tmp / "ray" / "ray_current_cluster").write_text(STALE_CLUSTER)
    env = {
        **os.environ,
        "GRAPHLORA_HOME": str(graphlora_home),
        "HF_HUB_OFFLINE": "1",
        "RAY_TMPDIR": str(ray_tmp),
    }
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "TUNE_DISABLE_SIGINT_HANDLER"):
        env.pop(key, None)
    return env


def _ray_pids(ray_tmp: Path) -> list[int]:
    """Processes of the local Ray started under `ray_tmp` (head services, workers)."""
    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if str(ray_tmp) in " ".join(proc.info["cmdline"] or []):
            pids.append(proc.info["pid"])
    return pids


def _kill_everything(search: subprocess.Popen, ray_tmp: Path) -> None:
    """What a machine stop does: SIGKILL to the search's process group and to every process of
    the Ray cluster it started (some of which may have left the group)."""
    os.killpg(search.pid, signal.SIGKILL)
    for pid in _ray_pids(ray_tmp):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    search.wait(30)
    _wait(lambda: not _ray_pids(ray_tmp), 30, "the killed Ray processes to go")


def _small_space(tmp_path: Path, experiment: str, hosts: bool = False):
    """3 trials of 40 steps (4 evaluations), 2 at a time on the search's own 2-CPU Ray: 30 steps
    between a trial's first evaluation and its end, so a fault sent on seeing that evaluation
    lands while the trial runs. `hosts`: on one trial host of 2 slots, as the quickstart."""
    make_space(tmp_path, trials=3, experiment=experiment)
    path = tmp_path / "space.yaml"
    if hosts:
        path.write_text(path.read_text().replace("max_concurrent_trials: 2", "trials_per_host: 2"))
    return load_search_space(path)


def _start(tmp_path: Path, space, env: dict) -> tuple[subprocess.Popen, MlflowClient, str]:
    """`pipelines/search.py` in its own process group (as a terminal runs it); returns it, an
    MLflow client and the search's parent run id once it exists."""
    cmd = [sys.executable, "pipelines/search.py", "--space", str(tmp_path / "space.yaml")]
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 - the child holds it; closed at exit
    search = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    client = MlflowClient(tracking_uri())
    (parent,) = _wait(lambda: _runs(client, space.experiment), 300, "the search's MLflow run")
    return search, client, parent


def _first_log(tmp_path: Path) -> str:
    return (tmp_path / "first.log").read_text()


def _resume(name: str, env: dict, tmp_path: Path) -> str:
    resumed = subprocess.run(
        [sys.executable, "pipelines/search.py", "--resume", name],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,
    )
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, (_first_log(tmp_path), out)
    assert f"search {name}: resuming" in out
    return out


def _assert_resumed_cleanly(client, space, parent_id, finished_before, continued_ids) -> None:
    """One run per trial, none running, none failed by the interruption; finished trials not
    re-run; interrupted ones went on from their Train checkpoint, not from step 0, or ended as
    ASHA had cut them before the interruption."""
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["status"] == "completed"
    assert parent.data.tags["resumes"] == "1"
    runs = _runs(client, space.experiment, parent_id)
    trial_ids = [r.data.tags["trial_id"] for r in runs]
    assert len(runs) == 3 == len(set(trial_ids)), [r.info.run_name for r in runs]
    assert all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    assert {r.data.tags["status"] for r in runs} <= {"completed", "stopped_early_asha"}
    for run in runs:
        _assert_clean_history(client, run)
        if run.info.run_id in finished_before:  # not re-run
            assert run.info.end_time == finished_before[run.info.run_id]
        if run.info.run_id in continued_ids:
            tags = run.data.tags
            if tags.get("asha_stop"):  # ASHA had cut it before the stop: it ends, not retrains
                assert tags["status"] == "stopped_early_asha", tags
                assert tags["status_reason"] == tags["asha_stop"]
                continue
            log = tags.get("recovery_log", "")
            assert "resumed from its checkpoint at step" in log, (run.info.run_name, log)
    assert continued_ids


def _evaluated(client, space, parent_id, need_done: bool):
    runs = _runs(client, space.experiment, parent_id)
    done = [r for r in runs if r.info.status == "FINISHED"]
    going = [r for r in runs if r.info.status == "RUNNING" and r.data.metrics.get("evals", 0) >= 1]
    return (done, going) if going and (done or not need_done) else None


def test_ctrl_c_stops_the_search_resumably(graphlora_home, tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) after the first evaluations, on the
    local Ray the search started, with its trials packed on a trial host (as the quickstart):
    it exits 130 saying how to resume, running trials are `interrupted` (MLflow KILLED), not
    failed; `--resume` continues them from the host's checkpoint and finishes."""
    space = _small_space(tmp_path, "ctrlc", hosts=True)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths
    env = _search_env(graphlora_home, ray_tmp)
    search, client, parent = _start(tmp_path, space, env)
    parent_id, name = parent.info.run_id, parent.data.tags["search_name"]
    try:
        done, going = _wait(
            lambda: _evaluated(client, space, parent_id, need_done=False),
            300,
            "a trial with one evaluation",
            poll=0.25,
        )
        os.killpg(search.pid, signal.SIGINT)
        assert search.wait(120) == 130, _first_log(tmp_path)
    finally:
        if search.poll() is None:
            _kill_everything(search, ray_tmp)
    log = _first_log(tmp_path).rstrip().splitlines()
    assert log[-1] == f"interrupted: continue with: graphlora-search --resume {name}"
    # The local Ray went with the search.
    _wait(lambda: not _ray_pids(ray_tmp), 60, "the search's local Ray to stop")

    parent = client.get_run(parent_id)
    assert parent.info.status == "KILLED" and parent.data.tags["status"] == "interrupted"
    runs = _runs(client, space.experiment, parent_id)
    assert all(r.info.status != "RUNNING" for r in runs)
    assert "failed" not in {r.data.tags.get("status") for r in runs}
    stopped = [r for r in runs if r.data.tags.get("status") == "interrupted"]
    assert stopped, [(r.info.run_name, r.data.tags.get("status")) for r in runs]
    # A trial seen mid-way was interrupted, unless it ended in the instant before the signal.
    ended = {r.info.run_id for r in runs if r.data.tags.get("status") != "interrupted"}
    assert {g.info.run_id for g in going} <= {r.info.run_id for r in stopped} | ended
    assert all(r.info.status == "KILLED" for r in stopped)
    stopped_ids = {r.info.run_id for r in stopped}
    finished_before = {
        r.info.run_id: r.info.end_time for r in runs if r.info.run_id not in stopped_ids
    }
    assert not (graphlora_home / "searches" / name / "best_config.yaml").exists()

    out = _resume(name, env, tmp_path)
    assert "resumed at eval" in out, out
    _assert_resumed_cleanly(client, space, parent_id, finished_before, stopped_ids)
    assert (graphlora_home / "searches" / name / "best_config.yaml").is_file()


def test_machine_stop_then_resume_on_a_new_local_ray(graphlora_home, tmp_path):
    """SIGKILL to the search and to the local Ray it started (a reboot, an OOM kill) once one
    trial has finished and another has evaluated; the saved Tune state holds no live Ray
    object, and `--resume` on a new local Ray (past the stale `ray_current_cluster` the dead
    head left) finishes: finished trials kept, the interrupted one continued, Optuna's history
    kept, one MLflow run per trial, none running or failed."""
    space = _small_space(tmp_path, "kill")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rk", dir="/tmp"))
    env = _search_env(graphlora_home, ray_tmp)
    search, client, parent = _start(tmp_path, space, env)
    parent_id, name = parent.info.run_id, parent.data.tags["search_name"]
    try:
        _wait(
            lambda: _evaluated(client, space, parent_id, need_done=True),
            420,
            "one finished and one evaluated trial",
            poll=0.25,
        )
    finally:
        _kill_everything(search, ray_tmp)
    # What the kill caught, read after it: a trial can end between the last poll and the kill.
    caught = _evaluated(client, space, parent_id, need_done=True)
    assert caught, "no trial was mid-way when the machine stopped: " + _first_log(tmp_path)[-2000:]
    done, going = caught
    # A dead head's address is what plain `ray.init()` would try first: the resume must not.
    (ray_tmp / "ray" / "ray_current_cluster").write_text(STALE_CLUSTER)
    finished_before = {r.info.run_id: r.info.end_time for r in done}
    experiment = graphlora_home / "ray_results" / name
    scan = subprocess.run(
        [sys.executable, "-c", _SCAN, str(experiment)],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert scan.returncode == 0, scan.stdout + scan.stderr

    out = _resume(name, env, tmp_path)
    assert "resumed at eval" in out, out
    _assert_resumed_cleanly(
        client, space, parent_id, finished_before, {g.info.run_id for g in going}
    )
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


def search_in_thread(space, tmp_path: Path) -> tuple[threading.Thread, dict, io.StringIO]:
    """`run_search(space)` in a thread of this process (on the tests' Ray): the thread, a box
    that gets its `result` or its `error`, and its progress output."""
    box: dict = {}
    out = io.StringIO()

    def search() -> None:
        try:
            box["result"] = run_search(space, output_dir=tmp_path / "out", out=out)
        except BaseException as exc:  # surfaced by the caller's assertions
            box["error"] = exc

    thread = threading.Thread(target=search)
    thread.start()
    return thread, box, out


def test_train_worker_sigkilled_mid_trial_restarts_from_checkpoint(ray_cluster, tmp_path):
    make_space(tmp_path, trials=1, concurrent=1, experiment="worker")
    path = tmp_path / "space.yaml"  # 70 steps after the first evaluation: the kill lands mid-way
    path.write_text(path.read_text().replace("max_steps: 40", "max_steps: 80"))
    space = load_search_space(path)
    thread, box, out = search_in_thread(space, tmp_path)
    client = MlflowClient(tracking_uri())

    def evaluated_worker():
        if not thread.is_alive():
            raise AssertionError(f"the search ended first: {box}\n{out.getvalue()}")
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


def test_a_diverged_run_is_not_retried_as_a_lost_worker(ray_cluster, tmp_path):
    """A NaN loss is the run's own verdict: one Ray Train attempt, whatever `worker_retries`
    says (retries are for lost workers; the same data and seed would diverge again), and the
    caller gets `NonFiniteLossError`. Counted at the Train run's relay, as a trial driver sees
    it: before, each of the 2 retries sent a worker error and trained again."""
    import ray

    from graphlora.run import NonFiniteLossError
    from pipelines.asha import TrialHub
    from pipelines.trial import _make_relay
    from pipelines.worker import fit_seed, seed_trainer

    space = make_space(tmp_path, trials=1, experiment="diverged")
    params = {"learning_rate": 1e-3, "num_experts": 2, "top_k": 1, "rank": 1}
    adapter, training = space.configs(params, seed=0)
    training.update(max_steps=6, eval_every=2, inject_nan_at_step=3)
    hub = TrialHub.remote()
    config = {"adapter": adapter, "training": training, "trial_id": "t"}
    trainer = seed_trainer(
        config,
        name="diverged",
        storage_path=str(tmp_path / "ray_results"),
        workers=1,
        cpus_per_worker=1,
        gpus_per_worker=0,
        worker_retries=2,
        callbacks=[_make_relay(hub, "t", 0)],
    )
    started = time.monotonic()
    try:
        fit_seed(trainer)
    except NonFiniteLossError as exc:
        assert "step 3" in str(exc) and "training loss is nan" in str(exc), exc
    else:
        raise AssertionError("a run whose loss turned NaN at step 3 returned normally")
    mail = ray.get(hub.take.remote("t", 0.0))
    assert [m["step"] for _, m in mail if "step" in m] == [2], mail  # one attempt: one evaluation
    assert not [m for _, m in mail if "worker_error" in m], mail
    print(f"diverged run ended in {time.monotonic() - started:.1f} s")


def test_nan_loss_fails_its_trial_and_the_search_goes_on(ray_cluster, tmp_path):
    """One trial's loss turns NaN at step 3: it ends failed with the reason; the other runs.
    (Seeded TPE proposes inject_nan_at_step 3, then 1000000, for this space.)"""
    path = tmp_path / "space.yaml"
    space = make_space(tmp_path, trials=2, experiment="nan")
    text = path.read_text().replace(
        "  learning_rate: {type: loguniform, low: 1.0e-5, high: 1.0e-1}\n",
        "  inject_nan_at_step: {type: categorical, values: [3, 1000000]}\n",
    )
    path.write_text(text.replace("max_steps: 40", "max_steps: 10"))
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
            # A diverged loss is the run's verdict, not a lost worker: Ray Train does not retry
            # it (the same data and seed would diverge again), so no worker error is recorded.
            assert run.data.tags.get("worker_failures", "0") == "0", run.data.tags
            assert "NonFiniteLossError" not in run.data.tags.get("recovery_log", ""), run.data.tags
    assert live_placement_groups() == []


def test_tune_has_saved_each_trial_before_its_driver_starts(ray_cluster, tmp_path):
    """The search's and the stability stage's schedulers have Tune save each new trial before it
    starts (`pipelines.asha.save_new_trial`): with reused actors the next trial starts within
    the step that adds it, and a machine stopping before Tune's next save (up to 10 s) left an
    MLflow run and an Optuna trial that a resumed search knew nothing of."""
    from ray import tune

    from pipelines.asha import SavingFIFOScheduler

    def trainable(config: dict) -> None:
        tune.report({"objective": config["x"]})

    saved_at_start: dict[str, list[str]] = {}

    class ReadSavedState(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            (path,) = (tmp_path / "saved").glob("experiment_state-*.json")
            state = json.loads(path.read_text())
            saved_at_start[trial.trial_id] = [
                json.loads(t)["trial_id"] for t, _ in state["trial_data"]
            ]

    tune.Tuner(
        trainable,
        param_space={"x": tune.grid_search([1, 2, 3])},
        tune_config=tune.TuneConfig(
            scheduler=SavingFIFOScheduler(), max_concurrent_trials=1, reuse_actors=True
        ),
        run_config=tune.RunConfig(
            name="saved", storage_path=str(tmp_path), callbacks=[ReadSavedState()], verbose=0
        ),
    ).fit()
    assert len(saved_at_start) == 3
    assert all(tid in saved for tid, saved in saved_at_start.items()), saved_at_start
