"""End to end on a real local Ray (2 CPUs) and a real MLflow store: ASHA stops trials through the
hub flag without leaking placement groups, every trial is recorded with its status, and
multi-seed / multi-worker trials work. (Failed trials: tests/e2e/test_faults_e2e.py.)"""

from __future__ import annotations

import io
import json
from pathlib import Path

import optuna
import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient
from ray.tune.result import AUTO_RESULT_KEYS

from graphlora.config import MoELoRAConfig
from graphlora.health import collapsed_layers
from graphlora.run import TrainConfig
from pipelines.records import (
    COLLAPSED_TAG,
    DETAIL,
    collapsed_text,
    config_from_params,
    is_quality,
)
from pipelines.search import run_search
from pipelines.search_state import STATE_FILE
from pipelines.tracking import tracking_uri
from pipelines.validate import load_search_space

SPACE = """\
model: tiny-qwen2
dataset: {dataset}
method: graphlora
seed: 0
adapter: {{gcn_hidden: 16, gcn_layers: 1}}
training: {{batch_size: 4, max_test_examples: 100}}
search:
  learning_rate: {{type: loguniform, low: 1.0e-5, high: 1.0e-1}}
  num_experts: {{type: categorical, values: [2, 4]}}
  top_k: {{type: int, low: 1, high: 2}}
  rank: {{type: categorical, values: [1, 2]}}
budget: {{trials: {trials}, max_steps: 40, eval_every: 10}}
asha: {{grace_period: 1, reduction_factor: 2}}
resources: {{workers_per_trial: {workers}, cpus_per_worker: 1, max_concurrent_trials: {concurrent}}}
seeds_per_trial: {seeds}
stability: {{top_k_configs: {top}, seeds: 2}}
mlflow: {{experiment: {experiment}}}
"""


def make_space(
    tmp_path: Path,
    *,
    dataset: str = "synthetic",
    trials: int = 6,
    workers: int = 1,
    concurrent: int = 2,
    seeds: int = 1,
    top: int = 0,
    experiment: str = "e2e",
):
    path = tmp_path / "space.yaml"
    path.write_text(
        SPACE.format(
            dataset=dataset,
            trials=trials,
            workers=workers,
            concurrent=concurrent,
            seeds=seeds,
            top=top,
            experiment=f"{experiment}-{tmp_path.name}",
        )
    )
    return load_search_space(path)


def live_placement_groups() -> list[dict]:
    return [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]


def child_runs(client: MlflowClient, experiment_id: str, parent: str) -> list:
    return client.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'"
    )


def test_asha_search_on_two_cpus_stops_by_flag_and_records_everything(asha_search):
    space, result, log = asha_search
    # More trials than fit at once (2 CPUs, 1 per trial) ran to the end: no deadlock, no leak.
    assert len(result.trials) == 5
    assert live_placement_groups() == []
    statuses = {t["status"] for t in result.trials}
    assert statuses <= {"completed", "stopped_early_asha"}, result.trials
    stopped = [t for t in result.trials if t["status"] == "stopped_early_asha"]
    assert stopped, log
    # The flag cuts a trial at the rung ASHA judged, not one evaluation later.
    assert all(t["evals"] < space.budget.max_evals for t in stopped)
    assert "stopped_early_asha (ASHA: objective=" in log and "to go 0]" in log

    # Optuna was told every trial, ASHA-stopped ones as complete with their last value.
    study = optuna.load_study(
        study_name=optuna.get_all_study_names(f"sqlite:///{result.output_dir / 'optuna.db'}")[0],
        storage=f"sqlite:///{result.output_dir / 'optuna.db'}",
    )
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 5

    # Tune's saved state holds no report detail (MLflow has it) and, of an ended trial, none of
    # what only a restore of it would read: it is rewritten whole at every save.
    state = json.loads((result.output_dir / STATE_FILE).read_text())
    (saved,) = Path(state["storage_path"], state["name"]).glob("experiment_state-*.json")
    records = json.loads(saved.read_text())["trial_data"]
    assert len(records) == 5
    for _, meta in records:
        meta = json.loads(meta)
        assert DETAIL not in meta["last_result"] and meta["metric_n_steps"] == {}, meta
        assert DETAIL.encode() not in bytes.fromhex(meta["checkpoint_manager"]["value"])

    # MLflow: parent run, one child per trial with its status and per-step metrics.
    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(space.experiment)
    assert exp.artifact_location.startswith("file://")  # the fixed absolute location
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["status"] == "completed"
    children = child_runs(client, exp.experiment_id, result.parent_run_id)
    trials = [r for r in children if r.data.tags.get("kind") == "search"]
    assert len(trials) == 5 == len(children)
    by_id = {r.data.tags["trial_id"]: r for r in trials}
    for t in result.trials:
        run = by_id[t["trial_id"]]
        assert run.data.tags["status"] == t["status"]
        assert run.info.status == "FINISHED"
        if t["status"] == "stopped_early_asha":
            assert run.data.tags["status_reason"].startswith("ASHA:")
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [m.step for m in history][: t["evals"]] == [10 * (i + 1) for i in range(t["evals"])]
        # Scored by its last evaluation (the weights it ends with), never by an earlier peak;
        # chosen on validation, a search trial never evaluates the test split.
        objectives = client.get_metric_history(run.info.run_id, "objective")
        assert t["objective"] == history[-1].value == objectives[-1].value
        assert [o.value for o in objectives][: t["evals"]] == [m.value for m in history][
            : t["evals"]
        ]
        assert not any(k.startswith("test_") for k in run.data.metrics), run.data.metrics
        # Tidy: one seed, so no `_std`; nothing of Ray's bookkeeping; what the trial cost.
        assert not any(k.endswith("_std") for k in run.data.metrics), run.data.metrics
        assert not set(AUTO_RESULT_KEYS) & set(run.data.metrics)
        assert not any(k.startswith(("layer", "routing_counts/")) for k in run.data.metrics)
        cost = ("wall_time_s", "startup_time_s", "device_seconds", "trainable_params")
        assert set(cost) <= set(run.data.metrics), run.data.metrics
        assert run.data.metrics["device_seconds"] == pytest.approx(run.data.metrics["wall_time_s"])
        # The params are the trial's full configuration, and rebuild it.
        adapter, training = space.configs(t["params"], space.seed)
        back_adapter, back_training = config_from_params(run.data.params)
        assert MoELoRAConfig(**back_adapter) == MoELoRAConfig(**adapter)
        assert TrainConfig(**back_training) == TrainConfig(**{**training, "eval_test": False})
        # Lineage: the data it saw, by context, and the base model.
        contexts = {
            i.dataset.name: {t.value for t in i.tags if t.key == "mlflow.data.context"}
            for i in run.inputs.dataset_inputs
        }
        assert contexts == {"synthetic-train": {"train"}, "synthetic-validation": {"validation"}}
        assert run.data.tags["graphlora.base_model_revision"] == "seed=0"
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"routing_counts.json", "routing_health.json"} <= files
        # Routing health at every evaluation, training and held-out batches; a collapse is named.
        for key in ("routing/batch_entropy", "routing/min_experts_used", "val_routing/token_mi"):
            assert len(client.get_metric_history(run.info.run_id, key)) == t["evals"], key
        health = json.loads(
            Path(client.download_artifacts(run.info.run_id, "routing_health.json")).read_text()
        )
        assert collapsed_text(collapsed_layers(health)) == run.data.tags.get(COLLAPSED_TAG, "")

    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"space.yaml", "results.csv", "best_config.yaml"} <= artifacts
    plots = {a.path for a in client.list_artifacts(result.parent_run_id, "plots")}
    assert {f"plots/{n}" for n in ("optimization_history.png", "pareto.png", "load_map.png")} <= (
        plots
    )
    assert (
        parent.data.metrics["total_device_seconds"]
        >= sum(r.data.metrics["device_seconds"] for r in trials) * 0.99
    )
    assert "plots/pareto.png" in parent.data.tags["mlflow.note.content"]
    assert f"#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning" in result.ui_link

    # The best config YAML loads straight into the library's dataclasses.
    best = yaml.safe_load((result.output_dir / "best_config.yaml").read_text())
    MoELoRAConfig(**best["adapter"])
    TrainConfig(**best["training"], seed=0)
    assert best["adapter"]["top_k"] <= best["adapter"]["num_experts"]


