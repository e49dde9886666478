"""Multiple-choice scoring by candidate log-likelihood (SPEC.md section 5).

The prediction is the candidate with the highest summed log-likelihood given the prompt. Tokenizer
agnostic: a candidate may span many tokens, and the continuation tokens are taken from the joint
encoding of prompt + candidate, so BPE merges across the boundary are scored as the model sees them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from graphlora.data import Example


@dataclass
class Encoded:
    """Token ids of one prompt + continuation; the first ``n_context`` ids are the prompt."""

    ids: list[int]
    n_context: int


def encode_pair(tokenizer, prompt: str, continuation: str, max_length: int) -> Encoded:  # noqa: ANN001
    """Encode prompt + continuation, cutting the prompt from the left if too long."""
    ctx = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    whole = tokenizer(prompt + continuation, add_special_tokens=True)["input_ids"]
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        cont = whole[len(ctx) :]
    else:  # the tokenizer merged across the boundary: score the continuation on its own
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not cont:
        raise ValueError(f"candidate {continuation!r} encodes to no tokens")
    keep = max(1, max_length - len(cont))
    ctx = ctx[-keep:]
    return Encoded(ids=ctx + cont, n_context=len(ctx))


def pad_batch(
    seqs: Sequence[Encoded], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Right-pad to a batch; labels are -100 on prompt and padding."""
    width = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s.ids)
        ids[i, :n] = torch.tensor(s.ids)
        mask[i, :n] = 1
        labels[i, s.n_context : n] = ids[i, s.n_context : n]
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
    }


@torch.no_grad()
def sequence_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """Summed log-likelihood of each row's labelled tokens, and their token counts."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    target = batch["labels"][:, 1:]
    keep = target != -100
    tok = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1) * keep
    return tok.sum(-1), keep.sum(-1)


@torch.no_grad()
def score_examples(
    model,  # noqa: ANN001
    tokenizer,  # noqa: ANN001
    examples: Sequence[Example],
    *,
    batch_size: int = 32,
    max_length: int = 512,
    device: torch.device | str | None = None,
) -> tuple[list[list[float]], list[list[int]]]:
    """Summed log-likelihood of every candidate of every example given its prompt, and the
    number of tokens each candidate spans."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pairs = [
        (i, encode_pair(tokenizer, ex.prompt, cand, max_length))
        for i, ex in enumerate(examples)
        for cand in ex.candidates
    ]
    was_training = model.training
    model.eval()
    scores: list[list[float]] = [[] for _ in examples]
    lengths: list[list[int]] = [[] for _ in examples]
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            lp, n = sequence_logprobs(model, pad_batch([e for _, e in chunk], pad, device))
            for (i, _), value, count in zip(chunk, lp.tolist(), n.tolist(), strict=True):
                scores[i].append(value)
                lengths[i].append(count)
    finally:
        model.train(was_training)
    return scores, lengths


def choose(scores: Sequence[float]) -> int:
    """Index of the predicted candidate: the highest score, the first one on a tie."""
    return max(range(len(scores)), key=scores.__getitem__)


@dataclass
class EvalResult:
    """Accuracy and loss over a set of examples (sums kept so ranks can be all-reduced)."""

    correct: int
    total: int
    nll_sum: float
    nll_tokens: int
    predictions: list[int]

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.total)

    @property
    def loss(self) -> float:
        """Mean per-token negative log-likelihood of the correct candidates."""
        return self.nll_sum / max(1, self.nll_tokens)


def evaluate_examples(
    model,  # noqa: ANN001
    tokenizer,  # noqa: ANN001
    examples: Sequence[Example],
    *,
    batch_size: int = 32,
    max_length: int = 512,
    device: torch.device | str | None = None,
) -> EvalResult:
    """Predict each example's candidate by log-likelihood; count hits and the answer NLL."""
    scores, lengths = score_examples(
        model, tokenizer, examples, batch_size=batch_size, max_length=max_length, device=device
    )
    preds = [choose(s) for s in scores]
    correct = sum(int(p == ex.label) for p, ex in zip(preds, examples, strict=True))
    nll_sum = -sum(s[ex.label] for s, ex in zip(scores, examples, strict=True))
    nll_tokens = sum(n[ex.label] for n, ex in zip(lengths, examples, strict=True))
    return EvalResult(correct, len(examples), nll_sum, nll_tokens, preds)
