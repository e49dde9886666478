"""Promotion without Ray: best-config validation, search-run lookup errors (each one line, exit 2,
nothing started or registered), and the registered pyfunc model's predict path."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from test_inference import EXAMPLES, one_torch_thread, trained_adapter  # noqa: F401 (autouse)

from graphlora.data import load_task
from graphlora.evaluate import evaluate_examples, score_examples
from graphlora.inference import package_model
from pipelines import evaluate as evaluate_cli
from pipelines import promote
from pipelines.results import write_results
from pipelines.search import load_search_space
from pipelines.serving import log_and_register
from pipelines.tracking import Tracker, tracking_uri

QUICKSTART = Path(__file__).resolve().parents[1] / "search_spaces" / "quickstart.yaml"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh GRAPHLORA_HOME (MLflow SQLite store) shared by this module's tests."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRAPHLORA_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield home


@pytest.fixture(scope="module")
def best_file(tmp_path_factory) -> Path:
    """A best_config.yaml exactly as a quickstart search writes it."""
    out = tmp_path_factory.mktemp("search")
    space = load_search_space(QUICKSTART)
    params = {"learning_rate": 0.01, "num_experts": 4, "top_k": 2, "rank": 2, "edge_density": 0.2}
    best = {"source": "trial 3", "params": params, "scores": {"objective": 0.75}}
    write_results(out, space, [], [], best)
    return out / "best_config.yaml"


def edited(best_file: Path, tmp_path: Path, edit) -> Path:  # noqa: ANN001
    doc = yaml.safe_load(best_file.read_text())
    edit(doc)
    path = tmp_path / "best_config.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def no_ray(monkeypatch) -> None:  # noqa: ANN001
    def fail(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("Ray must not start when the promotion is refused")

    monkeypatch.setattr(promote, "init_ray", fail)


def run_main(argv: list[str], capsys, monkeypatch) -> tuple[int, str]:  # noqa: ANN001
    no_ray(monkeypatch)
    code = promote.main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def test_plan_from_a_search_best_config(best_file, store):
    plan = promote.plan_promotion(config=best_file, seeds="2", epochs=0.5, max_test_examples=16)
    assert plan.seeds == [0, 1]
    assert plan.adapter["num_experts"] == 4 and plan.adapter["method"] == "graphlora"
    # synthetic: 2000 train examples, quickstart batch_size 8 -> 125 steps per half epoch
    assert plan.training["max_steps"] == 125
    assert plan.training["eval_test"] is True and "seed" not in plan.training
    assert plan.model_name == "graphlora-synthetic" and plan.alias == "champion"
    assert plan.experiment == promote.DEFAULT_EXPERIMENT
    assert plan.best.objective == {"metric": "val_accuracy", "mode": "max", "std_penalty": 0.0}
    assert (plan.workers, plan.cpus_per_worker, plan.gpus_per_worker) == (1, 1, 0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("3", [0, 1, 2]), ("0,2,5", [0, 2, 5]), ("7,", [7])],
)
def test_parse_seeds(text, expected):
    assert promote.parse_seeds(text) == expected


@pytest.mark.parametrize("text", ["0", "a", "1,1", "-1,"])
def test_parse_seeds_rejects(text):
    with pytest.raises(promote.PromotionError, match="--seeds"):
        promote.parse_seeds(text)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d["adapter"].update(num_expert=4),
            r"adapter\.num_expert: unknown key; did you mean 'num_experts'\? \(line \d+\)",
        ),
        (
            lambda d: d["adapter"].update(top_k=9),
            r"adapter\.top_k: rejected by MoELoRAConfig: must not exceed the number of experts "
            r"\(4\) \(got 9\) \(line \d+\)",
        ),
        (
            lambda d: d["training"].update(learning_rate=-1.0),
            r"training\.learning_rate: rejected by TrainConfig: must be > 0",
        ),
        (
            lambda d: d["training"].update(seed=3),
            r"training\.seed: set by the promotion; use --seeds",
        ),
        (lambda d: d.update(stability={}), r": stability: unknown key"),
        (lambda d: d.pop("adapter"), r"adapter: missing required key"),
        (
            lambda d: d.update(routing={"collapsed_layers": "1,2"}),
            r"routing\.collapsed_layers: expected a list of layer indices, got '1,2' \(line \d+\)",
        ),
        (
            lambda d: d.update(routing={"min_entropy": 0.2}),
            r"routing\.min_entropy: unknown key; did you mean 'min_batch_entropy'\?",
        ),
    ],
    ids=["unknown-key", "top-k", "lr", "seed", "top-level", "missing", "routing", "routing-key"],
)
def test_a_best_config_that_no_longer_validates_is_one_line_and_exit_2(
    best_file, tmp_path, store, capsys, monkeypatch, edit, message
):
    path = edited(best_file, tmp_path, edit)
    code, err = run_main(["--config", str(path)], capsys, monkeypatch)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {path}: "), err
    assert re.search(message, err), err


def test_overrides_are_blamed_on_their_flag(best_file, store, capsys, monkeypatch):
    code, err = run_main(["--config", str(best_file), "--max-steps", "0"], capsys, monkeypatch)
    assert (code, err) == (2, "error: --max-steps/--epochs: must be >= 1 (got 0)")
    code, err = run_main(
        ["--config", str(best_file), "--dataset", "no-such-task"], capsys, monkeypatch
    )
    assert code == 2 and err.startswith("error: Unknown task 'no-such-task'"), err
    code, err = run_main(["--config", str(best_file), "--alias", "latest"], capsys, monkeypatch)
    assert code == 2 and err.startswith("error: --alias latest:"), err


def _all_runs(client: MlflowClient) -> list[str]:
    ids = [e.experiment_id for e in client.search_experiments()]
    return sorted(r.info.run_id for r in client.search_runs(ids)) if ids else []


def test_missing_or_unfinished_search_runs_register_nothing(store, capsys, monkeypatch):
    tracker = Tracker("unfinished")
    running = tracker.start_run("search running", tags={"kind": "search"})
    failed_tracker = Tracker("failed-only")
    failed = failed_tracker.start_run("search failed", tags={"kind": "search"})
    failed_tracker.finish(failed, "failed", "RuntimeError: out of memory")
    done = tracker.start_run("search without best", tags={"kind": "search"})
    tracker.finish(done, "completed")
    trial = tracker.start_run("trial 01", parent_run_id=done, tags={"kind": "search"})
    client = MlflowClient(tracking_uri())
    before = _all_runs(client)
    capsys.readouterr()  # MLflow's own log lines while the store was set up

    cases = [
        ("0123456789abcdef0123456789abcdef", "no MLflow run with this id and no experiment"),
        ("no-such-experiment", "no MLflow run with this id and no experiment of this name"),
        (running, f"search run search running ({running}) is still running (unfinished)"),
        ("failed-only", "the latest, search failed"),
        ("failed-only", "did not finish (failed: RuntimeError: out of memory)"),
        (failed, "did not finish (failed: RuntimeError: out of memory); run a new search"),
        ("unfinished", "has no best_config.yaml (no trial finished)"),
        (trial, f"is a search run inside search run {done}, not a search run"),
    ]
    for ref, message in cases:
        code, err = run_main(["--from-search", ref], capsys, monkeypatch)
        assert code == 2, (ref, err)
        assert len(err.splitlines()) == 1 and err.startswith(f"error: --from-search {ref}: ")
        assert message in err, err
    assert _all_runs(client) == before
    assert client.search_registered_models() == []


def test_a_search_runs_invalid_best_config_is_refused(best_file, store, capsys, monkeypatch):
    tracker = Tracker("stale")
    run = tracker.start_run("search stale", tags={"kind": "search"})
    doc = yaml.safe_load(best_file.read_text())
    doc["adapter"]["gcn_hiden"] = 8  # e.g. a field renamed since the search ran
    tracker.log_text(run, yaml.safe_dump(doc, sort_keys=False), "best_config.yaml")
    tracker.finish(run, "completed")
    capsys.readouterr()
    code, err = run_main(["--from-search", "stale"], capsys, monkeypatch)
    assert code == 2
    assert err.startswith(f"error: search run {run}: best_config.yaml: adapter.gcn_hiden: ")
    assert "did you mean 'gcn_hidden'?" in err
    assert MlflowClient(tracking_uri()).search_registered_models() == []


@pytest.fixture(scope="module")
def registered(tmp_path_factory, store):
    """A tiny packaged model, registered as tiny-mc@champion; (model, tokenizer, folder)."""
    folder = tmp_path_factory.mktemp("registered")
    model, tokenizer = trained_adapter(folder / "adapter")
    package_model(
        folder / "adapter", folder / "model", batch_size=8, metadata={"dataset": "synthetic"}
    )
    run = Tracker("serving").start_run("final")
    version = log_and_register(
        run, folder / "model", name="tiny-mc", alias="champion", metadata={"seed": 0}
    )
    assert version == "1"
    return model, tokenizer, folder / "model"


def test_registered_pyfunc_predicts_like_evaluation(registered):
    model, tokenizer, folder = registered
    client = MlflowClient(tracking_uri())
    assert str(client.get_model_version_by_alias("tiny-mc", "champion").version) == "1"

    mlflow.set_tracking_uri(tracking_uri())
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-mc@champion")
    frame = pd.DataFrame(
        {
            "prompt": [e.prompt for e in EXAMPLES],
            "candidates": [list(e.candidates) for e in EXAMPLES],
        }
    )
    got = pyfunc.predict(frame)
    want = evaluate_examples(model, tokenizer, EXAMPLES, batch_size=8)
    assert list(got["prediction_index"]) == want.predictions
    answers = [e.candidates[p] for e, p in zip(EXAMPLES, want.predictions, strict=True)]
    assert list(got["prediction"]) == answers
    scores, _ = score_examples(model, tokenizer, EXAMPLES, batch_size=8)
    assert [list(s) for s in got["scores"]] == scores
    records = pyfunc.predict(frame.head(2).to_dict("records"))  # a list of dicts works too
    assert list(records["prediction"]) == list(got["prediction"][:2])
    assert pyfunc.metadata.metadata["graphlora"] == {"seed": 0}
    assert os.path.isdir(folder / "base_model")


def test_evaluate_cli(registered, capsys):
    model, tokenizer, folder = registered
    handful = load_task("synthetic").test[:4]
    want = evaluate_examples(model, tokenizer, handful, batch_size=8).correct
    # The model folder says its dataset; the registered model needs --dataset (its metadata
    # here has none).
    for argv in (
        ["--adapter", str(folder)],
        ["--model", "models:/tiny-mc@champion", "--dataset", "synthetic"],
    ):
        assert evaluate_cli.main([*argv, "--max-examples", "4"]) == 0
        out = capsys.readouterr().out.strip().splitlines()[-1]
        assert out.startswith(f"accuracy {want / 4:.4f} ({want}/4) on synthetic test: "), out
    for argv, message in (
        (["--adapter", str(folder / "nope")], "nope: no such folder"),
        (["--model", "models:/nope@champion"], "--model models:/nope@champion: "),
        (["--model", "models:/tiny-mc@champion"], "--dataset: the model does not say"),
    ):
        assert evaluate_cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err


def test_ctrl_c_during_registration_leaves_no_model_version(
    best_file, store, monkeypatch, tmp_path
):
    """Ctrl-C after MLflow created the model version but before its tags and alias: the version
    is deleted again and the run says `interrupted` (MLflow KILLED), not failed. (The seeds'
    training is stood in for: this is about the registration, on a real MLflow store.)"""
    plan = promote.plan_promotion(config=best_file, seeds="2", output_dir=str(tmp_path / "out"))
    per_seed = [{"seed": s, "test_accuracy": 0.5 + s / 10, "val_accuracy": 0.5} for s in (0, 1)]
    monkeypatch.setattr(promote, "_train_seeds", lambda *args: per_seed)
    client = MlflowClient(tracking_uri())

    def register_then_ctrl_c(plan, run_id, chosen, summary):  # noqa: ANN001, ANN202
        client.create_registered_model(plan.model_name)
        client.create_model_version(plan.model_name, str(tmp_path), run_id=run_id)
        assert client.search_model_versions(f"name='{plan.model_name}'")  # half registered
        raise KeyboardInterrupt

    monkeypatch.setattr(promote, "_register", register_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        promote.promote(plan, out=io.StringIO())
    assert client.search_model_versions(f"name='{plan.model_name}'") == []
    (run,) = client.search_runs(
        [client.get_experiment_by_name(plan.experiment).experiment_id],
        filter_string="tags.kind = 'final'",
    )
    assert run.info.status == "KILLED" and run.data.tags["status"] == "interrupted"
    assert "before the model was registered" in run.data.tags["status_reason"]
    client.delete_registered_model(plan.model_name)  # the module's other tests expect none


def test_promotion_from_a_trial_run_gets_the_trials_configuration(store, tmp_path):
    """A trial run's params (as the search's monitor writes them) rebuild its configuration."""
    from types import SimpleNamespace

    from graphlora.config import MoELoRAConfig
    from graphlora.run import TrainConfig
    from pipelines.monitor import SearchMonitor

    space = load_search_space(QUICKSTART)
    tracker = Tracker("from-run")
    parent = tracker.start_run("search x", tags={"kind": "search"})
    tracker.log_text(parent, yaml.safe_dump(space.raw), "space.yaml")
    monitor = SearchMonitor(tracker, parent, space, out=io.StringIO(), total=1)
    params = {
        "learning_rate": 0.02,
        "num_experts": 8,
        "top_k": 3,
        "rank": 4,
        "edge_density": 0.4,
        "poisson_coef": 0.01,
        "normal_coef": 2.0,
    }
    monitor.on_trial_start(0, [], SimpleNamespace(trial_id="abc_00001", config=params))
    run_id = monitor.records["abc_00001"]["run_id"]
    run = MlflowClient(tracking_uri()).get_run(run_id)
    assert run.data.params["adapter.num_experts"] == "8"
    assert run.data.params["training.eval_test"] == "false"  # search trials never see test
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == [
        "synthetic-train",
        "synthetic-validation",
    ]
    assert run.data.tags["graphlora.base_model"] == space.model

    plan = promote.plan_promotion(from_run=run_id, output_dir=tmp_path / "out", seeds="1")
    adapter, training = space.configs(params, space.seed)
    assert MoELoRAConfig(**plan.adapter) == MoELoRAConfig(**adapter)
    assert TrainConfig(**plan.training, seed=0) == TrainConfig(
        **{**training, "seed": 0, "eval_test": True}
    )
    assert plan.experiment == "from-run"
    assert plan.best.resources == space.raw["resources"]
    assert plan.best.objective["metric"] == space.objective.metric


def test_a_collapsed_router_reaches_the_promotion(tmp_path, store, monkeypatch):
    """The search's routing record of the best configuration (best_config.yaml, or a trial run's
    `routing_collapsed` tag) reaches the promotion, which says that its routing collapsed."""
    from pipelines.records import COLLAPSED_TAG, config_params, routing_warning

    space = load_search_space(QUICKSTART)
    params = {"learning_rate": 0.01, "num_experts": 4, "top_k": 2, "rank": 2, "edge_density": 0.2}
    routing = {"min_batch_entropy": 0.25, "collapsed_layers": [0, 1]}
    best = {"source": "trial 3", "params": params, "scores": {"objective": 0.75}}
    write_results(tmp_path, space, [], [], {**best, "routing": routing})
    plan = promote.plan_promotion(config=tmp_path / "best_config.yaml", seeds="1")
    assert plan.best.routing == routing
    assert "routing collapsed in the search in layers 0,1" in routing_warning(plan.best.routing)

    def stop(*args):  # noqa: ANN002, ANN202 (the training is not what this is about)
        raise KeyboardInterrupt

    monkeypatch.setattr(promote, "_train_seeds", stop)
    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        promote.promote(plan, out=out)
    assert routing_warning(routing) in out.getvalue().splitlines()

    tracker = Tracker("from-run-routing")
    adapter, training = space.configs(params, space.seed)
    run_id = tracker.start_run(
        "trial 01 x", params=config_params(adapter, training), tags={COLLAPSED_TAG: "1"}
    )
    tracker.log_metrics(run_id, {"routing/min_batch_entropy": 0.4})
    plan = promote.plan_promotion(from_run=run_id, output_dir=tmp_path / "out", seeds="1")
    assert plan.best.routing == {"min_batch_entropy": 0.4, "collapsed_layers": [1]}


def test_from_run_refuses_a_run_without_a_configuration(store, capsys, monkeypatch):
    tracker = Tracker("from-run")
    run_id = tracker.start_run("search y", tags={"kind": "search"})
    code, err = run_main(["--from-run", run_id], capsys, monkeypatch)
    assert code == 2 and err.startswith("error: --from-run ") and "\n" not in err
    code, err = run_main(["--from-run", "0" * 32], capsys, monkeypatch)
    assert code == 2 and "no MLflow run with this id" in err
