"""Packed searches on trial hosts (`resources.trials_per_host`), on a real local Ray (2 CPUs) and
a real MLflow store: the base model is loaded once per host, trials take slots, ASHA's stops and
a NaN end one slot and not the host, a packed trial computes what it computes alone, a host
of two data-parallel workers that loses one resumes every slot from its checkpoint and computes
what two ranks compute uninterrupted."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal

import pytest
import torch
from mlflow.tracking import MlflowClient
from test_faults_e2e import (
    _assert_clean_history,
    _runs,
    _train_worker_pids,
    _wait,
    search_in_thread,
)
from test_search_e2e import live_placement_groups, make_space

from graphlora.config import MoELoRAConfig
from graphlora.train import TrainConfig, run_training
from pipelines.search import load_search_space, run_search
from pipelines.tracking import tracking_uri
from tests.gloo_ranks import run_on_ranks

# Trials that ASHA never cuts (its grace period is every evaluation) and that train long enough
# for a test to see both of a host's slots evaluated before either ends.
UNCUT = (
    ("max_steps: 40, eval_every: 10", "max_steps: 120, eval_every: 10"),
    ("grace_period: 1", "grace_period: 12"),
)


def _uncut(text: str) -> str:
    for old, new in UNCUT:
        assert old in text, old
        text = text.replace(old, new)
    return text


def _packed_space(tmp_path, experiment: str, trials: int, *, nan: bool = False, uncut=False):
    """`make_space`'s space on one host of 2 slots (its 2 CPUs: the whole local Ray)."""
    make_space(tmp_path, trials=trials, experiment=experiment)
    path = tmp_path / "space.yaml"
    text = path.read_text().replace("max_concurrent_trials: 2", "trials_per_host: 2")
    if uncut:
        text = _uncut(text)
    if nan:  # one trial's loss turns NaN at step 3 (seeded TPE proposes it first)
        text = text.replace(
            "  top_k: {type: int, low: 1, high: 2}\n",
            "  top_k: {type: int, low: 1, high: 2}\n"
            "  inject_nan_at_step: {type: categorical, values: [3, 1000000]}\n",
        )
    path.write_text(text)
    return load_search_space(path)


@pytest.fixture(scope="module")
def packed_search(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packed")
    space = _packed_space(tmp, "packed", trials=4, nan=True)
    out = io.StringIO()
    result = run_search(space, output_dir=tmp / "out", out=out)
    return space, result, out.getvalue()


def test_packed_search_loads_the_base_once_and_records_every_trial(packed_search):
    space, result, log = packed_search
    assert "packed on 1 trial host(s) of 2 slots" in log
    assert len(result.trials) == 4
    assert live_placement_groups() == []
    client = MlflowClient(tracking_uri())
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["status"] == "completed"
    # One host: the base model was loaded once for the whole search, none lost.
    assert parent.data.metrics["base_loads"] == 1
    assert parent.data.metrics["hosts"] == 1 and parent.data.metrics["hosts_lost"] == 0
    note = parent.data.tags["mlflow.note.content"]
    assert "Trial hosts: 1 of 2 slots; the base model was loaded 1 time(s)" in note, note
    runs = _runs(client, space.experiment, result.parent_run_id)
    assert len(runs) == 4
    for run in runs:
        _assert_clean_history(client, run)
        assert run.data.tags.get("worker_failures", "0") == "0", run.data.tags["recovery_log"]
        if run.data.tags["status"] != "failed":
            # None of a trial's time went to loading the model or starting workers of its own.
            assert run.data.metrics["setup_time_s"] < 5, run.data.metrics
    statuses = {t["status"] for t in result.trials}
    assert statuses <= {"completed", "stopped_early_asha", "failed"}, result.trials


def test_a_nan_ends_its_slot_not_the_host(packed_search):
    space, result, log = packed_search
    failed = [t for t in result.trials if t["status"] == "failed"]
    assert failed, result.trials
    for t in failed:
        assert t["params"]["inject_nan_at_step"] == 3
        assert "NonFiniteLossError" in t["reason"] and "step 3" in t["reason"], t
    others = [t for t in result.trials if t["status"] != "failed"]
    assert others and all(t["params"]["inject_nan_at_step"] != 3 for t in others)
    assert any(t["evals"] >= 2 for t in others)  # trained on after the NaN, on the same host


def test_a_packed_trial_computes_what_it_computes_alone(packed_search, tmp_path):
    """Every evaluation of the search's first trial (packed beside the others, on the host)
    equals the same configuration trained alone with `run_training`, in this process."""
    space, result, _ = packed_search
    trial = next(t for t in result.trials if t["status"] != "failed")
    adapter, training = space.configs(trial["params"], space.seed)
    alone: list[tuple[int, dict]] = []
    # As many threads as the host had (Ray gives a worker its CPUs as threads): float sums
    # blocked another way differ by rounding, which training can amplify.
    threads = torch.get_num_threads()
    torch.set_num_threads(int(space.resources.host_cpus()))
    try:
        run_training(
            TrainConfig(**{**training, "max_steps": trial["evals"] * space.budget.eval_every}),
            MoELoRAConfig(**adapter),
            on_eval=lambda step, metrics: alone.append((step, metrics)) and False,
        )
    finally:
        torch.set_num_threads(threads)
    client = MlflowClient(tracking_uri())
    run = next(
        r
        for r in _runs(client, space.experiment, result.parent_run_id)
        if r.data.tags["trial_id"] == trial["trial_id"]
    )
    for metric in ("val_accuracy", "val_loss"):
        packed = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric)]
        assert [s for s, _ in packed] == [s for s, _ in alone]
        for (_, value), (_, metrics) in zip(packed, alone, strict=True):
            assert value == pytest.approx(metrics[metric], abs=1e-5), (metric, packed, alone)


