"""One Ray Tune run over trial drivers (`fit_experiment`, new or restored on any cluster), as the
search and its stability stage both use it; the local Ray a search starts (`init_ray`); a
search's stop on SIGINT (Ctrl-C) or SIGTERM; and what Optuna searches (`DefineByRun`,
`optuna_search_class`).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.schema import top_k_high

if TYPE_CHECKING:
    from pipelines.schema import SearchSpace
    from pipelines.trial import TrialPlan


def init_ray(num_cpus: int | None = None) -> None:
    """`ray.init` for the CLI and tests: `RAY_ADDRESS` if set, else a fresh local cluster of
    its own (token authentication on)."""
    import ray

    if ray.is_initialized():
        return
    # Workers import `pipelines` from where the driver did (a checkout, or site-packages once
    # installed), whatever their working directory; a job submitted with `ray job submit
    # --working-dir .` already has the project first on every node's PYTHONPATH.
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


class SearchInterrupted(Exception):  # noqa: N818 - a stop, not a bug
    """The search was stopped by SIGINT (Ctrl-C) or SIGTERM, or because its MLflow store or
    Optuna database stopped answering (`database_lost`); its state is saved and
    `graphlora-search --resume <name>` continues it."""

    def __init__(self, signum: int | None, name: str = "", lost: str | None = None) -> None:
        self.signum, self.name, self.lost = signum, name, lost
        super().__init__(lost or f"stopped by {signal.Signals(signum or 0).name}")

    @property
    def exit_status(self) -> int:
        """What a shell reports for a process ended by this signal (130, 143); 75 (EX_TEMPFAIL:
        try again later) when a database was lost."""
        return 128 + self.signum if self.signum else LOST_EXIT

    def resume_hint(self) -> str:
        if self.lost:
            return (
                f"error: {self.lost}; the running trials were stopped and the search's state "
                "saved (what MLflow could not take is kept beside it); once the database "
                f"answers again, continue with: graphlora-search --resume {self.name}"
            )
        return f"interrupted: continue with: graphlora-search --resume {self.name}"


LOST_EXIT = 75  # sysexits.h EX_TEMPFAIL


class _StopRequest:
    """SIGINT / SIGTERM while a search runs (installed by `run_search` in the main thread).

    The first signal is recorded; inside a Tune run it also ends that run the way Tune's own
    Ctrl-C handling does (the loop stops, the experiment state is saved with the running trials
    still running, so a restore continues them), through the SIGUSR1 handler Tune installs for
    exactly that. Tune's own SIGINT handler is off (`TUNE_DISABLE_SIGINT_HANDLER`): it would
    return from `fit` as if the search had ended. `fit_experiment` then raises `SearchInterrupted`.
    A second signal stops at once (the saved state resumes as after a killed driver).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.lost: str | None = None
        self.name = ""
        self.in_tune = False

    def handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            print(
                f"\nstopped at once; continue with: graphlora-search --resume {self.name}",
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
        self._stop_tune(frame)

    def _stop_tune(self, frame: Any = None) -> None:
        tune_stop = signal.getsignal(signal.SIGUSR1)
        if self.in_tune and callable(tune_stop):
            tune_stop(signal.SIGUSR1, frame)

    def lose(self, reason: str) -> None:
        """The MLflow store or the Optuna database stopped answering: stop as for Ctrl-C (the
        state saved, the running trials resumable), then fail with `reason`."""
        if self.signum is not None or self.lost is not None:
            return
        self.lost = reason
        print(f"\nerror: {reason}: stopping the search after saving its state", file=sys.stderr,
              flush=True)  # fmt: skip
        self._stop_tune()

    def check(self, monitor: Any = None) -> None:
        """Raise `SearchInterrupted` if a stop was asked for, closing `monitor`'s running
        trials as interrupted first."""
        if self.signum is None and self.lost is None:
            return
        if monitor is not None:
            monitor.close_interrupted(
                self.lost or f"the search was stopped by {signal.Signals(self.signum).name}"
            )
        raise SearchInterrupted(self.signum, self.name, self.lost)


_STOP = _StopRequest()


def database_lost(reason: str) -> None:
    """Told by the `Tracker` and the Optuna searcher when their database stops answering mid-run
    (after their own retries): the search stops as for Ctrl-C and exits 75."""
    _STOP.lose(reason)


class StopSignals:
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


def fit_experiment(
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
    # A trial's driver runs in the Tune actor of a trial that has ended (its function returned:
    # trials end themselves, `asha.py`), not in a new process: about 3 s less per trial.
    tune_config = dataclasses.replace(tune_config, reuse_actors=True)
    # Tune's own per-trial result files (result.json, progress.csv, TensorBoard events): MLflow
    # holds every figure, and nothing reads them; the driver writes them at every report.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    run_config = tune.RunConfig(
        name=name,
        storage_path=plan.storage_path,
        callbacks=[monitor, lean_tune_state()],  # the monitor reads each result first
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
        internal._tune_config.reuse_actors = True  # a search saved before actors were reused
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


def lean_tune_state() -> Any:
    """A Tune callback that keeps out of Tune's experiment state what no restore reads.

    Tune rewrites its whole experiment state, every trial's record in it, at each save: after
    every trial checkpoint and before every new trial (`asha.save_new_trial`), so its cost grows
    with the trials already run (`benchmarks/scale.py`). Of a trial's record (about 25 KB on the
    tiny preset, 2026-12-03) the larger part is what a restore never reads:
    - the report's `DETAIL` text, which the monitor (an earlier callback) has recorded in MLflow,
      kept as the trial's last result (Tune lets callbacks change the result in place) and again
      with its checkpoint;
    - for a trial that has ended (Tune never runs it again), its running statistics of every
      metric (`metric_analysis`, `metric_n_steps`) and its checkpoints' copies of the reports.
    """
    from ray import tune

    from pipelines.records import DETAIL

    class LeanTuneState(tune.Callback):
        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info):
            result.pop(DETAIL, None)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            _lean(trial)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            _lean(trial)

    def _lean(trial: Any) -> None:
        meta = trial.run_metadata  # Tune re-serialises an ended trial as it stops it
        manager = meta.checkpoint_manager
        for one in [*manager.best_checkpoint_results, manager.latest_checkpoint_result]:
            if one is not None:  # a restore reads these metrics; no restore runs it again
                one.metrics.clear()
        meta.metric_analysis, meta.metric_n_steps = {}, {}  # each assignment drops its cache

    return LeanTuneState()


def optuna_search_class() -> type:
    import logging
    import pickle
    import warnings

    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    from pipelines.storage import Heartbeat, first_error_line, unreachable

    log = logging.getLogger("pipelines.tuning")

    class ResumableOptunaSearch(OptunaSearch):
        """OptunaSearch that loses nothing to its database.

        - A trial Optuna already holds as finished is not told again (after a resume the study
          may know more than Tune's last snapshot; Optuna would raise and stop the search).
        - When the database stops answering, a result it could not take is kept (`_untold`,
          saved with the searcher in Tune's state) and told on the next call once it answers
          (a resumed search's first); the search is stopped (`database_lost`), not failed.
        - On a shared database it beats a heartbeat for its trials (`pipelines/storage.py`).
        """

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if not self._tell_untold() or trial_id not in self._ot_trials:
                return  # not in `_ot_trials`: already told as finished
            self._start_heartbeat()
            try:
                super().on_trial_result(trial_id, result)
            except UpdateFinishedTrialError:
                pass
            except Exception as exc:  # an intermediate value: ASHA, not Optuna, prunes
                if not unreachable(exc):
                    raise
                self._lost(exc)

        def on_trial_complete(
            self, trial_id: str, result: dict | None = None, error: bool = False
        ) -> None:
            if trial_id in self._completed_trials:
                return
            self._completed_trials.add(trial_id)
            self.__dict__.setdefault("_untold", {})[trial_id] = (result, error)
            self._tell_untold()

        def suggest(self, trial_id: str) -> dict | None:
            if not self._tell_untold():
                return None
            with warnings.catch_warnings():  # "Heartbeat ... used with Study.optimize"
                warnings.filterwarnings("ignore", "Heartbeat of storage")
                try:
                    config = super().suggest(trial_id)
                except Exception as exc:
                    if not unreachable(exc):
                        raise
                    self._ot_trials.pop(trial_id, None)
                    self._lost(exc)
                    return None
            self._start_heartbeat(trial_id)
            return config

        def save(self, checkpoint_path: str) -> None:
            """What a restore needs, without the study: its trials are in the database.

            OptunaSearch pickles its study (with Optuna's cache of every trial) and a handle on
            every trial it ever asked for, at each of Tune's saves: 32 ms at 290 trials, growing
            with the search (`benchmarks/scale.py`). Here: the unfinished trials' numbers in the
            database, the sampler, the bookkeeping; no thread (`_heartbeat`)."""
            skip = ("_heartbeat", "_ot_study", "_ot_trials")
            state = {k: v for k, v in self.__dict__.items() if k not in skip}
            state["_ot_trial_ids"] = {t: trial._trial_id for t, trial in self._ot_trials.items()}
            with open(checkpoint_path, "wb") as f:
                pickle.dump(state, f)

        def restore(self, checkpoint_path: str) -> None:
            import optuna

            super().restore(checkpoint_path)
            ids = self.__dict__.pop("_ot_trial_ids", None)
            if ids is not None:  # saved by `save` above: the study comes back from its database
                self._ot_study = optuna.load_study(
                    study_name=self._study_name, storage=self._storage, sampler=self._sampler
                )
                self._ot_trials = {t: optuna.trial.Trial(self._ot_study, i) for t, i in ids.items()}
            self._tell_untold()  # a resumed search's database answers (checked at its start)

        def _tell_untold(self) -> bool:
            """Tell Optuna the finished trials it has not heard of; False while it cannot."""
            untold = self.__dict__.get("_untold") or {}
            for trial_id, (result, error) in list(untold.items()):
                try:
                    self._tell(trial_id, result, error)
                except Exception as exc:
                    if not unreachable(exc):
                        raise
                    self._lost(exc)
                    return False
                del untold[trial_id]
                self._ot_trials.pop(trial_id, None)  # told: nothing asks for its handle again
            return True

        def _tell(self, trial_id: str, result: dict | None, error: bool) -> None:
            """`OptunaSearch.on_trial_complete`'s tell, with a database error raised, not
            logged and dropped."""
            ot_trial = self._ot_trials[trial_id]
            metrics = self.metric if isinstance(self.metric, list) else [self.metric]
            values = [(result or {}).get(m) for m in metrics]
            state = TrialState.COMPLETE
            if any(v is None for v in values):
                values, state = None, TrialState.FAIL if error else TrialState.PRUNED
            elif not isinstance(self.metric, list):
                values = values[0]
            try:
                self._ot_study.tell(ot_trial, values, state=state)
            except UpdateFinishedTrialError:
                pass  # already told (a resumed search's trial, or failed as stale meanwhile)
            except Exception as exc:
                if unreachable(exc):
                    raise
                log.warning("Optuna refused trial %s's result: %s", trial_id, exc)  # NaN

        def _lost(self, exc: BaseException) -> None:
            from pipelines.storage import masked

            storage = getattr(self._ot_study, "_storage", None)
            storage = getattr(storage, "_backend", storage)  # Optuna's cache wraps the RDB one
            url = masked(storage.url) if hasattr(storage, "url") else "of the study"
            cause = exc.__cause__ or exc.__context__ or exc  # Optuna's wrap: what it wraps
            database_lost(f"the Optuna database {url} stopped answering: {first_error_line(cause)}")

        def _start_heartbeat(self, new_trial: str | None = None) -> None:
            """On a shared database, beat for the trials held here (a restored searcher's too),
            and at once for a trial just asked (a driver may die before the next beat)."""
            storage = getattr(self._ot_study, "_storage", None)
            if storage is None or not storage.get_heartbeat_interval():
                return
            try:
                if getattr(self, "_heartbeat", None) is None:
                    self._heartbeat = Heartbeat(self).start()  # its first beat holds every trial
                elif new_trial in self._ot_trials:
                    storage.record_heartbeat(self._ot_trials[new_trial]._trial_id)
            except Exception as exc:  # a missed beat: the thread's next one tries again
                if not unreachable(exc):
                    raise

    return ResumableOptunaSearch


class DefineByRun:
    """Optuna define-by-run space for `OptunaSearch`: suggests values, computes nothing.

    num_experts is suggested first so top_k's upper bound can follow it (`top_k_high`).
    Picklable, so Tune can checkpoint the searcher.
    """

    def __init__(self, space: SearchSpace) -> None:
        order = sorted(space.search, key=lambda n: (n != "num_experts", n == "top_k"))
        self.params = [space.search[n] for n in order]
        self.fixed_experts = space.adapter.get("num_experts")

    def __call__(self, trial: Any) -> None:
        experts = self.fixed_experts
        for p in self.params:
            if p.type == "categorical":
                value = trial.suggest_categorical(p.name, list(p.values))
            elif p.type == "int":
                high = p.high
                if p.name == "top_k":
                    high = top_k_high(high, experts)
                value = trial.suggest_int(p.name, p.low, high, step=p.step or 1)
            else:
                value = trial.suggest_float(
                    p.name, p.low, p.high, step=p.step, log=p.type == "loguniform"
                )
            if p.name == "num_experts":
                experts = value
