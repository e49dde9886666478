"""How the search's own cost grows with the number of trials, against bare Ray Tune.

One run, side by side on one machine:

1. **The search**: `graphlora-search` (the real driver: Tune, Optuna, ASHA, trial hosts, MLflow
   in a fresh `GRAPHLORA_HOME`) on the quickstart space cut to the cheapest real trials: the tiny
   preset, `--max-steps` optimizer steps (default 2), an evaluation after each, `--val-questions`
   validation questions (default 8), no stability stage. It runs in a subprocess of its own
   (its own process group and local Ray, as a user's terminal would), instrumented from inside:
   the time each MLflow call takes (`Tracker`'s reads and writes), the time Optuna takes to
   suggest, and at every trial's end the driver's resident memory.
2. **The floor**: the same trials (the same configurations, each for the steps it ran in the
   search) as a bare Ray Tune run: a function trainable that trains the run in a `PackedTrainer`
   kept by its Tune actor (so, like a trial host, it loads the base model once), no MLflow, no
   Optuna, no ASHA, no hosts; as many trials at once as the search had slots.
3. **Resume**: the finished search extended by `--resume-trials` trials (`--resume S --trials K`),
   SIGKILLed (its process group and every process of its Ray) once a few of them have ended, and
   resumed; the time from the resume's start to its first new trial's start.

Per block of `--block` trials (by the order they ended), for the search and the floor: wall time
of the block, the trials' own training and evaluation time (`train_time_s` + `eval_time_total_s`
+ `test_time_s`), and the overhead per trial = (block wall - inside / concurrency) / trials; for
the search also its MLflow seconds, Optuna suggest seconds and driver memory at the block's end.

Targets: overhead per trial of the last block <= 1.2x that of the second; whole search <= 1.3x
the floor; driver memory growth <= 200 MB; resume's first new trial within 60 s.

Usage: python benchmarks/scale.py [--trials 1000] [--block 100] [--num-cpus 2]
           [--trials-per-host 2] [--max-steps 2] [--val-questions 8] [--resume-trials 20]
           [--no-floor] [--no-resume] [--keep DIR]
Prints one JSON line per stage, a table, and a last JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "graphlora-scale"


# ---------------------------------------------------------------------------------------------
# Inside the driver subprocess: timers around the real driver, then the real CLI.


def _driver(argv: list[str], stats_path: Path) -> int:
    import psutil

    import pipelines.monitor as monitor
    import pipelines.search as search
    import pipelines.tracking as tracking

    proc = psutil.Process()
    clock = {"mlflow_s": 0.0, "mlflow_calls": 0, "suggest_s": 0.0, "suggests": 0}
    out = stats_path.open("a", buffering=1)

    def timed(fn, key: str, count: str):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock[key] += time.perf_counter() - start
                clock[count] += 1

        return wrapper

    tracking.Tracker._apply = timed(tracking.Tracker._apply, "mlflow_s", "mlflow_calls")
    tracking.Tracker._read = timed(tracking.Tracker._read, "mlflow_s", "mlflow_calls")
    make_searcher = search.optuna_search_class

    def optuna_search_class() -> type:
        cls = make_searcher()
        cls.suggest = timed(cls.suggest, "suggest_s", "suggests")
        return cls

    search.optuna_search_class = optuna_search_class
    finish = monitor.SearchMonitor._finish

    def _finish(self, trial, status, reason):
        finish(self, trial, status, reason)
        line = {
            "t": time.time(),
            "trial_id": trial.trial_id,
            "rss_mb": proc.memory_info().rss / 2**20,
        }
        out.write(json.dumps({**line, **clock}) + "\n")

    monitor.SearchMonitor._finish = _finish
    start = {"t": time.time(), "event": "start"}
    out.write(json.dumps(start) + "\n")
    monitor_start = monitor.SearchMonitor._start

    def _start(self, trial):
        monitor_start(self, trial)
        out.write(
            json.dumps({"t": time.time(), "event": "trial_start", "id": trial.trial_id}) + "\n"
        )

    monitor.SearchMonitor._start = _start
    return search.main(argv)


# ---------------------------------------------------------------------------------------------
# The floor: bare Ray Tune, the same runs.

_TRAINERS: dict[str, Any] = {}


def floor_trial(config: dict[str, Any]) -> None:
    from ray import tune

    from graphlora.config import MoELoRAConfig
    from graphlora.packed_train import PackedTrainer
    from graphlora.run import TrainConfig

    run = config["run"]  # one of the search's runs (grid_search over them)
    training = TrainConfig(**run["training"])
    trainer = _TRAINERS.get("base")
    if trainer is None:  # once per Tune actor (reuse_actors), as a host loads once
        trainer = _TRAINERS["base"] = PackedTrainer(training)
    key = tune.get_context().get_trial_id()

    def on_eval(step: int, metrics: dict[str, float]) -> bool:
        tune.report({"val_accuracy": metrics.get("val_accuracy", 0.0), "step": step})
        return False

    trainer.add(key, training, MoELoRAConfig(**run["adapter"]), on_eval=on_eval)
    while key in trainer.slots:
        trainer.step()
    result = trainer.results.pop(key)
    if result.error is not None:
        raise result.error
    inside = sum(result.metrics.get(k, 0.0) for k in INSIDE)
    tune.report({"inside_s": inside, "done": 1})


INSIDE = ("train_time_s", "eval_time_total_s", "test_time_s")


def _floor(runs_path: Path, concurrent: int, num_cpus: int, stats_path: Path) -> int:
    import ray
    from ray import tune

    runs = json.loads(runs_path.read_text())
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    ends: list[dict[str, Any]] = []

    class Clock(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            import psutil

            inside = trial.last_result.get("inside_s", 0.0)
            rss = psutil.Process().memory_info().rss / 2**20
            ends.append({"t": time.time(), "inside_s": inside, "rss_mb": rss})

    start = time.time()
    tuner = tune.Tuner(
        tune.with_resources(floor_trial, {"cpu": num_cpus / concurrent}),
        param_space={"run": tune.grid_search(runs)},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=True),
        run_config=tune.RunConfig(
            storage_path=str(runs_path.parent / "floor"), callbacks=[Clock()], verbose=0
        ),
    )
    tuner.fit()
    stats_path.write_text(json.dumps({"start": start, "end": time.time(), "ends": ends}))
    return 0


# ---------------------------------------------------------------------------------------------
# The parent: the space, the three stages, the table.


def _space(args: argparse.Namespace, folder: Path) -> Path:
    doc = yaml.safe_load((ROOT / "search_spaces" / "quickstart.yaml").read_text())
    doc["budget"] = {"trials": args.trials, "max_steps": args.max_steps, "eval_every": 1}
    doc["training"] = {
        **doc.get("training", {}),
        "max_eval_examples": args.val_questions,
        "eval_batch_size": args.val_questions,
        "log_every": 1000,
    }
    doc["resources"]["trials_per_host"] = args.trials_per_host
    doc["stability"] = {"top_k_configs": 0, "seeds": 1}
    doc["mlflow"] = {"experiment": EXPERIMENT}
    path = folder / "scale.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _env(home: Path, ray_tmp: Path) -> dict[str, str]:
    ray_tmp.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "GRAPHLORA_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "RAY_TMPDIR": str(ray_tmp),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    return env


def _ray_pids(ray_tmp: Path) -> list[int]:
    import psutil

    return [
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if str(ray_tmp) in " ".join(p.info["cmdline"] or [])
    ]


def _spawn(mode: str, argv: list[str], stats: Path, env: dict[str, str], log: Path):
    cmd = [sys.executable, str(Path(__file__).resolve()), mode, str(stats), *argv]
    with log.open("ab") as sink:
        return subprocess.Popen(
            cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )


def _events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _blocks(
    ends: list[tuple[float, float]], start: float, block: int, concurrent: int
) -> list[dict]:
    """ends: (end time, inside seconds) per trial; per block of trials by end order."""
    ends = sorted(ends)
    rows, before = [], start
    for first in range(0, len(ends), block):
        chunk = ends[first : first + block]
        wall = chunk[-1][0] - before
        inside = sum(i for _, i in chunk)
        rows.append(
            {
                "trials": f"{first + 1}-{first + len(chunk)}",
                "wall_s": round(wall, 2),
                "inside_s": round(inside, 2),
                "overhead_per_trial_s": round((wall - inside / concurrent) / len(chunk), 3),
            }
        )
        before = chunk[-1][0]
    return rows


def _search_runs(home: Path) -> dict[str, dict[str, float]]:
    """trial id -> the trial run's metrics and params, read from the search's MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs, token = [], None
    while True:
        page = client.search_runs(
            [exp.experiment_id], "tags.kind = 'search'", max_results=1000, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    return {r.data.tags["trial_id"]: r for r in runs if "trial_id" in r.data.tags}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--block", type=int, default=100)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--trials-per-host", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--val-questions", type=int, default=8)
    parser.add_argument("--resume-trials", type=int, default=20)
    parser.add_argument("--no-floor", action="store_true")
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument("--keep", help="keep the search's GRAPHLORA_HOME here (for the MLflow UI)")
    parser.add_argument(
        "--ui",
        metavar="DIR",
        help="after the search: serve its store with `mlflow ui`, time the runs table's and the "
        "search run's requests, and screenshot both pages with headless chromium into DIR",
    )
    args = parser.parse_args(argv)

    from pipelines.host import hosts_for
    from pipelines.stages import SEARCH
    from pipelines.validate import load_search_space

    tmp = Path(tempfile.mkdtemp(prefix="graphlora-scale-"))
    home = Path(args.keep) if args.keep else tmp / "home"
    home.mkdir(parents=True, exist_ok=True)
    space_path = _space(args, tmp)
    space = load_search_space(space_path)
    concurrent = hosts_for(space, [{"CPU": float(args.num_cpus)}]) * args.trials_per_host
    print(f"scale: {args.trials} trials, {concurrent} at a time, work in {tmp}", flush=True)
    summary: dict[str, Any] = {"trials": args.trials, "concurrent": concurrent}

    # 1. The search.
    stats, out_dir = tmp / "search.jsonl", home / "searches" / "scale"
    env = _env(home, tmp / "ray")
    started = time.time()
    proc = _spawn(
        "_driver",
        ["--space", str(space_path), "--output-dir", str(out_dir)],
        stats,
        env,
        tmp / "search.log",
    )
    rc = proc.wait()
    wall = time.time() - started
    if rc != 0:
        print(f"error: the search exited {rc}; see {tmp / 'search.log'}", file=sys.stderr)
        return 1
    events = _events(stats)
    ends = [e for e in events if "trial_id" in e]
    runs = _search_runs(home)
    inside = {tid: sum(run.data.metrics.get(k, 0.0) for k in INSIDE) for tid, run in runs.items()}
    rows = _blocks(
        [(e["t"], inside.get(e["trial_id"], 0.0)) for e in ends], started, args.block, concurrent
    )
    for row, first in zip(rows, range(0, len(ends), args.block), strict=True):
        chunk, prev = ends[first : first + args.block], ends[first - 1] if first else None
        for key in ("mlflow_s", "suggest_s", "mlflow_calls", "suggests"):
            row[key] = round(chunk[-1][key] - (prev[key] if prev else 0.0), 2)
        row["driver_rss_mb"] = round(chunk[-1]["rss_mb"], 1)
    summary["search"] = {"wall_s": round(wall, 1), "blocks": rows, "runs_read": len(runs)}
    print(json.dumps({"stage": "search", **summary["search"]}), flush=True)

    # 2. The floor: the same runs, each for the steps it ran.
    if not args.no_floor:
        fixed = []
        for tid in (e["trial_id"] for e in ends):
            run = runs[tid]
            params = json.loads(run.data.tags["trial_params"])
            adapter, training = SEARCH.configs(space, params, space.seed)
            training["max_steps"] = int(run.data.metrics.get("steps", training["max_steps"]))
            fixed.append({"adapter": adapter, "training": training})
        runs_path = tmp / "floor_runs.json"
        runs_path.write_text(json.dumps(fixed))
        floor_stats = tmp / "floor.json"
        fenv = _env(tmp / "floor-home", tmp / "ray-floor")
        started = time.time()
        proc = _spawn(
            "_floor",
            [str(runs_path), str(concurrent), str(args.num_cpus)],
            floor_stats,
            fenv,
            tmp / "floor.log",
        )
        if proc.wait() != 0:
            print(f"error: the floor run failed; see {tmp / 'floor.log'}", file=sys.stderr)
            return 1
        floor_wall = time.time() - started
        fl = json.loads(floor_stats.read_text())
        frows = _blocks(
            [(e["t"], e["inside_s"]) for e in fl["ends"]], started, args.block, concurrent
        )
        for row, first in zip(frows, range(0, len(fl["ends"]), args.block), strict=True):
            row["driver_rss_mb"] = round(fl["ends"][first : first + args.block][-1]["rss_mb"], 1)
        summary["floor"] = {"wall_s": round(floor_wall, 1), "blocks": frows}
        print(json.dumps({"stage": "floor", **summary["floor"]}), flush=True)

    # 3. Resume after SIGKILL of everything, with the whole search's history behind it.
    if not args.no_resume:
        rstats = tmp / "resume.jsonl"
        proc = _spawn(
            "_driver",
            ["--resume", str(out_dir), "--trials", str(args.resume_trials)],
            rstats,
            env,
            tmp / "resume.log",
        )
        deadline = time.time() + 1800
        while time.time() < deadline and proc.poll() is None:
            if sum("trial_id" in e for e in _events(rstats)) >= 3:
                break
            time.sleep(1)
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in _ray_pids(tmp / "ray"):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(30)
        killed_after = sum("trial_id" in e for e in _events(rstats))
        rstats2 = tmp / "resume2.jsonl"
        started = time.time()
        proc = _spawn("_driver", ["--resume", str(out_dir)], rstats2, env, tmp / "resume2.log")
        first = None
        while proc.poll() is None and first is None:
            starts = [e for e in _events(rstats2) if e.get("event") == "trial_start"]
            first = starts[0]["t"] - started if starts else None
            time.sleep(0.5)
        rc = proc.wait()
        if first is None:
            starts = [e for e in _events(rstats2) if e.get("event") == "trial_start"]
            first = starts[0]["t"] - started if starts else None
        summary["resume"] = {
            "ended_before_kill": killed_after,
            "first_trial_start_s": None if first is None else round(first, 1),
            "exit": rc,
        }
        print(json.dumps({"stage": "resume", **summary["resume"]}), flush=True)

    if args.ui:
        summary["ui"] = measure_ui(home, Path(args.ui))
        print(json.dumps({"stage": "ui", **summary["ui"]}), flush=True)

    _print_table(summary)
    print(json.dumps(summary), flush=True)
    return 0


def measure_ui(home: Path, shots: Path, port: int = 5077) -> dict[str, Any]:
    """What a person waits for in the MLflow UI with every trial of the search in one experiment:
    the REST calls its two pages make first (timed), and the pages themselves (screenshots; the
    time headless chromium takes to load and render each, a 60 s budget for the page's
    requests)."""
    import shutil
    import urllib.request

    shots.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui",
         "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip

    def call(path: str, body: dict | None = None) -> tuple[dict, float]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            base + path, data=data, headers={"Content-Type": "application/json"}
        )
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=120) as response:
            doc = json.loads(response.read() or b"{}")
        return doc, time.perf_counter() - start

    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(base + "/health", timeout=2).read()
                break
            except OSError:
                time.sleep(1)
        exp, _ = call(f"/ajax-api/2.0/mlflow/experiments/get-by-name?experiment_name={EXPERIMENT}")
        exp_id = exp["experiment"]["experiment_id"]
        table, table_s = call(
            "/ajax-api/2.0/mlflow/runs/search",
            {
                "experiment_ids": [exp_id],
                "max_results": 100,
                "order_by": ["attributes.start_time DESC"],
            },
        )
        total, total_s = 0, 0.0
        token = None
        while True:  # every run, as `search_runs` pages them
            body = {"experiment_ids": [exp_id], "max_results": 1000}
            if token:
                body["page_token"] = token
            page, seconds = call("/ajax-api/2.0/mlflow/runs/search", body)
            total, total_s = total + len(page.get("runs", [])), total_s + seconds
            token = page.get("next_page_token")
            if not token:
                break
        parents, _ = call(  # the search's own run: with many trials, not on the first page
            "/ajax-api/2.0/mlflow/runs/search",
            {"experiment_ids": [exp_id], "filter": "tags.search_name != ''", "max_results": 1},
        )
        parent_id = parents["runs"][0]["info"]["run_id"]
        _, run_s = call(f"/ajax-api/2.0/mlflow/runs/get?run_id={parent_id}")
        result: dict[str, Any] = {
            "runs": total,
            "runs_table_first_page_s": round(table_s, 2),
            "all_runs_s": round(total_s, 2),
            "search_run_get_s": round(run_s, 2),
        }
        browser = shutil.which("chromium") or shutil.which("chromium-browser")
        pages = {
            "runs_table": f"{base}/#/experiments/{exp_id}/runs?workflowType=machine_learning",
            "search_run": f"{base}/#/experiments/{exp_id}/runs/{parent_id}",
        }
        for name, url in pages.items() if browser else ():
            start = time.perf_counter()
            subprocess.run(
                [browser, "--headless", "--no-sandbox", "--disable-gpu",
                 "--virtual-time-budget=60000", f"--screenshot={shots / (name + '.png')}",
                 "--window-size=1400,900", url],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300,
            )  # fmt: skip
            result[f"{name}_page_s"] = round(time.perf_counter() - start, 1)
        return result
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def _print_table(summary: dict[str, Any]) -> None:
    srch, floor = summary["search"], summary.get("floor")
    print(
        "\n| trials | search overhead/trial s | floor overhead/trial s | MLflow s | suggest s",
        end="",
    )
    print(" | driver MB |")
    print("|---|---|---|---|---|---|")
    for i, row in enumerate(srch["blocks"]):
        f = (
            floor["blocks"][i]["overhead_per_trial_s"]
            if floor and i < len(floor["blocks"])
            else "-"
        )
        print(
            f"| {row['trials']} | {row['overhead_per_trial_s']} | {f} | {row['mlflow_s']} | "
            f"{row['suggest_s']} | {row['driver_rss_mb']} |"
        )
    blocks = srch["blocks"]
    if len(blocks) >= 3:
        summary["last_vs_second_block"] = round(
            blocks[-1]["overhead_per_trial_s"] / blocks[1]["overhead_per_trial_s"], 2
        )
    if floor:
        summary["search_vs_floor_wall"] = round(srch["wall_s"] / floor["wall_s"], 2)
    summary["driver_rss_growth_mb"] = round(
        blocks[-1]["driver_rss_mb"] - blocks[0]["driver_rss_mb"], 1
    )
    if floor:
        fb = floor["blocks"]
        summary["floor_rss_growth_mb"] = round(fb[-1]["driver_rss_mb"] - fb[0]["driver_rss_mb"], 1)
    print(
        f"\nwhole search {srch['wall_s']} s"
        + (f", floor {floor['wall_s']} s ({summary['search_vs_floor_wall']}x)" if floor else "")
        + f"; driver memory +{summary['driver_rss_growth_mb']} MB from the first block's end"
        + (f" (bare Tune's driver: +{summary['floor_rss_growth_mb']} MB)" if floor else "")
    )


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] in ("_driver", "_floor"):
        sys.path.insert(0, str(ROOT))
        mode, stats_file, rest = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
        if mode == "_driver":
            raise SystemExit(_driver(rest, stats_file))
        raise SystemExit(_floor(Path(rest[0]), int(rest[1]), int(rest[2]), stats_file))
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
