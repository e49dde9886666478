"""Loading a base model and its tokenizer: a name graphlora knows, a local checkpoint or a Hub id.

``load_model_and_tokenizer`` is the one entry point. It resolves a name in this order:

1. a preset from :data:`~graphlora.presets.PRESETS` (``tiny-qwen2``...): a tiny random model with
   a byte-level tokenizer, deterministic given ``seed``; no files, no network;
2. a packaged pretrained model from :data:`~graphlora.presets.PACKAGED_MODELS` (``minilm-l6``):
   the model folder inside an installed Python package (no network), else its Hub id;
3. an existing local directory: loaded with ``local_files_only=True`` (never touches the network);
4. anything else: a Hugging Face Hub id, loaded at ``revision``; the resolved commit hash is
   recorded in :class:`ModelInfo` so a run can be reproduced.

Decoders (causal LMs) load with ``AutoModelForCausalLM``; encoders (BERT and its kin: no LM head
to score answers with) load as their base model class with ``AutoModel``, and
``ModelInfo.architecture`` says which of the two was loaded. ``check_model_reference`` and
``reference_config`` resolve the same way without loading weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants as hub_constants
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from graphlora.examples import first_line
from graphlora.presets import (
    PACKAGED_MODELS,
    PRESETS,
    SHIPPED_CONFIGS,
    ModelLoadError,
    build_preset_model,
    packaged_model_dir,
    packaged_model_version,
    preset_config,
    shipped_config,
)

__all__ = [
    "ENCODER_MODEL_TYPES",
    "ModelInfo",
    "ModelLoadError",
    "check_model_reference",
    "is_encoder_config",
    "load_model_and_tokenizer",
    "model_hidden_size",
    "reference_config",
    "resolve_dtype",
]

ENCODER_MODEL_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "albert", "camembert"}
    | {"deberta", "deberta-v2", "modernbert", "nomic_bert", "xlm"}
)
"""``config.model_type`` values loaded as encoders (``AutoModel``) unless the config says it is
a decoder (``is_decoder``) or names a causal-LM architecture."""


@dataclass
class ModelInfo:
    """Where a model came from, saved next to results so a run can be traced and repeated.

    Attributes:
        name: The name or path that was asked for (for a packaged model whose package is
            absent, the Hub id it resolved to).
        kind: ``"preset"``, ``"package"``, ``"local"`` or ``"hub"``.
        revision: For Hub models the resolved commit hash when known (else the requested
            revision); for presets ``"seed=<seed>"``; for packaged models
            ``"<package>==<version>"``; ``None`` for local directories.
        num_parameters: Total parameter count of the loaded model (trainable or not).
        dtype: The torch dtype the weights were loaded in, e.g. ``"float32"``.
        architecture: ``"decoder"`` (a causal LM: answers are scored by likelihood) or
            ``"encoder"`` (a base encoder such as BERT: answers need a scoring head).
    """

    name: str
    kind: str
    revision: str | None
    num_parameters: int
    dtype: str = field(default="float32")
    architecture: str = field(default="decoder")

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable dict of the fields."""
        return asdict(self)


