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
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import threading
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
from pipelines.tracking import (
    INTERRUPTED,
    STOPPED_EARLY_ASHA,
    Tracker,
    TrackingError,
    graphlora_home,
)

DEFAULT_BACKEND = "graphlora"
# backend -> (module with TrainConfig and run_training, module with MoELoRAConfig)
BACKENDS = {"graphlora": ("graphlora.train", "graphlora.config")}
OBJECTIVE = "objective"  # best-so-far score reported to ASHA and Optuna
VERDICT_WAIT_S = 60.0  # longest a Train run waits for ASHA's verdict on an evaluation
TRAIN_POLL_S = "0.25"  # Ray Train controller poll interval, unless the environment sets one


def training_api(backend: str = DEFAULT_BACKEND) -> tuple[type, type, Any]:
    """(TrainConfig, MoELoRAConfig, run_training) of a backend."""
    train_mod, config_mod = (importlib.import_module(m) for m in BACKENDS[backend])
    return train_mod.TrainConfig, config_mod.MoELoRAConfig, train_mod.run_training


def load_search_space(
    path: str | Path,
    backend: str = DEFAULT_BACKEND,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> SearchSpace:
    """Load and validate a space file against the backend's config dataclasses (`overrides`:
    section -> key -> value, replacing the file's entries before validation)."""
    train_cls, adapter_cls, _ = training_api(backend)
    methods = getattr(importlib.import_module(BACKENDS[backend][1]), "METHOD_PRESETS", None)
    space = load_space(
        path,
        adapter_fields=field_names(adapter_cls),
        training_fields=field_names(train_cls),
        methods=methods,
        overrides=overrides,
    )
    check_constructible(space, train_cls, adapter_cls)
    return space


# --- layer 1: every Ray Train worker ------------------------------------------------------------


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Train one seed of one trial on this worker.

    After every evaluation the full training state goes to Ray Train as a checkpoint; when a
    worker dies, Ray Train restarts the group (`resources.worker_retries` times) and this function
    continues from the last checkpoint, first re-reporting that checkpoint's evaluation (the trial
    driver ignores what it has already seen). A resumed search restarts the run under the same
    name and storage path, and Ray Train hands it the same checkpoint.

    Args:
        config: `backend`, `adapter` and `training` dicts (the dataclasses are built here, at the
            library's edge); optionally `save_adapter` (rank 0 attaches the trained adapter
            folder to the final report as a checkpoint), `hub` (a `pipelines.asha.HubRef`: the
            search's trial hub, by name), `trial_id` and `verdict_wait_s`: after its k-th
            evaluation the run waits up to that long for the scheduler's verdict on iteration k,
            and returns if the trial must stop.
    """
    import ray.train
    from ray.train.collective import broadcast_from_rank_zero

    from graphlora.checkpoint import read_progress

    train_cls, adapter_cls, run_training = training_api(config["backend"])
    train_cfg, adapter_cfg = train_cls(**config["training"]), adapter_cls(**config["adapter"])
    hub, wait_s = config.get("hub"), config.get("verdict_wait_s", 0)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    def on_eval(step: int, metrics: dict[str, float], state_dir: Path | None = None) -> bool:
        checkpoint = ray.train.Checkpoint.from_directory(state_dir) if state_dir else None
        ray.train.report({**metrics, "step": step}, checkpoint=checkpoint)
        if hub is None:
            return False
        # Rank 0 decides and every rank follows, so all ranks leave the loop at the same step.
        stop = None
        if rank == 0:
            iteration = eval_index(step, train_cfg.eval_every, train_cfg.max_steps)
            stop = ray.get(hub.should_stop.remote(config["trial_id"], iteration, wait_s))
        return bool(broadcast_from_rank_zero(stop) if world > 1 else stop)

    with tempfile.TemporaryDirectory(prefix="graphlora-") as tmp:
        resume_from = None
        previous = ray.train.get_checkpoint()
        if previous is not None:
            resume_from = previous.to_directory(str(Path(tmp) / "resume"))
            step, metrics = read_progress(resume_from)
            # The driver may not have seen this evaluation (it died, or the worker did, between
            # the checkpoint and the relay): say it again; the driver drops repeats.
            ray.train.report({**metrics, "step": step, "resumed": 1})
        if config.get("save_adapter"):
            # The trained adapter travels back as the run's last checkpoint (storage_path), so
            # the caller gets it from `Result.checkpoint` wherever this worker ran.
            train_cfg = dataclasses.replace(train_cfg, output_dir=str(Path(tmp) / "adapter"))
        final = run_training(
            train_cfg, adapter_cfg, on_eval=on_eval, checkpoint=True, resume_from=resume_from
        )
        adapter = None
        if config.get("save_adapter") and rank == 0:
            adapter = ray.train.Checkpoint.from_directory(train_cfg.output_dir)
        ray.train.report({**final, "final": 1}, checkpoint=adapter)


def seed_trainer(
    config: dict[str, Any],
    *,
    name: str,
    storage_path: str,
    workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float,
    worker_retries: int,
    callbacks: list | None = None,
) -> Any:
    """The `TorchTrainer` of one seed: `train_fn_per_worker(config)` on `workers` workers,
    restarted from its last checkpoint up to `worker_retries` times, keeping only the latest
    checkpoint (a resumable state, or the final adapter). Search trials and the promotion
    pipeline (`pipelines/train.py`) build their Train runs here."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    per_worker = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=gpus_per_worker > 0, resources_per_worker=per_worker
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=callbacks,
            failure_config=FailureConfig(max_failures=worker_retries),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )


