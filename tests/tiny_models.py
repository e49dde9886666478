"""Tiny randomly initialised Hugging Face models shared by the unit tests.

A plain module (not conftest.py): tests/e2e has its own conftest, and pytest would otherwise
resolve `import conftest` to whichever was collected first."""

from __future__ import annotations

import torch

from graphlora.config import METHOD_PRESETS

ALL_METHODS = sorted(METHOD_PRESETS)
VOCAB = 97


DECODERS = ("qwen2", "llama")
"""Gated-MLP decoders."""
CLASSIC = ("bert", "gpt2", "opt")
"""Classic (non-gated) FFNs: BERT's split intermediate/output, GPT-2's Conv1D, OPT's fc1/fc2."""


def tiny_base(arch: str = "qwen2", seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """A tiny randomly initialised model (hidden 32, FFN 64, 2 layers) in eval mode.

    ``qwen2``/``llama``: gated-MLP causal LMs with GQA; ``gpt2``/``opt``: classic-FFN causal LMs;
    ``bert``: a ``BertModel`` encoder (as ``AutoModel`` loads MiniLM)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers)
    cls, cfg = {
        "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config),
        "llama": (tf.LlamaForCausalLM, tf.LlamaConfig),
        "bert": (tf.BertModel, tf.BertConfig),
        "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config),
        "opt": (tf.OPTForCausalLM, tf.OPTConfig),
    }[arch]
    if arch in DECODERS:
        kw = dict(intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    elif arch == "bert":
        kw = dict(intermediate_size=64, num_attention_heads=4)
    elif arch == "gpt2":
        kw = dict(n_inner=64, n_head=4)
        common = dict(vocab_size=VOCAB, n_embd=32, n_layer=layers, bos_token_id=1, eos_token_id=2)
    else:
        kw = dict(ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32)
    config = cfg(**common, **kw, max_position_embeddings=64)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return cls(config).eval()


def model_output(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What a model computes for ``batch``: logits for a causal LM, hidden states for BERT."""
    out = model(**batch)
    return out.logits if "logits" in out else out.last_hidden_state
