"""What the search machinery costs per trial, against Ray's own floor, and what ASHA saves.

Measured side by side in one run, on one local Ray (`--num-cpus`, default 2):

1. Ray's floor: Tune trials whose driver runs a trivial `TorchTrainer` (one report, no model),
   `--floor-trials` of them, `max_concurrent_trials` of the space at a time. A trial's wall time
   is from Tune's `on_trial_start` to its `on_trial_complete` (the same two events that open
   and close a trial's MLflow run in a search).
2. The search: `run_search` on the space (default the quickstart, full budget; its stability
   stage is left out). Per trial, wall
   time is its MLflow run's end minus start; time inside the training loop is the run's
   `train_time_s` (optimizer steps) + `eval_time_total_s` (validation) + `test_time_s`;
   overhead = wall - inside (model load, data, Ray Train start, checkpoints, ASHA round trips),
   split into the run's own `setup_time_s` (data, model, adapter) and `checkpoint_time_s`
   (writing resumable states), and the rest (Ray: trial, Train run and worker start-up, imports,
   reports, verdicts, shutdown).
3. ASHA: optimizer steps the search ran, against every trial running the full `max_steps`.

4. The packed search: the same space on trial hosts (`resources.trials_per_host`, or
   `--trials-per-host`, default 2), against today's search (2.) with as many trials at once as
   the hosts have slots, same seed, same CPUs. A host loads the base model once and its trials
   take slots without starting anything; `packed_vs_default_wall` is the ratio of the two
   search stages (target <= 0.4), `packed_warm_trial_overhead_s` the median overhead of the
   trials that started after the host's first slots were filled (target <= 2 s), and
   `packed_base_loads` how many times the base model was loaded (target: the number of hosts).
   ASHA may cut different trials in the two searches: CPU float sums depend on the thread count
   (a host runs with its slots' CPUs), which moves high-learning-rate trials; `*_asha_steps_run`
   says how much training each did.

Prints one JSON line per stage and a summary line with `overhead_vs_ray_floor` (target <= 1.3),
`*_trial_overhead_fraction` (overhead / wall, summed over trials) and `*_asha_iteration_fraction`
(target <= 0.5), for each search.

Usage: python benchmarks/search_overhead.py [--space search_spaces/quickstart.yaml]
           [--num-cpus 2] [--floor-trials 4] [--trials N] [--trials-per-host 2] [--no-packed]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def trivial_worker(config: dict) -> None:
    import ray.train

    ray.train.report({"val_accuracy": 0.5, "step": 1})


def trivial_driver(config: dict) -> None:
    """One Tune trial: a one-worker TorchTrainer that reports once (Ray's floor)."""
    import ray.tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trial_id = ray.tune.get_context().get_trial_id()
    TorchTrainer(
        trivial_worker,
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"floor-{trial_id}", storage_path=config["storage"]),
    ).fit()
    ray.tune.report({"objective": 0.5})


def measure_floor(trials: int, concurrent: int, storage: str) -> list[float]:
    from ray import tune

    class Clock(tune.Callback):
        def __init__(self) -> None:
            self.start: dict[str, float] = {}
            self.walls: list[float] = []

        def on_trial_start(self, iteration, trials, trial, **info) -> None:  # noqa: ANN001
            self.start[trial.trial_id] = time.time()

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:  # noqa: ANN001
            self.walls.append(time.time() - self.start[trial.trial_id])

    clock = Clock()
    tune.Tuner(
        tune.with_resources(trivial_driver, {"cpu": 0, "memory": 2**20}),
        param_space={"storage": storage, "i": tune.grid_search(list(range(trials)))},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name="floor", storage_path=storage, callbacks=[clock], verbose=0),
    ).fit()
    return clock.walls


def measure_search(space, tmp: Path, label: str) -> dict:
    """Run the search stage of `space` and read back, per trial, its wall time and what went
    to training, validation and overhead (from its MLflow run)."""
    from mlflow.tracking import MlflowClient

    from pipelines.search import run_search
    from pipelines.tracking import tracking_uri

    t0 = time.perf_counter()
    with open(os.devnull, "w") as devnull:
        result = run_search(space, output_dir=tmp / f"out-{label}", out=devnull)
    search_s = time.perf_counter() - t0
    client = MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name(space.experiment).experiment_id
    rows = []
    for t in result.trials:
        run = client.search_runs(
            [experiment],
            filter_string=f"tags.trial_id = '{t['trial_id']}' and tags.kind = 'search'",
        )[0]
        m = run.data.metrics
        wall = (run.info.end_time - run.info.start_time) / 1000
        inside = m.get("train_time_s", 0) + m.get("eval_time_total_s", 0) + m.get("test_time_s", 0)
        history = client.get_metric_history(run.info.run_id, "evals")
        steps = max((h.step for h in history), default=0)
        setup, ckpt = m.get("setup_time_s", 0), m.get("checkpoint_time_s", 0)
        rows.append(
            {
                "trial": t["trial"],
                "status": t["status"],
                "start": run.info.start_time / 1000,
                "wall_s": round(wall, 1),
                "inside_loop_s": round(inside, 1),
                "overhead_s": round(wall - inside, 1),
                "setup_s": round(setup, 2),
                "checkpoint_s": round(ckpt, 2),
                "rest_s": round(wall - inside - setup - ckpt, 1),
                "steps": steps,
            }
        )
    for row in rows:
        emit({"stage": f"{label}_trial", **{k: v for k, v in row.items() if k != "start"}})
    parent = client.get_run(result.parent_run_id).data.metrics
    return {"rows": rows, "search_s": search_s, "parent": parent}


