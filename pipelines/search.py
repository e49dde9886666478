"""Hyperparameter search for GraphLoRA on Ray: `run_search(space, ...)` and its CLI.

The search is a Tuner with `OptunaSearch` (seeded TPE over the define-by-run space),
`FlagASHAScheduler` and a `ConcurrencyLimiter` over trial drivers (`pipelines/trial.py`, each
running Ray Train workers, `pipelines/worker.py`; the Tune run itself: `pipelines/tuning.py`);
then the stability stage (`pipelines/stability.py`), the best config YAML and the MLflow record.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import storage as optuna_db
from pipelines.console import library_output_to_log
from pipelines.errors import SpaceError, first_line
from pipelines.host import HostPool, HostsError, hosts_for
from pipelines.progress import print_outcome, print_table
from pipelines.results import stage_cost, trial_rows, write_results
from pipelines.schema import SearchSpace, how_many_fit
from pipelines.search_state import (
    STATE_FILE,
    SearchState,
    find_search,
    resume_search,
    start_search,
    write_state,
)
from pipelines.stability import choose_best, run_stability_stage
from pipelines.stages import SEARCH
from pipelines.storage import StorageError
from pipelines.summary import describe_search, search_cost, search_pictures
from pipelines.tracking import (
    INTERRUPTED,
    STOPPED_EARLY_ASHA,
    StoreLost,
    Tracker,
    TrackingError,
)
from pipelines.trial import OBJECTIVE, TrialPlan, optuna_objectives, train_driver_fn
from pipelines.tuning import (
    SearchInterrupted,
    StopSignals,
    check_ray_address,
    database_lost,
    fit_experiment,
    init_ray,
    optuna_search_class,
)
from pipelines.validate import DEFAULT_SPACE, load_search_space, preflight, shipped_spaces
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
        resume: Continue the search whose `search.json` is in `output_dir` (`--resume`).
        more_trials: With `resume`, extend a finished search by this many trials (`--resume
            --trials`): a new Tune experiment `<name>-more<k>` under the same search run, then
            the stability stage again (its runs tagged `round=<k>`) and the best config again.
        warm_start: A `pipelines.warm_start.WarmStart` for a new search (`--warm-start`).
        optuna_storage: The Optuna study's database URL (`--optuna-storage`); a resume must name
            the study's database again.

    Raises:
        TrackingError: MLflow is unreachable or misconfigured (checked before any trial).
        StorageError: the Optuna database is unreachable, or not the one a resumed search
            started with (checked before any trial).
        HostsError: with trial hosts, no node of the cluster holds one (before anything).
        SearchInterrupted: SIGINT (Ctrl-C) or SIGTERM stopped it (when run in the main
            thread); the running trials and the search's MLflow runs say `interrupted`, and
            `resume=True` continues it.
    """
    import ray

    from pipelines.asha import HubRef

    out = out or sys.stdout
    # Tune snapshots its state after every trial checkpoint (what makes resume exact) and warns
    # about it when evaluations come fast; the snapshots are small.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # With trial hosts, a cluster with no room for one is refused before anything starts.
    host_count = hosts_for(space) if space.resources.on_hosts else 0
    search, study = _open(space, output_dir, resume, more_trials, warm_start, optuna_storage, out)
    tracker = search.tracker
    _warn_if_too_small(space, out)
    # By name (recreated here on every start): Tune saves the scheduler and the trial plan, and
    # a resume may run on another Ray cluster than the one the search started on.
    hub = HubRef.start(f"trial-hub:{search.name}")
    hosts = None
    stop_signals = StopSignals(search.name)
    stop_signals.install()
    try:
        if space.resources.on_hosts:
            hosts = HostPool(space, search.name, search.state["storage_path"], hub, host_count)
            hosts.start()
        monitor, plan = _search_stage(search, hub, hosts, study, None if resume else warm_start)
        trials, stability, best = _conclude(search, monitor, plan, hosts, study)
    except SearchInterrupted as exc:
        # Trial runs were closed by their stage's monitor; what else is open (a stability
        # config's run) and the search's own run say `interrupted` too. search.json stays
        # unfinished, so `--resume` continues. With the store lost, what it could not take
        # waits in the journal (`--resume` writes it first).
        _close_runs(tracker, search.parent, INTERRUPTED, str(exc), str(exc))
        print(f"search {search.name}: {exc}; its state is saved", file=out, flush=True)
        raise
    except BaseException as exc:
        # The search itself died (e.g. Ray killed its actors for memory): no run it opened is
        # left `running` in MLflow.
        reason = f"{type(exc).__name__}: {exc}"
        _close_runs(tracker, search.parent, "failed", reason, f"the search failed: {reason}")
        raise
    finally:
        stop_signals.restore()
        if hosts is not None:
            hosts.close(abort=sys.exc_info()[0] is not None)
        ray.kill(hub.handle)
    link = tracker.ui_link()
    print_outcome(out, best, stability, search.output_dir, link)
    return SearchResult(search.output_dir, search.parent, trials, stability, best, link)


