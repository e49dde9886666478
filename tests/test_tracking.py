"""pipelines/tracking.py: which MLflow stores a search accepts, and where a database store puts
artifacts (a real PostgreSQL server: `tests/postgres.py`)."""

from __future__ import annotations

import pytest

from pipelines.tracking import Tracker, TrackingError, check_store, ui_link


def test_databricks_is_not_mistaken_for_a_file_store():
    check_store("databricks")  # MLflow's own client says what is missing (host, token)
    with pytest.raises(TrackingError, match="file store is deprecated"):
        check_store("./mlruns")


def test_unreachable_database_store_is_refused_in_one_line():
    with pytest.raises(TrackingError) as info:
        check_store("postgresql://u:pw@127.0.0.1:1/mlflow")
    message = str(info.value)
    assert "MLflow store postgresql://u:***@127.0.0.1:1/mlflow is unreachable" in message
    assert "MLFLOW_TRACKING_URI" in message and "\n" not in message and "pw@" not in message


def test_postgresql_store_gets_a_fixed_artifact_location(postgres, tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHLORA_HOME", str(tmp_path))
    uri = postgres.create_database("mlflow_direct")
    tracker = Tracker("direct", uri=uri)
    location = tracker.client.get_experiment(tracker.experiment_id).artifact_location
    assert location == (tmp_path / "mlartifacts" / "direct").as_uri()
    run = tracker.start_run("r", params={"db_password": "x"})
    tracker.log_text(run, "hello", "note.txt")
    assert (tmp_path / "mlartifacts" / "direct" / run / "artifacts" / "note.txt").is_file()
    assert "graphlora-test" not in ui_link(tracker.experiment_id, uri)  # no password shown


def test_a_store_lost_mid_search_keeps_every_write_for_the_resume(postgres, tmp_path, monkeypatch):
    """PostgreSQL stops under a running search's store: the first write that fails tells
    `on_lost` once, in one line without the password; that write and the later ones wait in the
    journal (reads and new runs raise `StoreLost`); once it is back, `replay` writes them in
    order and removes the journal."""
    from pipelines.tracking import StoreLost

    monkeypatch.setenv("GRAPHLORA_HOME", str(tmp_path))
    tracker = Tracker("lost", uri=postgres.create_database("mlflow_lost"))
    lost: list[str] = []
    tracker.on_lost, tracker.journal = lost.append, tmp_path / "unrecorded.jsonl"
    run = tracker.start_run("trial", params={"lr": 0.1})
    tracker.log_metrics(run, {"objective": 0.25}, step=10)
    postgres.stop()
    try:
        tracker.log_metrics(run, {"objective": 0.5, "evals": 2}, step=20)
        tracker.log_text(run, '{"layer0": [1, 2]}', "routing_counts.json")
        tracker.finish(run, "interrupted", "the store stopped")
        with pytest.raises(StoreLost):
            tracker.start_run("another")
        with pytest.raises(StoreLost):
            tracker.child_runs(run)
    finally:
        postgres.start()
    assert len(lost) == 1 and "stopped answering" in lost[0], lost
    assert "graphlora-test" not in lost[0] and "\n" not in lost[0]
    fresh = Tracker("lost", uri=tracker.uri)  # the resumed search's
    fresh.journal = tracker.journal
    assert fresh.client.get_run(run).info.status == "RUNNING"  # nothing written meanwhile
    assert fresh.replay() == 4  # metrics, text, the status tags, the status
    assert not tracker.journal.exists() and fresh.replay() == 0
    history = fresh.client.get_metric_history(run, "objective")
    assert [(m.step, m.value) for m in history] == [(10, 0.25), (20, 0.5)]
    got = fresh.client.get_run(run)
    assert got.info.status == "KILLED" and got.data.tags["status"] == "interrupted"
    assert got.data.metrics["evals"] == 2
    assert fresh.client.list_artifacts(run)[0].path == "routing_counts.json"


def test_a_refused_write_is_raised_not_journaled(tmp_path, monkeypatch):
    """A write the store refuses (a run that does not exist) is a bug: raised, nothing kept."""
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("GRAPHLORA_HOME", str(tmp_path))
    tracker = Tracker("refused")
    tracker.journal = tmp_path / "unrecorded.jsonl"
    with pytest.raises(MlflowException):
        tracker.set_tags("0" * 32, {"a": 1})
    assert tracker.lost is None and not tracker.journal.exists()