TWO_RANKS = r"""
import json
from gloo_ranks import join, result
from graphlora.config import MoELoRAConfig
from graphlora.train import TrainConfig, run_training
_, _, (run,) = join()
adapter, training = json.loads(open(run).read())
seen = []
run_training(TrainConfig(**training), MoELoRAConfig(**adapter),
             on_eval=lambda step, m: seen.append((step, m)) and False)
result(seen)
"""


def _run_training_on_two_ranks(adapter: dict, training: dict, tmp_path) -> list:
    """`run_training` on 2 gloo ranks of 1 thread each (as a host's 2 one-CPU workers): the
    evaluations rank 0 saw."""
    (tmp_path / "run.json").write_text(json.dumps([adapter, training]))
    return run_on_ranks(TWO_RANKS, tmp_path, str(tmp_path / "run.json"))[0]


def _search_until_both_evaluated(space, tmp_path):
    """`search_in_thread(space)`, returned once its 2 trials run with an evaluation each: the
    thread, its box and output, an MLflow client, and the Train worker pids at that moment."""
    thread, box, out = search_in_thread(space, tmp_path)
    client = MlflowClient(tracking_uri())

    def both_evaluated():
        if not thread.is_alive():  # both slots were never seen evaluated at once
            raise AssertionError(f"the search ended first: {box}\n{out.getvalue()}")
        parents = _runs(client, space.experiment)
        runs = [r for p in parents for r in _runs(client, space.experiment, p.info.run_id)]
        going = [r for r in runs if r.info.status == "RUNNING"]
        if len(going) == 2 and all(r.data.metrics.get("evals", 0) >= 1 for r in going):
            return _train_worker_pids()
        return None

    pids = _wait(both_evaluated, 300, "both packed trials with one evaluation", poll=0.25)
    return thread, box, out, client, pids


def test_a_data_parallel_host_that_loses_a_worker_trains_as_two_ranks_do(ray_cluster, tmp_path):
    """`workers_per_trial: 2`: one host of 2 Ray Train workers (1 CPU each) trains 2 packed
    trials data-parallel. One of its workers is SIGKILLed once both trials have evaluated: Ray
    Train restarts the whole host (as when a host of one worker loses it), every rank resumes
    every slot from the host's checkpoint, each trial that was training records the failure and
    the resume, and the trial that ran to the end reports, at every evaluation, what
    `run_training` on 2 gloo ranks computes without any interruption."""
    make_space(tmp_path, trials=2, workers=2, experiment="ddphost")
    path = tmp_path / "space.yaml"
    path.write_text(
        _uncut(path.read_text()).replace(
            "cpus_per_worker: 1, max_concurrent_trials: 2",
            "cpus_per_worker: 0.5, trials_per_host: 2",
        )
    )
    space = load_search_space(path)
    thread, box, out, client, pids = _search_until_both_evaluated(space, tmp_path)
    assert len(pids) == 2  # the host's two ranks
    os.kill(min(pids), signal.SIGKILL)  # one of them: the host loses a worker
    thread.join(600)
    assert not thread.is_alive() and "error" not in box, (box, out.getvalue())
    result = box["result"]
    assert "packed on 1 trial host(s) of 2 slots and 2 workers" in out.getvalue()
    assert {t["status"] for t in result.trials} <= {"completed", "stopped_early_asha"}
    assert live_placement_groups() == []
    assert client.get_run(result.parent_run_id).data.metrics["base_loads"] == 2  # + restart
    runs = _runs(client, space.experiment, result.parent_run_id)
    assert len(runs) == 2
    for run in runs:
        _assert_clean_history(client, run)
        if run.data.metrics["evals"] >= 2:  # was training when the host lost its worker
            log = run.data.tags.get("recovery_log", "")
            assert int(run.data.tags.get("worker_failures", 0)) >= 1, log
            assert "resumed from its checkpoint at step" in log, log
    trial = max(result.trials, key=lambda t: t["evals"])
    run = next(r for r in runs if r.data.tags["trial_id"] == trial["trial_id"])
    log = run.data.tags.get("recovery_log", "")
    assert "resumed from its checkpoint at step" in log, log
    adapter, training = space.configs(trial["params"], space.seed)
    training["max_steps"] = trial["evals"] * space.budget.eval_every
    alone = _run_training_on_two_ranks(adapter, training, tmp_path)
    assert alone, "no evaluation to compare"
    for metric in ("val_accuracy", "val_loss", "train_loss"):
        packed = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric)]
        assert [s for s, _ in packed] == [s for s, _ in alone]
        for (_, value), (_, metrics) in zip(packed, alone, strict=True):
            assert value == pytest.approx(metrics[metric], abs=1e-5), (metric, packed, alone)


def test_a_host_no_node_can_hold_is_refused_before_anything_is_recorded(ray_cluster, tmp_path):
    """3 slots of 1 CPU need a 3-CPU node; this Ray has one node of 2: one line, no MLflow run."""
    from pipelines.host import HostsError

    space = _packed_space(tmp_path, "nohost", trials=2)
    space = dataclasses.replace(
        space, resources=dataclasses.replace(space.resources, trials_per_host=3)
    )
    with pytest.raises(HostsError, match=r"needs 3 CPU on one node, and this Ray cluster"):
        run_search(space, output_dir=tmp_path / "out", out=io.StringIO())
    client = MlflowClient(tracking_uri())
    assert client.get_experiment_by_name(space.experiment) is None or not _runs(
        client, space.experiment
    )
    assert not (tmp_path / "out").exists()
