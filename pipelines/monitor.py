"""The Tune callback that records a search stage in MLflow: one child run per trial, with its
params, evaluations, routing artifacts and status, and its progress lines (`pipelines/progress.py`);
after a resume it adopts the stage's earlier runs. Its `records` are what the stage's results are
made of (`pipelines/results.py`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray import tune

from pipelines.errors import traceback_line
from pipelines.progress import Progress, fmt, format_params
from pipelines.records import (
    COLLAPSED_TAG,
    collapsed_from_text,
    collapsed_text,
    config_params,
    load_map,
    log_lineage,
    routing_health,
    tidy_metrics,
    unpack_report,
)
from pipelines.results import LOAD_MAP, ROUTING_HEALTH
from pipelines.schema import SearchSpace
from pipelines.stages import SEARCH, STAGES
from pipelines.tracking import (
    COMPLETED,
    FAILED,
    INTERRUPTED,
    STOPPED_EARLY_ASHA,
    StoreLost,
    Tracker,
)

ASHA_STOP = "asha_stop"  # run tag: ASHA's reason for cutting the trial, set when it decides


class SearchMonitor(tune.Callback):
    """Records one MLflow child run per trial, with its status, and says so (`progress`).

    Status: `stopped_early_asha` when the scheduler flagged the trial, `failed` (with the error
    line) when it raised, else `completed`. Stability trials nest under their config's run.
    """

    def __init__(
        self,
        tracker: Tracker,
        parent_run_id: str,
        space: SearchSpace,
        *,
        scheduler: Any = None,
        out: Any = None,
        total: int = 0,
        stage: str = "search",
    ) -> None:
        self.tracker, self.parent, self.space = tracker, parent_run_id, space
        self.scheduler, self.stage = scheduler, stage
        self.progress = Progress(space, stage, out, total)
        self.records: dict[str, dict[str, Any]] = {}  # trial id -> its record, in start order
        self._hidden_size: int | None = None  # the model's width, read once

    def adopt_runs(self, runs: list[Any]) -> None:
        """Take over this stage's MLflow runs from before a resume (`Tracker.child_runs`).

        Finished ones become rows as they were; unfinished ones (still `running` after a
        killed driver, or `interrupted` by Ctrl-C / SIGTERM) are re-opened when Ray Tune
        restarts their trial (`on_trial_start`), so a resumed search never duplicates a run.
        An unfinished one that ASHA had already cut (its `asha_stop` tag) ends here as
        `stopped_early_asha`, at the evaluation ASHA judged: its trial does not train again.
        """
        for r in sorted(runs, key=lambda r: r.info.start_time):
            tags, trial_id = r.data.tags, r.data.tags.get("trial_id")
            if not trial_id or tags.get("kind") != self.stage:
                continue
            metrics = dict(r.data.metrics)
            status, reason = tags.get("status", "running"), tags.get("status_reason")
            if status in ("running", INTERRUPTED) and tags.get(ASHA_STOP):
                # ASHA had cut it; the search stopped before the trial ended: it ends now, as
                # ASHA left it, rather than train again.
                status, reason = STOPPED_EARLY_ASHA, tags[ASHA_STOP]
                self.tracker.finish(r.info.run_id, status, reason)
            evals = self.tracker.client.get_metric_history(r.info.run_id, "evals")
            objective = {  # one point per step (a final report repeats the last one)
                m.step: m.value
                for m in self.tracker.client.get_metric_history(r.info.run_id, "objective")
            }
            self.records[trial_id] = {
                "trial": len(self.records) + 1,
                "trial_id": trial_id,
                "name": r.info.run_name,
                "params": json.loads(tags.get("trial_params", "{}")),
                "run": json.loads(tags["stability_run"]) if "stability_run" in tags else None,
                "run_id": r.info.run_id,
                "status": status,
                "reason": reason,
                "evals": len(evals),
                # ASHA's view of the trial: its objective at each evaluation, in order
                "objectives": [objective[k] for k in sorted(objective)][: len(evals)],
                "last": metrics,
                "last_step": max((m.step for m in evals), default=0),
                "worker_failures": int(metrics.get("worker_failures", 0)),
                "collapsed": collapsed_from_text(tags.get(COLLAPSED_TAG)),
                # ended before the resume (an interrupted trial has not: it continues)
                "kept": status not in ("running", INTERRUPTED),
            }
        self.progress.adopt_best(self.records.values())

    def ended(self) -> dict[str, dict | None]:
        """Adopted trials that had ended: id -> last metrics (None when it failed)."""
        return {
            tid: (None if rec["status"] == FAILED else dict(rec["last"]))
            for tid, rec in self.records.items()
            if rec.get("kept")
        }

    def close_unfinished(self) -> list[str]:
        """After the stage: runs still `running` belong to trials Ray Tune never resumed (the
        driver died before Tune saved them). Close them as failed, so MLflow shows no run that
        will never end; returns their trial ids."""
        lost = []
        for trial_id, rec in self.records.items():
            if rec["status"] in ("running", INTERRUPTED):
                rec["status"] = FAILED
                rec["reason"] = (
                    "interrupted: the search driver stopped before Ray Tune saved this trial"
                )
                self.tracker.finish(rec["run_id"], FAILED, rec["reason"])
                self.progress.say(f"{rec['name']} {FAILED} ({rec['reason']})")
                lost.append(trial_id)
        return lost

    def close_interrupted(self, reason: str) -> list[str]:
        """The search was stopped (Ctrl-C, SIGTERM): close the runs of trials still running as
        `interrupted` (MLflow: KILLED), not failed; `--resume` re-opens and continues them.
        Returns their trial ids."""
        stopped = []
        for trial_id, rec in self.records.items():
            if rec["status"] == "running":
                rec["status"], rec["reason"] = INTERRUPTED, reason
                self.tracker.finish(rec["run_id"], INTERRUPTED, reason)
                self.progress.say(f"{rec['name']} {INTERRUPTED} at eval {rec['evals']} ({reason})")
                stopped.append(trial_id)
        return stopped

    def _gcn_hidden_used(self, params: dict[str, Any]) -> int | None:
        """`gcn_hidden` as the graph router is built for these params: capped at the model's
        hidden size, read from the model's config (no weights). None: no graph router."""
        from graphlora.config import MoELoRAConfig
        from graphlora.models import model_hidden_size

        adapter, training = self.space.configs(params, self.space.seed)
        if self._hidden_size is None:
            self._hidden_size = model_hidden_size(
                training["model"], revision=training.get("model_revision")
            )
        return MoELoRAConfig.from_dict(adapter).gcn_hidden_for(self._hidden_size)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        try:
            self._start(trial)
        except StoreLost:  # the search is stopping (`Tracker.on_lost`); it starts on resume
            self.progress.say(f"trial {trial.trial_id} not recorded: {self.tracker.lost}")

    def _start(self, trial: Any) -> None:
        rec = self.records.get(trial.trial_id)
        if rec is not None and rec.get("kept"):
            self.progress.say(f"{rec['name']} had ended ({rec['status']}) before the resume; kept")
            return
        if rec is not None:  # resumed: same MLflow run, continued
            rec["status"], rec["reason"] = "running", None
            self.tracker.reopen(rec["run_id"])
            self.tracker.set_tags(rec["run_id"], {"status": "running", "status_reason": ""})
            self.progress.say(f"{rec['name']} resumed at eval {rec['evals']}", self.records)
            return
        number = len(self.records) + 1
        run = trial.config.get("_run")
        if run:  # stability: one seed of one top config
            params, parent, seed = run["params"], run["group_run_id"], run["seeds"][0]
            name = f"stability {run['group']} seed {seed}"
            extra = {"group": run["group"]}
        else:
            params, parent, seed = dict(trial.config), self.parent, self.space.seed
            name = f"trial {number:02d} {trial.trial_id}"
            seeds = SEARCH.seeds(self.space.seed, self.space.seeds_per_trial)
            extra = {"seeds": ",".join(map(str, seeds))}
        used = self._gcn_hidden_used(params)
        if used is not None:  # the graph router's width as built (capped at the model's width)
            extra["gcn_hidden_used"] = used
        adapter, training = STAGES[self.stage].configs(self.space, params, seed)
        tags = {"kind": self.stage, "trial_id": trial.trial_id, "trial_params": json.dumps(params)}
        if run:
            tags["stability_run"] = json.dumps(run)
        run_id = self.tracker.start_run(
            name,
            parent_run_id=parent,
            params={**config_params(adapter, training), **extra},
            tags=tags,
        )
        log_lineage(self.tracker, run_id, training, STAGES[self.stage].splits)
        self.records[trial.trial_id] = {
            "trial": number,
            "trial_id": trial.trial_id,
            "name": name,
            "params": params,
            "run": run,
            "run_id": run_id,
            "status": "running",
            "evals": 0,
            "last": {},
            "last_step": 0,
            "worker_failures": 0,
        }
        self.progress.say(f"{name} started: {format_params(params)}", self.records)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        rec = self.records.get(trial.trial_id)
        if rec is None or rec.get("kept"):  # None: it started while the store was unreachable
            return
        result = unpack_report(result)
        step = int(result.get("step", 0))
        metrics = tidy_metrics(result)
        failures = int(result.get("worker_failures", 0))
        log = str(result.get("recovery_log", ""))
        if log and log != rec.get("recovery_log"):
            rec["recovery_log"] = log
            self.tracker.set_tags(rec["run_id"], {"worker_failures": failures, "recovery_log": log})
        if failures > rec["worker_failures"]:
            rec["worker_failures"] = failures
            restart = f"worker failure {failures}, Ray Train restarts it: {log}"
            self.progress.say(f"{rec['name']} {restart}")
        # ASHA judged this result before the callbacks saw it. Its cut goes on the run at once:
        # a search stopped before the trial ends (Ctrl-C, a stopped machine) must not train a
        # cut trial again when it resumes (`adopt_runs`).
        cut = getattr(self.scheduler, "stop_reasons", {}).get(trial.trial_id)
        if cut and rec.get(ASHA_STOP) != cut:
            rec[ASHA_STOP] = cut
            self.tracker.set_tags(rec["run_id"], {ASHA_STOP: cut})
        if result.get("final"):  # only what the last evaluation did not already log
            new = {k: v for k, v in metrics.items() if rec["last"].get(k) != v}
            self.tracker.log_metrics(rec["run_id"], new, step=step)
            rec["last"].update(metrics)
            counts = load_map(result)
            if counts:
                rec["load_map"] = counts
                self.tracker.log_text(rec["run_id"], json.dumps(counts), LOAD_MAP)
            if health := routing_health(result):
                rec["health"] = health
                self.tracker.log_text(rec["run_id"], json.dumps(health), ROUTING_HEALTH)
            return
        if step <= rec["last_step"]:
            return  # already logged before a resume
        rec["evals"] += 1
        rec["last_step"] = step
        self.tracker.log_metrics(rec["run_id"], {**metrics, "evals": rec["evals"]}, step=step)
        rec["last"].update(metrics)
        rec["health"] = routing_health(result) or rec.get("health", {})
        self.progress.evaluated(rec, result)

    def _finish(self, trial: Any, status: str, reason: str | None) -> None:
        rec = self.records.get(trial.trial_id)
        if rec is None or rec.get("kept"):
            return
        rec["status"], rec["reason"] = status, reason
        collapsed = self._collapsed(rec)
        self.tracker.finish(rec["run_id"], status, reason)
        last = rec["last"]
        score = f"objective={fmt(last.get('objective'))}" if "objective" in last else ""
        test = f" test_accuracy={fmt(last['test_accuracy'])}" if "test_accuracy" in last else ""
        why = f" ({reason})" if reason else ""
        note = f" routing collapsed in layers {collapsed}" if collapsed else ""
        self.progress.say(f"{rec['name']} {status}{why}: {score}{test}{note}", self.records)

    def _collapsed(self, rec: dict[str, Any]) -> str:
        """The layers whose routing collapsed at the trial's last evaluation, as the
        `routing_collapsed` tag it gets ("1,2"); the tag is set only when one did."""
        from graphlora.health import collapsed_layers

        if rec.get("health"):  # else as adopted from its tag (resumed, no evaluation since)
            rec["collapsed"] = collapsed_layers(rec["health"])
        text = collapsed_text(rec.get("collapsed", []))
        if text:
            self.tracker.set_tags(rec["run_id"], {COLLAPSED_TAG: text})
        return text

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        reasons = getattr(self.scheduler, "stop_reasons", {})
        if trial.trial_id in reasons:
            self._finish(trial, STOPPED_EARLY_ASHA, reasons[trial.trial_id])
        else:
            self._finish(trial, COMPLETED, None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # Tune has just written the error to the trial's local folder (not yet to storage).
        path = Path(trial.error_file) if trial.error_file else None
        text = path.read_text() if path and path.exists() else trial.get_error()
        self._finish(trial, FAILED, traceback_line(text))
