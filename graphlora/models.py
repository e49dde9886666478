"""Base models and tokenizers: offline tiny presets, local checkpoints and Hub ids.

``load_model_and_tokenizer`` is the one entry point. It resolves a name in this order:

1. a preset name from :data:`PRESETS` (``tiny-qwen2``, ``tiny-llama``): a randomly initialised
   model, deterministic given ``seed``, with a byte-level tokenizer built in code. Needs no files
   and no network; this is what the tests, the quickstart and CPU smoke runs use.
2. an existing local directory: loaded with ``local_files_only=True`` (never touches the network).
3. anything else: a Hugging Face Hub id, loaded at ``revision``; the resolved commit hash is
   recorded in :class:`ModelInfo` so a run can be reproduced.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
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
    "PAD_TOKEN",
    "PRESETS",
    "ModelInfo",
    "ModelLoadError",
    "PresetSpec",
    "build_byte_tokenizer",
    "build_preset_model",
    "load_model_and_tokenizer",
    "model_hidden_size",
    "resolve_dtype",
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
        architecture: ``"qwen2"`` or ``"llama"``; picks the transformers config and model class.
        hidden_size: Model width.
        intermediate_size: MLP width (about 2.75x ``hidden_size``, as in the real families).
        num_hidden_layers: Number of decoder layers.
        num_attention_heads: Query heads.
        num_key_value_heads: Key/value heads (grouped-query attention when fewer than the
            query heads).
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
}
"""Offline presets by name. ``load_model_and_tokenizer(name)`` accepts any key."""


@dataclass
class ModelInfo:
    """Where a model came from, saved next to results so a run can be traced and repeated.

    Attributes:
        name: The name or path that was asked for.
        kind: ``"preset"``, ``"local"`` or ``"hub"``.
        revision: For Hub models the resolved commit hash when known (else the requested
            revision); for presets ``"seed=<seed>"``; ``None`` for local directories.
        num_parameters: Total parameter count of the loaded model (trainable or not).
        dtype: The torch dtype the weights were loaded in, e.g. ``"float32"``.
    """

    name: str
    kind: str
    revision: str | None
    num_parameters: int
    dtype: str = field(default="float32")

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
    common: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    if spec.architecture == "qwen2":
        return Qwen2Config(**common)
    if spec.architecture == "llama":
        return LlamaConfig(**common)
    raise ValueError(
        f"PresetSpec.architecture {spec.architecture!r} is not supported; use 'qwen2' or 'llama'."
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
    model_cls = Qwen2ForCausalLM if spec.architecture == "qwen2" else LlamaForCausalLM
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


def load_model_and_tokenizer(
    name_or_path: str,
    *,
    revision: str | None = None,
    dtype: str | torch.dtype = "auto",
    seed: int = 0,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelInfo]:
    """Loads a causal LM and its tokenizer from a preset name, a local directory or the Hub.

    Presets and local directories never touch the network. The tokenizer always has a pad token
    (falling back to the eos token).

    Args:
        name_or_path: A key of :data:`PRESETS`, an existing directory holding a
            ``save_pretrained`` checkpoint, or a Hub id such as ``"Qwen/Qwen2-0.5B"``.
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
        )
        return model, tokenizer, info

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=torch_dtype,
                local_files_only=True,
                trust_remote_code=trust_remote_code,
            )
            tokenizer = _load_local_tokenizer(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise ModelLoadError(
                f"Could not load a causal LM from local directory {str(path)!r}: {err}. "
                "It should hold the output of model.save_pretrained() and "
                "tokenizer.save_pretrained() (config.json, weights, tokenizer files)."
            ) from err
        kind, resolved_revision = "local", None
    elif _looks_like_path(name_or_path):
        raise _missing_path(name_or_path)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path,
                revision=revision,
                dtype=torch_dtype,
                trust_remote_code=trust_remote_code,
            )
            tokenizer = AutoTokenizer.from_pretrained(
                name_or_path, revision=revision, trust_remote_code=trust_remote_code
            )
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

    Presets are known; a local directory must hold a ``config.json``; a Hub id's config is
    fetched (or read from the local cache when offline), which is small and fast. Used to refuse
    a bad ``model:`` before a search starts any worker.

    Raises:
        ModelLoadError: One line saying what is wrong and what to use instead.
    """
    if name_or_path in PRESETS:
        return "preset"
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
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name_or_path, revision=revision)
    except (OSError, ValueError) as err:
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
    kind = check_model_reference(name_or_path, revision=revision)  # one-line errors
    from transformers import AutoConfig

    if kind == "local":
        config = AutoConfig.from_pretrained(Path(name_or_path).expanduser(), local_files_only=True)
    else:
        config = AutoConfig.from_pretrained(name_or_path, revision=revision)
    size = getattr(config.get_text_config(), "hidden_size", None)
    if not isinstance(size, int):
        raise ModelLoadError(
            f"{name_or_path!r}: its config ({type(config).__name__}) names no hidden_size; "
            "use a decoder with a gated MLP (Llama, Qwen2, Mistral, Yi, Gemma)"
        )
    return size
