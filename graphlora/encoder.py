"""Multiple choice with an encoder (BERT, MiniLM): a head that uses what the model already knows.

An encoder has no LM head to score an answer's likelihood with. A sentence-embedding model
(all-MiniLM-L6-v2) was trained so that the cosine similarity of mean-pooled embeddings says how
well two texts go together, so the head scores option i of a question q as

    logit_i = exp(t) * cos(pool(q), pool(o_i))

with one learnable log-temperature t (CLIP's ``logit_scale``). Before any training this already
ranks options well above chance on ARC-Easy; a fresh linear head over ``[CLS]`` would start at
chance. Training minimises the cross-entropy of the logits against the label, so the adapter's
LoRA experts and ``t`` learn together.

The head lives on the model as ``model.graphlora_head``: its parameter names carry the adapter
marker ``graphlora_head``, so ``mark_only_adapter_trainable`` trains it and ``save_adapter`` saves
it with the adapter (and records ``head`` in the config, so ``load_adapter`` puts it back).

An example needs its option texts (``Example.options``) and question (``Example.question``);
tasks whose files list no options (BoolQ) cannot be scored this way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graphlora.examples import Example

__all__ = [
    "HEAD_ATTR",
    "SimilarityHead",
    "attach_head",
    "is_encoder_model",
    "option_forward",
    "option_logits",
    "option_loss",
]

HEAD_ATTR = "graphlora_head"
"""Attribute of the model that holds the head (its name is the adapter marker of its weights)."""


class SimilarityHead(nn.Module):
    """Scaled cosine similarity between a question's and each option's mean-pooled embedding.

    Args:
        init_scale: ``exp(t)`` at the start (20: a softmax over cosines in [-1, 1] that is
            neither flat nor saturated; sentence-transformers' MultipleNegativesRankingLoss
            uses the same scale).
    """

    kind = "similarity"

    def __init__(self, init_scale: float = 20.0) -> None:
        super().__init__()
        self.init_scale = init_scale
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))

    def spec(self) -> dict[str, Any]:
        """What ``attach_head`` needs to build this head again (saved in the adapter config)."""
        return {"kind": self.kind, "init_scale": self.init_scale}

    def forward(self, question: torch.Tensor, options: torch.Tensor) -> torch.Tensor:
        """Logits (B, K) of question embeddings (B, d) against option embeddings (B, K, d)."""
        q = F.normalize(question.float(), dim=-1)
        o = F.normalize(options.float(), dim=-1)
        return self.log_scale.exp() * torch.einsum("bd,bkd->bk", q, o)


def attach_head(model: nn.Module, kind: str = "similarity", **kwargs: Any) -> SimilarityHead:
    """Put a scoring head on ``model`` (trainable, saved with the adapter); returns it."""
    if kind != SimilarityHead.kind:
        raise ValueError(f"head: unknown kind {kind!r}; the encoder head kinds are ['similarity']")
    head = SimilarityHead(**kwargs)
    param = next(model.parameters())
    head.to(device=param.device).train(model.training)
    setattr(model, HEAD_ATTR, head)
    return head


def is_encoder_model(model: nn.Module) -> bool:
    """True when ``model`` carries a scoring head (it is scored by option texts, not by the
    likelihood of answer labels)."""
    return getattr(model, HEAD_ATTR, None) is not None


def _encode(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int
) -> tuple[torch.Tensor, Any]:
    """Mean-pooled embeddings (N, d) and the model's raw output (it carries the aux loss)."""
    device = next(model.parameters()).device
    batch = tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    ).to(device)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hidden = out.last_hidden_state  # (N, S, d)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (N, S, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1), out


def option_logits(
    model: nn.Module, tokenizer: Any, examples: Sequence[Example], *, max_length: int = 256
) -> list[torch.Tensor]:
    """Per example, the head's logits over its options (K_i,), differentiable.

    Questions and options go through the encoder in two forwards (``option_forward``). Raises
    ``ValueError`` naming the first example without option texts.
    """
    return option_forward(model, tokenizer, examples, max_length=max_length)[0]


def option_forward(
    model: nn.Module, tokenizer: Any, examples: Sequence[Example], *, max_length: int = 256
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """:func:`option_logits` and the adapter's auxiliary losses of the same forwards.

    Questions and options go through the encoder in two forwards (questions are long, options
    short: one batch of both would be mostly padding). The second value holds ``aux_loss`` (the
    mean over the two forwards of the weighted auxiliary loss, which training adds to the task
    loss) and ``aux_losses`` (its parts), both absent without an adapter.
    """
    head = getattr(model, HEAD_ATTR, None)
    if head is None:
        raise ValueError("this encoder has no scoring head; call graphlora.encoder.attach_head")
    for i, ex in enumerate(examples):
        if not ex.options or ex.question is None:
            raise ValueError(
                f"example {i} has no option texts (Example.options) or question; an encoder "
                "scores option texts, so use a task whose files list them (not BoolQ)"
            )
    q_emb, q_raw = _encode(model, tokenizer, [ex.question for ex in examples], max_length)
    texts = [t for ex in examples for t in ex.options]
    o_emb, o_raw = _encode(model, tokenizer, texts, max_length)  # (sum(K_i), d)
    out, pos = [], 0
    for i, ex in enumerate(examples):
        k = len(ex.options)
        out.append(head(q_emb[i : i + 1], o_emb[pos : pos + k][None])[0])  # (K,)
        pos += k
    aux: dict[str, Any] = {}
    raws = [r for r in (q_raw, o_raw) if hasattr(r, "get") and r.get("aux_loss") is not None]
    if raws:
        aux["aux_loss"] = sum(r["aux_loss"] for r in raws) / len(raws)
        parts: dict[str, torch.Tensor] = {}
        for r in raws:
            for key, value in (r.get("aux_losses") or {}).items():
                parts[key] = parts.get(key, 0) + value / len(raws)
        aux["aux_losses"] = parts
    return out, aux


def option_loss(logits: Sequence[torch.Tensor], labels: Sequence[int]) -> torch.Tensor:
    """Mean cross-entropy of per-example option logits against their labels."""
    losses = [
        F.cross_entropy(lg[None], torch.tensor([y], device=lg.device))
        for lg, y in zip(logits, labels, strict=True)
    ]
    return torch.stack(losses).mean()
