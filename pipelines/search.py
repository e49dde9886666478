"""Hyperparameter search for GraphLoRA on Ray: Tune (Optuna TPE + ASHA) over Ray Train runs.

Three layers, as in Ray's own Train + Tune docs; each is callable on its own:

- `train_fn_per_worker(config)`: runs on every Ray Train worker; calls the library's
  `run_training` with an `on_eval` callback that does `ray.train.report` and reads the
  ASHA stop flag (see `pipelines/asha.py` for why stopping is a flag).
- `train_driver_fn(config, plan)`: one Tune trial; launches one `TorchTrainer` per seed side by
  side, gathers their evaluations and reports the seed mean/std and a best-so-far `objective`
  with `ray.tune.report`.
- `run_search(space, ...)`: the Tuner with `OptunaSearch` (seeded TPE, define-by-run space),
  `FlagASHAScheduler` and a `ConcurrencyLimiter`; then the stability stage (top configs again,
  with fresh seeds), the best config YAML and the MLflow record.

CLI (validation happens before Ray starts; `ray.init` only here)::

    python pipelines/search.py [--space search_spaces/quickstart.yaml]

Connects to `RAY_ADDRESS` when set, else starts a local Ray. Outputs go to
`$GRAPHLORA_HOME/searches/<name>/` (default `~/.graphlora`) and to MLflow (`pipelines/tracking.py`).
Train runs store under `$GRAPHLORA_STORAGE_PATH` (default `$GRAPHLORA_HOME/ray_results`); a
multi-node cluster needs shared storage there (e.g. `s3://bucket/graphlora`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # `python pipelines/search.py`: make `pipelines` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from pipelines.space import (
    SearchSpace,
    SpaceError,
    check_constructible,
    field_names,
    load_space,
)
from pipelines.tracking import Tracker, TrackingError, graphlora_home

# The library's training function; "standin" is a fast fake used by the overhead benchmark.
DEFAULT_BACKEND = "graphlora"
# backend -> (module with TrainConfig and run_training, module with MoELoRAConfig)
BACKENDS = {
    "standin": ("pipelines.standin", "pipelines.standin"),
    "graphlora": ("graphlora.train", "graphlora.config"),
}
OBJECTIVE = "objective"  # best-so-far score reported to ASHA and Optuna
VERDICT_WAIT_S = 60.0  # longest a Train run waits for ASHA's verdict on an evaluation
TRAIN_POLL_S = "0.25"  # Ray Train controller poll interval, unless the environment sets one


def training_api(backend: str = DEFAULT_BACKEND) -> tuple[type, type, Any]:
    """(TrainConfig, MoELoRAConfig, run_training) of a backend."""
    train_mod, config_mod = (importlib.import_module(m) for m in BACKENDS[backend])
    return train_mod.TrainConfig, config_mod.MoELoRAConfig, train_mod.run_training


def load_search_space(path: str | Path, backend: str = DEFAULT_BACKEND) -> SearchSpace:
    """Load and validate a space file against the backend's config dataclasses."""
    train_cls, adapter_cls, _ = training_api(backend)
    methods = getattr(importlib.import_module(BACKENDS[backend][1]), "METHOD_PRESETS", None)
    space = load_space(
        path,
        adapter_fields=field_names(adapter_cls),
        training_fields=field_names(train_cls),
        methods=methods,
    )
    check_constructible(space, train_cls, adapter_cls)
    return space


