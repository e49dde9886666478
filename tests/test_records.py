"""What a run records (pipelines/records.py) and the search's pictures (pipelines/pictures.py),
without Ray: tidy metrics, one std definition, params that rebuild the configuration."""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

import pytest
from ray.tune.result import AUTO_RESULT_KEYS

from graphlora.config import MoELoRAConfig
from graphlora.run import TrainConfig
from pipelines.pictures import health_labels, pareto_front, save_search_pictures
from pipelines.records import (
    BOOKKEEPING,
    collapsed_from_text,
    collapsed_note,
    collapsed_text,
    config_from_params,
    config_params,
    dataset_inputs,
    health_rows,
    load_map,
    pack_report,
    routing_health,
    routing_row,
    routing_summary,
    routing_warning,
    seed_stats,
    tidy_metrics,
    unpack_report,
)
from pipelines.search import load_search_space

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


def test_one_seed_has_no_std_and_several_seeds_have_sample_std_for_quality_only():
    one = seed_stats([{"val_accuracy": 0.5, "train_time_s": 3.0, "step": 10}])
    assert not any(k.endswith("_std") for k in one)
    rows = [
        {"val_accuracy": 0.5, "aux_poisson": 1.0, "train_time_s": 3.0, "learning_rate": 1e-3},
        {"val_accuracy": 0.7, "aux_poisson": 2.0, "train_time_s": 5.0, "learning_rate": 1e-3},
    ]
    two = seed_stats(rows)
    assert two["val_accuracy"] == pytest.approx(0.6)
    assert two["val_accuracy_std"] == pytest.approx(statistics.stdev([0.5, 0.7]))  # sample std
    assert "aux_poisson_std" in two
    assert "train_time_s_std" not in two and "learning_rate_std" not in two
    # an objective on a cost metric gets its std (the score needs it)
    assert "train_time_s_std" in seed_stats(rows, also_std=["train_time_s"])


def test_tidy_metrics_keep_what_a_run_measured_and_nothing_of_ray():
    assert set(AUTO_RESULT_KEYS) <= BOOKKEEPING  # Ray's own result keys are never logged
    result = {k: 1.0 for k in AUTO_RESULT_KEYS} | {
        "val_accuracy": 0.5,
        "val_accuracy_std": 0.1,
        "step_std": 0.0,
        "stopped_early": 0.0,
        "layer0/load_cv": 0.3,
        "routing/load_cv": 0.3,
        "routing_counts/layer0/expert1": 4.0,
        "trainable_params": 10.0,
        "device_seconds": 2.0,
        "recovery_log": "",
        "gcn_hidden_used": 32.0,  # a param of the run, not a metric
        "seeds": 1,
        "final": 1,
    }
    assert tidy_metrics(result) == {
        "val_accuracy": 0.5,
        "val_accuracy_std": 0.1,
        "routing/load_cv": 0.3,
        "trainable_params": 10.0,
        "device_seconds": 2.0,
    }


def test_load_map_from_flat_counts():
    flat = {
        f"routing_counts/layer{i}/expert{j}": float(10 * i + j) for i in range(2) for j in range(3)
    }
    assert load_map(flat) == [[0, 1, 2], [10, 11, 12]]
    assert load_map({"val_accuracy": 1.0}) == []


def _report(layers: int, experts: int) -> dict[str, float]:
    report = {"val_accuracy": 0.5, "objective": 0.5, "routing/batch_entropy": 0.9, "step": 4}
    for i in range(layers):
        report |= {f"layer{i}/{k}": 0.1 * i for k in ("batch_entropy", "token_mi", "load_cv")}
        report |= {f"routing_counts/layer{i}/expert{j}": float(j) for j in range(experts)}
    return report


def test_what_tune_tracks_of_a_report_does_not_grow_with_the_model_s_layers():
    """Ray Tune keeps running statistics of every number a trial reports, per trial, in the
    driver and in the experiment state it rewrites after each report: only what its scheduler
    and searcher read travel as numbers; the rest as one text, which comes back whole."""
    from ray.tune.trainable.metadata import _TrainingRunMetadata
    from ray.tune.utils import flatten_dict

    keep = {"objective", "step", "final"}

    def tracked(report: dict) -> set[str]:
        meta = _TrainingRunMetadata()
        for step in (1, 2, 3):  # as Trial.update_last_result does
            for key, value in flatten_dict(pack_report(report, keep)).items():
                if isinstance(value, int | float):
                    meta.update_metric(key, value, step=step)
        return set(meta.metric_analysis)

    small, qwen2_7b = _report(4, 4), _report(28, 8)
    assert tracked(small) == tracked(qwen2_7b) == {"objective", "step"}
    assert unpack_report(pack_report(qwen2_7b, keep)) == qwen2_7b
    assert load_map(unpack_report(pack_report(small, keep))) == [[0, 1, 2, 3]] * 4
    assert pack_report({"objective": 0.5}, keep) == {"objective": 0.5}  # nothing to pack
    assert tidy_metrics(pack_report(small, keep)) == {"objective": 0.5}  # the rest: unpack first
    assert tidy_metrics(unpack_report(pack_report(small, keep))) == tidy_metrics(small)


