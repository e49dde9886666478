"""FlagASHAScheduler's decisions, fed the results a search's trial drivers report (no Ray needed:
the scheduler only calls `hub.judged.remote`, recorded here)."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

from ray.tune.schedulers import TrialScheduler

from pipelines.asha import FlagASHAScheduler


class RecordingHub:
    """What the scheduler tells the TrialHub actor: (trial id, iteration, stop reason)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.judged = SimpleNamespace(remote=lambda *args: self.calls.append(args))


def scheduler(hub: RecordingHub, **kw) -> FlagASHAScheduler:
    kw = {"max_t": 4, "grace_period": 1, "reduction_factor": 2, **kw}
    return FlagASHAScheduler(
        hub, time_attr="training_iteration", metric="objective", mode="max", **kw
    )


def trial(trial_id: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id)


def report(s: FlagASHAScheduler, trial_id: str, iteration: int, score: float, **extra) -> str:
    result = {"training_iteration": iteration, "objective": score, **extra}
    return s.on_trial_result(None, trial(trial_id), result)


def finish(s: FlagASHAScheduler, trial_id: str, iteration: int, score: float) -> None:
    """A driver's last report (test metrics, `final`), one iteration after its last evaluation."""
    result = {"training_iteration": iteration, "objective": score, "final": 1}
    report(s, trial_id, iteration, score, final=1)
    s.on_trial_complete(None, trial(trial_id), result)


def test_decisions_go_to_the_hub_and_tune_is_always_told_continue() -> None:
    hub = RecordingHub()
    s = scheduler(hub)
    for t in ("a", "b", "c"):
        s.on_trial_add(None, trial(t))
    assert report(s, "a", 1, 0.6) == TrialScheduler.CONTINUE
    assert report(s, "b", 1, 0.7) == TrialScheduler.CONTINUE
    assert report(s, "c", 1, 0.1) == TrialScheduler.CONTINUE  # cut, but by flag
    assert set(s.stop_reasons) == {"c"}
    assert "objective=0.1 below the rung cutoff at training_iteration=1" in s.stop_reasons["c"]
    assert hub.calls[:2] == [("a", 1, None), ("b", 1, None)]
    assert hub.calls[2][:2] == ("c", 1) and hub.calls[2][2] == s.stop_reasons["c"]


def test_final_reports_of_cut_trials_do_not_lower_the_next_rung() -> None:
    """The quickstart's measured scores: three trials cut at rung 1 finish with a `final` report
    at iteration 2. Before the fix those landed in rung 2 and trial e passed it (0.605 against
    a cutoff of 0.275); rung 2 must hold only a and b's evaluations (cutoff 0.6325)."""
    s = scheduler(RecordingHub())
    for t in "abcdef":
        s.on_trial_add(None, trial(t))
    for it, (a, b) in enumerate([(0.345, 0.41), (0.605, 0.66), (0.95, 0.995), (0.97, 1.0)], 1):
        report(s, "a", it, a)
        report(s, "b", it, b)
    finish(s, "a", 5, 0.97)
    finish(s, "b", 5, 1.0)
    for t, score in (("c", 0.275), ("d", 0.245)):
        report(s, t, 1, score)
        finish(s, t, 2, score)
    report(s, "e", 1, 0.375)
    report(s, "f", 1, 0.25)
    finish(s, "f", 2, 0.25)
    assert set(s.stop_reasons) == {"c", "d", "f"}  # cut at rung 1
    report(s, "e", 2, 0.605)
    assert "training_iteration=2" in s.stop_reasons["e"]


def test_a_trial_cut_once_stays_cut() -> None:
    s = scheduler(RecordingHub())
    for t in "ab":
        s.on_trial_add(None, trial(t))
    report(s, "a", 1, 0.9)
    report(s, "b", 1, 0.1)
    reason = s.stop_reasons["b"]
    report(s, "b", 2, 0.99)  # the trial's next evaluation, already under way, changes nothing
    assert s.stop_reasons["b"] == reason


