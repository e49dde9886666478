"""The stability stage of a search: the top configurations again, each seed its own Tune trial
with a fresh seed, reporting the test split; and the choice of the best configuration.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipelines.space import SearchSpace
from pipelines.tracking import Tracker
from pipelines.trial import OBJECTIVE, TrialPlan, train_driver_fn
from pipelines.tuning import fit_experiment


def run_stability_stage(
    space: SearchSpace,
    backend: str,
    search_plan: TrialPlan,
    name: str,
    trials: list[dict[str, Any]],
    tracker: Tracker,
    parent: str,
    out: Any,
    earlier: list[Any],
) -> list[dict[str, Any]]:
    """Re-run the top configs, each seed its own trial (run side by side as resources allow).

    On a resume, config runs and seed runs already in MLflow (`earlier`) are reused."""
    from ray import tune

    from pipelines.monitor import SearchMonitor

    k = space.stability.top_k_configs
    done = [t for t in trials if t["status"] != "failed" and t.get(OBJECTIVE) is not None]
    top = sorted(done, key=lambda t: t[OBJECTIVE], reverse=space.objective.mode == "max")[:k]
    if not top:
        return []
    seeds = [space.seed + 100 + j for j in range(space.stability.seeds)]  # fresh: no winner's curse
    print(f"stability: top {len(top)} configs x {len(seeds)} seeds {seeds}", file=out, flush=True)
    runs = []
    before = {
        r.data.tags["group"]: r.info.run_id
        for r in earlier
        if r.data.tags.get("kind") == "stability" and "group" in r.data.tags
    }
    seed_runs = []
    for rank, t in enumerate(top, start=1):
        group = f"config-{rank}"
        group_run = before.get(group)
        if group_run:
            tracker.reopen(group_run)
            seed_runs += tracker.child_runs(group_run)
        else:
            group_run = tracker.start_run(
                f"stability {group}",
                parent_run_id=parent,
                params={**t["params"], "from_trial": t["trial"]},
                tags={"kind": "stability", "group": group},
            )
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
    # No ASHA here; these runs report the test split (of the weights they end with).
    plan = dataclasses.replace(search_plan, verdict_wait_s=0.0, eval_test=True)
    monitor = SearchMonitor(tracker, parent, space, out=out, total=len(runs), stage="stability")
    monitor.adopt_runs(seed_runs)
    plan = dataclasses.replace(plan, ended=monitor.ended())
    fit_experiment(
        train_driver_fn,
        plan,
        f"{name}-stability",
        tune.TuneConfig(num_samples=1, max_concurrent_trials=space.resources.max_concurrent_trials),
        monitor,
        param_space={"_run": tune.grid_search(runs)},
    )
    monitor.close_unfinished()
    return monitor.stability_groups(runs)


def choose_best(space: SearchSpace, trials: list[dict], stability: list[dict]) -> dict | None:
    """Best by `objective.score` over seeds: stability groups if any, else search trials."""
    rev = space.objective.mode == "max"
    if stability:
        g = sorted(stability, key=lambda g: g["score"], reverse=rev)[0]
        return {
            "source": f"stability {g['group']} (trial {g['from_trial']})",
            "params": g["params"],
            "scores": g["scores"],
        }
    done = [t for t in trials if t["status"] != "failed" and t.get(OBJECTIVE) is not None]
    if not done:
        return None
    t = sorted(done, key=lambda t: t[OBJECTIVE], reverse=rev)[0]
    return {
        "source": f"trial {t['trial']}",
        "params": t["params"],
        "scores": {OBJECTIVE: t[OBJECTIVE]},
    }
