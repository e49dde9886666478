"""Promote the winner of a search: train it for real on Ray Train with several seeds, keep every
seed's adapter, record it all in MLflow, and register a model that answers questions.

    graphlora-promote --from-search graphlora-quickstart   # that experiment's latest search
    graphlora-promote --from-search <search run id> --seeds 5
    graphlora-promote --config ~/.graphlora/searches/<name>/best_config.yaml --seeds 0,1,2
    graphlora-promote --from-run <trial run id>   # any trial's configuration, from MLflow

Steps (README, "Promote"): read and validate the best configuration (a `best_config.yaml`, a
finished search run's, or any training run's params with `--from-run`) with the overrides, before
Ray starts or any MLflow run exists (a problem: one `error:` line, exit status 2); train one Ray
Train run per seed (`train_fn_per_worker`, the trials' own code path) with `eval_test` on; log one
MLflow run (tag `graphlora.source_search_run`) with each seed's metrics and adapter; package the
seed with the best validation objective with its pinned base model, log it as a pyfunc model
(`pipelines/serving.py`), register it under `--model-name` and point `--alias` at it.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.best_config import (
    BEST_CONFIG,
    BestConfig,
    PromotionError,
    best_config_from_run,
    best_config_from_search,
    build_configs,
    read_best_config_file,
)
from pipelines.errors import SpaceError, error_line, first_line, traceback_line
from pipelines.evaluate import quiet_progress_bars
from pipelines.records import config_params, log_lineage, routing_warning
from pipelines.schema import Resources, field_names, how_many_fit
from pipelines.stages import PROMOTION, rank_trials
from pipelines.tracking import INTERRUPTED, Tracker, TrackingError, graphlora_home
from pipelines.tuning import init_ray
from pipelines.worker import fast_train_reports

SOURCE_TAG = "graphlora.source_search_run"
DEFAULT_EXPERIMENT = "graphlora-final"  # for --config; --from-search uses the search's experiment
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")
_ALIAS = re.compile(r"^[A-Za-z_][\w-]*$")


@dataclass
class PromotionPlan:
    """Everything `promote` needs, checked: built by `plan_promotion`."""

    best: BestConfig
    adapter: dict[str, Any]
    training: dict[str, Any]  # effective, without seed
    seeds: list[int]
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    worker_retries: int
    model_name: str
    alias: str
    experiment: str
    output_dir: Path

    @property
    def source_ref(self) -> str:
        return self.best.search_run_id or self.best.origin


@dataclass
class PromotionResult:
    """What a finished promotion returns (and prints)."""

    run_id: str
    model_name: str
    version: str
    alias: str
    registered_seed: int
    per_seed: list[dict[str, Any]]  # {"seed", **final metrics}
    summary: dict[str, float]
    output_dir: Path


# --- the plan: every check, before Ray or MLflow runs ------------------------------------------


def parse_seeds(text: str) -> list[int]:
    """`3` -> [0, 1, 2]; `0,1,2` or `7,` -> those seeds."""
    try:
        if "," not in text:
            count = int(text)
            if count < 1:
                raise ValueError
            return list(PROMOTION.seeds(0, count))
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise PromotionError(
            f"--seeds {text}: give a count (3 = seeds 0,1,2) or a comma list (0,1,2; 7, for one)"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise PromotionError(f"--seeds {text}: seeds must be distinct integers >= 0")
    return seeds


def default_model_name(dataset: str) -> str:
    """`graphlora-<dataset>`, a path reduced to its last part."""
    stem = Path(dataset).stem if ("/" in dataset or dataset.endswith(".json")) else dataset
    return "graphlora-" + (re.sub(r"[^\w.-]+", "-", stem).strip("-.") or "model")


def plan_promotion(
    *,
    config: str | Path | None = None,
    from_search: str | None = None,
    from_run: str | None = None,
    seeds: str = "3",
    max_steps: int | None = None,
    epochs: float | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    max_test_examples: int | None = None,
    workers: int | None = None,
    cpus_per_worker: float | None = None,
    gpus_per_worker: float | None = None,
    worker_retries: int | None = None,
    model_name: str | None = None,
    alias: str = "champion",
    experiment: str | None = None,
    output_dir: str | Path | None = None,
) -> PromotionPlan:
    """Read, override and check everything a promotion needs; starts nothing, writes nothing.

    Exactly one of `config` (a best_config.yaml), `from_search` (run id or experiment name) and
    `from_run` (any run that trained a configuration: a search trial, a stability run).
    Resources default to the search space's `resources:` (when known), else 1 worker, 1 CPU.

    Raises:
        PromotionError, SpaceError, TrackingError: One line each.
    """
    from graphlora.data import DataError, load_task
    from graphlora.models import ModelLoadError, check_model_reference

    if sum(x is not None for x in (config, from_search, from_run)) != 1:
        raise PromotionError(
            "give exactly one of --config FILE, --from-search RUN_OR_EXPERIMENT and "
            "--from-run RUN_ID"
        )
    if config:
        best = read_best_config_file(config)
    elif from_search:
        best = best_config_from_search(from_search)
    else:
        best = best_config_from_run(from_run)
    seed_list = parse_seeds(seeds)
    if max_steps is not None and epochs is not None:
        raise PromotionError("give one of --max-steps and --epochs")
    overrides = {
        "dataset": dataset,
        "data_dir": data_dir,
        "max_steps": max_steps,
        "max_test_examples": max_test_examples,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    training = {**best.training, **overrides, "eval_test": PROMOTION.eval_test}
    train_cfg, _ = build_configs(best, training, overridden=set(overrides))
    try:
        data = load_task(train_cfg.dataset, data_dir=train_cfg.data_dir)
        check_model_reference(train_cfg.model, revision=train_cfg.model_revision)
    except (DataError, ModelLoadError) as exc:
        raise PromotionError(first_line(exc)) from exc
    if not data.test:
        raise PromotionError(f"dataset {train_cfg.dataset!r} has no test split to report on")
    if epochs is not None:
        if epochs <= 0:
            raise PromotionError(f"--epochs {epochs}: must be above 0")
        training["max_steps"] = max(1, math.ceil(epochs * len(data.train) / train_cfg.batch_size))
    # The search's resources (their defaults where its space left them out), unless overridden.
    res = Resources(**{k: v for k, v in best.resources.items() if k in field_names(Resources)})
    workers = workers if workers is not None else res.workers_per_trial
    cpus = cpus_per_worker if cpus_per_worker is not None else res.cpus_per_worker
    gpus = gpus_per_worker if gpus_per_worker is not None else res.gpus_per_worker
    if worker_retries is None:
        worker_retries = res.worker_retries
    for flag, value, low in (
        ("--workers", workers, 1),
        ("--cpus-per-worker", cpus, 1e-9),
        ("--gpus-per-worker", gpus, 0),
        ("--worker-retries", worker_retries, 0),
    ):
        if value < low:
            raise PromotionError(f"{flag} {value}: must be {'above 0' if low else '0 or more'}")
    name = model_name or default_model_name(train_cfg.dataset)
    if not _NAME.match(name):
        raise PromotionError(f"--model-name {name}: use letters, digits, '.', '_' and '-'")
    if not _ALIAS.match(alias) or alias == "latest" or re.fullmatch(r"v\d+", alias):
        raise PromotionError(
            f"--alias {alias}: use letters, digits, '_' and '-' (not 'latest' or v<number>)"
        )
    experiment = experiment or best.experiment or DEFAULT_EXPERIMENT
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(output_dir or graphlora_home() / "final" / f"{name}-{stamp}").expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        raise PromotionError(f"--output-dir {out}: not empty; choose a new folder")
    return PromotionPlan(
        best=best,
        adapter=dict(best.adapter),
        training=training,
        seeds=seed_list,
        workers=workers,
        cpus_per_worker=cpus,
        gpus_per_worker=gpus,
        worker_retries=worker_retries,
        model_name=name,
        alias=alias,
        experiment=experiment,
        output_dir=out,
    )


# --- the promotion ------------------------------------------------------------------------------


def _fit_seed(plan: PromotionPlan, seed: int, storage: str, run_name: str) -> Any:
    """One Ray Train run of one seed; returns its `Result` (metrics + adapter checkpoint)."""
    from pipelines.worker import fit_seed, seed_trainer

    config = {
        "adapter": plan.adapter,
        "training": {**plan.training, "seed": seed},  # eval_test: the plan's (PROMOTION)
        "save_adapter": True,
    }
    trainer = seed_trainer(
        config,
        name=f"{run_name}-seed{seed}",
        storage_path=storage,
        workers=plan.workers,
        cpus_per_worker=plan.cpus_per_worker,
        gpus_per_worker=plan.gpus_per_worker,
        worker_retries=plan.worker_retries,
    )
    return fit_seed(trainer)


def _side_by_side(plan: PromotionPlan, out: Any) -> int:
    """How many seeds fit on the cluster at once (at least 1; say so when not even one does)."""
    import ray

    need = {"CPU": plan.cpus_per_worker * plan.workers, "GPU": plan.gpus_per_worker * plan.workers}
    have = ray.cluster_resources()
    fits = how_many_fit(have, need, default=1)
    if fits < 1:
        print(
            f"warning: a seed needs {need['CPU']:g} CPU / {need['GPU']:g} GPU and the cluster has "
            f"{have.get('CPU', 0):g} / {have.get('GPU', 0):g}; waiting for nodes",
            file=out,
            flush=True,
        )
    return max(1, min(fits, len(plan.seeds)))


def _pick_seed(plan: PromotionPlan, per_seed: list[dict[str, Any]]) -> int:
    """Index of the seed to register: best validation objective (never test), first on a tie."""
    metric, mode = plan.best.objective["metric"], plan.best.objective["mode"]
    values = [m.get(metric) for m in per_seed]
    if any(not isinstance(v, int | float) for v in values):
        return 0
    return rank_trials([{"i": i, metric: v} for i, v in enumerate(values)], mode, metric)[0]["i"]


def _train_seeds(
    plan: PromotionPlan, tracker: Tracker, run_id: str, run_name: str, out: Any
) -> list[dict[str, Any]]:
    """Every seed's Ray Train run, side by side as resources allow; each finished seed's metrics
    (at step = seed index) and adapter go to the MLflow run at once. Returns `{"seed", **final}`
    per seed, in seed order."""
    storage = os.environ.get("GRAPHLORA_STORAGE_PATH") or str(graphlora_home() / "ray_results")
    fast_train_reports()
    per_seed: list[dict[str, Any]] = [{} for _ in plan.seeds]
    started = time.monotonic()
    with ThreadPoolExecutor(_side_by_side(plan, out), thread_name_prefix="seed") as pool:
        jobs = {
            pool.submit(_fit_seed, plan, seed, storage, run_name): i
            for i, seed in enumerate(plan.seeds)
        }
        try:
            for done, job in enumerate(as_completed(jobs), start=1):
                i = jobs[job]
                seed, result = plan.seeds[i], job.result()
                if result.checkpoint is None:
                    raise RuntimeError(f"seed {seed}: its Train run returned no adapter")
                folder = plan.output_dir / f"seed{seed}"
                result.checkpoint.to_directory(str(folder))
                metrics = {k: v for k, v in result.metrics.items() if k not in ("final", "step")}
                per_seed[i] = {"seed": seed, **metrics}
                tracker.log_metrics(run_id, metrics, step=i)
                tracker.client.log_artifacts(run_id, str(folder), f"adapters/seed{seed}")
                print(
                    f"seed {seed} ({done}/{len(plan.seeds)}): "
                    f"test_accuracy={metrics['test_accuracy']:.4f} "
                    f"val_accuracy={metrics.get('val_accuracy', float('nan')):.4f} "
                    f"[{time.monotonic() - started:.0f} s]",
                    file=out,
                    flush=True,
                )
        except BaseException:
            for job in jobs:  # seeds still queued do not start; running ones finish
                job.cancel()
            raise
    return per_seed


def _register(
    plan: PromotionPlan, run_id: str, chosen: dict[str, Any], summary: dict[str, float]
) -> str:
    """Package the chosen seed's adapter with its base model, log and register it; the version."""
    from graphlora.inference import package_model
    from pipelines.serving import log_and_register

    t = plan.training
    facts = {
        "training_run_id": run_id,
        "source_search_run": plan.source_ref,
        "seed": chosen["seed"],
        "test_accuracy": chosen["test_accuracy"],
        "dataset": t["dataset"],
        "data_dir": t.get("data_dir"),
        "max_test_examples": t.get("max_test_examples"),
    }
    model_dir = package_model(
        plan.output_dir / f"seed{chosen['seed']}",
        plan.output_dir / "model",
        max_length=t.get("max_length", 512),
        batch_size=t.get("eval_batch_size", 64),
        metadata=facts,
    )
    return log_and_register(
        run_id,
        model_dir,
        name=plan.model_name,
        alias=plan.alias,
        metadata=facts,
        description=(
            f"{plan.adapter.get('method')} adapter on {t['model']} for {t['dataset']}, seed "
            f"{chosen['seed']} (test_accuracy {chosen['test_accuracy']:.4f}; over seeds "
            f"{summary['test_accuracy_mean']:.4f} +- {summary.get('test_accuracy_std', 0):.4f}), "
            f"promoted from {plan.source_ref}"
        ),
    )


