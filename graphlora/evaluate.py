"""Multiple-choice scoring by candidate log-likelihood (docs/method.md section 5).

The prediction is the candidate with the highest summed log-likelihood given the prompt. Tokenizer
agnostic: a candidate may span many tokens, and the continuation tokens are taken from the joint
encoding of prompt + candidate, so BPE merges across the boundary are scored as the model sees them.

One pass per question: the candidates of a question share its prompt, so the prompt is encoded once
and each candidate's tokens run on the prompt's cached keys and values (a candidate of one token
needs nothing but the prompt's last position). The language-model head runs only where a candidate
token is predicted (:func:`head_at`), never over the prompt, so no (batch, length, vocab) tensor is
built. Models that take no KV cache are scored the old way, one full sequence per candidate
(:func:`score_examples_reference`, also the yardstick of the tests and of
``benchmarks/eval_speed.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from graphlora.encoder import is_encoder_model, option_logits
from graphlora.examples import Example


@dataclass
class Encoded:
    """Token ids of one prompt + continuation; the first ``n_context`` ids are the prompt."""

    ids: list[int]
    n_context: int


def encode_pair(tokenizer, prompt: str, continuation: str, max_length: int) -> Encoded:  # noqa: ANN001
    """Encode prompt + continuation, cutting the prompt from the left if too long."""
    ctx = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    whole = tokenizer(prompt + continuation, add_special_tokens=True)["input_ids"]
    return _split_pair(tokenizer, ctx, whole, continuation, max_length)


def _split_pair(
    tokenizer,  # noqa: ANN001
    ctx: list[int],
    whole: list[int],
    continuation: str,
    max_length: int,
) -> Encoded:
    """:func:`encode_pair` from the prompt's and the joint encoding's token ids."""
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


@contextmanager
def head_at(model, select: torch.Tensor) -> Iterator[None]:  # noqa: ANN001
    """Run the model's output head only on the positions where ``select`` is True.

    Inside the block, a forward of ``model`` on a (B, S) batch returns logits of shape
    (``select.sum()``, vocab): the hidden states at the selected positions, in row-major order,
    through the head (and whatever the model applies after it, e.g. logit soft-capping).

    Args:
        model: a Hugging Face causal LM (``get_output_embeddings()`` returns its head).
        select: (B, S) bool mask of the positions whose next-token logits are needed.
    """
    head = model.get_output_embeddings()

    def pick(module: torch.nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        if hidden.shape[:-1] != select.shape:
            raise RuntimeError(
                f"head_at: the output head got hidden states of shape {tuple(hidden.shape)}, "
                f"expected {tuple(select.shape)} + (hidden,); this model slices them before its "
                "head: score it with score_examples_reference"
            )
        return (hidden[select], *args[1:])

    handle = head.register_forward_pre_hook(pick)
    try:
        yield
    finally:
        handle.remove()


def cache_argument(model) -> str | None:  # noqa: ANN001
    """Name of the KV-cache argument of ``model.forward`` (``cache`` in transformers 5,
    ``past_key_values`` before), or None when the model cannot be scored from a cache."""
    get_head = getattr(model, "get_output_embeddings", None)
    if get_head is None or get_head() is None:
        return None
    params = inspect.signature(model.forward).parameters
    if "position_ids" not in params:
        return None
    return next((n for n in ("cache", "past_key_values") if n in params), None)


def _select_rows(cache, index: torch.Tensor):  # noqa: ANN001, ANN202
    """The cache with its batch rows taken at ``index`` (repeats allowed)."""
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(index)
        return cache
    if isinstance(cache, tuple | list):  # legacy ((key, value), ...) per layer
        return tuple(tuple(t.index_select(0, index) for t in layer) for layer in cache)
    raise TypeError(f"cannot expand a KV cache of type {type(cache).__name__} per candidate")


@torch.no_grad()
def sequence_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """Summed log-likelihood of each row's labelled tokens, and their token counts (one full
    forward per row, logits over every position: the reference scorer's step)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    target = batch["labels"][:, 1:]
    keep = target != -100
    tok = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1) * keep
    return tok.sum(-1), keep.sum(-1)


def _device_of(model, device: torch.device | str | None) -> torch.device:  # noqa: ANN001
    return torch.device(device) if device is not None else next(model.parameters()).device


@torch.no_grad()
def score_examples_reference(
    model,  # noqa: ANN001
    tokenizer,  # noqa: ANN001
    examples: Sequence[Example],
    *,
    batch_size: int = 32,
    max_length: int = 512,
    device: torch.device | str | None = None,
) -> tuple[list[list[float]], list[list[int]]]:
    """:func:`score_examples` the straightforward way: every prompt + candidate is one full
    sequence, with logits at every position. For models without a KV cache, and as the reference
    the one-pass scorer is tested and benchmarked against."""
    device = _device_of(model, device)
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