@pytest.mark.parametrize("space_file", ["quickstart.yaml", "compare.yaml"])
def test_params_are_the_full_configuration_and_rebuild_it(space_file):
    space = load_search_space(SPACES / space_file)
    params = {n: p.values[-1] if p.values else p.low for n, p in space.search.items()}
    adapter, training = space.configs(params, 7)
    logged = config_params(adapter, training)
    assert {f"adapter.{f.name}" for f in dataclasses.fields(MoELoRAConfig)} <= set(logged)
    assert logged["training.seed"] == "7" and logged["training.model"] == space.model
    assert all(isinstance(v, str) for v in logged.values())
    back_adapter, back_training = config_from_params({**logged, "seeds": "7,8"})
    assert MoELoRAConfig(**back_adapter) == MoELoRAConfig(**adapter)
    assert TrainConfig(**back_training) == TrainConfig(**training)


def test_a_local_dataset_is_recorded_with_its_file_source_and_no_warning(recwarn):
    """A task read from files is a local-file dataset source. MLflow's registry matches a
    file:// URI twice (the same source under two schemes) and used to warn a user on every
    search; nothing is printed now."""
    tasks = Path(__file__).resolve().parents[1] / "graphlora" / "task_data" / "commonsense"
    inputs = dataset_inputs({"dataset": str(tasks / "ARC-Easy")}, ["train", "test"])
    assert [i.dataset.name for i in inputs] == ["ARC-Easy-train", "ARC-Easy-test"]
    assert {i.dataset.source_type for i in inputs} == {"local"}
    assert all((tasks / "ARC-Easy").as_uri() in i.dataset.source for i in inputs)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)], [
        str(w.message) for w in recwarn
    ]


def test_pareto_front():
    pts = [(10, 0.5), (20, 0.6), (15, 0.4), (5, 0.5), (30, 0.6)]
    assert pareto_front(pts, "max") == [3, 1]
    assert pareto_front([(1, 0.1), (2, 0.2)], "min") == [0]
    assert pareto_front([(1, 0.2), (2, 0.1)], "min") == [0, 1]


def test_pictures_are_drawn(tmp_path):
    rows = [
        {
            "trial": i,
            "trial_id": f"t{i}",
            "status": s,
            "objective": v,
            "val_accuracy": v,
            "trainable_params": p,
        }
        for i, (s, v, p) in enumerate(
            [("completed", 0.5, 1e4), ("stopped_early_asha", 0.3, 5e3), ("failed", None, None)], 1
        )
    ]
    stability = [
        {
            "group": "config-1",
            "from_trial": 1,
            "values": {"objective": [0.5, 0.6], "test_accuracy": [0.4, 0.45]},
        },
    ]
    maps = {"trial 01": [[1, 2, 3], [3, 0, 1]], "trial 02": [[2, 2, 2], [0, 0, 6]]}
    written, skipped = save_search_pictures(
        tmp_path, rows, stability, maps, metric="val_accuracy", mode="max"
    )
    assert skipped == []
    assert sorted(p.name for p in written) == ["load_map.png", "pareto.png", "stability.png"]
    assert all(p.stat().st_size > 5000 for p in written)
    _, skipped = save_search_pictures(tmp_path, rows[2:], [], {}, metric="val_accuracy", mode="max")
    assert len(skipped) == 2  # one line each, no exception


def test_gpu_utilisation_is_skipped_off_cuda():
    import torch

    from pipelines.worker import GpuUtilisation

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine samples for real")
    sampler = GpuUtilisation.start()
    sampler.stop()
    assert sampler.metrics() == {}  # a CPU run logs no gpu_util_mean


