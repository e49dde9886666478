"""The stability stage of a search: the top configurations again, each seed its own Tune trial
with a fresh seed, reporting the test split; and the choice of the best configuration.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipelines.progress import print_stability
from pipelines.records import config_params, log_lineage, routing_summary
from pipelines.results import stability_groups, stage_cost
from pipelines.schema import SearchSpace
from pipelines.stages import STABILITY, rank_trials
from pipelines.tracking import COMPLETED, FAILED, Tracker
from pipelines.trial import OBJECTIVE, TrialPlan, train_driver_fn
from pipelines.tuning import fit_experiment


def run_stability_stage(
    space: SearchSpace,
    search_plan: TrialPlan,
    name: str,
    trials: list[dict[str, Any]],
    tracker: Tracker,
    parent: str,
    out: Any,
    earlier: list[Any],
    *,
    round_: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Re-run the top configs, each seed its own trial (run side by side as resources allow).

    On a resume, config runs and seed runs already in MLflow (`earlier`) are reused. An
    extended search (`round_` k > 0) runs the stage again over the top configs of all trials,
    its runs tagged `round=k` beside the earlier rounds' (which stay as they were). Returns
    the groups (`pipelines.results.stability_groups`, each config's run closed with its
    scores) and the stage's cost (`pipelines.results.stage_cost`)."""
    from ray import tune

    from pipelines.asha import SavingFIFOScheduler
    from pipelines.monitor import SearchMonitor

    k = space.stability.top_k_configs
    top = rank_trials(trials, space.objective.mode, OBJECTIVE)[:k]
    if not top:
        return [], {}
    seeds = list(STABILITY.seeds(space.seed, space.stability.seeds))
    print(f"stability: top {len(top)} configs x {len(seeds)} seeds {seeds}", file=out, flush=True)
    runs, seed_runs = _config_runs(space, tracker, parent, top, seeds, earlier, round_)
    # No ASHA here; these runs report the test split (of the weights they end with).
    plan = dataclasses.replace(search_plan, verdict_wait_s=0.0, stage=STABILITY)
    monitor = SearchMonitor(tracker, parent, space, out=out, total=len(runs), stage=STABILITY.kind)
    monitor.adopt_runs(seed_runs)
    plan = dataclasses.replace(plan, ended=monitor.ended())
    fit_experiment(
        train_driver_fn,
        plan,
        f"{name}-stability" + (f"-more{round_}" if round_ else ""),
        tune.TuneConfig(
            num_samples=1,
            max_concurrent_trials=plan.concurrent_trials,
            scheduler=SavingFIFOScheduler(),
        ),
        monitor,
        param_space={"_run": tune.grid_search(runs)},
    )
    monitor.close_unfinished()
    groups = stability_groups(space.objective, monitor.records.values(), runs)
    _close_config_runs(tracker, runs, groups)
    print_stability(out, space, groups)
    return groups, stage_cost(monitor.records)


def _config_runs(
    space: SearchSpace,
    tracker: Tracker,
    parent: str,
    top: list[dict[str, Any]],
    seeds: list[int],
    earlier: list[Any],
    round_: int,
) -> tuple[list[dict[str, Any]], list[Any]]:
    """One MLflow run per top config (an earlier one of this round re-opened on a resume), and
    the stage's trials: one per config and seed. Returns (trials, the earlier seed runs)."""
    runs = []
    before = {
        r.data.tags["group"]: r.info.run_id
        for r in earlier
        if r.data.tags.get("kind") == "stability"
        and "group" in r.data.tags
        and int(r.data.tags.get("round", 0)) == round_
    }
    seed_runs = []
    for rank, t in enumerate(top, start=1):
        group = f"config-{rank}"
        group_run = before.get(group)
        if group_run:
            tracker.reopen(group_run)
            seed_runs += tracker.child_runs(group_run)
        else:
            adapter, training = STABILITY.configs(space, t["params"], seeds[0])
            training.pop("seed")  # one run per seed below; this run is the configuration
            group_run = tracker.start_run(
                f"stability {group}" + (f" (extension {round_})" if round_ else ""),
                parent_run_id=parent,
                params={
                    **config_params(adapter, training),
                    "seeds": ",".join(map(str, seeds)),
                    "from_trial": t["trial"],
                },
                tags={"kind": "stability", "group": group, "round": str(round_)},
            )
            log_lineage(tracker, group_run, training, STABILITY.splits)
        runs += [
            {
                "params": t["params"],
                "seeds": [s],
                "group": group,
                "group_run_id": group_run,
                "from_trial": t["trial"],
            }
            for s in seeds
        ]
    return runs, seed_runs


def _close_config_runs(tracker: Tracker, runs: list[dict], groups: list[dict]) -> None:
    """Each config's run ends with its seed statistics, or as failed when every seed failed."""
    scored = {g["run_id"]: g for g in groups}
    for run_id in dict.fromkeys(r["group_run_id"] for r in runs):
        if run_id in scored:
            tracker.log_metrics(run_id, scored[run_id]["scores"])
            tracker.finish(run_id, COMPLETED)
        else:
            tracker.finish(run_id, FAILED, "every seed failed")


def choose_best(space: SearchSpace, trials: list[dict], stability: list[dict]) -> dict | None:
    """Best by `objective.score` over seeds: stability groups if any, else search trials; with
    its router's health (`routing`, `pipelines.records.routing_summary`; None: not measured)."""
    mode = space.objective.mode
    if stability:
        g = rank_trials(stability, mode, "score")[0]
        return {
            "source": f"stability {g['group']} (trial {g['from_trial']})",
            "params": g["params"],
            "scores": g["scores"],
            "routing": g.get("routing"),
        }
    ranked = rank_trials(trials, mode, OBJECTIVE)
    if not ranked:
        return None
    t = ranked[0]
    return {
        "source": f"trial {t['trial']}",
        "params": t["params"],
        "scores": {OBJECTIVE: t[OBJECTIVE]},
        "routing": routing_summary([t]),
    }