@pytest.mark.parametrize(("seeds", "workers"), [(2, 1), (1, 2)], ids=["2seeds", "2workers"])
def test_multi_seed_and_multi_worker_trials(ray_cluster, tmp_path, seeds, workers):
    """2 seeds side by side in one trial, then the stability stage (1 config x 2 fresh seeds,
    one trial each, side by side); or one trial of 2 DDP workers."""
    stability = seeds > 1
    space = make_space(
        tmp_path,
        trials=1,
        concurrent=2 if stability else 1,
        seeds=seeds,
        workers=workers,
        top=1 if stability else 0,
    )
    result = run_search(space, output_dir=tmp_path / "out", out=io.StringIO())
    assert {t["status"] for t in result.trials} <= {"completed", "stopped_early_asha"}
    assert live_placement_groups() == []
    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(space.experiment)
    children = child_runs(client, exp.experiment_id, result.parent_run_id)
    runs = [r for r in children if r.data.tags.get("kind") == "search"]
    assert len(runs) == 1
    if stability:  # one config run, its seed runs nested under it
        (group,) = [r for r in children if r.data.tags.get("kind") == "stability"]
        seed_runs = child_runs(client, exp.experiment_id, group.info.run_id)
        assert sorted(r.data.params["training.seed"] for r in seed_runs) == ["100", "101"]
        assert {i.dataset.name for r in seed_runs for i in r.inputs.dataset_inputs} == {
            "synthetic-train",
            "synthetic-validation",
            "synthetic-test",
        }
        assert {r.data.tags["status"] for r in seed_runs} == {"completed"}
        assert "val_accuracy_std" in group.data.metrics and "score" in group.data.metrics
        # The stability runs report the test split, of the weights they end with.
        assert "test_accuracy_mean" in group.data.metrics
        assert all("test_accuracy" in r.data.metrics for r in seed_runs)
        assert result.best["source"].startswith("stability config-1")
        artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
        assert "stability.csv" in artifacts
        plots = {a.path for a in client.list_artifacts(result.parent_run_id, "plots")}
        assert "plots/stability.png" in plots
    for run in runs:
        assert run.data.params["seeds"] == ",".join(str(s) for s in range(seeds))
        assert "test_accuracy" not in run.data.metrics
        stds = {k for k in run.data.metrics if k.endswith("_std")}
        if seeds > 1:  # two Train runs side by side: their mean, and a spread between them
            assert run.data.metrics["val_accuracy_std"] > 0
            assert all(is_quality(k.removesuffix("_std")) for k in stds), stds
        else:
            assert not stds
