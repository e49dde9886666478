"""The byte-level tokenizer of the offline presets, built in code: no files, no network.

Ids 0-255 are the 256 byte values (through the GPT-2 byte-to-unicode alphabet, so every UTF-8
string round-trips), followed by ``<|bos|>`` (256), ``<|eos|>`` (257) and ``<|pad|>`` (258).
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

__all__ = ["BOS_TOKEN", "EOS_TOKEN", "PAD_TOKEN", "build_byte_tokenizer"]

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"


def build_byte_tokenizer(
    padding_side: str = "right", model_max_length: int = 2048
) -> PreTrainedTokenizerFast:
    """Builds the byte-level tokenizer (see the module docstring): deterministic, one token per
    byte (there are no merges). No special token is added by ``encode``; callers add
    ``eos_token`` where they want it (as with Qwen2 tokenizers).

    Args:
        padding_side: ``"right"`` (training) or ``"left"`` (batched generation).
        model_max_length: Stored on the tokenizer for truncation.

    Returns:
        A ``PreTrainedTokenizerFast`` with bos, eos and pad tokens set.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    backend = Tokenizer(models.BPE(vocab=_byte_symbols(), merges=[]))
    # use_regex=False: no word splitting is needed without merges, and it keeps spaces as they are.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([BOS_TOKEN, EOS_TOKEN, PAD_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side=padding_side,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def _byte_symbols() -> dict[str, int]:
    """The GPT-2 table the ByteLevel pre-tokenizer uses, as symbol -> byte value (so id == byte):
    printable bytes stand for themselves, the others for code points from 256 upwards."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}