def _open(
    space: SearchSpace,
    output_dir: str | Path | None,
    resume: bool,
    more_trials: int | None,
    warm_start: Any,
    optuna_storage: str | None,
    out: Any,
) -> tuple[SearchState, str]:
    """MLflow and the Optuna database checked, the search started or resumed; returns it and
    its Optuna study's database URL."""
    tracker = Tracker(space.experiment)
    tracker.on_lost = database_lost  # a store that stops answering stops the search, resumable
    optuna_storage = optuna_db.resolve(optuna_storage, space.optuna_storage)
    if optuna_storage:
        optuna_db.check(optuna_storage)
    if resume:
        search = resume_search(space, tracker, Path(output_dir), more_trials, optuna_storage, out)
    else:
        search = start_search(space, tracker, output_dir, warm_start, optuna_storage, out)
    return search, optuna_storage or optuna_db.default_url(search.output_dir)


def _search_stage(
    search: SearchState, hub: Any, hosts: HostPool | None, study: str, warm_start: Any
) -> tuple[Any, TrialPlan]:
    """The search's Tune run (this round's trials), its monitor having adopted the runs from
    before a resume; returns the monitor (its records: the trials) and the trial plan."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from pipelines.monitor import SearchMonitor

    space, state = search.space, search.state
    concurrent = _concurrency(space, hosts, search.out)
    scheduler = _scheduler(space, hub)
    searcher = _searcher(space, search.name, study, warm_start, search.out)
    plan = TrialPlan(
        space,
        SEARCH.seeds(space.seed, space.seeds_per_trial),
        state["storage_path"],
        hub,
        VERDICT_WAIT_S,
        board=hosts.board if hosts else None,
        concurrent_trials=concurrent,
    )
    new_trials = state["round_trials"] if search.round else space.budget.trials
    # Every round's trials (the progress line's "to go"), each counted once after a resume.
    earlier_trials = sum(1 for r in search.earlier if r.data.tags.get("kind") == "search")
    total = state.get("planned_trials") if search.round else space.budget.trials
    monitor = SearchMonitor(
        search.tracker,
        search.parent,
        space,
        scheduler=scheduler,
        out=search.out,
        total=total or new_trials + earlier_trials,
    )
    plan = dataclasses.replace(plan, ended=_adopt(monitor, search.earlier, scheduler, hub))
    fit_experiment(
        train_driver_fn,
        plan,
        f"{search.name}-more{search.round}" if search.round else search.name,
        tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, concurrent),
            scheduler=scheduler,
            num_samples=new_trials,
        ),
        monitor,
    )
    monitor.close_unfinished()
    return monitor, plan


def _concurrency(space: SearchSpace, hosts: HostPool | None, out: Any) -> int:
    """How many trials run at once (`Resources.concurrent_trials`), said on the console."""
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
    return concurrent


def _scheduler(space: SearchSpace, hub: Any) -> Any:
    """ASHA on the trials' objective, stopping by flag (`pipelines/asha.py`)."""
    from pipelines.asha import FlagASHAScheduler

    return FlagASHAScheduler(
        hub,
        time_attr="training_iteration",
        metric=OBJECTIVE,
        mode=space.objective.mode,
        max_t=space.budget.max_evals,
        grace_period=space.asha.grace_period,
        reduction_factor=space.asha.reduction_factor,
    )


