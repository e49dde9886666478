"""End to end on a real local Ray (2 CPUs) and a real MLflow store: a search (the shared ASHA
search of tests/e2e/conftest.py), promotion of its best configuration from the MLflow search run
(2 seeds on Ray Train), and the registered model loaded through `mlflow.pyfunc` answering
held-out questions with the accuracy the run reported."""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient
from test_inference import one_torch_thread  # noqa: F401 (autouse: one thread, as Ray workers)

from graphlora.data import load_task
from pipelines import promote
from pipelines.tracking import tracking_uri

HANDFUL = 16  # held-out test examples the promotion reports on and the served model answers


def test_search_promote_register_and_serve(asha_search, graphlora_home, tmp_path, capsys):
    """Promotes the best configuration of the shared ASHA search (tests/e2e/conftest.py)."""
    space, search, _ = asha_search
    experiment, name = space.experiment, f"graphlora-e2e-{tmp_path.name}"
    assert search.best is not None

    code = promote.main(
        [
            "--from-search",
            experiment,  # the experiment's latest finished search
            "--seeds",
            "2",
            "--max-steps",
            "10",
            "--max-test-examples",
            str(HANDFUL),
            "--model-name",
            name,
            "--output-dir",
            str(tmp_path / "final"),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "seed 0 (" in printed and "seed 1 (" in printed
    assert f"registered: models:/{name}@champion = version 1" in printed

    # One MLflow run, linked to the search run, with each seed's metrics and adapter.
    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'final'")
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "completed"
    assert run.data.tags[promote.SOURCE_TAG] == search.parent_run_id
    history = client.get_metric_history(run.info.run_id, "test_accuracy")
    assert sorted(m.step for m in history) == [0, 1]
    assert "test_accuracy_mean" in run.data.metrics and "test_accuracy_std" in run.data.metrics
    adapters = {a.path for a in client.list_artifacts(run.info.run_id, "adapters")}
    assert adapters == {"adapters/seed0", "adapters/seed1"}
    seed_files = {a.path for a in client.list_artifacts(run.info.run_id, "adapters/seed0")}
    assert {"adapters/seed0/adapter_model.safetensors", "adapters/seed0/adapter_config.json"} <= (
        seed_files
    )

    # Its params are named as the search's trial runs' are; its data inputs include the test.
    trial_run = client.get_run(search.trials[0]["run_id"])

    def config_keys(r) -> set[str]:  # noqa: ANN001
        return {k for k in r.data.params if k.startswith(("adapter.", "training."))}

    assert config_keys(run) == config_keys(trial_run) - {"training.seed"}
    contexts = {t.value for i in run.inputs.dataset_inputs for t in i.tags}
    assert contexts == {"train", "validation", "test"}

    # --from-run: any trial run's params give back that trial's configuration.
    from graphlora.config import MoELoRAConfig
    from graphlora.run import TrainConfig

    for t in search.trials:
        plan = promote.plan_promotion(from_run=t["run_id"], output_dir=tmp_path / "again")
        adapter, training = space.configs(t["params"], space.seed)
        assert MoELoRAConfig(**plan.adapter) == MoELoRAConfig(**adapter)
        assert TrainConfig(**plan.training, seed=space.seed) == TrainConfig(
            **{**training, "eval_test": True}
        )
        assert plan.best.resources == space.raw["resources"]

    # The registry holds the version and the alias, made from this run.
    (version,) = client.search_model_versions(f"name = '{name}'")
    assert str(version.version) == "1" and version.run_id == run.info.run_id
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"

    # Served through mlflow.pyfunc, the model answers the held-out handful with exactly the
    # accuracy the training run reported for the registered seed.
    seed = int(run.data.tags["graphlora.registered_seed"])
    reported = {m.step: m.value for m in history}[[0, 1].index(seed)]
    mlflow.set_tracking_uri(tracking_uri())
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    handful = load_task("synthetic").test[:HANDFUL]
    out = model.predict(
        pd.DataFrame(
            {
                "prompt": [e.prompt for e in handful],
                "candidates": [list(e.candidates) for e in handful],
            }
        )
    )
    correct = sum(int(p == e.label) for p, e in zip(out["prediction_index"], handful, strict=True))
    assert correct / HANDFUL == reported
    assert list(out["prediction"]) == [
        e.candidates[p] for p, e in zip(out["prediction_index"], handful, strict=True)
    ]
