"""Warm start: a new search's Optuna study begins with an earlier search's finished trials, read
from MLflow (no retraining).

Ray's `points_to_evaluate` / `evaluated_rewards` refuse a define-by-run space, so the trials go
into the Optuna study itself before `OptunaSearch` opens it (it loads an existing study). A
completed trial enters as COMPLETE with its objective; an ASHA-stopped one as PRUNED with its
objective at each evaluation (what it was, not a finished trial); failed and unfinished trials
are left out. The spaces must agree on the searched parameters and the objective.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipelines.errors import SpaceError
from pipelines.schema import Objective, SearchSpace
from pipelines.tracking import COMPLETED, MLFLOW_PARENT_RUN_ID, STOPPED_EARLY_ASHA
from pipelines.tuning import DefineByRun


@dataclass
class WarmStart:
    """An earlier search's trials, ready for `optuna.Study.add_trials`."""

    run_id: str  # the earlier search run
    name: str  # its search name
    trials: list[Any]  # optuna FrozenTrial


def _objective(raw: dict[str, Any]) -> tuple:
    given = raw.get("objective") or {}
    default = Objective()
    keys = ("metric", "mode", "std_penalty", "secondary")
    return tuple(given.get(k, getattr(default, k)) for k in keys)


def _find_search_run(client: Any, ref: str) -> Any:
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.search_name = '{ref}' and tags.kind = 'search'",
        max_results=5,
    )
    if runs:
        return runs[0]
    try:
        run = client.get_run(ref)
    except Exception:
        run = None
    if (
        run is None
        or run.data.tags.get("kind") != "search"
        or MLFLOW_PARENT_RUN_ID in run.data.tags
    ):
        raise SpaceError(
            f"--warm-start {ref}: no search of this name and no search run of this id in MLflow; "
            "pass a search name printed at its start or its search run id"
        )
    return run


def load_warm_start(space: SearchSpace, ref: str, client: Any) -> WarmStart:
    """The trials of the search `ref` names (its name or search run id) as Optuna trials.

    Raises:
        SpaceError: No such search; or its space searches other parameters or another
            objective (one line saying which).
    """
    import optuna

    run = _find_search_run(client, ref)
    run_id = run.info.run_id
    with tempfile.TemporaryDirectory(prefix="graphlora-warm-") as tmp:
        try:
            path = client.download_artifacts(run_id, "space.yaml", tmp)
        except Exception:
            raise SpaceError(f"--warm-start {ref}: search run {run_id} has no space.yaml") from None
        raw = yaml.safe_load(Path(path).read_text()) or {}
    if (raw.get("search") or {}) != (space.raw.get("search") or {}):
        raise SpaceError(
            f"--warm-start {ref}: its space searches {sorted(raw.get('search') or {})} with other "
            f"ranges than {space.path} ({sorted(space.search)}); warm start needs the same "
            "search: section"
        )
    if _objective(raw) != _objective(space.raw):
        raise SpaceError(
            f"--warm-start {ref}: its objective {_objective(raw)} differs from {space.path}'s "
            f"{_objective(space.raw)} (metric, mode, std_penalty, secondary); warm start needs "
            "the same one"
        )
    children = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run_id}' and tags.kind = 'search'",
        order_by=["attributes.start_time ASC"],
        max_results=50000,
    )
    suggest = DefineByRun(space)
    secondary = space.objective.secondary
    trials = []
    for r in children:
        status = r.data.tags.get("status")
        if status not in (COMPLETED, STOPPED_EARLY_ASHA) or "trial_params" not in r.data.tags:
            continue
        params = json.loads(r.data.tags["trial_params"])
        fixed = optuna.trial.FixedTrial(params)
        suggest(fixed)  # the distributions this space gives these values
        history = client.get_metric_history(r.info.run_id, "objective")
        by_step = {m.step: m.value for m in history}
        values = [by_step[s] for s in sorted(by_step)]
        if not values:
            continue
        steps = dict(enumerate(values, start=1))  # evaluation index -> objective, as ASHA saw
        done = None
        if status == COMPLETED:
            done = [values[-1]]
            if secondary:  # a multi-objective study: Optuna takes no intermediate values
                done.append(r.data.metrics[secondary["metric"]])
        trials.append(
            optuna.trial.create_trial(
                params=params,
                distributions=fixed.distributions,
                values=done,
                intermediate_values=steps if not secondary else {},
                state=(
                    optuna.trial.TrialState.COMPLETE
                    if status == COMPLETED
                    else optuna.trial.TrialState.PRUNED
                ),
                user_attrs={"warm_start_from": run_id, "mlflow_run_id": r.info.run_id},
            )
        )
    return WarmStart(run_id, run.data.tags.get("search_name", run.info.run_name), trials)


def seed_study(
    warm: WarmStart, storage: str, study_name: str, modes: list[str], sampler: Any
) -> None:
    """Create the new search's study with the earlier trials in it (before OptunaSearch opens
    it with `load_if_exists`); `modes`: one per objective."""
    import optuna

    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        sampler=sampler,
        directions=["maximize" if m == "max" else "minimize" for m in modes],
    )
    study.add_trials(warm.trials)
