"""What tracking costs the search's driver per trial: an `mlflow server` on PostgreSQL (with the
Optuna study in PostgreSQL too) against the embedded SQLite stores, on the same quickstart.

Measured side by side in one run, on one local Ray: the same space (default the quickstart with a
small budget, stability stage off) searched twice, first with the embedded stores (MLflow's
SQLite in a temporary GRAPHLORA_HOME, Optuna's optuna.db), then through the server given with
`--server` and the study in `--optuna-storage`. Every MLflow call the driver makes goes through
`pipelines.tracking.Tracker`; the script times each of its methods (wall time in the driver,
summed) and reports, per trial: `tracking_s_per_trial` (the driver's time in MLflow calls),
`calls_s_per_trial` (the same without constructing Trackers: mlflow's import, the store's check
and the experiment lookup, paid a few times per search, not per trial) and `search_s_per_trial`
(the whole search's wall time / trials). Prints one JSON line per store and
a summary line with `server_vs_sqlite_tracking`.

Start the server and the database as README "Use a cluster" does, then:

    python benchmarks/tracking_server.py --server http://127.0.0.1:5000 \\
        --optuna-storage postgresql://graphlora@127.0.0.1:5432/optuna [--trials 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from functools import wraps
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `pipelines` from a checkout

from pipelines.search import init_ray, load_search_space, run_search  # noqa: E402
from pipelines.tracking import Tracker  # noqa: E402

TIMED = ("start_run", "log_metrics", "set_tags", "finish", "reopen", "child_runs", "log_file",
         "log_text", "__init__")  # fmt: skip
SPENT: dict[str, float] = defaultdict(float)


def _time_tracker() -> None:
    """Sum the wall time of every Tracker method (the driver's MLflow calls)."""
    for name in TIMED:
        method = getattr(Tracker, name)

        @wraps(method)
        def timed(*args, __method=method, __name=name, **kwargs):
            start = time.perf_counter()
            try:
                return __method(*args, **kwargs)
            finally:
                SPENT[__name] += time.perf_counter() - start

        setattr(Tracker, name, timed)


def _search(space_file: str, overrides: dict, label: str, optuna_storage: str | None) -> dict:
    space = load_search_space(space_file, overrides=overrides)
    space = dataclasses.replace(space, experiment=f"tracking-bench-{label}")
    SPENT.clear()
    start = time.perf_counter()
    result = run_search(
        space, output_dir=Path(tempfile.mkdtemp()), out=io.StringIO(), optuna_storage=optuna_storage
    )
    wall = time.perf_counter() - start
    trials = len(result.trials)
    row = {
        "store": label,
        "trials": trials,
        "tracking_s_per_trial": round(sum(SPENT.values()) / trials, 3),
        # without connecting (Tracker(): mlflow's import, the store's check, the experiment)
        "calls_s_per_trial": round((sum(SPENT.values()) - SPENT["__init__"]) / trials, 3),
        "search_s_per_trial": round(wall / trials, 2),
        "by_call_s": {k: round(v, 3) for k, v in sorted(SPENT.items())},
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="the MLflow server's http:// URL")
    parser.add_argument("--optuna-storage", required=True, help="the Optuna study's database")
    parser.add_argument("--space", default="search_spaces/quickstart.yaml")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args()
    overrides = {
        "budget": {"trials": args.trials, "max_steps": args.max_steps, "eval_every": 10},
        "stability": {"top_k_configs": 0},
    }
    os.environ["GRAPHLORA_HOME"] = tempfile.mkdtemp(prefix="tracking-bench-")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("GRAPHLORA_OPTUNA_STORAGE", None)
    _time_tracker()
    init_ray(num_cpus=args.num_cpus)
    embedded = _search(args.space, overrides, "sqlite", None)
    os.environ["MLFLOW_TRACKING_URI"] = args.server
    served = _search(args.space, overrides, "server", args.optuna_storage)
    print(
        json.dumps(
            {
                "server_vs_sqlite_tracking": round(
                    served["tracking_s_per_trial"] / embedded["tracking_s_per_trial"], 2
                ),
                "server_minus_sqlite_tracking_s_per_trial": round(
                    served["tracking_s_per_trial"] - embedded["tracking_s_per_trial"], 3
                ),
                "server_vs_sqlite_calls": round(
                    served["calls_s_per_trial"] / embedded["calls_s_per_trial"], 2
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