def eval_index(step: int, eval_every: int, max_steps: int) -> int:
    """Which evaluation of a run happens at `step` (1-based; the last step always evaluates)."""
    return step // eval_every + (1 if step == max_steps and step % eval_every else 0)


# --- layer 2: one Tune trial --------------------------------------------------------------------


@dataclass(frozen=True)
class TrialPlan:
    """What every trial of one stage shares (passed with `tune.with_parameters`)."""

    space: SearchSpace
    backend: str
    seeds: tuple[int, ...]
    storage_path: str
    hub: Any = None  # asha.HubRef (a name, never a live handle); None: the trial makes its own
    verdict_wait_s: float = 0.0  # > 0 when a FlagASHAScheduler judges every evaluation
    # Search trials are chosen on validation and never see the test split (a test figure on
    # every trial invites choosing on it, and costs every ASHA-stopped trial a test pass); the
    # stability stage's runs do evaluate it.
    eval_test: bool = False
    # On a resume: trials MLflow already holds as ended (id -> last metrics, None if failed).
    # Ray Tune may restart one it had not yet saved as ended; it is answered, never re-run.
    ended: dict[str, dict | None] = dataclasses.field(default_factory=dict)


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
            errors = "; ".join(
                f"rank {r}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
                for r, e in sorted(worker_exceptions.items())
            )
            ray.get(hub.put.remote(trial_id, seed_index, {"worker_error": errors[:1000]}))

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
    seed mean of every metric, `<objective metric>_std`, and `objective`: that evaluation's
    `mean -/+ std_penalty * std`. A trial is scored by its last evaluation, the weights it ships
    (docs/method.md, "Selection"): ASHA judges each rung on it, and Optuna is told the last one.
    A last report carries the final metrics (test metrics only where `plan.eval_test`).

    Every report carries a small Tune checkpoint of this driver's state (steps reported, best so
    far, worker failures), so a resumed search continues the trial without repeating a report;
    its Train runs continue from their own checkpoints (same run names, same storage path).
    Worker failures are reported as `worker_failures` (count) and, with the checkpoints the Train
    runs resumed from, as `recovery_log` (text).
    """
    import ray.tune

    from pipelines.asha import TrialHub

    space, obj = plan.space, plan.space.objective
    trial_id = ray.tune.get_context().get_trial_id()
    if trial_id in plan.ended:
        last = plan.ended[trial_id]
        if last is None:
            raise RuntimeError(f"trial {trial_id} had failed before the search was resumed")
        ray.tune.report({**last, "final": 1})
        return
    # Ray Train polls its workers (and so forwards reports) every 2 s by default; that is dead
    # time per evaluation that the verdict round trip would wait for. Read when the run starts.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_S)
    params, seeds = unpack_trial_config(config, plan)
    res = space.resources
    hub = plan.hub or TrialHub.remote()

    def fit(index: int, seed: int) -> None:
        adapter, training = space.configs(params, seed)
        training["eval_test"] = plan.eval_test
        config = {
            "backend": plan.backend,
            "adapter": adapter,
            "training": training,
            "trial_id": trial_id,
            "hub": hub,
            "verdict_wait_s": plan.verdict_wait_s,
        }
        seed_trainer(
            config,
            name=f"{trial_id}-seed{seed}",
            storage_path=plan.storage_path,
            workers=res.workers_per_trial,
            cpus_per_worker=res.cpus_per_worker,
            gpus_per_worker=res.gpus_per_worker,
            worker_retries=res.worker_retries,
            callbacks=[_make_relay(hub, trial_id, index)],
        ).fit()

    state = _DriverState.load(ray.tune.get_checkpoint())
    evals: list[dict[int, dict]] = [{} for _ in seeds]  # per seed: step -> metrics
    finals: dict[int, dict] = {}

    def report(metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory(prefix="graphlora-trial-") as tmp:
            state.save(Path(tmp))
            ray.tune.report(
                {
                    **metrics,
                    "seeds": len(seeds),
                    "worker_failures": len(state.failures),
                    "recovery_log": " | ".join(state.log)[-2000:],
                },
                checkpoint=ray.tune.Checkpoint.from_directory(tmp),
            )

    def flush(finished: set[int]) -> None:
        steps = sorted({s for e in evals for s in e} - state.reported)
        for step in steps:
            if step <= max(state.reported, default=0):
                continue  # an older evaluation re-sent after a restart, already judged
            if not all(step in evals[i] or i in finished for i in range(len(seeds))):
                return  # wait: a seed still running has not reached this step
            stats = _seed_stats([e[step] for e in evals if step in e])
            state.last = obj.score(stats[obj.metric], stats[f"{obj.metric}_std"])
            state.reported.add(step)
            report({**stats, "step": step, OBJECTIVE: state.last})

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
    for f in futures:
        if f.exception() is not None:
            raise f.exception()
    flush(set(range(len(seeds))))
    last = _seed_stats([finals[i] for i in sorted(finals)])
    report({**last, "step": max(state.reported, default=0), OBJECTIVE: state.last, "final": 1})


@dataclass
class _DriverState:
    """What a trial driver must remember across a resumed search (its Tune checkpoint)."""

    reported: set[int] = dataclasses.field(default_factory=set)
    last: float | None = None  # the objective of the last evaluation reported
    failures: list[str] = dataclasses.field(default_factory=list)  # worker errors
    log: list[str] = dataclasses.field(default_factory=list)  # errors and resumes, in order

    FILE = "driver_state.json"

    def save(self, folder: Path) -> None:
        doc = {
            "reported": sorted(self.reported),
            "last": self.last,
            "failures": self.failures,
            "log": self.log,
        }
        (folder / self.FILE).write_text(json.dumps(doc))

    @classmethod
    def load(cls, checkpoint: Any) -> _DriverState:
        if checkpoint is None:
            return cls()
        with checkpoint.as_directory() as folder:
            doc = json.loads((Path(folder) / cls.FILE).read_text())
        last = doc.get("last", doc.get("best"))  # "best": written by an older version
        return cls(set(doc["reported"]), last, list(doc["failures"]), list(doc["log"]))


# --- layer 3: the search ------------------------------------------------------------------------


def init_ray(num_cpus: int | None = None) -> None:
    """`ray.init` for the CLI and tests: `RAY_ADDRESS` if set, else a fresh local cluster of
    its own (token authentication on)."""
    import ray

    if ray.is_initialized():
        return
    # Workers import `pipelines` from the project root, whatever the working directory; a job
    # submitted with `ray job submit --working-dir .` already ships the project to every node.
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {"env_vars": {"PYTHONPATH": path}}
    # Worker logs stay in the Ray session's log folder; the search prints its own progress.
    if os.environ.get("RAY_ADDRESS"):
        in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        ray.init(
            address=os.environ["RAY_ADDRESS"],
            log_to_driver=False,
            runtime_env=None if in_job else env,
        )
        return
    # A fresh local Ray of the search's own, whatever else is on the machine: address="local"
    # never reads /tmp/ray/ray_current_cluster, which a Ray head killed without `ray stop` (OOM,
    # reboot) leaves behind pointing at a dead address that plain `ray.init()` would retry for
    # minutes. Ray 2.60's servers listen on every interface (it maps a loopback node address to
    # the machine's address), so what keeps other machines out is token authentication: Ray's
    # default for a local cluster, forced on here so that an inherited RAY_AUTH_MODE=disabled
    # cannot turn it off. The token is ~/.ray/auth_token (created on first use).
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        os.environ["RAY_AUTH_MODE"] = "token"
        from ray._raylet import Config  # Ray reads the mode from its cached config

        Config.initialize("")
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env=env,
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


class SearchInterrupted(Exception):  # noqa: N818 - a stop a person asked for, not an error
    """The search was stopped by SIGINT (Ctrl-C) or SIGTERM; its state is saved and
    `python pipelines/search.py --resume <name>` continues it."""

    def __init__(self, signum: int, name: str = "") -> None:
        self.signum, self.name = signum, name
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_status(self) -> int:
        """What a shell reports for a process ended by this signal (130, 143)."""
        return 128 + self.signum

    def resume_hint(self) -> str:
        return f"interrupted: continue with: python pipelines/search.py --resume {self.name}"


class _StopRequest:
    """SIGINT / SIGTERM while a search runs (installed by `run_search` in the main thread).

    The first signal is recorded; inside a Tune run it also ends that run the way Tune's own
    Ctrl-C handling does (the loop stops, the experiment state is saved with the running trials
    still running, so a restore continues them), through the SIGUSR1 handler Tune installs for
    exactly that. Tune's own SIGINT handler is off (`TUNE_DISABLE_SIGINT_HANDLER`): it would
    return from `fit` as if the search had ended. `_fit` then raises `SearchInterrupted`.
    A second signal stops at once (the saved state resumes as after a killed driver).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.name = ""
        self.in_tune = False

    def handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            print(
                f"\nstopped at once; continue with: python pipelines/search.py --resume "
                f"{self.name}",
                file=sys.stderr,
                flush=True,
            )
            os._exit(128 + signum)
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name}: stopping the search after saving its state "
            "(again to stop at once)",
            file=sys.stderr,
            flush=True,
        )
        tune_stop = signal.getsignal(signal.SIGUSR1)
        if self.in_tune and callable(tune_stop):
            tune_stop(signal.SIGUSR1, frame)

    def check(self, monitor: Any = None) -> None:
        """Raise `SearchInterrupted` if a stop was asked for, closing `monitor`'s running
        trials as interrupted first."""
        if self.signum is None:
            return
        if monitor is not None:
            monitor.close_interrupted(
                f"the search was stopped by {signal.Signals(self.signum).name}"
            )
        raise SearchInterrupted(self.signum, self.name)


