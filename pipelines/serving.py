"""The registered model: an MLflow `pyfunc` over `graphlora.inference.MultipleChoiceModel`.

    model = mlflow.pyfunc.load_model("models:/graphlora-synthetic@champion")
    model.predict(pd.DataFrame({"prompt": [...], "candidates": [[...], ...]}))
    model.predict(pd.DataFrame({"question": [...], "options": [[...], ...]}))

Input: a DataFrame (or a list of dicts) with either `question` (str) and `options` (list of
option texts), which suits every model: the pyfunc formats them the way its model was trained (a
decoder: the listed prompt "Answer1: ... Answer format: answer1/..." with the labels as
candidates; an encoder: the question and option texts its head compares); or, for a decoder,
`prompt` (str) and `candidates` (list of str) as they are.
Output: a DataFrame with `prediction` (the chosen option text, or candidate), `prediction_index`,
and `scores`: each candidate's summed log-likelihood given the prompt (a decoder) or each
option's head logit (an encoder), computed by the same function as training's evaluation, so
accuracies agree exactly.

The model's one artifact is a `package_model` folder (adapter + pinned base model). The model
carries its code: this file (MLflow's "models from code": loading runs it, and `set_model` at the
bottom names the model object) and `graphlora/` (`code_paths`), so it computes what it was
trained with and loads wherever its pip requirements are installed.
"""

from __future__ import annotations

import importlib.metadata
import json
import warnings
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import Array, ColSpec, Schema

import graphlora

ARTIFACT = "model"  # the pyfunc's artifact key: the package_model folder
SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec("string", "prompt", required=False),
            ColSpec(Array("string"), "candidates", required=False),
            ColSpec("string", "question", required=False),
            ColSpec(Array("string"), "options", required=False),
        ]
    ),
    outputs=Schema(
        [
            ColSpec("string", "prediction"),
            ColSpec("long", "prediction_index"),
            ColSpec(Array("double"), "scores"),
        ]
    ),
)
_REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "torch-geometric")


class MultipleChoicePyfunc(mlflow.pyfunc.PythonModel):
    """Answers multiple-choice questions with a GraphLoRA adapter on its pinned base model."""

    def load_context(self, context: Any) -> None:
        from graphlora.inference import MultipleChoiceModel

        self.model = MultipleChoiceModel.load(context.artifacts[ARTIFACT])

    # A DataFrame hint tells MLflow not to infer a schema from hints (SIGNATURE is the schema).
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if {"question", "options"} <= set(frame.columns):
            candidates = [list(o) for o in frame["options"]]
            preds = self.model.answer([str(q) for q in frame["question"]], candidates)
        elif {"prompt", "candidates"} <= set(frame.columns):
            candidates = [list(c) for c in frame["candidates"]]
            preds = self.model.predict(list(frame["prompt"]), candidates)
        else:
            raise ValueError(
                "input needs columns 'question' (str) and 'options' (list of option texts), or "
                f"for a decoder 'prompt' (str) and 'candidates' (list of str); got "
                f"{sorted(map(str, frame.columns))}"
            )
        return pd.DataFrame(
            {
                "prediction": [c[p.index] for c, p in zip(candidates, preds, strict=True)],
                "prediction_index": [p.index for p in preds],
                "scores": [p.scores for p in preds],
            }
        )


def _requirements(model_dir: str | Path | None = None) -> list[str]:
    """Pinned pip requirements of the pyfunc, plus what its base model needs (a packaged base:
    its package at the version trained on)."""
    out = []
    for name in _REQUIREMENTS:
        version = importlib.metadata.version(name).split("+")[0]  # local builds: torch 2.x+cpu
        out.append(f"{name}=={version}")
    if model_dir is not None:
        from graphlora.inference import MODEL_FILE, base_model_requirements

        doc = json.loads((Path(model_dir) / MODEL_FILE).read_text())
        out += base_model_requirements(doc["base_model"])
    return out


def log_and_register(
    run_id: str,
    model_dir: str | Path,
    *,
    name: str,
    alias: str,
    metadata: dict[str, Any],
    description: str = "",
) -> str:
    """Log `model_dir` (a `package_model` folder) as the run's pyfunc model `model`, register it
    as a new version of `name`, point `alias` at it; return the version.

    Uses the fluent API on an existing run: the tracking URI must be set (`Tracker` does it).
    """
    client = mlflow.MlflowClient()
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # The explicit signature stands in for an input example, which MLflow would run.
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).resolve()),
            artifacts={ARTIFACT: str(model_dir)},
            code_paths=[str(Path(graphlora.__file__).parent)],
            signature=SIGNATURE,
            pip_requirements=_requirements(model_dir),
            metadata={"graphlora": metadata},
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    if description:
        client.update_model_version(name, version, description=description)
    for key in ("training_run_id", "source_search_run", "seed", "test_accuracy"):
        if key in metadata:
            client.set_model_version_tag(name, version, key, str(metadata[key]))
    client.set_registered_model_alias(name, alias, version)
    return version


mlflow.models.set_model(MultipleChoicePyfunc())
