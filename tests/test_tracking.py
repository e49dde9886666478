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
