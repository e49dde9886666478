"""What a search says when it ends: its pictures (`pipelines/pictures.py` and Optuna's), its
summed cost, and its MLflow run's description (the run page's Description box)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.progress import fmt
from pipelines.records import collapsed_note
from pipelines.results import load_maps, routing_healths
from pipelines.schema import SearchSpace
from pipelines.tracking import STOPPED_EARLY_ASHA


def search_pictures(
    space: SearchSpace,
    monitor: Any,
    trials: list[dict[str, Any]],
    stability: list[dict[str, Any]],
    study: Any,
    out_dir: Path,
) -> tuple[list[Path], list[str]]:
    """The search's pictures (`pipelines/pictures.py`) and Optuna's; (files, reasons skipped)."""
    from pipelines.pictures import best_load_map_trials, save_search_pictures
    from pipelines.tracking import save_optuna_plots

    obj = space.objective
    methods = {t["trial_id"]: str(t["params"].get("method", space.method)) for t in trials}
    chosen = best_load_map_trials(trials, obj.mode, methods)
    ids = [t["trial_id"] for t in chosen]
    maps = load_maps(monitor.tracker, monitor.records, ids)
    health = routing_healths(monitor.tracker, monitor.records, ids)
    labelled, labelled_health = {}, {}
    for t in chosen:
        if t["trial_id"] in maps:
            value = t.get(obj.metric)
            score = f"{value:.3f}" if isinstance(value, int | float) else "-"
            label = f"trial {t['trial']:02d} {methods[t['trial_id']]} ({obj.metric} {score})"
            labelled[label] = maps[t["trial_id"]]
            labelled_health[label] = health.get(t["trial_id"], {})
    ours, skipped = save_search_pictures(
        out_dir,
        trials,
        stability,
        labelled,
        metric=obj.metric,
        mode=obj.mode,
        health=labelled_health,
    )
    theirs, skipped_optuna = save_optuna_plots(study, out_dir)
    return ours + theirs, skipped + skipped_optuna


def search_cost(search: dict[str, float], stability: dict[str, float]) -> dict[str, float]:
    """The search run's cost metrics: each stage's sums (`trials_<metric>`,
    `stability_<metric>`) and `total_device_seconds` / `total_wall_time_s` over both."""
    out = {f"trials_{k}": v for k, v in search.items()}
    out.update({f"stability_{k}": v for k, v in stability.items()})
    for key in ("device_seconds", "wall_time_s"):
        out[f"total_{key}"] = search.get(key, 0.0) + stability.get(key, 0.0)
    return out


def describe_search(
    space: SearchSpace,
    name: str,
    trials: list[dict[str, Any]],
    best: dict[str, Any] | None,
    cost: dict[str, float],
    plots: list[Path],
) -> str:
    """The search run's description (Markdown, the run page's Description box)."""
    by = [t["status"] for t in trials]
    lines = [
        f"**{name}**: {len(trials)} trials of {space.model} on {space.dataset} "
        f"({by.count('completed')} completed, {by.count(STOPPED_EARLY_ASHA)} stopped by ASHA, "
        f"{by.count('failed')} failed); objective: {space.objective.mode} "
        f"{space.objective.metric} (last evaluation).",
        "",
    ]
    if best:
        scores = ", ".join(f"{k} {v:.4g}" for k, v in best["scores"].items())
        params = ", ".join(f"{k}={fmt(v)}" for k, v in best["params"].items())
        lines += [f"Best: {best['source']}: {params} ({scores}).", ""]
    if note := collapsed_note(trials):
        lines += [f"{note[0].upper()}{note[1:]}.", ""]
    lines += [
        f"Cost: {cost.get('total_device_seconds', 0):.0f} device-seconds, "
        f"{cost.get('total_wall_time_s', 0):.0f} s of trial wall time in all.",
        "",
    ]
    if cost.get("hosts"):
        lines += [
            f"Trial hosts: {cost['hosts']:.0f} of {space.resources.trials_per_host} slots; the "
            f"base model was loaded {cost.get('base_loads', 0):.0f} time(s), "
            f"{cost.get('hosts_lost', 0):.0f} host(s) lost.",
            "",
        ]
    lines += ["Pictures (Artifacts tab, `plots/`):"]
    notes = {
        "pareto.png": "validation metric against trainable parameters, Pareto front marked",
        "load_map.png": "expert load per layer (training tokens) of the best trials, each "
        "layer's per-batch routing entropy and experts in use beside it (collapsed in red)",
        "stability.png": "the stability stage: each configuration's seeds, mean and std",
        "optimization_history.png": "Optuna: objective per trial",
        "param_importances.png": "Optuna: hyperparameter importances",
        "parallel_coordinate.png": "Optuna: parallel coordinates",
    }
    lines += [f"- `plots/{p.name}`: {notes.get(p.name, '')}" for p in plots]
    lines += [
        "",
        "Every trial run's params are its full configuration: "
        "`graphlora-promote --from-run <trial run id>` trains it again.",
    ]
    return "\n".join(lines)
