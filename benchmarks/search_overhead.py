"""Fixed cost of the search machinery, measured with a trivial training function.

Prints one JSON line per measurement:
- `fit_alone`: one `TorchTrainer.fit()` of `train_fn_per_worker` (stand-in, ~0 s of training);
- `trial`: one Tune trial of `train_driver_fn` (Tune + Train + hub + MLflow-free);
- `search`: a small ASHA search (`--trials` trials, 2 at a time) through `run_search`,
  wall time per trial.

Usage: python benchmarks/search_overhead.py [--num-cpus 2] [--trials 4] [--no-dashboard]
                                           [--only fit|trial|search ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--no-dashboard", action="store_true")
    parser.add_argument(
        "--only",
        choices=["fit", "trial", "search"],
        action="append",
        help="run only these measurements (repeatable; default: all)",
    )
    args = parser.parse_args()

    os.environ.setdefault("GRAPHLORA_STANDIN_STEP_S", "0.0")
    tmp = Path(tempfile.mkdtemp(prefix="graphlora-bench-"))
    os.environ["GRAPHLORA_HOME"] = str(tmp)
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    import ray
    from ray import tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.search import TrialPlan, load_search_space, run_search, train_driver_fn

    t0 = time.perf_counter()
    ray.init(num_cpus=args.num_cpus, include_dashboard=not args.no_dashboard, log_to_driver=False)
    emit("ray_init", time.perf_counter() - t0, args)
    space = load_search_space(Path(__file__).resolve().parents[1] / "search_spaces/quickstart.yaml")
    adapter, training = space.configs({"learning_rate": 1e-3}, 0)

    from pipelines.search import train_fn_per_worker

    only = set(args.only or ["fit", "trial", "search"])
    t0 = time.perf_counter()
    if "fit" in only:
        TorchTrainer(
            train_fn_per_worker,
            train_loop_config={"backend": "standin", "adapter": adapter, "training": training},
            scaling_config=ScalingConfig(num_workers=1),
            run_config=RunConfig(name="bench-fit", storage_path=str(tmp / "ray")),
        ).fit()
        emit("fit_alone", time.perf_counter() - t0, args)

    if "trial" in only:
        plan = TrialPlan(space, "standin", (0,), str(tmp / "ray"))
        t0 = time.perf_counter()
        tune.Tuner(
            tune.with_resources(
                tune.with_parameters(train_driver_fn, plan=plan), {"cpu": 0, "memory": 2**20}
            ),
            param_space={"learning_rate": 1e-3},
            run_config=tune.RunConfig(name="bench-trial", storage_path=str(tmp / "ray"), verbose=0),
        ).fit()
        emit("trial", time.perf_counter() - t0, args)

    if "search" in only:
        import dataclasses

        small = dataclasses.replace(
            space,
            budget=dataclasses.replace(space.budget, trials=args.trials),
            stability=dataclasses.replace(space.stability, top_k_configs=0),
        )
        t0 = time.perf_counter()
        with open(os.devnull, "w") as devnull:
            run_search(small, output_dir=tmp / "out", out=devnull)
        total = time.perf_counter() - t0
        emit("search", total, args, trials=args.trials, per_trial_s=round(total / args.trials, 2))
    ray.shutdown()


def emit(name: str, seconds: float, args: argparse.Namespace, **extra: object) -> None:
    print(
        json.dumps(
            {
                "bench": name,
                "seconds": round(seconds, 2),
                "num_cpus": args.num_cpus,
                "dashboard": not args.no_dashboard,
                **extra,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