# --- layer 1: every Ray Train worker ------------------------------------------------------------


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Train one seed of one trial on this worker.

    Args:
        config: `backend`, `adapter` and `training` dicts (the dataclasses are built here, at the
            library's edge); optionally `save_adapter` (rank 0 attaches the trained adapter
            folder to the final report as a checkpoint), `hub` (a `TrialHub`), `trial_id` and
            `verdict_wait_s`: after its k-th evaluation the run waits up to that long for the
            scheduler's verdict on iteration k, and returns if the trial must stop.
    """
    import ray.train
    from ray.train.collective import broadcast_from_rank_zero

    train_cls, adapter_cls, run_training = training_api(config["backend"])
    train_cfg, adapter_cfg = train_cls(**config["training"]), adapter_cls(**config["adapter"])
    hub, wait_s = config.get("hub"), config.get("verdict_wait_s", 0)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    evals = 0

    def on_eval(step: int, metrics: dict[str, float]) -> bool:
        nonlocal evals
        evals += 1
        ray.train.report({**metrics, "step": step})
        if hub is None:
            return False
        # Rank 0 decides and every rank follows, so all ranks leave the loop at the same step.
        stop = None
        if rank == 0:
            stop = ray.get(hub.should_stop.remote(config["trial_id"], evals, wait_s))
        return bool(broadcast_from_rank_zero(stop) if world > 1 else stop)

    if not config.get("save_adapter"):
        final = run_training(train_cfg, adapter_cfg, on_eval=on_eval)
        ray.train.report({**final, "final": 1})
        return
    # The trained adapter travels back as the run's last checkpoint (storage_path), so the caller
    # gets it from `Result.checkpoint` wherever this worker ran.
    with tempfile.TemporaryDirectory(prefix="graphlora-adapter-") as tmp:
        train_cfg = dataclasses.replace(train_cfg, output_dir=tmp)
        final = run_training(train_cfg, adapter_cfg, on_eval=on_eval)
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
        ray.train.report({**final, "final": 1}, checkpoint=checkpoint)


# --- layer 2: one Tune trial --------------------------------------------------------------------


@dataclass(frozen=True)
class TrialPlan:
    """What every trial of one stage shares (passed with `tune.with_parameters`)."""

    space: SearchSpace
    backend: str
    seeds: tuple[int, ...]
    storage_path: str
    hub: Any = None  # TrialHub handle; None: the trial makes its own
    verdict_wait_s: float = 0.0  # > 0 when a FlagASHAScheduler judges every evaluation


def _make_relay(hub: Any, trial_id: str, seed_index: int) -> Any:
    """Ray Train callback forwarding rank 0's reports to the trial driver, tagged by seed.

    Like `ray.tune.integration.ray_train.TuneReportCallback` (which puts `metrics[0]` on the Tune
    session's own queue), but through the hub, so several Train runs can feed one Tune trial.
    Runs in the Train controller.
    """
    import ray
    from ray.train import UserCallback

    class EvalRelay(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
            ray.get(hub.put.remote(trial_id, seed_index, metrics[0]))

    return EvalRelay()


def _seed_stats(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of every numeric metric over seeds, plus `<metric>_std` (population std)."""
    out: dict[str, float] = {}
    for key in rows[0]:
        vals = [r[key] for r in rows if isinstance(r.get(key), int | float)]
        if len(vals) == len(rows) and key not in ("final",):
            out[key] = statistics.fmean(vals)
            out[f"{key}_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
    return out


def unpack_trial_config(config: dict[str, Any], plan: TrialPlan) -> tuple[dict, tuple[int, ...]]:
    """Searched params and seeds of a trial: search trials carry params only; stability trials
    carry `{"_run": {"params", "seeds", ...}}`."""
    if "_run" in config:
        return dict(config["_run"]["params"]), tuple(config["_run"]["seeds"])
    return {k: v for k, v in config.items() if not k.startswith("_")}, plan.seeds


def train_driver_fn(config: dict[str, Any], plan: TrialPlan) -> None:
    """One Tune trial: one TorchTrainer per seed, side by side; reports seed statistics.

    Each evaluation step is reported once every seed has reported it (or has finished), with the
    seed mean of every metric, `<objective metric>_std`, and `objective`: the best so far of
    `mean -/+ std_penalty * std` (Optuna is told the last value of a trial ASHA cut short, so it
    must be the best so far). A last report carries the final (test) metrics.
    """
    import ray.train
    import ray.tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.asha import TrialHub

    space, obj = plan.space, plan.space.objective
    trial_id = ray.tune.get_context().get_trial_id()
    # Ray Train polls its workers (and so forwards reports) every 2 s by default; that is dead
    # time per evaluation that the verdict round trip would wait for. Read when the run starts.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_S)
    params, seeds = unpack_trial_config(config, plan)
    res = space.resources
    per_worker = {
        "CPU": res.cpus_per_worker,
        **({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {}),
    }
    hub = plan.hub or TrialHub.remote()

    def fit(index: int, seed: int) -> None:
        adapter, training = space.configs(params, seed)
        TorchTrainer(
            train_fn_per_worker,
            train_loop_config={
                "backend": plan.backend,
                "adapter": adapter,
                "training": training,
                "trial_id": trial_id,
                "hub": hub,
                "verdict_wait_s": plan.verdict_wait_s,
            },
            scaling_config=ScalingConfig(
                num_workers=res.workers_per_trial,
                use_gpu=res.gpus_per_worker > 0,
                resources_per_worker=per_worker,
            ),
            run_config=RunConfig(
                name=f"{trial_id}-seed{seed}",
                storage_path=plan.storage_path,
                callbacks=[_make_relay(hub, trial_id, index)],
            ),
        ).fit()

    evals: list[dict[int, dict]] = [{} for _ in seeds]  # per seed: step -> metrics
    finals: dict[int, dict] = {}
    reported: set[int] = set()
    best: float | None = None
    better = max if obj.mode == "max" else min

    def flush(finished: set[int]) -> None:
        nonlocal best
        steps = sorted({s for e in evals for s in e} - reported)
        for step in steps:
            if not all(step in evals[i] or i in finished for i in range(len(seeds))):
                return  # wait: a seed still running has not reached this step
            stats = _seed_stats([e[step] for e in evals if step in e])
            score = obj.score(stats[obj.metric], stats[f"{obj.metric}_std"])
            best = score if best is None else better(best, score)
            reported.add(step)
            ray.tune.report(
                {
                    **stats,
                    "step": step,
                    "seeds": len(seeds),
                    "objective_now": score,
                    OBJECTIVE: best,
                }
            )

    with ThreadPoolExecutor(len(seeds), thread_name_prefix="seed") as pool:
        futures = [pool.submit(fit, i, s) for i, s in enumerate(seeds)]
        failed = False
        while True:
            done = {i for i, f in enumerate(futures) if f.done()}
            mail = ray.get(hub.take.remote(trial_id, 0.5))
            if not mail and len(done) == len(seeds):
                break
            for i in done:
                if futures[i].exception() is not None and not failed:
                    failed = True  # let the sibling seeds end at their next evaluation
                    ray.get(hub.request_stop.remote(trial_id, f"seed {seeds[i]} failed"))
            for index, metrics in mail:
                if metrics.get("final"):
                    finals[index] = metrics
                else:
                    evals[index][int(metrics["step"])] = metrics
            flush(done | set(finals))
    for f in futures:
        if f.exception() is not None:
            raise f.exception()
    flush(set(range(len(seeds))))
    last = _seed_stats([finals[i] for i in sorted(finals)])
    ray.tune.report(
        {
            **last,
            "step": max(max(e) for e in evals if e),
            "seeds": len(seeds),
            OBJECTIVE: best,
            "final": 1,
        }
    )


# --- layer 3: the search ------------------------------------------------------------------------


def init_ray(num_cpus: int | None = None) -> None:
    """`ray.init` for the CLI and tests: `RAY_ADDRESS` if set, else a local cluster."""
    import ray

    if ray.is_initialized():
        return
    # Worker logs stay in the Ray session's log folder; the search prints its own progress.
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:  # workers import `pipelines` from the project root, whatever the working directory
        root = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": path}},
        )


@dataclass
class SearchResult:
    """What a finished search returns (and prints)."""

    output_dir: Path
    parent_run_id: str
    trials: list[dict[str, Any]]
    stability: list[dict[str, Any]]
    best: dict[str, Any] | None
    ui_link: str


def _tuner(
    trainable: Any,
    plan: TrialPlan,
    name: str,
    tune_config: Any,
    monitor: Any,
    param_space: dict | None = None,
) -> Any:
    from ray import tune

    # The trial driver only waits on its Train runs, so it reserves no CPU of its own (the Train
    # controller is num_cpus=0 too); the workers reserve what `resources` asks for. Tune wants a
    # non-empty bundle, hence a token 1 MiB of memory.
    trainable = tune.with_resources(
        tune.with_parameters(trainable, plan=plan), {"cpu": 0, "memory": 2**20}
    )
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune_config,
        run_config=tune.RunConfig(
            name=name,
            storage_path=plan.storage_path,
            callbacks=[monitor],
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )


def run_search(
    space: SearchSpace,
    *,
    backend: str = DEFAULT_BACKEND,
    output_dir: str | Path | None = None,
    out: Any = None,
) -> SearchResult:
    """Search, re-run the top configs with more seeds, pick the best, record it all in MLflow.

    Needs a running Ray (`init_ray`). The best configuration is the one with the best
    `objective.score(mean, std)` of the objective metric over the stability seeds (or over the
    search seeds when `stability.top_k_configs` is 0).

    Args:
        space: A validated space (`load_search_space`).
        backend: Training backend (`BACKENDS`).
        output_dir: Where results go; default `$GRAPHLORA_HOME/searches/<name>`.
        out: Stream for progress lines (default stdout).

    Raises:
        TrackingError: MLflow is unreachable or misconfigured (checked before any trial).
    """
    import optuna
    import ray
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from pipelines.asha import FlagASHAScheduler, TrialHub
    from pipelines.monitor import SearchMonitor, write_results
    from pipelines.space import DefineByRun

    out = out or sys.stdout
    name = f"{Path(space.path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    output_dir = Path(output_dir or graphlora_home() / "searches" / name).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    storage = os.environ.get("GRAPHLORA_STORAGE_PATH") or str(graphlora_home() / "ray_results")
    tracker = Tracker(space.experiment)
    parent = tracker.start_run(
        f"search {name}",
        params={
            "space_file": space.path,
            "model": space.model,
            "dataset": space.dataset,
            "method": space.method or "searched",
            "backend": backend,
            "trials": space.budget.trials,
            "max_steps": space.budget.max_steps,
            "eval_every": space.budget.eval_every,
            "seeds_per_trial": space.seeds_per_trial,
            "searched": ",".join(space.search),
        },
        tags={"kind": "search"},
    )
    tracker.log_text(parent, yaml.safe_dump(space.raw, sort_keys=False), "space.yaml")
    print(
        f"search {name}: {space.budget.trials} trials of {space.model} on {space.dataset}, "
        f"{space.resources.max_concurrent_trials} at a time; MLflow: {tracker.ui_link()}",
        file=out,
        flush=True,
    )

    _warn_if_too_small(space, out)
    hub = TrialHub.remote()
    try:
        scheduler = FlagASHAScheduler(
            hub,
            time_attr="training_iteration",
            metric=OBJECTIVE,
            mode=space.objective.mode,
            max_t=space.budget.max_evals,
            grace_period=space.asha.grace_period,
            reduction_factor=space.asha.reduction_factor,
        )
        study_storage = f"sqlite:///{output_dir / 'optuna.db'}"
        searcher = OptunaSearch(
            DefineByRun(space),
            metric=OBJECTIVE,
            mode=space.objective.mode,
            sampler=optuna.samplers.TPESampler(seed=space.seed),
            storage=optuna.storages.RDBStorage(study_storage),
            study_name=name,
        )
        plan = TrialPlan(
            space,
            backend,
            tuple(space.seed + i for i in range(space.seeds_per_trial)),
            storage,
            hub,
            VERDICT_WAIT_S,
        )
        monitor = SearchMonitor(
            tracker, parent, space, scheduler=scheduler, out=out, total=space.budget.trials
        )
        _tuner(
            train_driver_fn,
            plan,
            name,
            tune.TuneConfig(
                search_alg=ConcurrencyLimiter(searcher, space.resources.max_concurrent_trials),
                scheduler=scheduler,
                num_samples=space.budget.trials,
                max_concurrent_trials=space.resources.max_concurrent_trials,
            ),
            monitor,
        ).fit()
        trials = monitor.rows()
        monitor.print_table(trials, "search")

        stability = _stability_stage(space, backend, plan, name, trials, tracker, parent, out)
        best = _choose_best(space, trials, stability)
        files = write_results(output_dir, space, trials, stability, best)
        study = optuna.load_study(study_name=name, storage=study_storage)
        from pipelines.tracking import save_optuna_plots

        plots, skipped = save_optuna_plots(study, output_dir / "plots")
        for f in files + plots:
            tracker.log_file(parent, f, "plots" if f in plots else None)
        for reason in skipped:
            print(f"plot skipped: {reason}", file=out)
        if best:
            tracker.log_metrics(parent, {f"best_{k}": v for k, v in best["scores"].items()})
        tracker.finish(parent, "completed")
    except BaseException as exc:
        tracker.finish(parent, "failed", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        ray.kill(hub)
    link = tracker.ui_link()
    if best:
        print(
            f"best: {best['source']}: "
            + " ".join(f"{k}={v:.4g}" for k, v in best["params"].items())
            + " -> "
            + ", ".join(
                f"{k}={v:.4f}" for k, v in best["scores"].items() if not k.endswith("_seeds")
            ),
            file=out,
        )
    print(f"results: {output_dir}\nMLflow runs: {link}", file=out, flush=True)
    return SearchResult(output_dir, parent, trials, stability, best, link)


def _warn_if_too_small(space: SearchSpace, out: Any) -> None:
    """Say so when the cluster cannot hold max_concurrent_trials at once (trials will queue)."""
    import ray

    res = space.resources
    per_trial = {
        "CPU": res.cpus_per_worker * res.workers_per_trial * space.seeds_per_trial,
        "GPU": res.gpus_per_worker * res.workers_per_trial * space.seeds_per_trial,
    }
    have = ray.cluster_resources()
    fits = min((int(have.get(k, 0) // v) for k, v in per_trial.items() if v > 0), default=0)
    if fits < res.max_concurrent_trials:
        print(
            f"warning: the cluster has {have.get('CPU', 0):g} CPU / {have.get('GPU', 0):g} GPU; "
            f"a trial needs {per_trial['CPU']:g} CPU / {per_trial['GPU']:g} GPU, so {fits} of "
            f"max_concurrent_trials={res.max_concurrent_trials} fit at once (an autoscaling "
            "cluster may add nodes)",
            file=out,
            flush=True,
        )


def _stability_stage(
    space: SearchSpace,
    backend: str,
    search_plan: TrialPlan,
    name: str,
    trials: list[dict[str, Any]],
    tracker: Tracker,
    parent: str,
    out: Any,
) -> list[dict[str, Any]]:
    """Re-run the top configs, each seed its own trial (run side by side as resources allow)."""
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
    for rank, t in enumerate(top, start=1):
        group = f"config-{rank}"
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
    plan = dataclasses.replace(search_plan, verdict_wait_s=0.0)  # no ASHA here
    monitor = SearchMonitor(tracker, parent, space, out=out, total=len(runs), stage="stability")
    _tuner(
        train_driver_fn,
        plan,
        f"{name}-stability",
        tune.TuneConfig(num_samples=1, max_concurrent_trials=space.resources.max_concurrent_trials),
        monitor,
        param_space={"_run": tune.grid_search(runs)},
    ).fit()
    return monitor.stability_groups(runs)


def _choose_best(space: SearchSpace, trials: list[dict], stability: list[dict]) -> dict | None:
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


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--space",
        default="search_spaces/quickstart.yaml",
        help="search space YAML (default: %(default)s)",
    )
    parser.add_argument(
        "--backend",
        default=DEFAULT_BACKEND,
        choices=sorted(BACKENDS),
        help="training function to run (default: %(default)s)",
    )
    parser.add_argument("--output-dir", help="results folder (default: $GRAPHLORA_HOME/searches/)")
    args = parser.parse_args(argv)
    try:
        space = load_search_space(args.space, args.backend)
    except SpaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.backend == "standin":
        print(
            "note: training with the TEMPORARY stand-in (pipelines/standin.py), not graphlora",
            file=sys.stderr,
        )
    try:
        Tracker(space.experiment)  # fail fast, before Ray starts
    except TrackingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    init_ray()
    run_search(space, backend=args.backend, output_dir=args.output_dir)
    return 0


if __name__ == "__main__":
    from pipelines.search import main as _main  # run from the module, so Ray pickles by reference

    raise SystemExit(_main())