def _searcher(space: SearchSpace, name: str, study: str, warm_start: Any, out: Any) -> Any:
    """Optuna's seeded TPE over the define-by-run space, its study `name` in the database
    `study`; a new search's `warm_start` trials are put in the study first."""
    import optuna

    from pipelines.tuning import DefineByRun

    metrics, modes = optuna_objectives(space)
    if warm_start is not None:
        from pipelines.warm_start import seed_study

        sampler = optuna.samplers.TPESampler(seed=space.seed)
        seed_study(warm_start, study, name, modes, sampler)
        print(
            f"warm start: {len(warm_start.trials)} trials of search {warm_start.name} in "
            "the Optuna study",
            file=out,
            flush=True,
        )
    return optuna_search_class()(
        DefineByRun(space),
        metric=metrics if len(metrics) > 1 else metrics[0],
        mode=modes if len(modes) > 1 else modes[0],
        sampler=optuna.samplers.TPESampler(seed=space.seed),
        storage=optuna_db.open_storage(study),
        study_name=name,
    )


def _adopt(monitor: Any, earlier: list[Any], scheduler: Any, hub: Any) -> dict[str, Any]:
    """Hand the runs from before a resume to the monitor; ASHA's earlier cuts still hold and
    its rungs hold what they held. Returns the trials that had ended (`TrialPlan.ended`)."""
    import ray

    monitor.adopt_runs(earlier)
    scheduler.restore_rungs({t: r.get("objectives", []) for t, r in monitor.records.items()})
    for rec in monitor.records.values():
        if rec["status"] == STOPPED_EARLY_ASHA:
            scheduler.stop_reasons[rec["trial_id"]] = rec["reason"]
            ray.get(hub.request_stop.remote(rec["trial_id"], rec["reason"]))
    return monitor.ended()


def _conclude(
    search: SearchState, monitor: Any, plan: TrialPlan, hosts: HostPool | None, study: str
) -> tuple[list[dict], list[dict], dict | None]:
    """After the search stage: the stability stage, the best config, the result files and
    pictures (on disk and on the search's MLflow run, with its best scores, cost and
    description); the search's run completed. Returns (trials, stability groups, best)."""
    import optuna

    space, tracker, parent, out = search.space, search.tracker, search.parent, search.out
    trials = trial_rows(space, monitor.records)
    print_table(out, space, trials, "search")
    stability, stability_cost = run_stability_stage(
        space, plan, search.name, trials, tracker, parent, out, search.earlier, round_=search.round
    )
    best = choose_best(space, trials, stability)
    files = write_results(search.output_dir, space, trials, stability, best)
    optuna_study = optuna.load_study(study_name=search.name, storage=study)
    plots, skipped = search_pictures(
        space, monitor, trials, stability, optuna_study, search.output_dir / "plots"
    )
    for f in files + plots:
        tracker.log_file(parent, f, "plots" if f in plots else None)
    for reason in skipped:
        print(f"plot skipped: {reason}", file=out)
    if best:
        tracker.log_metrics(parent, {f"best_{k}": v for k, v in best["scores"].items()})
    cost = search_cost(stage_cost(monitor.records), stability_cost)
    if hosts is not None:
        cost.update(hosts.stats())
    tracker.log_metrics(parent, cost)
    tracker.set_tags(
        parent,
        {"mlflow.note.content": describe_search(space, search.name, trials, best, cost, plots)},
    )
    tracker.finish(parent, "completed")
    write_state(search.output_dir, {**search.state, "finished": True})
    return trials, stability, best