class _NoCacheError(RuntimeError):
    """The model returned no KV cache although asked for one."""


@dataclass
class _Question:
    """Candidates of one example that share the same prompt tokens."""

    example: int
    context: list[int]
    slots: list[int]  # candidate indices within the example
    conts: list[list[int]]  # their continuation tokens


def _questions(
    tokenizer,  # noqa: ANN001
    examples: Sequence[Example],
    max_length: int,
) -> list[_Question]:
    out: list[_Question] = []
    for i, ex in enumerate(examples):
        # Candidates of different lengths can see differently cut prompts when max_length bites:
        # each distinct prompt is its own group.
        by_ctx: dict[tuple[int, ...], _Question] = {}
        prompt = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"]
        wholes = tokenizer([ex.prompt + c for c in ex.candidates], add_special_tokens=True)
        for j, (cand, whole) in enumerate(zip(ex.candidates, wholes["input_ids"], strict=True)):
            enc = _split_pair(tokenizer, prompt, whole, cand, max_length)
            ctx = enc.ids[: enc.n_context]
            q = by_ctx.setdefault(tuple(ctx), _Question(i, ctx, [], []))
            q.slots.append(j)
            q.conts.append(enc.ids[enc.n_context :])
        out.extend(by_ctx.values())
    return out


def _right_pad(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


@torch.no_grad()
def _score_questions(
    model,  # noqa: ANN001
    cache_name: str,
    questions: Sequence[_Question],
    pad: int,
    device: torch.device,
) -> list[list[float]]:
    """Summed log-likelihood of each question's candidates (in ``slots`` order)."""
    ids, mask = _right_pad([q.context for q in questions], pad)  # (Q, W)
    ids, mask = ids.to(device), mask.to(device)
    n_ctx = mask.sum(1)  # (Q,)
    last = torch.zeros_like(mask, dtype=torch.bool)
    last[torch.arange(len(questions), device=device), n_ctx - 1] = True
    rows = [(qi, c) for qi, q in enumerate(questions) for c in q.conts]
    multi = [(qi, c) for qi, c in rows if len(c) > 1]

    # Prompt pass: logits at each prompt's last position only; its keys/values kept if needed.
    with head_at(model, last):
        out = model(input_ids=ids, attention_mask=mask, use_cache=bool(multi))
    first = F.log_softmax(out.logits.float(), dim=-1)  # (Q, V)
    q_of = torch.tensor([qi for qi, _ in rows], device=device)
    tok0 = torch.tensor([c[0] for _, c in rows], device=device)
    total = first[q_of, tok0]  # (R,)

    if multi:
        # Candidate pass: tokens 0..n-2 of every longer candidate on its prompt's cache.
        cache = getattr(out, cache_name, None)
        if cache is None:
            raise _NoCacheError
        src = torch.tensor([qi for qi, _ in multi], device=device)
        cache = _select_rows(cache, src)
        c_ids, c_mask = _right_pad([c[:-1] for _, c in multi], pad)  # (M, L)
        c_ids, c_mask = c_ids.to(device), c_mask.to(device)
        positions = n_ctx[src, None] + torch.arange(c_ids.shape[1], device=device)
        with head_at(model, c_mask.bool()):
            out = model(
                input_ids=c_ids,
                attention_mask=torch.cat([mask[src], c_mask], dim=1),
                position_ids=positions,
                use_cache=True,
                **{cache_name: cache},
            )
        logp = F.log_softmax(out.logits.float(), dim=-1)  # (sum of n-1, V)
        target = torch.tensor([t for _, c in multi for t in c[1:]], device=device)
        tok = logp.gather(-1, target[:, None]).squeeze(-1)
        row = torch.repeat_interleave(torch.arange(len(multi), device=device), c_mask.sum(1))
        rest = torch.zeros(len(multi), device=device).index_add_(0, row, tok)
        is_multi = torch.tensor([len(c) > 1 for _, c in rows], device=device)
        total = total.index_add(0, is_multi.nonzero().squeeze(-1), rest)

    values = total.tolist()
    out_scores: list[list[float]] = []
    for q in questions:
        out_scores.append(values[: len(q.conts)])
        values = values[len(q.conts) :]
    return out_scores


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
    number of tokens each candidate spans.

    Each prompt runs once and its candidates are scored from its KV cache; the scores equal
    :func:`score_examples_reference`'s (to float rounding). A model whose ``forward`` takes no
    cache is scored by :func:`score_examples_reference`.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        examples: the multiple-choice items.
        batch_size: most candidate rows in one forward (questions are batched whole).
        max_length: longest prompt + candidate in tokens; prompts are cut from the left.
        device: where the batches go (default: the model's device).
    """
    cache_name = cache_argument(model)
    if cache_name is None:
        return score_examples_reference(
            model, tokenizer, examples, batch_size=batch_size, max_length=max_length, device=device
        )
    device = _device_of(model, device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    questions = _questions(tokenizer, examples, max_length)
    scores = [[0.0] * len(ex.candidates) for ex in examples]
    lengths = [[0] * len(ex.candidates) for ex in examples]
    # Longest prompts first and together: less padding per batch.
    order = sorted(questions, key=lambda q: -len(q.context))
    batches: list[list[_Question]] = [[]]
    rows = 0
    for q in order:
        if batches[-1] and rows + len(q.conts) > batch_size:
            batches.append([])
            rows = 0
        batches[-1].append(q)
        rows += len(q.conts)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            for q, values in zip(
                batch, _score_questions(model, cache_name, batch, pad, device), strict=True
            ):
                for slot, cont, value in zip(q.slots, q.conts, values, strict=True):
                    scores[q.example][slot] = value
                    lengths[q.example][slot] = len(cont)
    except _NoCacheError:  # e.g. a model whose config turns the cache off for good
        return score_examples_reference(
            model, tokenizer, examples, batch_size=batch_size, max_length=max_length, device=device
        )
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
        """Mean per-token negative log-likelihood of the correct candidates (a decoder), or the
        mean cross-entropy of the head's logits over the options (an encoder: ``nll_sum`` sums
        each question's cross-entropy, ``nll_tokens`` counts questions)."""
        return self.nll_sum / max(1, self.nll_tokens)


@torch.no_grad()
def score_options(
    model,  # noqa: ANN001
    tokenizer,  # noqa: ANN001
    examples: Sequence[Example],
    *,
    batch_size: int = 32,
    max_length: int = 256,
) -> list[list[float]]:
    """An encoder's scores: per example, its head's logits over the option texts
    (``graphlora.encoder``); ``batch_size`` questions per forward (each with its options), taken
    in order of length so a batch holds texts of similar length (little padding)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].question or ""))
    scores: list[list[float]] = [[] for _ in examples]
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            chunk = [examples[i] for i in idx]
            logits = option_logits(model, tokenizer, chunk, max_length=max_length)
            for i, lg in zip(idx, logits, strict=True):
                scores[i] = lg.float().cpu().tolist()
    finally:
        model.train(was_training)
    return scores


def candidate_scores(
    model,  # noqa: ANN001
    tokenizer,  # noqa: ANN001
    examples: Sequence[Example],
    *,
    batch_size: int = 32,
    max_length: int = 512,
    device: torch.device | str | None = None,
) -> tuple[list[list[float]], list[list[int]] | None]:
    """Every example's scores as its model's kind scores them: a model with an encoder's scoring
    head (``graphlora.encoder``) its head's logits over the options (:func:`score_options`,
    ``batch_size`` questions per forward; lengths None), a decoder each candidate's summed
    log-likelihood and token count (:func:`score_examples`)."""
    if is_encoder_model(model):
        return score_options(
            model, tokenizer, examples, batch_size=batch_size, max_length=max_length
        ), None
    return score_examples(
        model, tokenizer, examples, batch_size=batch_size, max_length=max_length, device=device
    )


def evaluate_examples(
    model,  # noqa: ANN001
    tokenizer,  # noqa: ANN001
    examples: Sequence[Example],
    *,
    batch_size: int = 32,
    max_length: int = 512,
    device: torch.device | str | None = None,
) -> EvalResult:
    """Predict each example's candidate (:func:`candidate_scores`, the highest) and count hits
    and the loss: a decoder's is the correct answers' per-token NLL, an encoder's the mean
    cross-entropy over the options."""
    scores, lengths = candidate_scores(
        model, tokenizer, examples, batch_size=batch_size, max_length=max_length, device=device
    )
    if lengths is None:  # an encoder's head logits
        nll_sum = -sum(
            torch.log_softmax(torch.tensor(s, dtype=torch.float64), 0)[ex.label].item()
            for s, ex in zip(scores, examples, strict=True)
        )
        nll_tokens = len(examples)
    else:
        nll_sum = -sum(s[ex.label] for s, ex in zip(scores, examples, strict=True))
        nll_tokens = sum(n[ex.label] for n, ex in zip(lengths, examples, strict=True))
    preds = [choose(s) for s in scores]
    correct = sum(int(p == ex.label) for p, ex in zip(preds, examples, strict=True))
    return EvalResult(correct, len(examples), nll_sum, nll_tokens, preds)