@pytest.mark.parametrize(
    ("resources", "per_seed"),
    [
        ({"gpus_per_worker": 1, "cpus_per_worker": 8}, 1.0),  # a Train run of its own: 1 GPU
        ({"gpus_per_worker": 1, "cpus_per_worker": 8, "trials_per_host": 4}, 0.25),  # a slot
        ({"cpus_per_worker": 1, "trials_per_host": 2}, 1.0),  # a CPU slot has its own CPU
    ],
)
def test_a_trials_device_seconds_count_its_share_of_a_host(resources, per_seed):
    from pipelines.trial import TrialPlan, trial_cost

    space = load_search_space(SPACES / "quickstart.yaml")
    res = dataclasses.replace(
        space.resources, **{"trials_per_host": 0, "gpus_per_worker": 0, **resources}
    )
    space = dataclasses.replace(space, resources=res)
    plan = TrialPlan(
        space, "graphlora", (0, 1), "/tmp", board="board" if res.trials_per_host else None
    )
    cost = trial_cost({"train_time_s": 4.0}, 10.0, 2, plan)
    assert cost["device_seconds"] == pytest.approx(2 * per_seed * 10.0)
    assert cost["startup_time_s"] == pytest.approx(6.0)


def test_a_trial_asha_cut_before_the_search_stopped_ends_on_resume(tmp_path, monkeypatch):
    """ASHA cuts a trial; Ctrl-C lands before the trial ends (its run is `interrupted`). The
    resumed search's monitor ends that run as `stopped_early_asha` at the evaluation ASHA
    judged, and hands its last metrics to the trial (`ended`), so it does not train again."""
    import io
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from pipelines.monitor import SearchMonitor
    from pipelines.tracking import INTERRUPTED, STOPPED_EARLY_ASHA, Tracker, tracking_uri

    monkeypatch.setenv("GRAPHLORA_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    space = load_search_space(Path(__file__).resolve().parents[1] / "search_spaces/quickstart.yaml")
    tracker = Tracker("resume-cut")
    parent = tracker.start_run("search x", tags={"kind": "search"})
    asha = SimpleNamespace(stop_reasons={})  # what the monitor reads of FlagASHAScheduler
    monitor = SearchMonitor(tracker, parent, space, scheduler=asha, out=io.StringIO(), total=2)
    params = {"learning_rate": 0.02, "num_experts": 4, "top_k": 2, "rank": 2}
    cut, going = (SimpleNamespace(trial_id=t, config=params) for t in ("cut_1", "going_2"))
    for trial in (cut, going):
        monitor.on_trial_start(0, [], trial)
    asha.stop_reasons["cut_1"] = "ASHA: objective=0.2 below the rung cutoff"
    for trial in (cut, going):
        result = {"step": 20, "val_accuracy": 0.2, "objective": 0.2}
        monitor.on_trial_result(0, [], trial, result)
    assert monitor.close_interrupted("SIGINT") == ["cut_1", "going_2"]

    resumed = SearchMonitor(tracker, parent, space, out=io.StringIO(), total=2)
    resumed.adopt_runs(tracker.child_runs(parent))
    ended = resumed.ended()
    assert set(ended) == {"cut_1"} and ended["cut_1"]["val_accuracy"] == 0.2
    assert resumed.records["cut_1"]["status"] == STOPPED_EARLY_ASHA
    assert resumed.records["going_2"]["status"] == INTERRUPTED  # continues when Tune restarts it
    run = MlflowClient(tracking_uri()).get_run(resumed.records["cut_1"]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["status"] == STOPPED_EARLY_ASHA
    assert run.data.tags["status_reason"] == asha.stop_reasons["cut_1"]


def health_metrics(entropies: list[float], used: list[float]) -> dict[str, float]:
    """An evaluation's metrics as `graphlora.run.RunState.evaluate` reports them for a router of
    several experts: per-layer health figures, their aggregates, and what was there before."""
    out: dict[str, float] = {"val_accuracy": 0.5, "objective": 0.5}
    for i, (h, n) in enumerate(zip(entropies, used, strict=True)):
        out |= {
            f"layer{i}/batch_entropy": h,
            f"layer{i}/experts_used": n,
            f"layer{i}/distinct_topk": 2.0 * n,
            f"layer{i}/token_mi": h / 2,
            f"layer{i}/load_cv": 0.1,
            f"routing_counts/layer{i}/expert0": 10.0,
        }
    out |= {
        "routing/batch_entropy": statistics.fmean(entropies),
        "routing/min_batch_entropy": min(entropies),
        "routing/collapsed_layers": float(sum(h < 0.5 for h in entropies)),
    }
    return out


HEALTHY = health_metrics([0.9, 0.8, 0.95], [3.5, 3.0, 3.8])
COLLAPSED = health_metrics([0.9, 0.33, 0.2], [3.5, 2.0, 1.0])  # layers 1 and 2 collapsed


def test_routing_health_keeps_the_per_layer_batch_figures_only():
    health = routing_health(COLLAPSED)
    assert set(health) == {
        f"layer{i}/{f}"
        for i in range(3)
        for f in ("batch_entropy", "experts_used", "distinct_topk", "token_mi")
    }
    assert health_rows(health)[1] == {
        "batch_entropy": 0.33,
        "experts_used": 2.0,
        "distinct_topk": 4.0,
        "token_mi": 0.165,
    }
    assert routing_health({"val_accuracy": 0.5, "layer0/load_cv": 0.2}) == {}  # one expert
    # per-layer figures stay off the metrics; the aggregates are metrics
    tidy = tidy_metrics(COLLAPSED)
    assert not any(k.startswith("layer") for k in tidy)
    assert tidy["routing/min_batch_entropy"] == 0.2 and tidy["routing/collapsed_layers"] == 2.0


def test_a_collapsed_configuration_is_named_and_summarised():
    assert collapsed_text([1, 2, 3]) == "1,2,3" and collapsed_text([]) == ""
    assert collapsed_from_text("1,2,3") == [1, 2, 3] and collapsed_from_text(None) == []
    healthy = {"trial": 1, **routing_row(HEALTHY, [])}
    collapsed = {"trial": 2, **routing_row(COLLAPSED, [1, 2])}
    assert collapsed == {"trial": 2, "min_batch_entropy": 0.2, "routing_collapsed": "1,2"}
    assert collapsed_note([healthy]) is None
    assert collapsed_note([healthy, collapsed, {"trial": 5, "routing_collapsed": "0"}]) == (
        "routing collapsed (batch entropy < 0.5) in: trial 02 layers 1,2; trial 05 layer 0"
    )
    # a configuration over its seeds: the lowest entropy, the layers any seed collapsed in
    seed_b = routing_row({"routing/min_batch_entropy": 0.45}, [0])
    assert routing_summary([collapsed, seed_b]) == {
        "min_batch_entropy": 0.2,
        "collapsed_layers": [0, 1, 2],
    }
    assert routing_summary([healthy]) == {"min_batch_entropy": 0.8, "collapsed_layers": []}
    assert routing_summary([{"min_batch_entropy": None, "routing_collapsed": ""}]) is None
    assert routing_warning({"min_batch_entropy": 0.8, "collapsed_layers": []}) is None
    note = routing_warning({"min_batch_entropy": 0.2, "collapsed_layers": [1, 2]})
    assert "collapsed in the search in layers 1,2" in note and "lowest 0.20" in note


def test_the_load_map_labels_each_layer_with_its_per_batch_routing(tmp_path):
    labels = health_labels(routing_health(COLLAPSED), 4)
    assert labels == [
        ("batch H 0.90, 3.5 used", False),
        ("batch H 0.33, 2.0 used, collapsed", True),
        ("batch H 0.20, 1.0 used, collapsed", True),
        ("", False),  # a layer without figures
    ]
    assert all(not c for _, c in health_labels(routing_health(HEALTHY), 3))
    assert health_labels({}, 2) == [("", False), ("", False)]  # an older trial: no labels
    maps = {"trial 01": [[5, 5, 0, 0], [9, 1, 0, 0], [0, 0, 10, 0]], "trial 02": [[1, 2], [2, 1]]}
    written, skipped = save_search_pictures(
        tmp_path,
        [],
        [],
        maps,
        metric="val_accuracy",
        mode="max",
        health={"trial 01": routing_health(COLLAPSED)},  # trial 02 without: drawn unlabelled
    )
    assert [p.name for p in written] == ["load_map.png"] and skipped == [
        "pareto.png: no trial reported both val_accuracy and trainable_params"
    ]


def test_a_collapsed_trial_is_tagged_recorded_and_named(tmp_path, monkeypatch):
    """Two trials, one whose routing collapsed in layers 1 and 2: only it gets the
    `routing_collapsed` tag; both keep their per-layer figures in `routing_health.json`, read
    back from MLflow alone; the printed table names it; best_config.yaml carries its routing."""
    import io
    from types import SimpleNamespace

    import yaml
    from mlflow.tracking import MlflowClient

    from pipelines.best_config import parse_best_config
    from pipelines.monitor import COLLAPSED_TAG, SearchMonitor
    from pipelines.progress import print_table
    from pipelines.results import ROUTING_HEALTH, routing_healths, trial_rows, write_results
    from pipelines.stability import choose_best
    from pipelines.tracking import Tracker, tracking_uri

    monkeypatch.setenv("GRAPHLORA_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    space = load_search_space(SPACES / "quickstart.yaml")
    tracker = Tracker("routing-health")
    parent = tracker.start_run("search x", tags={"kind": "search"})
    out = io.StringIO()
    monitor = SearchMonitor(tracker, parent, space, out=out, total=2)
    params = {"learning_rate": 0.02, "num_experts": 4, "top_k": 2, "rank": 2}
    trials = {t: SimpleNamespace(trial_id=t, config=params) for t in ("ok_1", "gone_2")}
    finals = {"ok_1": HEALTHY, "gone_2": {**COLLAPSED, "objective": 0.7, "val_accuracy": 0.7}}
    for tid, trial in trials.items():
        monitor.on_trial_start(0, [], trial)
        monitor.on_trial_result(0, [], trial, {**finals[tid], "step": 10})
        monitor.on_trial_result(0, [], trial, {**finals[tid], "step": 10, "final": 1})
        monitor.on_trial_complete(0, [], trial)
    client = MlflowClient(tracking_uri())
    runs = {t: client.get_run(monitor.records[t]["run_id"]) for t in trials}
    assert runs["gone_2"].data.tags[COLLAPSED_TAG] == "1,2"
    assert COLLAPSED_TAG not in runs["ok_1"].data.tags  # healthy: no tag at all
    assert runs["gone_2"].data.metrics["routing/collapsed_layers"] == 2.0
    assert not any(k.startswith("layer") for k in runs["gone_2"].data.metrics)
    assert "routing collapsed in layers 1,2" in out.getvalue()  # its progress line

    rows = trial_rows(space, monitor.records)
    assert [(r["min_batch_entropy"], r["routing_collapsed"]) for r in rows] == [
        (0.8, ""),
        (0.2, "1,2"),
    ]
    print_table(out, space, rows, "search")
    assert "routing collapsed (batch entropy < 0.5) in: trial 02 layers 1,2\n" in out.getvalue()

    # the picture's figures come back from MLflow alone (an adopted, resumed search)
    again = SearchMonitor(tracker, parent, space, out=io.StringIO(), total=2)
    again.adopt_runs(tracker.child_runs(parent))
    assert routing_healths(tracker, again.records, ["ok_1", "gone_2"]) == {
        t: routing_health(finals[t]) for t in trials
    }
    assert [r["routing_collapsed"] for r in trial_rows(space, again.records)] == ["", "1,2"]
    names = {a.path for a in client.list_artifacts(runs["gone_2"].info.run_id)}
    assert {"routing_counts.json", ROUTING_HEALTH} <= names

    best = choose_best(space, rows, [])
    assert best["source"] == "trial 2"
    assert best["routing"] == {"min_batch_entropy": 0.2, "collapsed_layers": [1, 2]}
    write_results(tmp_path, space, rows, [], best)
    text = (tmp_path / "best_config.yaml").read_text()
    assert "# routing: " in text
    doc = yaml.safe_load(text)
    assert doc["routing"] == {"min_batch_entropy": 0.2, "collapsed_layers": [1, 2]}
    assert parse_best_config(text, "best_config.yaml").routing == doc["routing"]
    with (tmp_path / "results.csv").open() as f:
        header = f.readline().strip().split(",")
    assert {"min_batch_entropy", "routing_collapsed"} <= set(header)


def test_a_stability_configuration_carries_the_routing_of_its_seeds():
    """The best configuration after a stability stage: its lowest entropy over its seeds, and
    the layers any seed collapsed in."""
    import io
    from types import SimpleNamespace

    from pipelines.monitor import SearchMonitor
    from pipelines.results import stability_groups
    from pipelines.stability import choose_best

    space = load_search_space(SPACES / "quickstart.yaml")
    tracker = SimpleNamespace(log_metrics=lambda *a, **k: None, finish=lambda *a, **k: None)
    monitor = SearchMonitor(tracker, "parent", space, out=io.StringIO(), stage="stability")
    run = {"group": "config-1", "params": {"rank": 2}, "from_trial": 2, "group_run_id": "g1"}
    for seed, (metrics, layers) in enumerate([(HEALTHY, []), (COLLAPSED, [1, 2])]):
        monitor.records[f"s{seed}"] = {
            "status": "completed",
            "run": run,
            "last": tidy_metrics(metrics),
            "collapsed": layers,
        }
    groups = stability_groups(space.objective, monitor.records.values(), [run])
    assert groups[0]["routing"] == {"min_batch_entropy": 0.2, "collapsed_layers": [1, 2]}
    assert choose_best(space, [], groups)["routing"] == groups[0]["routing"]
