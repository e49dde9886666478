from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tiny_models import ALL_METHODS, VOCAB
from torch import nn

from graphlora.config import MoELoRAConfig
from graphlora.data import Example
from graphlora.evaluate import (
    choose,
    encode_pair,
    evaluate_examples,
    head_at,
    pad_batch,
    score_examples,
    score_examples_reference,
)
from graphlora.inject import inject_adapter, moe_blocks, reset_load_state
from graphlora.run import labelled_forward
from graphlora.synthetic import make_synthetic_task
from graphlora.tokenizer import build_byte_tokenizer


class TransitionLM(nn.Module):
    """A model whose next-token distribution is a fixed function of the current token."""

    def __init__(self, vocab: int, table: dict[int, int]) -> None:
        super().__init__()
        self.vocab = vocab
        self.table = table
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):  # noqa: ANN001
        nxt = torch.full((self.vocab,), -1)
        for a, b in self.table.items():
            nxt[a] = b
        target = nxt[input_ids]  # (B, S): the favoured next token, -1 for none
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits.scatter_(
            -1, target.clamp_min(0).unsqueeze(-1), 8.0 * (target >= 0).float().unsqueeze(-1)
        )
        return SimpleNamespace(logits=logits)


def _model_preferring(tokenizer, prompt: str, answer: str) -> TransitionLM:  # noqa: ANN001
    enc = encode_pair(tokenizer, prompt, answer, 512)
    cont = enc.ids[enc.n_context - 1 :]
    table = dict(zip(cont[:-1], cont[1:], strict=True))
    return TransitionLM(len(tokenizer), table)


def test_scoring_picks_the_known_multi_token_answer():
    tok = build_byte_tokenizer()
    prompt = "Which?\n\nAnswer:"
    # Shared prefixes and different lengths: only summing every token's log-prob separates them.
    cands = (" blue sea", " blue sky", " bluish", " green sky")
    model = _model_preferring(tok, prompt, " blue sky")
    ex = Example(prompt=prompt, candidates=cands, label=1)
    scores, lengths = score_examples(model, tok, [ex], batch_size=3)
    assert max(range(4), key=scores[0].__getitem__) == 1
    assert lengths[0] == [len(c.encode()) for c in cands]
    res = evaluate_examples(model, tok, [ex, Example(prompt, cands, label=0)], batch_size=2)
    assert res.predictions == [1, 1]
    assert res.correct == 1 and res.accuracy == 0.5


def test_long_prompts_are_cut_from_the_left():
    tok = build_byte_tokenizer()
    enc = encode_pair(tok, "x" * 100, " yes", max_length=20)
    assert len(enc.ids) == 20
    assert tok.decode(enc.ids[enc.n_context :]) == " yes"


# ----------------------------------------------------------------------------------------------
# The one-pass scorer against today's (score_examples_reference)

SMALL = {"gcn_hidden": 16, "dropout": 0.0}


