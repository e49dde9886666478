"""What a person sees and what MLflow keeps while a search runs: a Tune callback, and the result
files written at the end (results CSV, stability CSV, best config YAML)."""

from __future__ import annotations

import csv
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ray import tune

from pipelines.best_config import write_best_config
from pipelines.records import (
    COLLAPSED_TAG,
    collapsed_from_text,
    collapsed_note,
    collapsed_text,
    config_params,
    load_map,
    log_lineage,
    routing_health,
    routing_row,
    routing_summary,
    tidy_metrics,
)
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
LOAD_MAP = "routing_counts.json"  # a trial run's artifact: layers x experts, training tokens
ROUTING_HEALTH = "routing_health.json"  # beside it: its last evaluation's per-batch routing
# Summed over a stage's runs into the search run's cost (`SearchMonitor.cost`).
COST_METRICS = (
    "wall_time_s",
    "device_seconds",
    "startup_time_s",
    "setup_time_s",
    "train_time_s",
    "eval_time_total_s",
    "checkpoint_time_s",
    "test_time_s",
)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_params(params: dict[str, Any]) -> str:
    """`name=value ...` for progress lines: floats to 4 significant digits, others as they are
    (a searched `method` is a string)."""
    return " ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def error_line(text: str | None) -> str:
    """The last `SomeError: message` line of a traceback (the reason a person needs)."""
    if not text:
        return "unknown error"
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", line):
            return line[:500]
    return lines[-1][:500] if lines else "unknown error"