def test_workers_and_drivers_do_not_import_mlflow_or_optuna() -> None:
    """Ray Train workers and Tune trial drivers import their layers (and the search module's,
    which Ray may unpickle there); MLflow and Optuna cost seconds to import and are only used by
    the search's own process."""
    code = (
        "import sys, pipelines.worker, pipelines.trial, pipelines.search, pipelines.asha; "
        "print(sorted(m for m in ('mlflow', 'optuna') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_parent_run_tag_matches_mlflow() -> None:
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from pipelines import tracking

    assert tracking.MLFLOW_PARENT_RUN_ID == MLFLOW_PARENT_RUN_ID


def test_a_resumed_search_judges_against_the_rungs_it_had() -> None:
    """Before the interruption a reached 4 evaluations (0.3, 0.6, 0.8, 0.9) and b was cut at
    the first (0.2). The resumed scheduler starts empty; after `restore_rungs` a new trial is
    judged against the same cutoffs as before, and a trial already in a rung is not re-judged."""
    before = scheduler(RecordingHub(), max_t=8)
    resumed = scheduler(RecordingHub(), max_t=8)
    resumed.restore_rungs({"a": [0.3, 0.6, 0.8, 0.9], "b": [0.2]})
    for s in (before, resumed):
        for t in "abc":
            s.on_trial_add(None, trial(t))
    for it, value in enumerate([0.3, 0.6, 0.8, 0.9], 1):
        report(before, "a", it, value)
    report(before, "b", 1, 0.2)
    assert [dict(r) for _, r in resumed._brackets[0]._rungs] == [
        dict(r) for _, r in before._brackets[0]._rungs
    ]
    for s in (before, resumed):
        report(s, "c", 1, 0.25)  # passes rung 1 (cutoff 0.25 = median of 0.3 and 0.2)
        report(s, "c", 2, 0.5)  # cut at rung 2: below a's 0.6
        assert set(s.stop_reasons) == {"b", "c"} - ({"b"} if s is resumed else set())
        assert "training_iteration=2" in s.stop_reasons["c"]
    report(resumed, "a", 5, 0.1)  # a continues past its rungs: nothing recorded or cut
    assert "a" not in resumed.stop_reasons


def test_hub_ref_pickles_as_its_name_only() -> None:
    """Tune pickles the scheduler (and the trial plan) into its saved experiment; a live actor
    handle there cannot be unpickled on the new cluster a resumed search runs on."""
    import pickle

    from pipelines.asha import HubRef

    ref = HubRef("trial-hub:s1")
    ref._handle = object()  # a looked-up handle, valid only in this cluster
    s = scheduler(ref)
    back = pickle.loads(pickle.dumps(s))
    assert isinstance(back._hub, HubRef) and back._hub.name == "trial-hub:s1"
    assert back._hub._handle is None  # looked up again on first use
    assert ref._handle is not None  # pickling did not drop the live one here
    assert not hasattr(HubRef("x"), "__setstate_probe__")  # dunders never reach Ray


def test_a_released_hub_answers_every_verdict_wait_at_once() -> None:
    """A search stopped early releases its hub: a trial host waiting for ASHA's verdict on an
    evaluation goes on at once (it then sees the stop) instead of sitting out its wait."""
    import asyncio

    from pipelines.asha import TrialHub

    hub = TrialHub.__ray_actor_class__()  # the actor's own class, run here on an event loop

    async def wait_then_release() -> bool:
        waiting = asyncio.create_task(hub.should_stop("t1", iteration=1, timeout_s=30.0))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # no verdict yet: it waits
        await hub.release()
        return await asyncio.wait_for(waiting, 5.0)  # TimeoutError if it still waits

    assert asyncio.run(wait_then_release()) is False  # not a stop: the abort is the host's to see
    assert asyncio.run(hub.should_stop("t2", iteration=3, timeout_s=30.0)) is False
