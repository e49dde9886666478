"""Hyperparameter search for GraphLoRA on Ray: Tune (Optuna TPE + ASHA) over Ray Train runs.

The layers, one file each, imports flowing one way (the space's schema and validation, and the
stages' rules <- worker <- trial <- tuning, stability <- search), as in Ray's own Train + Tune
docs; each is callable on its own:

- `pipelines/worker.py`, `train_fn_per_worker(config)`: runs on every Ray Train worker; calls the
  library's `run_training` with an `on_eval` callback that does `ray.train.report` and reads the
  ASHA stop flag (see `pipelines/asha.py` for why stopping is a flag).
- `pipelines/trial.py`, `train_driver_fn(config, plan)`: one Tune trial; launches one
  `TorchTrainer` per seed side by side, gathers their evaluations and reports the seed mean/std
  and the trial's `objective` (its last evaluation's score) with `ray.tune.report`.
- `pipelines/tuning.py`: one Tune run over trial drivers (new or restored), the local Ray, and the
  stop on Ctrl-C / SIGTERM, and the Optuna define-by-run space; `pipelines/stability.py`: the
  stability stage and the best config; `pipelines/stages.py`: what each stage evaluates, its
  seeds, and the one ranking of trials.
- here, `run_search(space, ...)`: the Tuner with `OptunaSearch` (seeded TPE, define-by-run space),
  `FlagASHAScheduler` and a `ConcurrencyLimiter`; then the stability stage (top configs again,
  with fresh seeds), the best config YAML and the MLflow record; and the CLI.

CLI (validation happens before Ray starts; `ray.init` only here)::

    graphlora-search [--space quickstart]      # or: python pipelines/search.py [--space ...]

Connects to `RAY_ADDRESS` when set, else starts a local Ray. Outputs go to
`$GRAPHLORA_HOME/searches/<name>/` (default `~/.graphlora`) and to MLflow (`pipelines/tracking.py`).
Train runs store under `$GRAPHLORA_STORAGE_PATH` (default `$GRAPHLORA_HOME/ray_results`); a
multi-node cluster needs shared storage there (e.g. `s3://bucket/graphlora`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipelines import storage as optuna_db
from pipelines.console import library_output_to_log, log_to
from pipelines.errors import SpaceError, first_line
from pipelines.host import HostPool, HostsError, hosts_for
from pipelines.records import routing_warning
from pipelines.schema import SearchSpace
from pipelines.stability import choose_best, run_stability_stage
from pipelines.stages import SEARCH
from pipelines.storage import StorageError
from pipelines.summary import describe_search, search_cost, search_pictures
from pipelines.tracking import (
    INTERRUPTED,
    JOURNAL,
    STOPPED_EARLY_ASHA,
    StoreLost,
    Tracker,
    TrackingError,
    graphlora_home,
)
from pipelines.trial import OBJECTIVE, TrialPlan, train_driver_fn
from pipelines.tuning import (
    SearchInterrupted,
    StopSignals,
    check_ray_address,
    database_lost,
    fit_experiment,
    init_ray,
    optuna_search_class,
)
from pipelines.validate import DEFAULT_SPACE, load_search_space, shipped_spaces
from pipelines.worker import VERDICT_WAIT_S

__all__ = [
    "SearchResult",
    "find_search",
    "init_ray",
    "load_search_space",
    "main",
    "preflight",
    "run_search",
]


@dataclass
class SearchResult:
    """What a finished search returns (and prints)."""

    output_dir: Path
    parent_run_id: str
    trials: list[dict[str, Any]]
    stability: list[dict[str, Any]]
    best: dict[str, Any] | None
    ui_link: str


STATE_FILE = "search.json"  # in a search's output folder: what `--resume` needs


def _write_state(output_dir: Path, state: dict[str, Any]) -> None:
    tmp = output_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(output_dir / STATE_FILE)  # never half a state file


def find_search(ref: str | Path) -> Path:
    """A search's output folder from its name (`$GRAPHLORA_HOME/searches/<name>`) or its path.

    Raises:
        SpaceError: no resumable search there (one line saying what to do).
    """
    for folder in (Path(ref), graphlora_home() / "searches" / str(ref)):
        if (folder / STATE_FILE).is_file():
            return folder.resolve()
    raise SpaceError(
        f"--resume {ref}: no search found (looked for {STATE_FILE} in {ref} and in "
        f"{graphlora_home() / 'searches' / str(ref)}); pass a search name printed at its start "
        "or its results folder"
    )


def run_search(
    space: SearchSpace,
    *,
    output_dir: str | Path | None = None,
    out: Any = None,
    resume: bool = False,
    more_trials: int | None = None,
    warm_start: Any = None,
    optuna_storage: str | None = None,
) -> SearchResult:
    """Search, re-run the top configs with more seeds, pick the best, record it all in MLflow.

    Needs a running Ray (`init_ray`). The best configuration is the one with the best
    `objective.score(mean, std)` of the objective metric over the stability seeds (or over the
    search seeds when `stability.top_k_configs` is 0).

    Args:
        space: A validated space (`load_search_space`).
        output_dir: Where results go; default `$GRAPHLORA_HOME/searches/<name>`.
        out: Stream for progress lines (default stdout).
        resume: Continue the search whose `search.json` is in `output_dir` (same MLflow parent
            run, same trials: finished ones are kept, unfinished ones continue from their last
            checkpoint, the Optuna history is kept).
        more_trials: With `resume`, extend a finished search by this many trials: a new Tune
            experiment (`<name>-more<k>`) under the same search run, whose Optuna study is the
            search's own (every earlier trial known, none re-run) and whose ASHA rungs hold the
            earlier trials; then the stability stage runs again over the top configs of all
            trials (its runs tagged `round=<k>`), and the best config is chosen again.
        warm_start: A `pipelines.warm_start.WarmStart`: a new search's Optuna study starts with
            those earlier trials (no retraining).
        optuna_storage: A database URL for the Optuna study (`pipelines/storage.py`; default
            `$GRAPHLORA_OPTUNA_STORAGE`, else `space.optuna_storage`, else `optuna.db` in
            `output_dir`). A resume must name the study's database again.

    Raises:
        TrackingError: MLflow is unreachable or misconfigured (checked before any trial).
        StorageError: the Optuna database is unreachable, or not the one a resumed search
            started with (checked before any trial).
        HostsError: with trial hosts, no node of the cluster holds one (before anything).
        SearchInterrupted: SIGINT (Ctrl-C) or SIGTERM stopped it (when run in the main
            thread); the running trials and the search's MLflow runs say `interrupted`, and
            `resume=True` continues it.
    """
    import optuna
    import ray
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from pipelines.asha import FlagASHAScheduler, HubRef
    from pipelines.monitor import SearchMonitor, format_params, write_results
    from pipelines.tuning import DefineByRun

    _OptunaSearch = optuna_search_class()  # noqa: N806 - a class
    out = out or sys.stdout
    # Tune snapshots its state after every trial checkpoint (what makes resume exact) and warns
    # about it when evaluations come fast; the snapshots are small.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # With trial hosts, a cluster with no room for one is refused before anything starts.
    host_count = hosts_for(space) if space.resources.trials_per_host else 0
    tracker = Tracker(space.experiment)
    tracker.on_lost = database_lost  # a store that stops answering stops the search, resumable
    optuna_storage = optuna_db.resolve(optuna_storage, space.optuna_storage)
    if optuna_storage:
        optuna_db.check(optuna_storage)
    if resume:
        output_dir = Path(output_dir).resolve()
        state = json.loads((output_dir / STATE_FILE).read_text())
        optuna_db.for_resume(state.get("optuna_storage"), optuna_storage)
        name, parent = state["name"], state["parent_run_id"]
        log_to(output_dir)
        tracker.journal = output_dir / JOURNAL
        if replayed := tracker.replay():
            print(f"search {name}: wrote {replayed} records MLflow had missed", file=out)
        tracker.reopen(parent)
        if more_trials:  # extend a finished search (a resumed extension keeps its round)
            state["round"] = state.get("round", 0) + 1
            state["round_trials"] = more_trials
            state["finished"] = False
            _write_state(output_dir, state)
        state["resumes"] = state.get("resumes", 0) + 1
        _write_state(output_dir, state)  # counted even if this run is interrupted too
        tracker.set_tags(parent, {"status": "running", "resumes": state["resumes"]})
        earlier = tracker.child_runs(parent)
        print(f"search {name}: resuming ({len(earlier)} runs recorded so far)", file=out)
    else:
        name = f"{Path(space.path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        output_dir = Path(output_dir or graphlora_home() / "searches" / name).resolve()
        output_dir.mkdir(parents=True, exist_ok=True)
        log_to(output_dir)
        tracker.journal = output_dir / JOURNAL
        storage = os.environ.get("GRAPHLORA_STORAGE_PATH") or str(graphlora_home() / "ray_results")
        parent = tracker.start_run(
            f"search {name}",
            params={
                "space_file": space.path,
                "model": space.model,
                "dataset": space.dataset,
                "method": space.method or "searched",
                "trials": space.budget.trials,
                "max_steps": space.budget.max_steps,
                "eval_every": space.budget.eval_every,
                "seeds_per_trial": space.seeds_per_trial,
                "searched": ",".join(space.search),
            },
            tags={"kind": "search", "status": "running", "search_name": name},
        )
        from pipelines.records import log_lineage

        log_lineage(tracker, parent, space.configs({}, space.seed)[1], SEARCH.splits)
        space_text = yaml.safe_dump(space.raw, sort_keys=False)
        (output_dir / "space.yaml").write_text(space_text)
        tracker.log_text(parent, space_text, "space.yaml")
        if warm_start is not None:
            tracker.set_tags(parent, {"warm_start_from": warm_start.run_id})
        state = {
            "name": name,
            "space_file": space.path,
            "experiment": space.experiment,
            "parent_run_id": parent,
            "storage_path": storage,
        }
        if optuna_storage:
            state["optuna_storage"] = optuna_db.masked(optuna_storage)  # never the password
        _write_state(output_dir, state)
        earlier = []
        print(
            f"search {name}: {space.budget.trials} trials of {space.model} on {space.dataset}; "
            f"MLflow: {tracker.ui_link()}\n"
            f"  interrupted? continue with: graphlora-search --resume {name}",
            file=out,
            flush=True,
        )
    storage = state["storage_path"]
    round_ = state.get("round", 0)  # 0: the search as started; k: its k-th extension
    experiment = name if not round_ else f"{name}-more{round_}"
    new_trials = state["round_trials"] if round_ else space.budget.trials

    _warn_if_too_small(space, out)
    # By name (recreated here on every start): Tune saves the scheduler and the trial plan, and
    # a resume may run on another Ray cluster than the one the search started on.
    hub = HubRef.start(f"trial-hub:{name}")
    hosts = None
    stop_signals = StopSignals(name)
    stop_signals.install()
    try:
        if space.resources.trials_per_host:
            hosts = HostPool(space, name, storage, hub, host_count)
            hosts.start()
        concurrent = space.resources.concurrent_trials(
            hosts.count if hosts else 0,
            space.seeds_per_trial,
            "max_concurrent_trials" in (space.raw.get("resources") or {}),
        )
        print(
            f"{concurrent} trial(s) at a time"
            + (
                f", packed on {hosts.count} trial host(s) of {hosts.capacity} slots"
                + (f" and {hosts.workers} workers" if hosts.workers > 1 else "")
                + f", each loading {space.model} once"
                if hosts
                else ""
            ),
            file=out,
            flush=True,
        )
        scheduler = FlagASHAScheduler(
            hub,
            time_attr="training_iteration",
            metric=OBJECTIVE,
            mode=space.objective.mode,
            max_t=space.budget.max_evals,
            grace_period=space.asha.grace_period,
            reduction_factor=space.asha.reduction_factor,
        )
        study_storage = optuna_storage or optuna_db.default_url(output_dir)
        if warm_start is not None and not resume:
            from pipelines.warm_start import seed_study

            seed_study(
                warm_start,
                study_storage,
                name,
                optuna_objectives(space)[1],
                optuna.samplers.TPESampler(seed=space.seed),
            )
            print(
                f"warm start: {len(warm_start.trials)} trials of search {warm_start.name} in "
                "the Optuna study",
                file=out,
                flush=True,
            )
        metrics, modes = optuna_objectives(space)
        searcher = _OptunaSearch(
            DefineByRun(space),
            metric=metrics if len(metrics) > 1 else metrics[0],
            mode=modes if len(modes) > 1 else modes[0],
            sampler=optuna.samplers.TPESampler(seed=space.seed),
            storage=optuna_db.open_storage(study_storage),
            study_name=name,
        )
        plan = TrialPlan(
            space,
            SEARCH.seeds(space.seed, space.seeds_per_trial),
            storage,
            hub,
            VERDICT_WAIT_S,
            board=hosts.board if hosts else None,
            concurrent_trials=concurrent,
        )
        monitor = SearchMonitor(
            tracker,
            parent,
            space,
            scheduler=scheduler,
            out=out,
            total=new_trials + sum(1 for r in earlier if r.data.tags.get("kind") == "search"),
        )
        monitor.adopt_runs(earlier)
        plan = dataclasses.replace(plan, ended=monitor.ended())
        # ASHA's earlier cuts still hold, and its rungs hold what they held.
        scheduler.restore_rungs({t: r.get("objectives", []) for t, r in monitor.records.items()})
        for rec in monitor.records.values():
            if rec["status"] == STOPPED_EARLY_ASHA:
                scheduler.stop_reasons[rec["trial_id"]] = rec["reason"]
                ray.get(hub.request_stop.remote(rec["trial_id"], rec["reason"]))
        fit_experiment(
            train_driver_fn,
            plan,
            experiment,
            tune.TuneConfig(
                search_alg=ConcurrencyLimiter(searcher, concurrent),
                scheduler=scheduler,
                num_samples=new_trials,
            ),
            monitor,
        )
        monitor.close_unfinished()
        trials = monitor.rows()
        monitor.print_table(trials, "search")

        stability, stability_cost = run_stability_stage(
            space, plan, name, trials, tracker, parent, out, earlier, round_=round_
        )
        best = choose_best(space, trials, stability)
        files = write_results(output_dir, space, trials, stability, best)
        study = optuna.load_study(study_name=name, storage=study_storage)
        plots, skipped = search_pictures(
            space, monitor, trials, stability, study, output_dir / "plots"
        )
        for f in files + plots:
            tracker.log_file(parent, f, "plots" if f in plots else None)
        for reason in skipped:
            print(f"plot skipped: {reason}", file=out)
        if best:
            tracker.log_metrics(parent, {f"best_{k}": v for k, v in best["scores"].items()})
        cost = search_cost(monitor.cost(), stability_cost)
        if hosts is not None:
            cost.update(hosts.stats())
        tracker.log_metrics(parent, cost)
        tracker.set_tags(
            parent,
            {"mlflow.note.content": describe_search(space, name, trials, best, cost, plots)},
        )
        tracker.finish(parent, "completed")
        _write_state(output_dir, {**state, "finished": True})
    except SearchInterrupted as exc:
        # Trial runs were closed by their stage's monitor; what else is open (a stability
        # config's run) and the search's own run say `interrupted` too. search.json stays
        # unfinished, so `--resume` continues. With the store lost, what it could not take
        # waits in the journal (`--resume` writes it first).
        for run in _open_runs(tracker, parent):
            tracker.finish(run.info.run_id, INTERRUPTED, str(exc))
        tracker.finish(parent, INTERRUPTED, str(exc))
        print(f"search {name}: {exc}; its state is saved", file=out, flush=True)
        raise
    except BaseException as exc:
        # The search itself died (e.g. Ray killed its actors for memory): no run it opened is
        # left `running` in MLflow.
        reason = f"{type(exc).__name__}: {exc}"
        for run in _open_runs(tracker, parent):
            tracker.finish(run.info.run_id, "failed", f"the search failed: {reason}")
        tracker.finish(parent, "failed", reason)
        raise
    finally:
        stop_signals.restore()
        if hosts is not None:
            hosts.close(abort=sys.exc_info()[0] is not None)
        ray.kill(hub.handle)
    link = tracker.ui_link()
    if best:
        print(
            f"best: {best['source']}: {format_params(best['params'])} -> "
            + ", ".join(
                f"{k}={v:.4f}" for k, v in best["scores"].items() if not k.endswith("_seeds")
            ),
            file=out,
        )
        if note := routing_warning(best.get("routing") or {}):
            print(note, file=out)
        if not stability:
            print(
                "test: not evaluated (search trials are chosen on validation only); the "
                "stability stage (stability.top_k_configs > 0) or promotion "
                "(graphlora-promote) reports the test split",
                file=out,
            )
    print(f"results: {output_dir}\nMLflow runs: {link}", file=out, flush=True)
    return SearchResult(output_dir, parent, trials, stability, best, link)


def _open_runs(tracker: Tracker, parent: str) -> list[Any]:
    """The search's child runs still RUNNING; none when the store is lost (the monitor's own
    closing writes wait in the journal)."""
    try:
        return [r for r in tracker.child_runs(parent) if r.info.status == "RUNNING"]
    except StoreLost:
        return []


def optuna_objectives(space: SearchSpace) -> tuple[list[str], list[str]]:
    """What Optuna optimises: the trial's `objective`, and `objective.secondary` when set (a
    multi-objective study: Optuna searches the Pareto front; ASHA judges the first only)."""
    metrics, modes = [OBJECTIVE], [space.objective.mode]
    if space.objective.secondary:
        metrics.append(space.objective.secondary["metric"])
        modes.append(space.objective.secondary["mode"])
    return metrics, modes


def _warn_if_too_small(space: SearchSpace, out: Any) -> None:
    """Say so when the cluster cannot hold max_concurrent_trials (or the trial hosts) at once
    (trials will queue)."""
    import ray

    res = space.resources
    per_trial = {
        "CPU": res.cpus_per_worker * res.workers_per_trial * space.seeds_per_trial,
        "GPU": res.gpus_per_worker * res.workers_per_trial * space.seeds_per_trial,
    }
    have = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    print(
        f"Ray: {len(nodes)} node{'s' if len(nodes) != 1 else ''}, {have.get('CPU', 0):g} CPU, "
        f"{have.get('GPU', 0):g} GPU",
        file=out,
        flush=True,
    )
    if res.trials_per_host:
        return  # the host pool is sized to the nodes (`hosts_for`), or refuses
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


def preflight(space: SearchSpace) -> None:
    """What every trial would otherwise fail on: the model reference and the dataset (and, with
    trial hosts, a model that cannot be packed; on GPUs, a largest trial that does not fit).

    Raises:
        SpaceError: one line naming the file and key.
    """
    from graphlora.data import load_task
    from graphlora.models import ModelLoadError, check_model_reference
    from pipelines.memory_check import check_memory

    try:
        check_model_reference(space.model, revision=space.training.get("model_revision"))
    except ModelLoadError as exc:
        raise SpaceError(f"{space.path}: model: {exc}") from None
    try:
        data = load_task(space.dataset, data_dir=space.data_dir)
    except (ValueError, OSError) as exc:  # DataError is a ValueError
        raise SpaceError(f"{space.path}: dataset: {exc}") from None
    if not data.train or not data.validation:
        raise SpaceError(f"{space.path}: dataset: {space.dataset} has no train or validation data")
    if space.resources.trials_per_host:
        from graphlora.packed_train import packing_problem

        problem = packing_problem(space.model, revision=space.training.get("model_revision"))
        if problem:
            raise SpaceError(
                f"{space.path}: resources.trials_per_host: {problem}, or set trials_per_host: 0"
            )
    check_memory(space, sys.stdout)  # a GPU space: its largest trial's memory plan


def main(argv: list[str] | None = None, *, own_console: bool = False) -> int:
    """CLI entry point; returns the exit status. `own_console`: the libraries' log lines go to
    the search's driver.log (`pipelines/console.py`), as the installed command does."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--space",
        default=DEFAULT_SPACE,
        help="a search space YAML, or the name of a shipped space ("
        + ", ".join(shipped_spaces())
        + "); default: %(default)s",
    )
    parser.add_argument(
        "--resume",
        metavar="SEARCH",
        help="continue an interrupted search: its name (printed when it started) or its "
        "results folder; finished trials are kept, unfinished ones continue from their last "
        "checkpoint (--space is then ignored: the space as first run is used); with --trials N, "
        "extend a finished search by N more trials under the same search run (finished trials "
        "are known to Optuna and ASHA, none re-run; the stability stage runs again)",
    )
    parser.add_argument(
        "--warm-start",
        metavar="SEARCH",
        help="start a new search's Optuna study with an earlier search's finished trials (its "
        "name or search run id; read from MLflow, nothing retrained); the spaces must search "
        "the same parameters for the same objective",
    )
    parser.add_argument("--output-dir", help="results folder (default: $GRAPHLORA_HOME/searches/)")
    parser.add_argument(
        "--optuna-storage",
        metavar="URL",
        help="the Optuna study in a shared database, e.g. postgresql://USER@HOST:5432/DB "
        "(password in PGPASSWORD or ~/.pgpass); default: $GRAPHLORA_OPTUNA_STORAGE, else the "
        "space's optuna_storage, else optuna.db in the results folder",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="validate the space and print what it would run (trials, searched parameters, ASHA "
        "rungs, resources, trial hosts), then exit; starts no Ray and records nothing",
    )
    parser.add_argument(
        "--list",
        action="store_true",
        help="list the searches in the MLflow store ($MLFLOW_TRACKING_URI, default "
        "$GRAPHLORA_HOME/mlflow.db): status, trials, best objective; starts no Ray",
    )
    flags = {  # flag -> the space entry it overrides
        "trials": ("budget", "trials"),
        "max_steps": ("budget", "max_steps"),
        "eval_every": ("budget", "eval_every"),
        "stability_configs": ("stability", "top_k_configs"),
        "trials_per_host": ("resources", "trials_per_host"),
    }
    for key, (section, field) in flags.items():
        parser.add_argument(
            f"--{key.replace('_', '-')}",
            type=int,
            help=f"override the space's {section}.{field} (e.g. a quick smoke test of a space)",
        )
    args = parser.parse_args(argv)
    if args.list:
        from pipelines.overview import print_searches, searches

        if own_console:
            library_output_to_log()

        try:
            print_searches(*searches(), out=sys.stdout)
        except TrackingError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    overrides: dict[str, dict[str, int]] = {}
    for key, (section, field) in flags.items():
        if getattr(args, key) is not None:
            overrides.setdefault(section, {})[field] = getattr(args, key)
    # Everything that can be checked is checked before Ray starts or MLflow records anything.
    try:
        warm = None
        if args.resume:
            if args.warm_start:
                raise SpaceError("--warm-start starts a new search; --resume continues one")
            folder = find_search(args.resume)
            state = json.loads((folder / STATE_FILE).read_text())
            if args.trials is not None and args.trials < 1:
                raise SpaceError(f"--trials {args.trials}: must be 1 or more")
            if state.get("finished") and not args.trials:
                raise SpaceError(
                    f"--resume {args.resume}: that search has already finished; add --trials N "
                    "to extend it by N trials"
                )
            if args.trials and not state.get("finished"):
                raise SpaceError(
                    f"--resume {args.resume} --trials {args.trials}: that search has not "
                    f"finished; continue it first with --resume {args.resume}"
                )
            space = load_search_space(folder / "space.yaml")
            space = dataclasses.replace(space, path=state["space_file"])
        else:
            space = load_search_space(args.space, overrides=overrides)
        optuna_storage = optuna_db.resolve(args.optuna_storage, space.optuna_storage)
        if args.plan:
            from pipelines.overview import print_plan

            preflight(space)
            print_plan(space, sys.stdout)
            return 0
        if own_console:  # from here MLflow and Optuna speak (tables, studies); not before:
            library_output_to_log()  # a bad space or --plan does not pay for importing them
        if args.resume:
            optuna_db.for_resume(state.get("optuna_storage"), optuna_storage)
        if optuna_storage:
            optuna_db.check(optuna_storage)
        preflight(space)
        check_ray_address()
        tracker = Tracker(space.experiment)
        if args.warm_start:
            from pipelines.warm_start import load_warm_start

            warm = load_warm_start(space, args.warm_start, tracker.client)
    except (SpaceError, TrackingError, StorageError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        init_ray()
    except (ConnectionError, RuntimeError) as exc:
        print(f"error: cannot connect to Ray: {first_line(exc)}", file=sys.stderr)
        return 2
    if own_console:
        library_output_to_log()  # again: ray.init may have configured Ray's loggers anew
    try:
        if args.resume:
            run_search(
                space,
                output_dir=folder,
                resume=True,
                more_trials=args.trials,
                optuna_storage=optuna_storage,
            )
        else:
            run_search(
                space, output_dir=args.output_dir, warm_start=warm, optuna_storage=optuna_storage
            )
    except SearchInterrupted as exc:  # the last line a person sees
        print(exc.resume_hint(), file=sys.stderr if exc.lost else sys.stdout, flush=True)
        return exc.exit_status
    except (HostsError, TrackingError, StorageError) as exc:  # a resume's store, at its start
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cli() -> int:
    """`graphlora-search`: `main` with the console the search's own."""
    return main(own_console=True)


if __name__ == "__main__":
    from pipelines.search import cli as _cli  # run from the module, so Ray pickles by reference

    raise SystemExit(_cli())
