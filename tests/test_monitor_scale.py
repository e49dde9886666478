"""The search's bookkeeping per trial does not grow with the number of trials before it.

A search of a thousand trials must not pay, at its thousandth trial, for the 999 before it: no
callback may rescan every trial's record or every MLflow run. Here the search monitor (the Tune
callback that records every trial in MLflow) gets a few hundred trials' events, with no training
and no Ray, against a real MLflow store (SQLite, as the embedded default); the work of each block
of trials is counted (SQL statements the store runs, and the steps SQLite takes to run them,
which grow with the rows a query scans), never timed, so the test means the same on any machine.
"""

from __future__ import annotations

import io
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from pipelines.monitor import SearchMonitor
from pipelines.tracking import Tracker
from pipelines.validate import load_search_space

SPACE = """\
model: tiny-qwen2
dataset: synthetic
method: graphlora
search:
  learning_rate: {type: loguniform, low: 1.0e-5, high: 1.0e-1}
  num_experts: {type: categorical, values: [2, 4]}
budget: {trials: 1000, max_steps: 20, eval_every: 10}
mlflow: {experiment: scale}
"""
TRIALS, BLOCK = 120, 30


@dataclass
class _Trial:
    """What the monitor reads of a Tune trial."""

    trial_id: str
    config: dict = field(default_factory=dict)
    error_file: str | None = None

    def get_error(self) -> str:
        return "RuntimeError: boom"


class _Work:
    """SQL statements, and the SQLite virtual-machine steps they take (in thousands: what grows
    when a query scans more rows), counted on every SQLAlchemy engine of this process."""

    def __init__(self) -> None:
        self.statements = 0
        self.steps = 0

    def __enter__(self) -> _Work:
        event.listen(Engine, "before_cursor_execute", self._statement)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(Engine, "before_cursor_execute", self._statement)

    def _step(self) -> int:
        self.steps += 1
        return 0  # go on

    def _statement(self, conn, *args: object) -> None:  # noqa: ANN001
        self.statements += 1
        dbapi = conn.connection.dbapi_connection
        if isinstance(dbapi, sqlite3.Connection):
            dbapi.set_progress_handler(self._step, 1000)


def _result(step: int, value: float, final: bool = False) -> dict:
    out = {"step": step, "objective": value, "val_accuracy": value, "train_loss": 1.0 - value}
    out.update({"layer0/batch_entropy": 0.9, "routing/batch_entropy": 0.9})
    return {**out, "final": 1} if final else out


@pytest.mark.slow
def test_work_per_trial_does_not_grow_with_earlier_trials(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("GRAPHLORA_HOME", str(tmp_path))
    (tmp_path / "space.yaml").write_text(SPACE)
    space = load_search_space(tmp_path / "space.yaml")
    tracker = Tracker(space.experiment, uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = tracker.start_run("search", tags={"kind": "search"})
    monitor = SearchMonitor(tracker, parent, space, out=io.StringIO(), total=TRIALS)
    blocks: list[tuple[int, int]] = []
    with _Work() as work:
        for block in range(TRIALS // BLOCK):
            before = (work.statements, work.steps)
            for i in range(block * BLOCK, (block + 1) * BLOCK):
                trial = _Trial(f"t{i:05d}", {"learning_rate": 1e-3, "num_experts": 2 + 2 * (i % 2)})
                monitor.on_trial_start(0, [], trial)
                for step in (10, 20):
                    monitor.on_trial_result(0, [], trial, _result(step, (i % 7) / 7))
                monitor.on_trial_result(0, [], trial, _result(20, (i % 7) / 7, final=True))
                if i % 10 == 9:
                    monitor.on_trial_error(0, [], trial)
                else:
                    monitor.on_trial_complete(0, [], trial)
            blocks.append((work.statements - before[0], work.steps - before[1]))
    per_trial = [(s / BLOCK, r / BLOCK) for s, r in blocks]
    print("SQL statements, thousands of SQLite steps per trial, by block of", BLOCK, per_trial)
    assert len(monitor.records) == TRIALS
    assert blocks[0][0] > 0  # the counter sees the store's work
    # The first block also creates what every later one reuses; from the second on, a block's
    # work is that of its own trials: the last block does no more than the second.
    second, last = blocks[1], blocks[-1]
    assert last[0] <= second[0], per_trial
    assert last[1] <= 1.2 * second[1], per_trial  # B-tree depth grows; a rescan grows linearly
    runs = tracker.child_runs(parent)
    assert len(runs) == TRIALS