_STOP = _StopRequest()


class _StopSignals:
    """`_STOP` handles SIGINT and SIGTERM between `install` and `restore`, in the main thread
    only (signal handlers can only be set there; a search run from another thread keeps Tune's
    own handling)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.saved: dict[int, Any] = {}
        self.env: str | None = None

    def install(self) -> None:
        _STOP.__init__()
        _STOP.name = self.name
        if threading.current_thread() is not threading.main_thread():
            return
        self.env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.saved[sig] = signal.signal(sig, _STOP.handle)

    def restore(self) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        if self.saved:
            if self.env is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self.env


def _fit(
    trainable: Any,
    plan: TrialPlan,
    name: str,
    tune_config: Any,
    monitor: Any,
    param_space: dict | None = None,
) -> None:
    """Run one Tune experiment, or continue it when `storage_path/name` holds a saved one.

    On a restore, Ray Tune brings back its trials (finished ones stay finished, unfinished ones
    restart from their last checkpoint) and the searcher's history; the scheduler and the
    monitor are this run's fresh objects (the saved ones were pickled when the experiment
    started, so they lack the rungs and records rebuilt from MLflow since). Nothing in the saved
    state is a live Ray object (the hub is a `HubRef`), so the restore works on any cluster.

    Raises:
        SearchInterrupted: SIGINT or SIGTERM stopped it (the monitor's running trials are then
            closed as interrupted; the saved experiment continues them on the next call).
    """
    from ray import tune

    _STOP.check(monitor)

    # The trial driver only waits on its Train runs, so it reserves no CPU of its own (the Train
    # controller is num_cpus=0 too); the workers reserve what `resources` asks for. Tune wants a
    # non-empty bundle, hence a token 1 MiB of memory.
    trainable = tune.with_resources(
        tune.with_parameters(trainable, plan=plan), {"cpu": 0, "memory": 2**20}
    )
    run_config = tune.RunConfig(
        name=name,
        storage_path=plan.storage_path,
        callbacks=[monitor],
        verbose=0,
        failure_config=tune.FailureConfig(max_failures=0),
        # Keeping only the latest driver checkpoint also makes Tune save its experiment state
        # after every trial checkpoint, so a resume loses at most one evaluation.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
    )
    path = f"{plan.storage_path.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(
            path, trainable, resume_unfinished=True, resume_errored=False, param_space=param_space
        )
        internal = getattr(tuner, "_local_tuner", None)
        if internal is None or not hasattr(internal, "_tune_config"):
            raise RuntimeError(
                f"cannot resume {name}: this Ray version's Tuner has no _local_tuner._tune_config"
                "; resume needs ray==2.60 (pyproject) or a fresh search"
            )
        internal._tune_config.scheduler = tune_config.scheduler
        internal.set_run_config_and_remote_string_queue(run_config, None)
        internal.clear_remote_string_queue()
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space, tune_config=tune_config, run_config=run_config
        )
    # SIGUSR1 is Tune's "stop and save" signal; until this fit installs its handler, a stale
    # one from an earlier fit must not swallow a stop (the check below catches it instead).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    _STOP.in_tune = True
    try:
        tuner.fit()
    finally:
        _STOP.in_tune = False
    _STOP.check(monitor)


def _optuna_search_class() -> type:
    from optuna.exceptions import UpdateFinishedTrialError
    from ray.tune.search.optuna import OptunaSearch

    class ResumableOptunaSearch(OptunaSearch):
        """OptunaSearch whose study (SQLite, in the search folder) may know more than Tune's
        last snapshot after a resume: a trial Optuna already holds as finished is not told
        again (Optuna would raise and stop the search)."""

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            try:
                super().on_trial_result(trial_id, result)
            except UpdateFinishedTrialError:
                pass

    return ResumableOptunaSearch


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
    backend: str = DEFAULT_BACKEND,
    output_dir: str | Path | None = None,
    out: Any = None,
    resume: bool = False,
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
        resume: Continue the search whose `search.json` is in `output_dir` (same MLflow parent
            run, same trials: finished ones are kept, unfinished ones continue from their last
            checkpoint, the Optuna history is kept).

    Raises:
        TrackingError: MLflow is unreachable or misconfigured (checked before any trial).
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
    from pipelines.space import DefineByRun

    _OptunaSearch = _optuna_search_class()  # noqa: N806 - a class
    out = out or sys.stdout
    # Tune snapshots its state after every trial checkpoint (what makes resume exact) and warns
    # about it when evaluations come fast; the snapshots are small.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    tracker = Tracker(space.experiment)
    if resume:
        output_dir = Path(output_dir).resolve()
        state = json.loads((output_dir / STATE_FILE).read_text())
        name, parent = state["name"], state["parent_run_id"]
        tracker.reopen(parent)
        state["resumes"] = state.get("resumes", 0) + 1
        tracker.set_tags(parent, {"status": "running", "resumes": state["resumes"]})
        earlier = tracker.child_runs(parent)
        print(f"search {name}: resuming ({len(earlier)} runs recorded so far)", file=out)
    else:
        name = f"{Path(space.path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        output_dir = Path(output_dir or graphlora_home() / "searches" / name).resolve()
        output_dir.mkdir(parents=True, exist_ok=True)
        storage = os.environ.get("GRAPHLORA_STORAGE_PATH") or str(graphlora_home() / "ray_results")
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
            tags={"kind": "search", "status": "running", "search_name": name},
        )
        space_text = yaml.safe_dump(space.raw, sort_keys=False)
        (output_dir / "space.yaml").write_text(space_text)
        tracker.log_text(parent, space_text, "space.yaml")
        state = {
            "name": name,
            "space_file": space.path,
            "backend": backend,
            "experiment": space.experiment,
            "parent_run_id": parent,
            "storage_path": storage,
        }
        _write_state(output_dir, state)
        earlier = []
        print(
            f"search {name}: {space.budget.trials} trials of {space.model} on {space.dataset}, "
            f"{space.resources.max_concurrent_trials} at a time; MLflow: {tracker.ui_link()}\n"
            f"  interrupted? continue with: python pipelines/search.py --resume {name}",
            file=out,
            flush=True,
        )
    storage = state["storage_path"]

    _warn_if_too_small(space, out)
    # By name (recreated here on every start): Tune saves the scheduler and the trial plan, and
    # a resume may run on another Ray cluster than the one the search started on.
    hub = HubRef.start(f"trial-hub:{name}")
    stop_signals = _StopSignals(name)
    stop_signals.install()
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
        searcher = _OptunaSearch(
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
        monitor.adopt_runs(earlier)
        plan = dataclasses.replace(plan, ended=monitor.ended())
        # ASHA's earlier cuts still hold, and its rungs hold what they held.
        scheduler.restore_rungs({t: r.get("objectives", []) for t, r in monitor.records.items()})
        for rec in monitor.records.values():
            if rec["status"] == STOPPED_EARLY_ASHA:
                scheduler.stop_reasons[rec["trial_id"]] = rec["reason"]
                ray.get(hub.request_stop.remote(rec["trial_id"], rec["reason"]))
        _fit(
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
        )
        monitor.close_unfinished()
        trials = monitor.rows()
        monitor.print_table(trials, "search")

        stability = _stability_stage(
            space, backend, plan, name, trials, tracker, parent, out, earlier
        )
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
        _write_state(output_dir, {**state, "finished": True})
    except SearchInterrupted as exc:
        # Trial runs were closed by their stage's monitor; what else is open (a stability
        # config's run) and the search's own run say `interrupted` too. search.json stays
        # unfinished, so `--resume` continues.
        for run in tracker.child_runs(parent):
            if run.info.status == "RUNNING":
                tracker.finish(run.info.run_id, INTERRUPTED, str(exc))
        tracker.finish(parent, INTERRUPTED, str(exc))
        print(f"search {name}: {exc}; its state is saved", file=out, flush=True)
        raise
    except BaseException as exc:
        tracker.finish(parent, "failed", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        stop_signals.restore()
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
        if not stability:
            print(
                "test: not evaluated (search trials are chosen on validation only); the "
                "stability stage (stability.top_k_configs > 0) or promotion "
                "(pipelines/train.py) reports the test split",
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
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    print(
        f"Ray: {len(nodes)} node{'s' if len(nodes) != 1 else ''}, {have.get('CPU', 0):g} CPU, "
        f"{have.get('GPU', 0):g} GPU",
        file=out,
        flush=True,
    )
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
    _fit(
        train_driver_fn,
        plan,
        f"{name}-stability",
        tune.TuneConfig(num_samples=1, max_concurrent_trials=space.resources.max_concurrent_trials),
        monitor,
        param_space={"_run": tune.grid_search(runs)},
    )
    monitor.close_unfinished()
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


def check_ray_address() -> None:
    """Refuse an unreachable `RAY_ADDRESS` in one line, before anything starts.

    Raises:
        ConnectionError: the address is malformed, is the job server's HTTP address, or
            nothing answers there.
    """
    addr = os.environ.get("RAY_ADDRESS", "").strip()
    if not addr or addr == "auto":
        return
    if addr.startswith(("http://", "https://")):
        raise ConnectionError(
            f"RAY_ADDRESS={addr} is a job server (dashboard) address: submit the search there "
            "with `ray job submit --address ADDR --working-dir . -- python pipelines/search.py`"
            ", or set RAY_ADDRESS to the cluster's GCS address (HOST:6379)"
        )
    host, _, port = addr.split("://", 1)[-1].rstrip("/").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        raise ConnectionError(
            f"RAY_ADDRESS={addr}: no Ray cluster answers there ({exc}); start one "
            "(`ray start --head --node-ip-address 127.0.0.1`) or `ray up cluster.yaml`, or "
            "unset RAY_ADDRESS to run on this machine"
        ) from None


def preflight(space: SearchSpace) -> None:
    """What every trial would otherwise fail on: the model reference and the dataset.

    Raises:
        SpaceError: one line naming the file and key.
    """
    from graphlora.data import load_task
    from graphlora.models import ModelLoadError, check_model_reference

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


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--space",
        default="search_spaces/quickstart.yaml",
        help="search space YAML (default: %(default)s)",
    )
    parser.add_argument(
        "--resume",
        metavar="SEARCH",
        help="continue an interrupted search: its name (printed when it started) or its "
        "results folder; finished trials are kept, unfinished ones continue from their last "
        "checkpoint (--space is then ignored: the space as first run is used)",
    )
    parser.add_argument("--output-dir", help="results folder (default: $GRAPHLORA_HOME/searches/)")
    flags = {  # flag -> the space entry it overrides
        "trials": ("budget", "trials"),
        "max_steps": ("budget", "max_steps"),
        "eval_every": ("budget", "eval_every"),
        "stability_configs": ("stability", "top_k_configs"),
    }
    for key, (section, field) in flags.items():
        parser.add_argument(
            f"--{key.replace('_', '-')}",
            type=int,
            help=f"override the space's {section}.{field} (e.g. a quick smoke test of a space)",
        )
    args = parser.parse_args(argv)
    overrides: dict[str, dict[str, int]] = {}
    for key, (section, field) in flags.items():
        if getattr(args, key) is not None:
            overrides.setdefault(section, {})[field] = getattr(args, key)
    # Everything that can be checked is checked before Ray starts or MLflow records anything.
    try:
        if args.resume:
            folder = find_search(args.resume)
            state = json.loads((folder / STATE_FILE).read_text())
            if state.get("finished"):
                raise SpaceError(f"--resume {args.resume}: that search has already finished")
            space = load_search_space(folder / "space.yaml")
            space = dataclasses.replace(space, path=state["space_file"])
        else:
            space = load_search_space(args.space, overrides=overrides)
        preflight(space)
        check_ray_address()
        Tracker(space.experiment)
    except (SpaceError, TrackingError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        init_ray()
    except (ConnectionError, RuntimeError) as exc:
        print(f"error: cannot connect to Ray: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    try:
        if args.resume:
            run_search(space, output_dir=folder, resume=True)
        else:
            run_search(space, output_dir=args.output_dir)
    except SearchInterrupted as exc:
        print(exc.resume_hint(), flush=True)  # the last line a person sees
        return exc.exit_status
    return 0


if __name__ == "__main__":
    from pipelines.search import main as _main  # run from the module, so Ray pickles by reference

    raise SystemExit(_main())