def _drop_versions(model_name: str, run_id: str) -> list[str]:
    """Delete the versions of `model_name` registered from `run_id` (a registration cut short:
    the version exists but its tags or alias may not); returns the versions deleted."""
    import mlflow

    client = mlflow.MlflowClient()
    try:
        versions = client.search_model_versions(f"name='{model_name}' and run_id='{run_id}'")
    except Exception:  # no such registered model: nothing was registered
        return []
    for v in versions:
        client.delete_model_version(model_name, v.version)
    return [v.version for v in versions]


def promote(plan: PromotionPlan, *, out: Any = None) -> PromotionResult:
    """Train the plan's seeds on Ray Train, record the run in MLflow, register the model.

    Needs a running Ray (`init_ray`). The MLflow run is marked failed if anything fails, or
    `interrupted` (MLflow KILLED) on Ctrl-C (`KeyboardInterrupt`), and no model version is
    registered then: a version registered from this run before the stop is deleted again.
    """
    from graphlora.train import summarize_seeds

    out = out or sys.stdout
    tracker = Tracker(plan.experiment)
    t, seeds = plan.training, ",".join(map(str, plan.seeds))
    run_name = f"final-{plan.model_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id = tracker.start_run(
        run_name,
        params={
            "source": plan.source_ref,
            "seeds": seeds,
            "workers": plan.workers,
            "gpus_per_worker": plan.gpus_per_worker,
            **config_params(plan.adapter, t),  # as trial and stability runs
        },
        tags={
            "kind": PROMOTION.kind,
            SOURCE_TAG: plan.source_ref,
            "graphlora.source": plan.best.source,
        },
    )
    log_lineage(tracker, run_id, t, PROMOTION.splits)
    tracker.log_text(run_id, plan.best.text, BEST_CONFIG)
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"promote {plan.best.origin}: {plan.adapter.get('method')} on {t['model']} / "
        f"{t['dataset']}, {t['max_steps']} steps, seeds {seeds}; MLflow: {tracker.ui_link()}",
        file=out,
        flush=True,
    )
    if note := routing_warning(plan.best.routing):
        print(note, file=out, flush=True)
    try:
        per_seed = _train_seeds(plan, tracker, run_id, run_name, out)
        summary = summarize_seeds(per_seed)
        tracker.log_metrics(run_id, summary)
        chosen = per_seed[_pick_seed(plan, per_seed)]
        version = _register(plan, run_id, chosen, summary)
        tracker.set_tags(
            run_id,
            {
                "graphlora.registered_model": f"{plan.model_name}/{version}",
                "graphlora.registered_seed": chosen["seed"],
            },
        )
        tracker.finish(run_id, "completed")
    except BaseException as exc:
        _drop_versions(plan.model_name, run_id)  # a half-done registration, if any
        if isinstance(exc, KeyboardInterrupt):
            why = f"stopped ({first_line(exc)}) before the model was registered"
            tracker.finish(run_id, INTERRUPTED, why)
        else:
            tracker.finish(run_id, "failed", error_line(exc))
        raise
    print(
        f"final: test_accuracy {summary['test_accuracy_mean']:.4f} +- "
        f"{summary.get('test_accuracy_std', 0):.4f} over seeds {seeds}\n"
        f"registered: models:/{plan.model_name}@{plan.alias} = version {version} "
        f"(seed {chosen['seed']}, test_accuracy {chosen['test_accuracy']:.4f})\n"
        f"adapters: {plan.output_dir}\nMLflow run {run_id}: {tracker.ui_link()}",
        file=out,
        flush=True,
    )
    return PromotionResult(
        run_id,
        plan.model_name,
        version,
        plan.alias,
        chosen["seed"],
        per_seed,
        summary,
        plan.output_dir,
    )


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2: nothing started, 1: training failed)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="a best_config.yaml written by a search")
    src.add_argument(
        "--from-search",
        metavar="RUN_OR_EXPERIMENT",
        help="an MLflow search run id, or an experiment name (its latest finished search)",
    )
    src.add_argument(
        "--from-run",
        metavar="RUN_ID",
        help="any MLflow run that trained a configuration (a search trial, a stability run): "
        "its params are its full configuration",
    )
    parser.add_argument(
        "--seeds", default="3", help="a count (3 = seeds 0,1,2) or a list (0,1,2); default 3"
    )
    steps = parser.add_mutually_exclusive_group()
    steps.add_argument("--max-steps", type=int, help="optimizer steps (default: the search's)")
    steps.add_argument(
        "--epochs", type=float, help="passes over the train split (sets max_steps from its size)"
    )
    parser.add_argument("--dataset", help="task name or path (default: the search's)")
    parser.add_argument(
        "--data-dir",
        help="folder with one LLM-Adapters folder per task (ARC-Challenge/train.json, test.json); "
        "default: the search's, else $GRAPHLORA_DATA_DIR, else the copy shipped with graphlora",
    )
    parser.add_argument("--max-test-examples", type=int, help="cap on test examples (default all)")
    parser.add_argument("--workers", type=int, help="Ray Train workers per seed (DDP)")
    parser.add_argument("--cpus-per-worker", type=float)
    parser.add_argument("--gpus-per-worker", type=float)
    parser.add_argument(
        "--worker-retries", type=int, help="restarts of a seed's run when a worker dies (2)"
    )
    parser.add_argument("--model-name", help="registered model name (default graphlora-<dataset>)")
    parser.add_argument("--alias", default="champion", help="registry alias (default: %(default)s)")
    parser.add_argument(
        "--experiment", help=f"MLflow experiment (default: the search's, else {DEFAULT_EXPERIMENT})"
    )
    parser.add_argument(
        "--output-dir", help="where the adapters go (default $GRAPHLORA_HOME/final/<name>-<time>)"
    )
    args = parser.parse_args(argv)
    quiet_progress_bars()  # they would break the one-line errors and clutter the progress lines
    try:
        plan = plan_promotion(**{k: v for k, v in vars(args).items() if v is not None})
        Tracker(plan.experiment)  # fail fast on the store, before Ray starts
    except (PromotionError, SpaceError, TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    init_ray()
    # SIGTERM (`ray job stop`, a scheduler) stops a promotion as Ctrl-C does: nothing registered.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        promote(plan)
    except KeyboardInterrupt as exc:
        args = sys.argv[1:] if argv is None else argv
        again = shlex.join(["graphlora-promote", *args])
        print(f"interrupted: nothing was registered; run it again with: {again}", flush=True)
        return 143 if exc.args == ("SIGTERM",) else 130
    except Exception as exc:
        print(f"error: promotion failed: {traceback_line(str(exc))}", file=sys.stderr)
        return 1
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


if __name__ == "__main__":
    from pipelines.promote import main as _main  # run from the module, so Ray pickles by reference

    raise SystemExit(_main())
