"""A search's folder and saved state (`search.json`, what `--resume` needs), and its MLflow
run: a new search opens both; a resumed one re-opens them (the journal written to MLflow first).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipelines import storage as optuna_db
from pipelines.console import log_to
from pipelines.errors import SpaceError
from pipelines.records import log_lineage
from pipelines.schema import SearchSpace
from pipelines.stages import SEARCH
from pipelines.tracking import JOURNAL, Tracker, graphlora_home

STATE_FILE = "search.json"  # in a search's output folder: what `--resume` needs


def write_state(output_dir: Path, state: dict[str, Any]) -> None:
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


@dataclass
class SearchState:
    """One search while it runs: its space, MLflow, folder and saved state."""

    space: SearchSpace
    tracker: Tracker
    output_dir: Path
    state: dict[str, Any]  # what search.json holds
    earlier: list[Any]  # its MLflow child runs from before a resume
    out: Any

    def __post_init__(self) -> None:
        self.name, self.parent = self.state["name"], self.state["parent_run_id"]
        self.round = self.state.get("round", 0)  # 0: the search as started; k: its k-th extension


def resume_search(
    space: SearchSpace,
    tracker: Tracker,
    output_dir: Path,
    more_trials: int | None,
    optuna_storage: str | None,
    out: Any,
) -> SearchState:
    """Re-open a search from its `search.json`: its journal written to MLflow, its run running
    again, a resume counted, and a new round when `more_trials` extends it."""
    output_dir = output_dir.resolve()
    state = json.loads((output_dir / STATE_FILE).read_text())
    optuna_db.for_resume(state.get("optuna_storage"), optuna_storage)
    name, parent = state["name"], state["parent_run_id"]
    log_to(output_dir)
    tracker.journal = output_dir / JOURNAL
    if replayed := tracker.replay():
        print(f"search {name}: wrote {replayed} records MLflow had missed", file=out)
    tracker.reopen(parent)
    if more_trials:  # extend a finished search (a resumed extension keeps its round)
        state["round"] = state.get("round", 0) + 1
        state["round_trials"] = more_trials
        state["finished"] = False
    state["resumes"] = state.get("resumes", 0) + 1
    earlier = tracker.child_runs(parent)
    if more_trials:  # every round's trials (the progress line's "to go")
        ran = sum(1 for r in earlier if r.data.tags.get("kind") == "search")
        state["planned_trials"] = ran + more_trials
    write_state(output_dir, state)  # counted even if this run is interrupted too
    tracker.set_tags(parent, {"status": "running", "resumes": state["resumes"]})
    print(f"search {name}: resuming ({len(earlier)} runs recorded so far)", file=out)
    return SearchState(space, tracker, output_dir, state, earlier, out)


def start_search(
    space: SearchSpace,
    tracker: Tracker,
    output_dir: str | Path | None,
    warm_start: Any,
    optuna_storage: str | None,
    out: Any,
) -> SearchState:
    """A new search: its folder, its MLflow run (params, lineage, the space), its state."""
    name = f"{Path(space.path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    output_dir = Path(output_dir or graphlora_home() / "searches" / name).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    log_to(output_dir)
    tracker.journal = output_dir / JOURNAL
    parent = tracker.start_run(
        f"search {name}",
        params={
            "space_file": space.path,
            "model": space.model,
            "dataset": space.dataset,
            "method": space.method or "searched",
            "trials": space.budget.trials,
            "max_steps": space.budget.max_steps,
            "eval_every": space.budget.eval_every,
            "seeds_per_trial": space.seeds_per_trial,
            "searched": ",".join(space.search),
        },
        tags={"kind": "search", "status": "running", "search_name": name},
    )
    log_lineage(tracker, parent, space.configs({}, space.seed)[1], SEARCH.splits)
    space_text = yaml.safe_dump(space.raw, sort_keys=False)
    (output_dir / "space.yaml").write_text(space_text)
    tracker.log_text(parent, space_text, "space.yaml")
    if warm_start is not None:
        tracker.set_tags(parent, {"warm_start_from": warm_start.run_id})
    state = {
        "name": name,
        "space_file": space.path,
        "experiment": space.experiment,
        "parent_run_id": parent,
        "storage_path": os.environ.get("GRAPHLORA_STORAGE_PATH")
        or str(graphlora_home() / "ray_results"),
    }
    if optuna_storage:
        state["optuna_storage"] = optuna_db.masked(optuna_storage)  # never the password
    write_state(output_dir, state)
    print(
        f"search {name}: {space.budget.trials} trials of {space.model} on {space.dataset}; "
        f"MLflow: {tracker.ui_link()}\n"
        f"  interrupted? continue with: graphlora-search --resume {name}",
        file=out,
        flush=True,
    )
    return SearchState(space, tracker, output_dir, state, [], out)