def _close_runs(tracker: Tracker, parent: str, status: str, reason: str, why: str) -> None:
    """The search's run, and its child runs still RUNNING (`why`), end as `status`; with the
    store lost, none are found (the monitor's own closing writes wait in the journal)."""
    try:
        running = [r for r in tracker.child_runs(parent) if r.info.status == "RUNNING"]
    except StoreLost:
        running = []
    for run in running:
        tracker.finish(run.info.run_id, status, why)
    tracker.finish(parent, status, reason)


def _warn_if_too_small(space: SearchSpace, out: Any) -> None:
    """Say so when the cluster cannot hold max_concurrent_trials (or the trial hosts) at once
    (trials will queue)."""
    import ray

    res = space.resources
    per_trial = res.trial_needs(space.seeds_per_trial)
    have = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    print(
        f"Ray: {len(nodes)} node{'s' if len(nodes) != 1 else ''}, {have.get('CPU', 0):g} CPU, "
        f"{have.get('GPU', 0):g} GPU",
        file=out,
        flush=True,
    )
    if res.on_hosts:
        return  # the host pool is sized to the nodes (`hosts_for`), or refuses
    fits = how_many_fit(have, per_trial)
    if fits < res.max_concurrent_trials:
        print(
            f"warning: the cluster has {have.get('CPU', 0):g} CPU / {have.get('GPU', 0):g} GPU; "
            f"a trial needs {per_trial['CPU']:g} CPU / {per_trial['GPU']:g} GPU, so {fits} of "
            f"max_concurrent_trials={res.max_concurrent_trials} fit at once (an autoscaling "
            "cluster may add nodes)",
            file=out,
            flush=True,
        )


_FLAGS = {  # flag -> the space entry it overrides
    "trials": ("budget", "trials"),
    "max_steps": ("budget", "max_steps"),
    "eval_every": ("budget", "eval_every"),
    "stability_configs": ("stability", "top_k_configs"),
    "trials_per_host": ("resources", "trials_per_host"),
}


def _parser() -> argparse.ArgumentParser:
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
    for key, (section, field) in _FLAGS.items():
        parser.add_argument(
            f"--{key.replace('_', '-')}",
            type=int,
            help=f"override the space's {section}.{field} (e.g. a quick smoke test of a space)",
        )
    return parser


def _list_searches(own_console: bool) -> int:
    from pipelines.overview import print_searches, searches

    if own_console:
        library_output_to_log()
    try:
        print_searches(*searches(), out=sys.stdout)
    except TrackingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _resumed(args: argparse.Namespace) -> tuple[Path, dict[str, Any], SearchSpace]:
    """`--resume`: the search's folder, its state and its space as first run, checked against
    the other flags."""
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
    return folder, state, dataclasses.replace(space, path=state["space_file"])


def main(argv: list[str] | None = None, *, own_console: bool = False) -> int:
    """CLI entry point; returns the exit status. `own_console`: the libraries' log lines go to
    the search's driver.log (`pipelines/console.py`), as the installed command does."""
    args = _parser().parse_args(argv)
    if args.list:
        return _list_searches(own_console)
    overrides: dict[str, dict[str, int]] = {}
    for key, (section, field) in _FLAGS.items():
        if getattr(args, key) is not None:
            overrides.setdefault(section, {})[field] = getattr(args, key)
    # Everything that can be checked is checked before Ray starts or MLflow records anything.
    try:
        warm, folder, state = None, None, {}
        if args.resume:
            folder, state, space = _resumed(args)
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
        run_search(
            space,
            output_dir=folder or args.output_dir,
            resume=folder is not None,
            more_trials=args.trials if folder else None,
            warm_start=warm,
            optuna_storage=optuna_storage,
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
