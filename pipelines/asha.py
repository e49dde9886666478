"""ASHA that stops a trial by asking it to stop, not by killing it, and the hub actor behind it.

Why: a Tune trial whose driver runs a Ray Train V2 `TorchTrainer` and is stopped by a scheduler
is torn down while its Train run is alive, and that run's placement group leaks; on a small
cluster the search then deadlocks (ray-project/ray#54305). Instead `FlagASHAScheduler` records
every decision on a `TrialHub` actor and always tells Tune to CONTINUE. After each evaluation,
rank 0 of every Train worker group waits (briefly) until the scheduler has judged that evaluation
and reads the decision (`train_fn_per_worker`); a stopped trial's training loop returns and its
Train run ends on its own, releasing its resources. ASHA therefore cuts a trial exactly at the
rung where it decided, as the algorithm intends, at the cost of one round trip per evaluation.

The hub also carries each Train run's reports to its trial driver (`put`/`take`): one actor per
search instead of one queue actor per trial.

The hub is a named actor, and everything that needs it (the scheduler, the trial plan, the Train
workers) holds a `HubRef`: its name, looked up on first use. Ray Tune pickles the scheduler and
the trial plan into its saved experiment state; an actor handle there would mean nothing to the
new Ray cluster a resumed search runs on (a machine restart, an OOM kill), and unpickling it
fails. A name is recreated on start (`HubRef.start`).

The search's scheduler and the stability stage's (`SavingFIFOScheduler`) have Tune save each new
trial before its driver starts (`save_new_trial`), so a resumed search knows every trial that
has an MLflow run.
"""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import ray
from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController


@ray.remote(num_cpus=0)
class TrialHub:
    """Per-search mailbox: stop decisions (scheduler -> workers) and reports (Train -> driver)."""

    def __init__(self) -> None:
        self._reasons: dict[str, str] = {}
        self._judged: dict[str, int] = {}  # trial id -> last training_iteration judged
        self._mail: dict[str, list[tuple[int, dict]]] = defaultdict(list)
        self._released = False  # the search stopped: no verdict will come
        self._changed = asyncio.Condition()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def judged(self, trial_id: str, iteration: int, stop_reason: str | None = None) -> None:
        """The scheduler has seen `iteration` of `trial_id` (and maybe decided it should stop)."""
        if stop_reason:
            self._reasons.setdefault(trial_id, stop_reason)
        self._judged[trial_id] = max(self._judged.get(trial_id, 0), iteration)
        await self._notify()

    async def request_stop(self, trial_id: str, reason: str) -> None:
        self._reasons.setdefault(trial_id, reason)
        await self._notify()

    async def release(self) -> None:
        """The search stopped early (Ctrl-C, an error): its scheduler judges nothing more, so
        nobody waits for a verdict (a trial host would sit out `timeout_s` before it saw the
        stop)."""
        self._released = True
        await self._notify()

    async def should_stop(self, trial_id: str, iteration: int = 0, timeout_s: float = 0) -> bool:
        """Whether `trial_id` must stop, waiting up to `timeout_s` for `iteration` to be judged."""

        def ready() -> bool:
            judged = self._judged.get(trial_id, 0) >= iteration
            return self._released or trial_id in self._reasons or judged

        if timeout_s > 0 and not ready():
            async with self._changed:
                try:
                    await asyncio.wait_for(self._changed.wait_for(ready), timeout_s)
                except TimeoutError:
                    pass  # no verdict in time: keep training rather than hang
        return trial_id in self._reasons

    async def put(self, trial_id: str, seed_index: int, metrics: dict) -> None:
        self._mail[trial_id].append((seed_index, metrics))
        await self._notify()

    async def take(self, trial_id: str, timeout_s: float) -> list[tuple[int, dict]]:
        """All reports waiting for `trial_id`, waiting up to `timeout_s` for the first one."""
        if not self._mail.get(trial_id):
            async with self._changed:
                try:
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda: bool(self._mail.get(trial_id))), timeout_s
                    )
                except TimeoutError:
                    return []
        return self._mail.pop(trial_id, [])


HUB_NAMESPACE = "graphlora"  # fixed, so a trial driver or Train worker of any job finds the hub