def summarize(label: str, measured: dict, space, warm_after: int = 0) -> dict:
    rows = measured["rows"]
    steps_run = sum(r["steps"] for r in rows)
    full = len(rows) * space.budget.max_steps
    warm = sorted(rows, key=lambda r: r["start"])[warm_after:] or rows
    doc = {
        f"{label}_wall_s": round(measured["search_s"], 1),
        f"{label}_trial_overhead_s": round(statistics.median(r["overhead_s"] for r in rows), 2),
        f"{label}_overhead_median_parts_s": {
            k: round(statistics.median(r[k] for r in rows), 2)
            for k in ("setup_s", "checkpoint_s", "rest_s")
        },
        f"{label}_trial_overhead_fraction": round(
            sum(r["overhead_s"] for r in rows) / sum(r["wall_s"] for r in rows), 3
        ),
        f"{label}_asha_iteration_fraction": round(steps_run / full, 3),
        f"{label}_asha_steps_run": steps_run,
    }
    if warm_after:
        doc[f"{label}_warm_trial_overhead_s"] = round(
            statistics.median(r["overhead_s"] for r in warm), 2
        )
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "quickstart.yaml"))
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--floor-trials", type=int, default=4)
    parser.add_argument("--trials", type=int, help="override the space's budget.trials")
    parser.add_argument(
        "--trials-per-host",
        type=int,
        default=2,
        help="slots per host in the packed search (when the space sets none)",
    )
    parser.add_argument("--no-packed", action="store_true", help="skip the packed search")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="graphlora-bench-"))
    os.environ["GRAPHLORA_HOME"] = str(tmp)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray

    from pipelines.host import hosts_for
    from pipelines.search import init_ray, load_search_space

    overrides = {"budget": {"trials": args.trials}} if args.trials else None
    space = load_search_space(args.space, overrides=overrides)
    # The search stage only: the stability stage re-runs configs without ASHA.
    space = dataclasses.replace(
        space, stability=dataclasses.replace(space.stability, top_k_configs=0)
    )
    res = space.resources
    slots = res.trials_per_host or args.trials_per_host
    raw_res = space.raw.get("resources") or {}
    init_ray(num_cpus=args.num_cpus)
    packed = dataclasses.replace(
        space,
        resources=dataclasses.replace(res, trials_per_host=slots),
        raw={
            **space.raw,
            "resources": {k: v for k, v in raw_res.items() if k != "max_concurrent_trials"},
        },
        experiment=f"{space.experiment}-packed",
    )
    hosts = hosts_for(packed)
    # Today's search: a Train run per trial, as many at once as the packed search's slots.
    default = dataclasses.replace(
        space,
        resources=dataclasses.replace(res, trials_per_host=0, max_concurrent_trials=hosts * slots),
        experiment=f"{space.experiment}-default",
    )

    floor = measure_floor(args.floor_trials, hosts * slots, str(tmp / "ray"))
    floor_s = statistics.median(floor)
    emit({"stage": "ray_floor", "trials": len(floor), "wall_s": floor, "median_s": floor_s})

    measured = measure_search(default, tmp, "default")
    summary = {
        "stage": "summary",
        "space": Path(args.space).name,
        "num_cpus": args.num_cpus,
        "ray_floor_trial_s": round(floor_s, 2),
        **summarize("default", measured, default),
        "default_model_loads": len(measured["rows"]) * space.seeds_per_trial,
        "full_budget_steps": len(measured["rows"]) * space.budget.max_steps,
    }
    summary["overhead_vs_ray_floor"] = round(summary["default_trial_overhead_s"] / floor_s, 3)
    if not args.no_packed:
        packed_run = measure_search(packed, tmp, "packed")
        summary.update(summarize("packed", packed_run, packed, warm_after=hosts * slots))
        summary["packed_hosts"] = hosts
        summary["packed_trials_per_host"] = slots
        summary["packed_base_loads"] = int(packed_run["parent"].get("base_loads", 0))
        summary["packed_vs_default_wall"] = round(packed_run["search_s"] / measured["search_s"], 3)
    emit(summary)
    ray.shutdown()


def emit(doc: dict) -> None:
    print(json.dumps(doc), flush=True)


if __name__ == "__main__":
    main()