class SearchMonitor(tune.Callback):
    """Prints progress and records one MLflow child run per trial, with its status.

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
        self.scheduler, self.out, self.total, self.stage = (
            scheduler,
            out or sys.stdout,
            total,
            stage,
        )
        self.records: dict[str, dict[str, Any]] = {}
        self.best: tuple[float, int] | None = None
        self.better = max if space.objective.mode == "max" else min
        self._hidden_size: int | None = None  # the model's width, read once
        self.started = time.monotonic()

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks into the experiment state; an open stream may not pickle.
        return {**self.__dict__, "out": None}

    def _print(self, text: str) -> None:
        minutes, seconds = divmod(int(time.monotonic() - self.started), 60)
        print(
            f"[{self.stage} {minutes:02d}:{seconds:02d}] {text}",
            file=self.out or sys.stdout,
            flush=True,
        )

    def _counts(self) -> str:
        by = [r["status"] for r in self.records.values()]
        return (
            f"[running {by.count('running')} | completed {by.count(COMPLETED)} | "
            f"stopped {by.count(STOPPED_EARLY_ASHA)} | failed {by.count(FAILED)} | "
            f"to go {max(self.total - len(by), 0)}]"
        )

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
                self._print(f"{rec['name']} {FAILED} ({rec['reason']})")
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
                self._print(f"{rec['name']} {INTERRUPTED} at eval {rec['evals']} ({reason})")
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
        return MoELoRAConfig(**adapter).gcn_hidden_for(self._hidden_size)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        try:
            self._start(trial)
        except StoreLost:  # the search is stopping (`Tracker.on_lost`); it starts on resume
            self._print(f"trial {trial.trial_id} not recorded: {self.tracker.lost}")

    def _start(self, trial: Any) -> None:
        rec = self.records.get(trial.trial_id)
        if rec is not None and rec.get("kept"):
            self._print(f"{rec['name']} had ended ({rec['status']}) before the resume; kept")
            return
        if rec is not None:  # resumed: same MLflow run, continued
            rec["status"], rec["reason"] = "running", None
            self.tracker.reopen(rec["run_id"])
            self.tracker.set_tags(rec["run_id"], {"status": "running", "status_reason": ""})
            self._print(f"{rec['name']} resumed at eval {rec['evals']} {self._counts()}")
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
        self._print(f"{name} started: {format_params(params)} {self._counts()}")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        rec = self.records.get(trial.trial_id)
        if rec is None or rec.get("kept"):  # None: it started while the store was unreachable
            return
        step = int(result.get("step", 0))
        metrics = tidy_metrics(result)
        failures = int(result.get("worker_failures", 0))
        log = str(result.get("recovery_log", ""))
        if log and log != rec.get("recovery_log"):
            rec["recovery_log"] = log
            self.tracker.set_tags(rec["run_id"], {"worker_failures": failures, "recovery_log": log})
        if failures > rec["worker_failures"]:
            rec["worker_failures"] = failures
            self._print(f"{rec['name']} worker failure {failures}, Ray Train restarts it: {log}")
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
        obj = result.get("objective")
        if obj is not None and (self.best is None or self.better(obj, self.best[0]) == obj):
            self.best = (obj, rec["trial"])
        metric = self.space.objective.metric
        best = (
            f" | best {self.best[0]:.4f} (trial {self.best[1]:02d})" if rec["run"] is None else ""
        )
        self._print(
            f"{rec['name']} eval {rec['evals']}/{self.space.budget.max_evals} step "
            f"{result.get('step')}: {metric}={_fmt(result.get(metric))} "
            f"objective={_fmt(obj)}{best}"
        )

    def _finish(self, trial: Any, status: str, reason: str | None) -> None:
        rec = self.records.get(trial.trial_id)
        if rec is None or rec.get("kept"):
            return
        rec["status"], rec["reason"] = status, reason
        collapsed = self._collapsed(rec)
        self.tracker.finish(rec["run_id"], status, reason)
        last = rec["last"]
        score = f"objective={_fmt(last.get('objective'))}" if "objective" in last else ""
        test = f" test_accuracy={_fmt(last['test_accuracy'])}" if "test_accuracy" in last else ""
        why = f" ({reason})" if reason else ""
        note = f" routing collapsed in layers {collapsed}" if collapsed else ""
        self._print(f"{rec['name']} {status}{why}: {score}{test}{note} {self._counts()}")

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
        self._finish(trial, FAILED, error_line(text))

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per trial, in start order (the results table)."""
        metric = self.space.objective.metric
        out = []
        for rec in self.records.values():
            last = rec["last"]
            out.append(
                {
                    "trial": rec["trial"],
                    "trial_id": rec["trial_id"],
                    "status": rec["status"],
                    "reason": rec.get("reason") or "",
                    "evals": rec["evals"],
                    "params": rec["params"],
                    "objective": last.get("objective"),
                    metric: last.get(metric),
                    "trainable_params": last.get("trainable_params"),
                    "samples_per_sec": last.get("samples_per_sec"),
                    "wall_time_s": last.get("wall_time_s"),
                    "device_seconds": last.get("device_seconds"),
                    "peak_memory_mb": last.get("peak_memory_mb"),
                    **routing_row(rec["last"], rec.get("collapsed", [])),
                    "run_id": rec["run_id"],
                }
            )
        return out

    def cost(self) -> dict[str, float]:
        """This stage's cost: `COST_METRICS` summed over its runs (`trial_<name>` on the
        search run), the largest `peak_memory_mb`, and the mean `gpu_util_mean` where measured."""
        lasts = [rec["last"] for rec in self.records.values()]
        out = {k: sum(float(m.get(k) or 0.0) for m in lasts) for k in COST_METRICS}
        peaks = [m["peak_memory_mb"] for m in lasts if m.get("peak_memory_mb") is not None]
        if peaks:
            out["peak_memory_mb"] = max(peaks)
        utils = [m["gpu_util_mean"] for m in lasts if m.get("gpu_util_mean") is not None]
        if utils:
            out["gpu_util_mean"] = statistics.fmean(utils)
        return out

    def load_maps(self, trial_ids: list[str]) -> dict[str, list[list[float]]]:
        """The load maps of these trials (from memory, else the run's `routing_counts.json`)."""
        return self._artifacts(trial_ids, "load_map", LOAD_MAP)

    def routing_healths(self, trial_ids: list[str]) -> dict[str, dict[str, float]]:
        """The per-layer routing figures of these trials' last evaluations (from memory, else
        the run's `routing_health.json`; `pipelines.records.routing_health`)."""
        return self._artifacts(trial_ids, "health", ROUTING_HEALTH)

    def _artifacts(self, trial_ids: list[str], key: str, name: str) -> dict[str, Any]:
        """`rec[key]` of these trials, read from their run's JSON artifact `name` when not in
        memory; trials without it are left out (a failed trial, an older search)."""
        out = {}
        for tid in trial_ids:
            rec = self.records.get(tid)
            if rec is None:
                continue
            if not rec.get(key):
                try:
                    with tempfile.TemporaryDirectory() as tmp:
                        path = self.tracker.client.download_artifacts(rec["run_id"], name, tmp)
                        rec[key] = json.loads(Path(path).read_text())
                except Exception:  # not recorded: no picture (or no labels) for it
                    continue
            out[tid] = rec[key]
        return out

    def stability_groups(self, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Seed statistics per re-run config; closes each config's MLflow run."""
        obj = self.space.objective
        groups: dict[str, dict[str, Any]] = {}
        for r in runs:
            groups.setdefault(
                r["group"],
                {
                    "group": r["group"],
                    "params": r["params"],
                    "from_trial": r["from_trial"],
                    "run_id": r["group_run_id"],
                    "values": {},
                },
            )
        for rec in self.records.values():
            if rec["status"] == FAILED:
                continue
            g = groups[rec["run"]["group"]]
            g.setdefault("routing_runs", []).append(
                routing_row(rec["last"], rec.get("collapsed", []))
            )
            for key in ("objective", "test_accuracy"):
                if rec["last"].get(key) is not None:
                    g["values"].setdefault(key, []).append(rec["last"][key])
        out = []
        for g in groups.values():
            scores: dict[str, float] = {}
            for key, vals in g["values"].items():  # sample std, as everywhere (records.py)
                name = obj.metric if key == "objective" else key
                scores[f"{name}_mean"] = statistics.fmean(vals)
                if len(vals) > 1:
                    scores[f"{name}_std"] = statistics.stdev(vals)
                scores[f"{name}_seeds"] = len(vals)
            if f"{obj.metric}_mean" not in scores:
                self.tracker.finish(g["run_id"], FAILED, "every seed failed")
                continue
            g["score"] = obj.score(
                scores[f"{obj.metric}_mean"], scores.get(f"{obj.metric}_std", 0.0)
            )
            g["scores"] = {"score": g["score"], **scores}
            g["routing"] = routing_summary(g.pop("routing_runs", []))
            self.tracker.log_metrics(g["run_id"], g["scores"])
            self.tracker.finish(g["run_id"], COMPLETED)
            out.append(g)
        self.print_stability(out)
        return out

    def print_table(self, rows: list[dict[str, Any]], title: str) -> None:
        metric = self.space.objective.metric
        names = list(self.space.search)
        header = ["trial", "status", *names, "evals", "objective", metric]
        table = [
            [
                f"{r['trial']:02d}",
                r["status"],
                *(_fmt(r["params"].get(n)) for n in names),
                str(r["evals"]),
                _fmt(r["objective"]),
                _fmt(r[metric]),
            ]
            for r in rows
        ]
        note, title = collapsed_note(rows), f"{title}: {len(rows)} trials"
        _print_grid(self.out or sys.stdout, title, header, table, (note,) if note else ())

    def print_stability(self, groups: list[dict[str, Any]]) -> None:
        metric = self.space.objective.metric
        header = ["config", "from trial", f"{metric} mean", "std", "test_acc mean", "std", "score"]
        table = [
            [
                g["group"],
                f"{g['from_trial']:02d}",
                _fmt(g["scores"][f"{metric}_mean"]),
                _fmt(g["scores"].get(f"{metric}_std")),
                _fmt(g["scores"].get("test_accuracy_mean")),
                _fmt(g["scores"].get("test_accuracy_std")),
                _fmt(g["score"]),
            ]
            for g in groups
        ]
        _print_grid(self.out or sys.stdout, "stability", header, table)


def _print_grid(
    out: Any, title: str, header: list[str], rows: list[list[str]], notes: tuple[str, ...] = ()
) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    line = "  ".join
    print(f"\n{title}", file=out)
    print(line(h.ljust(w) for h, w in zip(header, widths, strict=True)), file=out)
    for row in rows:
        print(line(str(c).ljust(w) for c, w in zip(row, widths, strict=True)), file=out)
    for note in notes:
        print(note, file=out)
    print(file=out, flush=True)


def write_results(
    output_dir: Path,
    space: SearchSpace,
    trials: list[dict],
    stability: list[dict],
    best: dict | None,
) -> list[Path]:
    """results.csv (one row per trial), stability.csv, best_config.yaml; returns the files."""
    files = [output_dir / "results.csv"]
    names = list(space.search)
    with files[0].open("w", newline="") as f:
        w = csv.writer(f)
        keys = [k for k in trials[0] if k != "params"] if trials else []
        w.writerow(keys + names)
        for t in trials:
            w.writerow([t[k] for k in keys] + [t["params"].get(n) for n in names])
    if stability:
        files.append(output_dir / "stability.csv")
        with files[-1].open("w", newline="") as f:
            score_keys = list(stability[0]["scores"])
            w = csv.writer(f)
            w.writerow(["group", "from_trial", *names, *score_keys])
            for g in stability:
                w.writerow(
                    [
                        g["group"],
                        g["from_trial"],
                        *(g["params"].get(n) for n in names),
                        *(g["scores"].get(k) for k in score_keys),
                    ]
                )
    if best:
        files.append(write_best_config(output_dir, space, best))
    return files
