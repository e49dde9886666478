"""Warm start and extend, end to end on the shared ASHA search (`asha_search`, conftest.py) and
a real MLflow store. This file runs after the tests that check that search as it was made: the
extension adds one trial to it."""

from __future__ import annotations

import dataclasses
import io
import json

import optuna
import pytest
from mlflow.tracking import MlflowClient
from test_search_e2e import child_runs, make_space

from pipelines.errors import SpaceError
from pipelines.search import run_search
from pipelines.tracking import tracking_uri
from pipelines.warm_start import load_warm_start


def study_of(output_dir) -> optuna.Study:  # noqa: ANN001
    url = f"sqlite:///{output_dir / 'optuna.db'}"
    return optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url)


def test_warm_start_hands_the_earlier_trials_to_optuna(asha_search, tmp_path):
    space, result, _ = asha_search
    client = MlflowClient(tracking_uri())
    name = client.get_run(result.parent_run_id).data.tags["search_name"]
    new = make_space(tmp_path, trials=1, experiment="warm")
    warm = load_warm_start(new, name, client)
    statuses = {t["trial_id"]: t["status"] for t in result.trials}
    assert len(warm.trials) == len(result.trials) == 5
    states = sorted(t.state.name for t in warm.trials)
    assert states == sorted("COMPLETE" if s == "completed" else "PRUNED" for s in statuses.values())

    out = io.StringIO()
    second = run_search(new, output_dir=tmp_path / "out", out=out, warm_start=warm)
    assert f"warm start: 5 trials of search {name}" in out.getvalue()
    study = study_of(second.output_dir)
    assert len(study.trials) == 6  # five known, one trained
    assert sum(1 for t in study.trials if t.user_attrs.get("warm_start_from")) == 5
    # Nothing was retrained: the new search run holds its one trial only.
    exp = client.get_experiment_by_name(new.experiment)
    assert len(child_runs(client, exp.experiment_id, second.parent_run_id)) == 1
    parent = client.get_run(second.parent_run_id)
    assert parent.data.tags["warm_start_from"] == result.parent_run_id

    # A space that searches something else (or for another objective) is refused, in one line.
    other = dataclasses.replace(new, raw={**new.raw, "search": {"rank": new.raw["search"]["rank"]}})
    with pytest.raises(SpaceError, match="warm start needs the same search"):
        load_warm_start(other, name, client)
    other = dataclasses.replace(new, raw={**new.raw, "objective": {"metric": "val_loss"}})
    with pytest.raises(SpaceError, match="warm start needs the same one"):
        load_warm_start(other, name, client)


def test_resume_with_more_trials_extends_a_finished_search(asha_search):
    space, result, _ = asha_search
    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(space.experiment)
    before = {r.info.run_id for r in child_runs(client, exp.experiment_id, result.parent_run_id)}
    out = io.StringIO()
    more = run_search(
        space,
        output_dir=result.output_dir,
        out=out,
        resume=True,
        more_trials=1,
    )
    assert len(more.trials) == 6 and more.parent_run_id == result.parent_run_id
    # The five earlier trials are kept as they were (same runs), one new trial run.
    assert [t["trial_id"] for t in more.trials[:5]] == [t["trial_id"] for t in result.trials]
    assert "had ended" not in out.getvalue()  # Tune never restarted them
    after = {r.info.run_id for r in child_runs(client, exp.experiment_id, result.parent_run_id)}
    assert before < after and len(after - before) == 1
    assert len(study_of(result.output_dir).trials) == 6  # Optuna saw all six
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["status"] == "completed"
    state = json.loads((result.output_dir / "search.json").read_text())
    assert state["round"] == 1 and state["finished"]


def test_multi_objective_search_keeps_asha_on_the_first(ray_cluster, tmp_path):
    """`objective.secondary: {metric: trainable_params, mode: min}`: Optuna is told both, the
    best config is still chosen on the first, and every picture draws."""
    from pipelines.validate import load_search_space

    make_space(tmp_path, trials=2, experiment="pareto")
    path = tmp_path / "space.yaml"
    path.write_text(
        path.read_text()
        + "objective: {metric: val_accuracy, mode: max,"
        + " secondary: {metric: trainable_params, mode: min}}\n"
    )
    space = load_search_space(path)
    out = io.StringIO()
    result = run_search(space, output_dir=tmp_path / "out", out=out)
    study = study_of(result.output_dir)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    finished = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert finished and all(len(t.values) == 2 for t in finished)
    assert {t.values[1] for t in finished} <= {r["trainable_params"] for r in result.trials}
    assert result.best["scores"]["objective"] == max(
        r["objective"] for r in result.trials if r["objective"] is not None
    )
    assert "plot skipped" not in out.getvalue(), out.getvalue()
    client = MlflowClient(tracking_uri())
    plots = {a.path for a in client.list_artifacts(result.parent_run_id, "plots")}
    assert {
        f"plots/{n}.png"
        for n in (
            "pareto",
            "load_map",
            "optimization_history",
            "param_importances",
            "parallel_coordinate",
        )
    } <= plots
