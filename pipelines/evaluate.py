"""Accuracy of a trained adapter or a registered model on any supported dataset.

    graphlora-evaluate --model models:/graphlora-synthetic@champion
    graphlora-evaluate --adapter ~/.graphlora/final/<name>/seed0 --dataset synthetic
    graphlora-evaluate --model runs:/<run id>/model --dataset boolq \\
        --split validation --log-to-mlflow

`--model` takes any MLflow model URI of a promoted model (`models:/<name>@<alias>`,
`models:/<name>/<version>`, `runs:/<run id>/model`) and predicts through its pyfunc, as a
service would; `--adapter` takes a model folder (`package_model`) or a bare adapter folder and
scores with the library directly. The dataset defaults to the one the model was promoted on.
Prints one line: accuracy, counts, dataset and split. Bad input is one `error: ...` line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from pipelines.errors import first_line
from pipelines.tracking import Tracker, TrackingError, check_store, tracking_uri

SPLITS = ("test", "validation", "train")


class EvaluationError(ValueError):
    """One line saying what is wrong with the evaluation's input."""


def quiet_progress_bars() -> None:
    """No download / weight-loading progress bars: the CLIs print their own lines."""
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    hf_logging.disable_progress_bar()


def _model_facts(model: str | None, adapter: str | None) -> dict[str, Any]:
    """What the model says about itself (dataset, seed...), read without loading weights."""
    from graphlora.inference import MODEL_FILE

    if adapter is not None:
        folder = Path(adapter).expanduser()
        if not folder.is_dir():
            raise EvaluationError(f"--adapter {adapter}: no such folder")
        return (
            json.loads((folder / MODEL_FILE).read_text()) if (folder / MODEL_FILE).is_file() else {}
        )
    import mlflow
    from mlflow.exceptions import MlflowException

    store = tracking_uri()
    check_store(store)
    mlflow.set_tracking_uri(store)
    try:
        info = mlflow.models.get_model_info(model)
    except (MlflowException, OSError) as exc:
        raise EvaluationError(f"--model {model}: {first_line(exc)}") from exc
    return (info.metadata or {}).get("graphlora", {})


def _predictor(model: str | None, adapter: str | None, base_model: str | None) -> Any:
    """predict(examples) -> predicted indices: through the pyfunc for `model` (as a service
    would), with the library for `adapter`."""
    if adapter is not None:
        from graphlora.inference import MultipleChoiceModel
        from graphlora.models import ModelLoadError

        try:
            mc = MultipleChoiceModel.load(Path(adapter).expanduser(), base_model=base_model)
        except (FileNotFoundError, ModelLoadError, ValueError) as exc:
            raise EvaluationError(f"--adapter {adapter}: {first_line(exc)}") from exc
        return lambda examples: mc.evaluate(examples).predictions
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    try:
        pyfunc = mlflow.pyfunc.load_model(model)
    except (MlflowException, OSError) as exc:
        raise EvaluationError(f"--model {model}: {first_line(exc)}") from exc

    def predict(examples: list) -> list[int]:
        frame = pd.DataFrame(
            {
                "prompt": [e.prompt for e in examples],
                "candidates": [list(e.candidates) for e in examples],
            }
        )
        return [int(i) for i in pyfunc.predict(frame)["prediction_index"]]

    return predict


def evaluate(
    *,
    model: str | None = None,
    adapter: str | None = None,
    base_model: str | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    split: str = "test",
    max_examples: int | None = None,
) -> dict[str, Any]:
    """Accuracy of `model` (an MLflow model URI) or `adapter` (a folder) on a dataset split.

    Returns:
        `{"accuracy", "correct", "total", "dataset", "split", "source"}`.

    Raises:
        EvaluationError: One line, for any bad input.
    """
    from graphlora.data import DataError, load_task

    if (model is None) == (adapter is None):
        raise EvaluationError("give exactly one of --model URI and --adapter FOLDER")
    if split not in SPLITS:
        raise EvaluationError(f"--split {split}: use one of {', '.join(SPLITS)}")
    if max_examples is not None and max_examples < 1:
        raise EvaluationError(f"--max-examples {max_examples}: must be at least 1")
    meta = _model_facts(model, adapter)
    if dataset is None:  # the model's own dataset, from where it was promoted
        dataset, data_dir = meta.get("dataset"), data_dir or meta.get("data_dir")
    if dataset is None:
        raise EvaluationError("--dataset: the model does not say what it was trained on; name it")
    try:
        examples = getattr(load_task(dataset, data_dir=data_dir), split)
    except DataError as exc:
        raise EvaluationError(first_line(exc)) from exc
    examples = examples[:max_examples] if max_examples else examples
    if not examples:
        raise EvaluationError(f"dataset {dataset!r} has no {split} examples")
    predictions = _predictor(model, adapter, base_model)(examples)
    correct = sum(int(p == e.label) for p, e in zip(predictions, examples, strict=True))
    return {
        "accuracy": correct / len(examples),
        "correct": correct,
        "total": len(examples),
        "dataset": dataset,
        "split": split,
        "source": model or str(adapter),
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="MLflow model URI, e.g. models:/graphlora-synthetic@champion")
    what.add_argument("--adapter", help="a model folder or an adapter folder")
    parser.add_argument("--base-model", help="with a bare --adapter: the base to load instead")
    parser.add_argument("--dataset", help="task name or path (default: the model's)")
    parser.add_argument(
        "--data-dir",
        help="folder with one LLM-Adapters folder per task (ARC-Challenge/train.json, test.json); "
        "default: the model's when --dataset is not given, else $GRAPHLORA_DATA_DIR, else the "
        "copy shipped with graphlora",
    )
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--max-examples", type=int, help="evaluate the first N examples only")
    parser.add_argument(
        "--log-to-mlflow",
        nargs="?",
        const="graphlora-eval",
        metavar="EXPERIMENT",
        help="log the result as an MLflow run (experiment default: %(const)s)",
    )
    options = vars(parser.parse_args(argv))
    experiment = options.pop("log_to_mlflow")
    quiet_progress_bars()
    try:
        tracker = Tracker(experiment) if experiment else None
        result = evaluate(**options)
    except (EvaluationError, TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"accuracy {result['accuracy']:.4f} ({result['correct']}/{result['total']}) on "
        f"{result['dataset']} {result['split']}: {result['source']}"
    )
    if tracker is not None:
        run = tracker.start_run(
            f"evaluate {result['dataset']} {result['split']}",
            params={k: result[k] for k in ("source", "dataset", "split", "total")},
            tags={"kind": "evaluation"},
        )
        tracker.log_metrics(run, {k: result[k] for k in ("accuracy", "correct", "total")})
        tracker.log_text(run, json.dumps(result, indent=2), "evaluation.json")
        tracker.finish(run, "completed")
        print(f"MLflow run {run}: {tracker.ui_link()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
