"""pipelines/storage.py: which database holds a search's Optuna study (flag, environment, space,
default), refusals in one line, and, on a real PostgreSQL server (`tests/postgres.py`), two
drivers sharing one study with a heartbeat that fails a dead driver's trials."""

from __future__ import annotations

import time

import pytest

from pipelines import storage
from pipelines.storage import StorageError


def test_flag_then_environment_then_space(monkeypatch):
    monkeypatch.delenv(storage.ENV, raising=False)
    assert storage.resolve(None, None) is None
    assert storage.resolve(None, "postgresql://s@h/db") == "postgresql://s@h/db"
    monkeypatch.setenv(storage.ENV, "postgresql://e@h/db")
    assert storage.resolve(None, "postgresql://s@h/db") == "postgresql://e@h/db"
    assert storage.resolve("postgresql://f@h/db", "postgresql://s@h/db") == "postgresql://f@h/db"


def test_passwords_are_masked():
    assert storage.masked("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert storage.masked("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


@pytest.mark.parametrize(
    "url, expected",
    [
        ("nonsense", "is not a database URL"),
        ("oracle://u@h/db", "'oracle' is not supported"),
        ("postgresql://u:pw@127.0.0.1:1/db", "is unreachable: connection failed"),
    ],
)
def test_refused_in_one_line(url, expected):
    with pytest.raises(StorageError) as info:
        storage.check(url)
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert "pw@" not in message


def test_a_resume_uses_the_study_it_started_with():
    storage.for_resume(None, None)
    storage.for_resume("postgresql://u:***@h/db", "postgresql://u:pw@h/db")
    with pytest.raises(StorageError, match="optuna.db"):
        storage.for_resume(None, "postgresql://u@h/db")
    with pytest.raises(StorageError, match="set GRAPHLORA_OPTUNA_STORAGE"):
        storage.for_resume("postgresql://u:***@h/db", None)


def _space(trial) -> None:
    trial.suggest_float("x", 0.0, 1.0)


def _searcher(url: str):
    from pipelines.tuning import optuna_search_class

    return optuna_search_class()(
        _space,
        metric="objective",
        mode="max",
        storage=storage.open_storage(url),
        study_name="shared",
    )


def test_two_drivers_share_a_study_and_a_dead_drivers_trial_fails(postgres, monkeypatch):
    """Driver A asks a trial and dies (its heartbeat stops); driver B, on the same study, gets
    another trial number, beats for it, and fails A's trial once A's beat is older than the grace
    period; B's trial ends COMPLETE, nothing is left RUNNING."""
    import optuna

    monkeypatch.setattr(storage, "HEARTBEAT_S", 1)
    monkeypatch.setattr(storage, "GRACE_S", 2)
    url = postgres.create_database("heartbeat")
    storage.check(url)
    dead = _searcher(url)
    dead.suggest("a")
    dead._heartbeat.stop()  # the driver dies: no more beats
    live = _searcher(url)
    live.suggest("b")
    study = optuna.load_study(study_name="shared", storage=url)
    deadline = time.monotonic() + 30
    while study.trials[0].state.name == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
    first, second = study.trials
    assert (first.number, second.number) == (0, 1)
    assert first.state.name == "FAIL" and second.state.name == "RUNNING"
    live.on_trial_complete("b", {"objective": 0.5})
    live._heartbeat.stop()
    states = [t.state.name for t in optuna.load_study(study_name="shared", storage=url).trials]
    assert states == ["FAIL", "COMPLETE"]


def test_a_result_the_database_missed_is_told_when_it_answers(postgres, tmp_path):
    """PostgreSQL stops as a trial ends: the searcher keeps the result (saved with it, as Tune
    saves it), stops the search in one line without the password, and asks no new trial; the
    resumed searcher, restored from that save once PostgreSQL is back, tells it: the trial is
    COMPLETE with its value, nothing RUNNING, nothing told twice."""
    import optuna

    from pipelines import tuning

    url = postgres.create_database("untold")
    searcher = _searcher(url)
    searcher.suggest("a")
    searcher._heartbeat.stop()
    postgres.stop()
    try:
        searcher.on_trial_complete("a", {"objective": 0.75})
        assert searcher.suggest("b") is None  # no new trial while it cannot be recorded
        lost = tuning._STOP.lost
        searcher.save(str(tmp_path / "searcher.pkl"))
    finally:
        tuning._STOP.__init__()
        postgres.start()
    assert lost and "Optuna database postgresql://graphlora:***@127.0.0.1" in lost, lost
    assert "stopped answering: connection failed" in lost, lost
    assert "graphlora-test" not in lost and "\n" not in lost
    assert optuna.load_study(study_name="shared", storage=url).trials[0].state.name == "RUNNING"
    resumed = _searcher(url)
    resumed.restore(str(tmp_path / "searcher.pkl"))
    (trial,) = optuna.load_study(study_name="shared", storage=url).trials
    assert trial.state.name == "COMPLETE" and trial.value == 0.75
    resumed.on_trial_complete("a", {"objective": 0.75})  # Tune's own repeat: no second tell
    resumed.suggest("c")
    resumed._heartbeat.stop()
    states = [t.state.name for t in optuna.load_study(study_name="shared", storage=url).trials]
    assert states == ["COMPLETE", "RUNNING"]


def test_the_saved_searcher_does_not_grow_with_the_finished_trials(tmp_path):
    """Tune saves the searcher after every report: what it saves holds the unfinished trials and
    the sampler, not every trial of the study. A restored searcher ends the trial asked before
    the save, with its value, and asks new ones."""
    import optuna

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher, saved = _searcher(url), tmp_path / "searcher.pkl"
    sizes = {}
    for n in range(60):
        searcher.suggest(f"t{n}")
        searcher.on_trial_result(f"t{n}", {"objective": 0.1, "training_iteration": 1})
        searcher.on_trial_complete(f"t{n}", {"objective": n / 100})
        if n in (9, 59):
            searcher.save(str(saved))
            sizes[n + 1] = saved.stat().st_size
    # 50 more finished trials: their ids (the whole study pickled took about 1.5 KB a trial)
    assert (sizes[60] - sizes[10]) / 50 < 20, sizes
    searcher.suggest("open")
    searcher.on_trial_result("open", {"objective": 0.2, "training_iteration": 1})
    searcher.save(str(saved))
    resumed = _searcher(url)
    resumed.restore(str(saved))
    resumed.on_trial_result("open", {"objective": 0.3, "training_iteration": 2})
    resumed.on_trial_complete("open", {"objective": 0.9})
    resumed.on_trial_complete("t5", {"objective": 0.05})  # Tune's repeat of an ended trial
    assert resumed.suggest("next") is not None
    trials = optuna.load_study(study_name="shared", storage=url).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 61 + ["RUNNING"]
    assert trials[60].value == 0.9 and trials[60].intermediate_values == {1: 0.2, 2: 0.3}
