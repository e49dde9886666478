"""What a person can ask the search CLI without starting Ray: what a space would run
(`graphlora-search --plan`) and which searches the MLflow store holds (`graphlora-search --list`).
"""

from __future__ import annotations

import math
import os
import time
from typing import IO, Any

from pipelines.schema import SearchSpace
from pipelines.tracking import MLFLOW_PARENT_RUN_ID, check_store, tracking_uri


def _fmt_param(p: Any) -> str:
    if p.values is not None:
        return f"{p.name}: {p.type} {list(p.values)}"
    step = f" step {p.step:g}" if p.step is not None else ""
    return f"{p.name}: {p.type} {p.low:g}..{p.high:g}{step}"


def _local_node() -> dict[str, float]:
    """This machine's resources, as a local Ray started by the search would see them."""
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        pass
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)}


def print_plan(space: SearchSpace, out: IO[str]) -> None:
    """What `space` would run: budget, searched parameters, ASHA rungs, resources and hosts."""
    b, res, asha = space.budget, space.resources, space.asha
    rungs, rung = [], asha.grace_period
    while rung < b.max_evals:
        rungs.append(str(int(rung)))
        rung *= asha.reduction_factor
    lines = [
        f"space: {space.path}",
        f"  model {space.model}, dataset {space.dataset}, method {space.method or 'searched'}; "
        f"MLflow experiment {space.experiment}",
        f"  trials: {b.trials} (Optuna TPE, seed {space.seed}), each up to {b.max_steps} steps, "
        f"evaluated every {b.eval_every} ({b.max_evals} evaluations), "
        f"{space.seeds_per_trial} seed(s) per trial",
        f"  ASHA: grace {asha.grace_period}, reduction {asha.reduction_factor:g}; rungs at "
        f"evaluation {', '.join(rungs) or 'none'}",
        f"  objective: {space.objective.mode} {space.objective.metric} (last evaluation)"
        + (
            f", then {space.objective.secondary['mode']} {space.objective.secondary['metric']}"
            if space.objective.secondary
            else ""
        ),
        f"  searched ({len(space.search)}):",
        *(f"    {_fmt_param(p)}" for p in space.search.values()),
        "  stability: "
        + (
            f"the {space.stability.top_k_configs} best configurations x "
            f"{space.stability.seeds} seeds"
            if space.stability.top_k_configs
            else "none"
        ),
        f"  resources per trial: {res.workers_per_trial} worker(s) x {res.cpus_per_worker:g} CPU"
        f", {res.gpus_per_worker:g} GPU; worker retries {res.worker_retries}",
    ]
    explicit = "max_concurrent_trials" in (space.raw.get("resources") or {})
    if res.on_hosts:
        if res.hosts or not os.environ.get("RAY_ADDRESS"):
            from pipelines.host import HostsError, hosts_for

            node = _local_node()
            where = "as set" if res.hosts else f"on this machine ({node['CPU']:g} CPU, "
            where += "" if res.hosts else f"{node['GPU']:g} GPU)"
            try:
                hosts = hosts_for(space, [node])
            except HostsError as exc:
                lines.append(f"  trial hosts: none fits {where}; the search would refuse: {exc}")
            else:
                at_once = res.concurrent_trials(hosts, space.seeds_per_trial, explicit)
                lines.append(
                    f"  trial hosts: {hosts} {where}, {res.trials_per_host} slots each, "
                    f"{res.host_cpus():g} CPU per worker; {at_once} trial(s) at a time"
                )
        else:
            lines.append(
                f"  trial hosts: as many as the cluster's nodes hold (RAY_ADDRESS), "
                f"{res.trials_per_host} slots each, {res.host_cpus():g} CPU per worker"
            )
    else:
        lines.append(
            f"  trial hosts: none (each trial starts its own Ray Train run); "
            f"{res.max_concurrent_trials} trial(s) at a time"
        )
    lines.append(
        f"  Ray: {os.environ.get('RAY_ADDRESS') or 'a local Ray of its own'} (not started)"
    )
    print("\n".join(lines), file=out, flush=True)


def searches(uri: str | None = None) -> tuple[str, list[dict[str, Any]]]:
    """The searches recorded in the MLflow store at `uri` (default: `tracking_uri()`), newest
    first: name, experiment, status, trial count, best objective, start time, run id.

    Raises:
        TrackingError: the store is unreachable or misconfigured.
    """
    from mlflow.tracking import MlflowClient

    uri = uri or tracking_uri()
    check_store(uri)
    client = MlflowClient(uri)
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    runs = []
    ids = list(experiments)
    for start in range(0, len(ids), 100):  # MLflow caps the experiments of one query
        token = None
        while True:
            page = client.search_runs(
                ids[start : start + 100],
                filter_string="tags.kind = 'search'",
                max_results=5000,
                page_token=token,
            )
            runs.extend(page)
            token = page.token
            if not token:
                break
    trials: dict[str, int] = {}
    for r in runs:
        parent = r.data.tags.get(MLFLOW_PARENT_RUN_ID)
        if parent:
            trials[parent] = trials.get(parent, 0) + 1
    found = []
    for r in runs:
        tags = r.data.tags
        if MLFLOW_PARENT_RUN_ID in tags:
            continue
        best = r.data.metrics.get("best_objective")
        found.append(
            {
                "name": tags.get("search_name", r.info.run_name),
                "experiment": experiments.get(r.info.experiment_id, r.info.experiment_id),
                "status": tags.get("status", r.info.status.lower()),
                "trials": trials.get(r.info.run_id, 0),
                "planned": r.data.params.get("trials"),
                "best": best,
                "started": r.info.start_time,
                "run_id": r.info.run_id,
            }
        )
    found.sort(key=lambda s: s["started"] or 0, reverse=True)
    return uri, found


def print_searches(uri: str, found: list[dict[str, Any]], out: IO[str]) -> None:
    """`--list`: one row per search."""
    print(f"MLflow store: {uri}", file=out)
    if not found:
        print("no searches recorded there yet", file=out, flush=True)
        return
    header = ("search", "experiment", "status", "trials", "best objective", "started", "run id")
    rows = [
        (
            s["name"],
            s["experiment"],
            s["status"],
            f"{s['trials']}" + (f"/{s['planned']}" if s["planned"] else ""),
            "-" if s["best"] is None or math.isnan(s["best"]) else f"{s['best']:.4f}",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(s["started"] / 1000))
            if s["started"]
            else "-",
            s["run_id"],
        )
        for s in found
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    for row in (header, *rows):
        print(
            "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out
        )
    out.flush()
