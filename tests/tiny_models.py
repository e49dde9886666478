"""Tiny randomly initialised Hugging Face decoders shared by the unit tests.

A plain module (not conftest.py): tests/e2e has its own conftest, and pytest would otherwise
resolve `import conftest` to whichever was collected first."""

from __future__ import annotations

import torch

from graphlora.config import METHOD_PRESETS

ALL_METHODS = sorted(METHOD_PRESETS)
VOCAB = 97


def tiny_base(arch: str = "qwen2", seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """A tiny randomly initialised decoder (hidden 32, 2 layers, GQA) in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls, cfg_cls = {
        "qwen2": (Qwen2ForCausalLM, Qwen2Config),
        "llama": (LlamaForCausalLM, LlamaConfig),
    }[arch]
    cfg = cfg_cls(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return cls(cfg).eval()