def _tiny_lm(vocab: int, arch: str = "qwen2", seed: int = 0) -> torch.nn.Module:
    """A tiny random decoder whose vocabulary covers ``vocab`` token ids."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls, cfg_cls = {
        "qwen2": (Qwen2ForCausalLM, Qwen2Config),
        "llama": (LlamaForCausalLM, LlamaConfig),
    }[arch]
    cfg = cfg_cls(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return cls(cfg).eval()


def _adapted(method: str, vocab: int, arch: str = "qwen2") -> torch.nn.Module:
    """A tiny model with the adapter, its LoRA B matrices random so the experts matter."""
    model = inject_adapter(_tiny_lm(vocab, arch), MoELoRAConfig(method=method, **SMALL))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def _mixed_examples() -> list[Example]:
    """Multi-token candidates of different lengths, one-token ones, and a prompt long enough to
    be cut from the left (differently per candidate length) at max_length=40."""
    return [
        *make_synthetic_task(n_train=0, n_val=6, n_test=0).validation,
        Example("Which?\n\nAnswer:", (" blue sea", " b", " bluish", " green sky"), 1),
        Example("Pick one:", (" x", " y", " z"), 2),
        Example("long " * 20 + "end:", (" y", " yes please", " no thanks, really"), 0),
    ]


def _assert_same_scores(model, tok, examples, max_length=40, batch_size=5) -> None:  # noqa: ANN001
    ref, ref_n = score_examples_reference(
        model, tok, examples, batch_size=batch_size, max_length=max_length
    )
    new, new_n = score_examples(model, tok, examples, batch_size=batch_size, max_length=max_length)
    assert new_n == ref_n
    for r, s in zip(ref, new, strict=True):
        assert s == pytest.approx(r, abs=1e-4)
        assert choose(s) == choose(r)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_one_pass_scores_equal_todays_for_every_method(method):
    tok = build_byte_tokenizer()
    model = _adapted(method, len(tok))
    blocks = moe_blocks(model)
    before = [(b.routing_counts.clone(), b.coord_load.clone()) for b in blocks]
    _assert_same_scores(model, tok, _mixed_examples())
    # Scoring leaves the load of the Normal loss and the routing diagnostics alone.
    for b, (counts, load) in zip(blocks, before, strict=True):
        assert torch.equal(b.routing_counts, counts) and torch.equal(b.coord_load, load)


def test_one_pass_scores_equal_todays_on_llama_and_batch_sizes():
    tok = build_byte_tokenizer()
    model = _adapted("mixlora", len(tok), arch="llama")
    for batch_size in (1, 3, 64):
        _assert_same_scores(model, tok, _mixed_examples(), batch_size=batch_size)


def test_truncated_prompts_are_scored_as_cut():
    tok = build_byte_tokenizer()
    model = _adapted("graphlora", len(tok))
    ex = [Example("p" * 60 + "?", (" a", " bb", " ccc dd"), 1)]
    # Each candidate sees the prompt cut to a different length: three prompts, one question.
    cut = {encode_pair(tok, ex[0].prompt, c, 20).n_context for c in ex[0].candidates}
    assert len(cut) == 3
    _assert_same_scores(model, tok, ex, max_length=20)


def test_one_token_candidates_need_only_the_prompt_pass():
    tok = build_byte_tokenizer()
    model = _adapted("graphlora", len(tok))
    examples = [Example(f"Q{i}: pick ", ("a", "b", "c"), i % 3) for i in range(5)]
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)
    try:
        new, _ = score_examples(model, tok, examples, batch_size=64)
    finally:
        handle.remove()
    assert len(calls) == 1  # one forward for all prompts, no candidate pass
    ref, _ = score_examples_reference(model, tok, examples, batch_size=64)
    for r, s in zip(ref, new, strict=True):
        assert s == pytest.approx(r, abs=1e-4)


def _bpe_tokenizer():  # noqa: ANN202
    """A small byte-level BPE trained in code, so prompt + candidate merges across the boundary
    (``color of K`` + ``navy`` is one word)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    data = make_synthetic_task(n_train=300, n_val=0, n_test=0).train
    corpus = [ex.prompt + ex.answer for ex in data]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    raw.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>")


def test_merges_across_the_prompt_boundary_score_as_today():
    tok = _bpe_tokenizer()
    examples = make_synthetic_task(n_train=0, n_val=8, n_test=0).validation
    merged = [
        c
        for ex in examples
        for c in ex.candidates
        if tok(ex.prompt + c)["input_ids"][: len(tok(ex.prompt)["input_ids"])]
        != tok(ex.prompt)["input_ids"]
    ]
    assert merged  # the fallback of encode_pair is exercised
    model = _adapted("mixlora", len(tok))
    _assert_same_scores(model, tok, examples, max_length=512)


def test_head_at_gives_the_full_logits_at_the_selected_positions(batch):
    model = _tiny_lm(VOCAB)
    full = model(**batch).logits
    select = batch["attention_mask"].bool()
    with head_at(model, select):
        part = model(**batch).logits
    assert part.shape == (int(select.sum()), VOCAB)
    torch.testing.assert_close(part, full[select])


def _forward_loss(model, batch):  # noqa: ANN001, ANN202
    """The trainer's loss from its labelled-positions forward, on a model carrying an adapter."""
    out, target = labelled_forward(model, batch)
    out["task_loss"] = F.cross_entropy(out.logits.float(), target)
    aux = out.get("aux_loss")
    out["loss"] = out["task_loss"] if aux is None else out["task_loss"] + aux
    return out


@pytest.mark.parametrize("method", ["graphlora", "lora"])
def test_training_loss_from_labelled_positions_equals_the_full_loss(method):
    tok = build_byte_tokenizer()
    model = _adapted(method, len(tok)).train()
    examples = make_synthetic_task(n_train=6, n_val=0, n_test=0).train
    batch = pad_batch([encode_pair(tok, e.prompt, e.answer, 64) for e in examples], 0, "cpu")
    reset_load_state(model)
    full = model(**batch)
    reset_load_state(model)
    part = _forward_loss(model, batch)
    assert part.logits.shape[0] == int((batch["labels"] != -100).sum())
    torch.testing.assert_close(part.loss, full.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(part.task_loss, full.get("task_loss", full.loss), atol=1e-5, rtol=0)
    # and the same gradient
    grads = []
    for out in (full, part):
        model.zero_grad()
        reset_load_state(model)
        out = model(**batch) if out is full else _forward_loss(model, batch)
        out.loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
