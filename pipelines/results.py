"""A stage's results from its trial records (`SearchMonitor.records`): the results table, the
stability stage's seed statistics per configuration, the stage's cost, the trials' recorded
routing, and the result files written at the end (results CSV, stability CSV, best config)."""

from __future__ import annotations

import csv
import json
import statistics
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipelines.best_config import write_best_config
from pipelines.records import RUN_TIMES, routing_row, routing_summary
from pipelines.schema import Objective, SearchSpace
from pipelines.tracking import FAILED, Tracker

LOAD_MAP = "routing_counts.json"  # a trial run's artifact: layers x experts, training tokens
ROUTING_HEALTH = "routing_health.json"  # beside it: its last evaluation's per-batch routing
# Summed over a stage's runs into the search run's cost (`stage_cost`).
COST_METRICS = ("wall_time_s", "device_seconds", "startup_time_s", *RUN_TIMES)

Records = dict[str, dict[str, Any]]  # trial id -> its record, in start order


def trial_rows(space: SearchSpace, records: Records) -> list[dict[str, Any]]:
    """One flat row per trial, in start order (the results table)."""
    metric = space.objective.metric
    out = []
    for rec in records.values():
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


def stage_cost(records: Records) -> dict[str, float]:
    """A stage's cost: `COST_METRICS` summed over its runs, the largest `peak_memory_mb`, and
    the mean `gpu_util_mean` where measured."""
    lasts = [rec["last"] for rec in records.values()]
    out = {k: sum(float(m.get(k) or 0.0) for m in lasts) for k in COST_METRICS}
    peaks = [m["peak_memory_mb"] for m in lasts if m.get("peak_memory_mb") is not None]
    if peaks:
        out["peak_memory_mb"] = max(peaks)
    utils = [m["gpu_util_mean"] for m in lasts if m.get("gpu_util_mean") is not None]
    if utils:
        out["gpu_util_mean"] = statistics.fmean(utils)
    return out


def stability_groups(
    objective: Objective, records: Iterable[dict[str, Any]], runs: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Seed statistics (sample std, as everywhere) per re-run configuration of `runs`, from its
    seeds' records; a configuration whose every seed failed is left out."""
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
    for rec in records:
        if rec["status"] == FAILED:
            continue
        g = groups[rec["run"]["group"]]
        g.setdefault("routing_runs", []).append(routing_row(rec["last"], rec.get("collapsed", [])))
        for key in ("objective", "test_accuracy"):
            if rec["last"].get(key) is not None:
                g["values"].setdefault(key, []).append(rec["last"][key])
    out = []
    metric = objective.metric
    for g in groups.values():
        scores: dict[str, float] = {}
        for key, vals in g["values"].items():
            name = metric if key == "objective" else key
            scores[f"{name}_mean"] = statistics.fmean(vals)
            if len(vals) > 1:
                scores[f"{name}_std"] = statistics.stdev(vals)
            scores[f"{name}_seeds"] = len(vals)
        if f"{metric}_mean" not in scores:
            continue
        g["score"] = objective.score(scores[f"{metric}_mean"], scores.get(f"{metric}_std", 0.0))
        g["scores"] = {"score": g["score"], **scores}
        g["routing"] = routing_summary(g.pop("routing_runs", []))
        out.append(g)
    return out


def load_maps(tracker: Tracker, records: Records, trial_ids: list[str]) -> dict[str, Any]:
    """The load maps of these trials (from memory, else the run's `routing_counts.json`)."""
    return _recorded(tracker, records, trial_ids, "load_map", LOAD_MAP)


def routing_healths(tracker: Tracker, records: Records, trial_ids: list[str]) -> dict[str, Any]:
    """The per-layer routing figures of these trials' last evaluations (from memory, else the
    run's `routing_health.json`; `pipelines.records.routing_health`)."""
    return _recorded(tracker, records, trial_ids, "health", ROUTING_HEALTH)


def _recorded(
    tracker: Tracker, records: Records, trial_ids: list[str], key: str, name: str
) -> dict[str, Any]:
    """`rec[key]` of these trials, read from their run's JSON artifact `name` when not in
    memory; trials without it are left out (a failed trial, an older search)."""
    out = {}
    for tid in trial_ids:
        rec = records.get(tid)
        if rec is None:
            continue
        if not rec.get(key):
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    path = tracker.client.download_artifacts(rec["run_id"], name, tmp)
                    rec[key] = json.loads(Path(path).read_text())
            except Exception:  # not recorded: no picture (or no labels) for it
                continue
        out[tid] = rec[key]
    return out


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