class HubRef:
    """A `TrialHub` by name: pickles as its name only, looks the actor up on first use.

    Calls go through as on a handle (`ref.put.remote(...)`). The actor is created by the search
    driver (`HubRef.start`) and, as a non-detached actor, dies with it.
    """

    actor_cls: Any = TrialHub  # a subclass names another per-search actor class

    def __init__(self, name: str) -> None:
        self.name = name
        self._handle: Any = None

    @classmethod
    def start(cls, name: str, *args: Any) -> HubRef:
        """Create the actor `name` in this cluster (or reuse a live one; `args` go to a new
        one's constructor) and return a reference."""
        ref = cls(name)
        ref._handle = cls.actor_cls.options(
            name=name, namespace=HUB_NAMESPACE, get_if_exists=True
        ).remote(*args)
        return ref

    @property
    def handle(self) -> Any:
        """The live actor handle (looked up in this process's cluster on first use)."""
        if self._handle is None:
            self._handle = ray.get_actor(self.name, namespace=HUB_NAMESPACE)
        return self._handle

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):  # pickle and copy probe dunders before __init__ has run
            raise AttributeError(attr)
        return getattr(self.handle, attr)

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "_handle": None}  # a handle is only valid in its cluster

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def save_new_trial(tune_controller: Any, trial: Trial) -> None:
    """Save Tune's experiment state with `trial` in it, now, before the trial's driver starts.

    A trial's MLflow run and Optuna trial exist from its start; Tune saves its state only after
    a trial's report, or every 10 s. A machine that stopped in between left a running MLflow run
    and Optuna trial that the resumed search knew nothing of, and a new trial in its place
    (`test_machine_stop_then_resume_on_a_new_local_ray` caught it once Tune reused actors: the
    next trial then starts within the step that adds it). A trial restored with results was
    saved before; it is not saved again (a resume of a thousand trials would save a thousand
    times). Schedulers get a wrapper of the controller; what it wraps is Ray 2.60's (pyproject
    pins it), whose private `_mark_trial_to_checkpoint` puts a trial in the next save."""
    controller = getattr(tune_controller, "__dict__", {}).get("_tune_controller", tune_controller)
    if not hasattr(controller, "_mark_trial_to_checkpoint"):
        return
    if "training_iteration" in trial.last_result:  # a new trial's holds only its id
        return
    controller._mark_trial_to_checkpoint(trial)
    controller.checkpoint(force=True, wait=True)


class SavesNewTrials:
    """A scheduler that has Tune save each new trial before it starts (`save_new_trial`)."""

    def on_trial_add(self, tune_controller: TuneController, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)  # type: ignore[misc]
        save_new_trial(tune_controller, trial)


class SavingFIFOScheduler(SavesNewTrials, FIFOScheduler):
    """The stability stage's scheduler: first in, first out, each new trial saved at once."""


class FlagASHAScheduler(SavesNewTrials, AsyncHyperBandScheduler):
    """`AsyncHyperBandScheduler` whose decisions go to a `TrialHub`; it never stops a trial.

    `stop_reasons` (trial id -> reason) says which trials ASHA cut, for MLflow and the summary.
    Trials that reach `max_t` end on their own as well (their loop is at max_steps).
    """

    def __init__(self, hub: HubRef, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._hub = hub  # a reference by name: Tune pickles the scheduler into its saved state
        self.stop_reasons: dict[str, str] = {}

    def on_trial_result(self, tune_controller: TuneController, trial: Trial, result: dict) -> str:
        iteration = result.get(self._time_attr, 0)
        reason = None
        if trial.trial_id not in self.stop_reasons and not result.get("final"):
            action = super().on_trial_result(tune_controller, trial, result)
            if action == TrialScheduler.STOP and iteration < self._max_t:
                reason = (
                    f"ASHA: {self._metric}={result[self._metric]:.4g} below the rung "
                    f"cutoff at {self._time_attr}={iteration}"
                )
                self.stop_reasons[trial.trial_id] = reason
        self._hub.judged.remote(trial.trial_id, iteration, reason)
        return TrialScheduler.CONTINUE

    def restore_rungs(self, objectives: dict[str, list[float]]) -> None:
        """Put back what the rungs held before a resumed search: `objectives` maps each earlier
        trial to its objective at evaluations 1, 2, ...; a trial sits in every rung it reached,
        with its value there (as `on_trial_result` recorded it), so resumed and new trials are
        judged against the same cutoffs as before the interruption."""
        for trial_id, values in objectives.items():
            for bracket in self._brackets:
                for milestone, recorded in bracket._rungs:
                    reached = math.ceil(milestone)  # the first evaluation at or past it
                    if reached <= len(values) and milestone < self._max_t:
                        recorded[trial_id] = self._metric_op * values[reached - 1]

    def on_trial_complete(
        self, tune_controller: TuneController, trial: Trial, result: dict
    ) -> None:
        # A trial driver's last report (`final`: test metrics) is not an evaluation: it repeats
        # the last one's objective one training_iteration later. The stock scheduler records it
        # at the next rung, so a trial cut at rung r would sit in rung r+1 with its rung-r score
        # and pull that rung's cutoff down (measured: the quickstart's trial 5 then passed a rung
        # ASHA should have cut it at). Rungs only ever hold evaluations.
        if result.get("final"):
            self._trial_info.pop(trial.trial_id, None)
            return
        super().on_trial_complete(tune_controller, trial, result)