def is_encoder_config(config: PretrainedConfig) -> bool:
    """True when a checkpoint with this config is an encoder (loaded with ``AutoModel``) rather
    than a causal LM: its ``model_type`` is in :data:`ENCODER_MODEL_TYPES`, it is not configured
    as a decoder, and its ``architectures`` name no causal-LM head."""
    heads = getattr(config, "architectures", None) or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in heads)
    return (
        config.model_type in ENCODER_MODEL_TYPES
        and not getattr(config, "is_decoder", False)
        and not causal
    )


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Turns a dtype name into a ``torch.dtype``.

    Args:
        dtype: A ``torch.dtype``, ``"auto"`` (bfloat16 on a CUDA device that supports it, else
            float32), or a name such as ``"float32"``, ``"fp32"``, ``"bfloat16"``, ``"bf16"``,
            ``"float16"``, ``"fp16"``.

    Returns:
        The torch dtype.

    Raises:
        ValueError: The name is not one of the above.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    aliases = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
    }
    if key not in aliases:
        raise ValueError(
            f"Unknown dtype {dtype!r}; use 'auto', 'float32', 'bfloat16' or 'float16'."
        )
    return aliases[key]


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(
                f"Tokenizer of {model.name_or_path!r} has neither a pad nor an eos token; "
                "add a pad token to the checkpoint's tokenizer before fine-tuning."
            )
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def _from_pretrained(
    source: str | Path,
    *,
    revision: str | None,
    dtype: torch.dtype,
    trust_remote_code: bool,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer of a local folder (``Path``, never touches the network) or a Hub id;
    an encoder loads with ``AutoModel``, a decoder with ``AutoModelForCausalLM``."""
    local = isinstance(source, Path)
    where: dict[str, Any] = {"local_files_only": True} if local else {"revision": revision}
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **where)
    auto = AutoModel if is_encoder_config(config) else AutoModelForCausalLM
    model = auto.from_pretrained(
        source, config=config, dtype=dtype, trust_remote_code=trust_remote_code, **where
    )
    if local:
        tokenizer = _load_local_tokenizer(source, trust_remote_code=trust_remote_code)
    else:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=revision, trust_remote_code=trust_remote_code
        )
    return model, tokenizer


def _locate(name: str) -> tuple[str, str | Path]:
    """What a model reference names, without loading anything: ``("preset", name)``,
    ``("package", folder)``, ``("local", folder)`` or ``("hub", hub_id)`` (a packaged model whose
    package is absent is its Hub copy).

    Raises:
        ModelLoadError: a path that does not exist, or a packaged model's broken install.
    """
    if name in PRESETS:
        return "preset", name
    if name in PACKAGED_MODELS:
        folder = packaged_model_dir(name)
        return ("package", folder) if folder is not None else ("hub", PACKAGED_MODELS[name].hub_id)
    path = Path(name).expanduser()
    if path.is_dir():
        return "local", path
    if _looks_like_path(name):
        raise ModelLoadError(
            f"Model path {name!r} does not exist. Give an existing directory holding a "
            f"save_pretrained() checkpoint, a preset ({', '.join(sorted(PRESETS))}) or a "
            "Hugging Face Hub id such as 'Qwen/Qwen2-0.5B'."
        )
    return "hub", name


def load_model_and_tokenizer(
    name_or_path: str,
    *,
    revision: str | None = None,
    dtype: str | torch.dtype = "auto",
    seed: int = 0,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelInfo]:
    """Loads a model and its tokenizer from a preset, a packaged model, a local directory or the
    Hub (in that order, see the module docstring): a causal LM, or an encoder (see
    :func:`is_encoder_config`); ``info.architecture`` says which.

    Presets, installed packaged models and local directories never touch the network. The
    tokenizer always has a pad token (falling back to the eos token).

    Args:
        name_or_path: A key of :data:`PRESETS` or :data:`PACKAGED_MODELS`, an existing directory
            holding a ``save_pretrained`` checkpoint, or a Hub id such as ``"Qwen/Qwen2-0.5B"``.
        revision: Hub branch, tag or commit (Hub ids only; ignored otherwise).
        dtype: ``"auto"`` (bf16 on CUDA when supported, else fp32), a dtype name or a
            ``torch.dtype``.
        seed: Initialisation seed for presets (ignored for pretrained weights).
        trust_remote_code: Passed to transformers for checkpoints with custom code.

    Returns:
        ``(model, tokenizer, info)``; the model is in eval mode.

    Raises:
        ModelLoadError: The name is neither a preset nor a directory and the Hub load failed
            (offline, unknown id, gated repo...). The message lists the presets.
    """
    torch_dtype = resolve_dtype(dtype)
    kind, where = _locate(name_or_path)
    load = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if kind == "preset":
        model, tokenizer = build_preset_model(name_or_path, seed=seed, dtype=torch_dtype)
        resolved_revision = f"seed={seed}"
    elif kind == "hub":
        try:
            model, tokenizer = _from_pretrained(where, revision=revision, **load)
        except (OSError, ValueError) as err:
            raise ModelLoadError(
                f"Could not load model {where!r} from the Hugging Face Hub{_offline_note()}: "
                f"{first_line(err)}. It is not a preset (available: "
                f"{', '.join(sorted(PRESETS))}) and not an existing local directory. Use a preset "
                "for offline runs, pass a local directory holding a save_pretrained() "
                "checkpoint, or check the Hub id, revision and network access."
            ) from err
        name_or_path = where  # a packaged model without its package: the Hub id it resolved to
        resolved_revision = getattr(model.config, "_commit_hash", None) or revision
    else:
        try:
            model, tokenizer = _from_pretrained(where, revision=None, **load)
        except (OSError, ValueError) as err:
            raise ModelLoadError(
                f"Could not load a model from local directory {str(where)!r}: {err}. "
                "It should hold the output of model.save_pretrained() and "
                "tokenizer.save_pretrained() (config.json, weights, tokenizer files)."
            ) from err
        resolved_revision = packaged_model_version(name_or_path) if kind == "package" else None

    _ensure_pad_token(tokenizer, model)
    model.eval()
    info = ModelInfo(
        name=name_or_path,
        kind=kind,
        revision=resolved_revision,
        num_parameters=sum(p.numel() for p in model.parameters()),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        architecture="encoder" if is_encoder_config(model.config) else "decoder",
    )
    return model, tokenizer, info


def _load_local_tokenizer(path: Path, *, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    # A generic tokenizers-backed tokenizer (such as the presets' byte tokenizer) must come back
    # as it was saved. AutoTokenizer would pick the class from config.json's model_type instead
    # (Qwen2Tokenizer for a qwen2 model) and rebuild the pipeline, adding NFC normalisation.
    config_file = path / "tokenizer_config.json"
    if config_file.is_file():
        try:
            tokenizer_class = json.loads(config_file.read_text()).get("tokenizer_class")
        except (OSError, ValueError):
            tokenizer_class = None
        if tokenizer_class in _GENERIC_TOKENIZER_CLASSES and (path / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    return AutoTokenizer.from_pretrained(
        path, local_files_only=True, trust_remote_code=trust_remote_code
    )


_GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else with path syntax is a missing path.
    return name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1


def _offline_note() -> str:
    return " (offline mode is on: HF_HUB_OFFLINE=1)" if hub_constants.HF_HUB_OFFLINE else ""


def _require_config_file(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"Local model directory {str(folder)!r} has no config.json; it should hold the "
            "output of model.save_pretrained() and tokenizer.save_pretrained()."
        )


def _hub_config(hub_id: str, revision: str | None) -> PretrainedConfig:
    """A Hub id's config (fetched, or read from the local cache when offline); offline, one
    that ships with graphlora (:data:`SHIPPED_CONFIGS`) stands in for it."""
    try:
        return AutoConfig.from_pretrained(hub_id, revision=revision)
    except (OSError, ValueError) as err:
        if hub_constants.HF_HUB_OFFLINE and revision is None and hub_id in SHIPPED_CONFIGS:
            return shipped_config(hub_id)  # the weights come when online
        raise ModelLoadError(
            f"Unknown model {hub_id!r}: not a preset ({', '.join(sorted(PRESETS))}), not "
            f"a local directory, and the Hugging Face Hub has no config for it{_offline_note()}: "
            f"{first_line(err)}"
        ) from err


def check_model_reference(name_or_path: str, *, revision: str | None = None) -> str:
    """Check that a model reference can be loaded, without loading weights; return its kind
    (``"preset"``, ``"package"``, ``"local"`` or ``"hub"``).

    A local directory must hold a ``config.json``; a Hub id's config is fetched (or read from
    the local cache when offline), which is small and fast. Used to refuse a bad ``model:``
    before a search starts any worker.

    Raises:
        ModelLoadError: One line saying what is wrong and what to use instead.
    """
    kind, where = _locate(name_or_path)
    if kind == "local":
        _require_config_file(where)
    elif kind == "hub":
        _hub_config(where, revision)
    return kind


def reference_config(name_or_path: str, *, revision: str | None = None) -> PretrainedConfig:
    """The config of a model reference, without loading weights: a preset's own, a packaged or
    local folder's ``config.json``, a Hub id's (as :func:`check_model_reference`).

    Raises:
        ModelLoadError: the reference cannot be resolved (as ``check_model_reference``).
    """
    kind, where = _locate(name_or_path)
    if kind == "preset":
        return preset_config(name_or_path)
    if kind == "hub":
        return _hub_config(where, revision)
    if kind == "local":
        _require_config_file(where)
    return AutoConfig.from_pretrained(where, local_files_only=True)


def model_hidden_size(name_or_path: str, *, revision: str | None = None) -> int:
    """The hidden size d of a model reference, read from its config (:func:`reference_config`)
    without loading weights. Multimodal configs answer with their text model's size.

    Raises:
        ModelLoadError: the reference cannot be resolved, or its config names no
            ``hidden_size``.
    """
    config = reference_config(name_or_path, revision=revision)
    size = getattr(config.get_text_config(), "hidden_size", None)
    if not isinstance(size, int):
        raise ModelLoadError(
            f"{name_or_path!r}: its config ({type(config).__name__}) names no hidden_size; "
            "use a transformer with a gated or classic FFN (Llama, Qwen2, GPT-2, OPT, BERT)"
        )
    return size
