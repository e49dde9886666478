"""Every shipped search space runs to its last line through the CLI, on a real local Ray and a
real MLflow store, on a tiny budget: its model swapped for a tiny preset where it names a Hub
model (a packaged model, MiniLM in real_cpu.yaml, is kept: the one CI run on pretrained weights
through the search), its resources for this machine's CPUs, every other entry as shipped
(searched parameters, method, dataset: the real benchmark files shipped with graphlora,
objective, ASHA). The real task's search (MiniLM on ARC-Easy) is also promoted, and its
registered model answers a question with its option texts through the MLflow pyfunc.

A space that names a string-valued searched parameter (compare.yaml's `method`) once died printing
the best configuration after all its work was recorded (exit status 1, so `ray job submit` said
the job failed); a new space cannot break that way unseen."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from graphlora.presets import PACKAGED_MODELS, PRESETS
from pipelines import promote
from pipelines.search import main
from pipelines.tracking import tracking_uri

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "search_spaces").glob("*.yaml"))
# Spaces run end to end by another test (with the same CLI and overrides).
ELSEWHERE = {"quickstart.yaml": "test_job_server_e2e.py submits it with ray job submit"}
# One trial each, no stability stage: what can break is the space itself and the CLI's last lines
# (the stability stage is run end to end by test_search_e2e.py's 2-seed test).
FLAGS = ["--trials", "1", "--max-steps", "4", "--eval-every", "2", "--stability-configs", "0"]
RUN_HERE = ["compare.yaml", "paper.yaml", "real_cpu.yaml"]


def test_every_shipped_space_is_run_end_to_end_somewhere():
    assert {p.name for p in SHIPPED} == set(RUN_HERE) | set(ELSEWHERE)


def _tiny_copy(path: Path, folder: Path) -> Path:
    raw = yaml.safe_load(path.read_text())
    if raw["model"] not in {*PRESETS, *PACKAGED_MODELS}:  # a Hub model: nothing to fetch in CI
        raw["model"] = "tiny-qwen2"
    raw["resources"] = {  # this machine's 2 CPUs; trial hosts as the space has them
        "workers_per_trial": 1,
        "gpus_per_worker": 0,
        "cpus_per_worker": 1,
        "max_concurrent_trials": 2,
        "trials_per_host": (raw.get("resources") or {}).get("trials_per_host", 0),
    }
    raw["training"] = {
        **(raw.get("training") or {}),
        "batch_size": 4,
        "max_eval_examples": 16,
        "max_test_examples": 16,
        "max_length": 256,
    }
    raw["mlflow"] = {"experiment": f"shipped-{path.stem}"}
    copy = folder / path.name
    copy.write_text(yaml.safe_dump(raw, sort_keys=False))
    return copy


@pytest.mark.parametrize("name", RUN_HERE)
def test_shipped_space_runs_to_its_last_line(name, ray_cluster, tmp_path, capsys):
    space = _tiny_copy(ROOT / "search_spaces" / name, tmp_path)
    argv = ["--space", str(space), *FLAGS]
    status = main([*argv, "--output-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert status == 0, out[-3000:]
    best = next(ln for ln in out.splitlines() if ln.startswith("best: "))
    lines = out.strip().splitlines()
    assert lines[-1].startswith("MLflow runs: ") and lines[-2].startswith("results: "), lines[-4:]
    assert (tmp_path / "out" / "best_config.yaml").is_file()
    state = json.loads((tmp_path / "out" / "search.json").read_text())
    parent = MlflowClient(tracking_uri()).get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["status"] == "completed"
    raw = yaml.safe_load(space.read_text())
    if "method" in raw.get("search", {}):
        assert " method=" in best  # a string-valued parameter, printed as it is
    client = MlflowClient(tracking_uri())
    (trial,) = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
    )
    if raw.get("method") == "graphlora":  # paper.yaml asks for 256 on a narrower tiny model
        spec = PRESETS.get(raw["model"])
        hidden = spec.hidden_size if spec is not None else 384  # MiniLM-L6's width
        width = min(raw["adapter"]["gcn_hidden"], hidden)
        assert trial.data.params["gcn_hidden_used"] == str(width)
    assert "test: not evaluated" in out  # search trials are chosen on validation only
    if name == "real_cpu.yaml":
        _promote_and_serve(raw["mlflow"]["experiment"], tmp_path, capsys)


def _promote_and_serve(experiment: str, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """Promote a search's best configuration (1 seed, a few steps) and ask the registered model
    a question with its options, as a user would."""
    model_name = f"shipped-real-cpu-{tmp_path.name}"
    code = promote.main(
        [
            "--from-search",
            experiment,
            "--seeds",
            "1",
            "--max-steps",
            "2",
            "--max-test-examples",
            "8",
            "--model-name",
            model_name,
            "--output-dir",
            str(tmp_path / "final"),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]
    assert f"registered: models:/{model_name}@champion = version 1" in printed
    mlflow.set_tracking_uri(tracking_uri())
    served = mlflow.pyfunc.load_model(f"models:/{model_name}@champion")
    options = ["oxygen", "carbon dioxide", "helium", "neon"]
    question = "Which gas do plants take in to make food?"
    out = served.predict(pd.DataFrame({"question": [question], "options": [options]}))
    assert len(out) == 1 and out.iloc[0]["prediction"] in options, out
    assert len(out.iloc[0]["scores"]) == len(options)
