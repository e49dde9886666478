"""Layer 2 of a search: what one Ray Tune trial does (`train_driver_fn`: its seeds' Train runs,
side by side or on the search's trial hosts, reported as seed statistics and an `objective`), and
`TrialPlan`, what every trial of one stage shares.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.host import job_key, run_on_host
from pipelines.records import RUN_TIMES, pack_report, seed_stats
from pipelines.schema import SearchSpace
from pipelines.stages import SEARCH, Stage
from pipelines.worker import fast_train_reports, fit_seed, seed_trainer, worker_errors

RETURN_WAIT_S = 5.0  # longest a trial waits for its runs to return once all sent their last
OBJECTIVE = "objective"  # the score of a trial's last evaluation, reported to ASHA and Optuna


def optuna_objectives(space: SearchSpace) -> tuple[list[str], list[str]]:
    """What Optuna optimises: the trial's `objective`, and `objective.secondary` when set (a
    multi-objective study: Optuna searches the Pareto front; ASHA judges the first only)."""
    metrics, modes = [OBJECTIVE], [space.objective.mode]
    if space.objective.secondary:
        metrics.append(space.objective.secondary["metric"])
        modes.append(space.objective.secondary["mode"])
    return metrics, modes


@dataclass(frozen=True)
class TrialPlan:
    """What every trial of one stage shares (passed with `tune.with_parameters`)."""

    space: SearchSpace
    seeds: tuple[int, ...]
    storage_path: str
    hub: Any = None  # asha.HubRef (a name, never a live handle); None: the trial makes its own
    verdict_wait_s: float = 0.0  # > 0 when a FlagASHAScheduler judges every evaluation
    stage: Stage = SEARCH  # its rules: which splits its runs evaluate (pipelines/stages.py)
    # On a resume: trials MLflow already holds as ended (id -> last metrics, None if failed).
    # Ray Tune may restart one it had not yet saved as ended; it is answered, never re-run.
    ended: dict[str, dict | None] = dataclasses.field(default_factory=dict)
    # host.BoardRef when the search packs trials on hosts (resources.trials_per_host): each
    # seed's run is a job for a host's slot instead of a TorchTrainer of its own.
    board: Any = None
    concurrent_trials: int = 1  # trials run at once (resources, or the hosts' slots)


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

        def after_exception(self, run_context: Any, worker_exceptions: dict) -> None:
            # A worker died or raised; Ray Train restarts the group from the last checkpoint
            # while retries last. The driver records it, so MLflow shows the failure.
            errors = worker_errors(worker_exceptions)
            ray.get(hub.put.remote(trial_id, seed_index, {"worker_error": errors}))

    return EvalRelay()


def trial_cost(
    stats: dict[str, float], wall_s: float, seeds: int, plan: TrialPlan
) -> dict[str, float]:
    """A trial's cost so far: `wall_time_s`, `startup_time_s` (wall time not spent in the
    runs' own setup, training, evaluation, checkpoints and test) and `device_seconds`: seeds x
    workers x GPUs per worker (CPUs when no GPU) x wall time; on a trial host, its slot's share
    (a GPU host's GPU is shared by its slots; a CPU host has each slot's CPUs)."""
    res = plan.space.resources
    per_worker = res.gpus_per_worker or res.cpus_per_worker
    if res.on_hosts and res.gpus_per_worker:
        per_worker = res.gpus_per_worker / res.trials_per_host
    run = sum(stats.get(k, 0.0) for k in RUN_TIMES)
    return {
        "wall_time_s": wall_s,
        "startup_time_s": max(0.0, wall_s - run),
        "device_seconds": seeds * res.workers_per_trial * per_worker * wall_s,
    }


def unpack_trial_config(config: dict[str, Any], plan: TrialPlan) -> tuple[dict, tuple[int, ...]]:
    """Searched params and seeds of a trial: search trials carry params only; stability trials
    carry `{"_run": {"params", "seeds", ...}}`."""
    if "_run" in config:
        return dict(config["_run"]["params"]), tuple(config["_run"]["seeds"])
    return {k: v for k, v in config.items() if not k.startswith("_")}, plan.seeds


def train_driver_fn(config: dict[str, Any], plan: TrialPlan) -> None:
    """One Tune trial: one TorchTrainer per seed, side by side, or one job per seed on the
    search's trial hosts (`plan.board`); reports seed statistics.

    Each evaluation step is reported once every seed has reported it (or has finished), with the
    seed mean of every metric, `<objective metric>_std`, and `objective`: that evaluation's
    `mean -/+ std_penalty * std`. A trial is scored by its last evaluation, the weights it ships
    (docs/method.md, "Selection"): ASHA judges each rung on it, and Optuna is told the last one.
    A last report carries the final metrics (test metrics only where `plan.stage.eval_test`).

    Every report carries a small Tune checkpoint of this driver's state (steps reported, last
    objective, worker failures), so a resumed search continues the trial without repeating a report;
    its Train runs continue from their own checkpoints (same run names, same storage path).
    Worker failures are reported as `worker_failures` (count) and, with the checkpoints the Train
    runs resumed from, as `recovery_log` (text).
    """
    import ray.tune

    from pipelines.asha import TrialHub

    space, obj = plan.space, plan.space.objective
    keep = {*optuna_objectives(space)[0], "final", "step"}  # what ASHA and Optuna read
    trial_id = ray.tune.get_context().get_trial_id()
    if trial_id in plan.ended:
        last = plan.ended[trial_id]
        if last is None:
            raise RuntimeError(f"trial {trial_id} had failed before the search was resumed")
        ray.tune.report({**last, "final": 1})
        return
    fast_train_reports()
    params, seeds = unpack_trial_config(config, plan)
    res = space.resources
    hub = plan.hub or TrialHub.remote()

    def fit(index: int, seed: int) -> None:
        adapter, training = plan.stage.configs(space, params, seed)
        if res.on_hosts:
            job = {
                "key": job_key(trial_id, seed),
                "trial_id": trial_id,
                "seed_index": index,
                "adapter": adapter,
                "training": training,
                "verdict_wait_s": plan.verdict_wait_s,
            }
            run_on_host(plan.board, job)
            return
        config = {
            "adapter": adapter,
            "training": training,
            "trial_id": trial_id,
            "hub": hub,
            "verdict_wait_s": plan.verdict_wait_s,
        }
        trainer = seed_trainer(
            config,
            name=job_key(trial_id, seed),
            storage_path=plan.storage_path,
            workers=res.workers_per_trial,
            cpus_per_worker=res.cpus_per_worker,
            gpus_per_worker=res.gpus_per_worker,
            worker_retries=res.worker_retries,
            callbacks=[_make_relay(hub, trial_id, index)],
        )
        fit_seed(trainer)

    state = _DriverState.load(ray.tune.get_checkpoint())
    started, wall_before = time.monotonic(), state.wall_s  # a resumed trial adds to its time
    evals: list[dict[int, dict]] = [{} for _ in seeds]  # per seed: step -> metrics
    finals: dict[int, dict] = {}

    def report(metrics: dict[str, Any]) -> None:
        state.wall_s = wall_before + time.monotonic() - started
        with tempfile.TemporaryDirectory(prefix="graphlora-trial-") as tmp:
            state.save(Path(tmp))
            ray.tune.report(
                pack_report(
                    {
                        **metrics,
                        **trial_cost(metrics, state.wall_s, len(seeds), plan),
                        "seeds": len(seeds),
                        "worker_failures": len(state.failures),
                        "recovery_log": " | ".join(state.log)[-2000:],
                    },
                    keep,
                ),
                checkpoint=ray.tune.Checkpoint.from_directory(tmp),
            )

    def flush(finished: set[int]) -> None:
        steps = sorted({s for e in evals for s in e} - state.reported)
        for step in steps:
            if step <= max(state.reported, default=0):
                continue  # an older evaluation re-sent after a restart, already judged
            if not all(step in evals[i] or i in finished for i in range(len(seeds))):
                return  # wait: a seed still running has not reached this step
            stats = seed_stats([e[step] for e in evals if step in e], also_std=[obj.metric])
            state.last = obj.score(stats[obj.metric], stats.get(f"{obj.metric}_std", 0.0))
            state.reported.add(step)
            report({**stats, "step": step, OBJECTIVE: state.last})

    with ThreadPoolExecutor(len(seeds), thread_name_prefix="seed") as pool:
        futures = [pool.submit(fit, i, s) for i, s in enumerate(seeds)]
        failed = False
        while True:
            done = {i for i, f in enumerate(futures) if f.done()}
            # A run's last messages reach the hub before its run returns: once all have
            # returned, what is left to take is already there.
            mail = ray.get(hub.take.remote(trial_id, 0.0 if len(done) == len(seeds) else 0.5))
            if not mail and len(done) == len(seeds):
                break
            for i in done:
                if futures[i].exception() is not None and not failed:
                    failed = True  # let the sibling seeds end at their next evaluation
                    ray.get(hub.request_stop.remote(trial_id, f"seed {seeds[i]} failed"))
            for index, metrics in mail:
                if "worker_error" in metrics:
                    state.failures.append(f"seed {seeds[index]}: {metrics['worker_error']}")
                    state.log.append(state.failures[-1])
                    continue
                if metrics.get("resumed"):
                    state.log.append(
                        f"seed {seeds[index]}: resumed from its checkpoint at step "
                        f"{int(metrics['step'])}"
                    )
                if metrics.get("final"):
                    finals[index] = metrics
                else:
                    evals[index][int(metrics["step"])] = metrics
            flush(done | set(finals))
            if len(finals) == len(seeds):  # every run has said its last: they are returning
                wait(futures, timeout=RETURN_WAIT_S)
    for f in futures:
        if f.exception() is not None:
            raise f.exception()
    flush(set(range(len(seeds))))
    last = seed_stats([finals[i] for i in sorted(finals)], also_std=[obj.metric])
    report({**last, "step": max(state.reported, default=0), OBJECTIVE: state.last, "final": 1})


@dataclass
class _DriverState:
    """What a trial driver must remember across a resumed search (its Tune checkpoint)."""

    reported: set[int] = dataclasses.field(default_factory=set)
    last: float | None = None  # the objective of the last evaluation reported
    failures: list[str] = dataclasses.field(default_factory=list)  # worker errors
    log: list[str] = dataclasses.field(default_factory=list)  # errors and resumes, in order
    wall_s: float = 0.0  # the trial's wall time up to its last report

    FILE = "driver_state.json"

    def save(self, folder: Path) -> None:
        doc = {
            "reported": sorted(self.reported),
            "last": self.last,
            "failures": self.failures,
            "log": self.log,
            "wall_s": self.wall_s,
        }
        (folder / self.FILE).write_text(json.dumps(doc))

    @classmethod
    def load(cls, checkpoint: Any) -> _DriverState:
        if checkpoint is None:
            return cls()
        with checkpoint.as_directory() as folder:
            doc = json.loads((Path(folder) / cls.FILE).read_text())
        last = doc.get("last", doc.get("best"))  # "best": written by an older version
        return cls(
            set(doc["reported"]),
            last,
            list(doc["failures"]),
            list(doc["log"]),
            float(doc.get("wall_s", 0.0)),
        )
