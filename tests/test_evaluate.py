from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from graphlora.data import Example
from graphlora.evaluate import encode_pair, evaluate_examples, score_examples
from graphlora.models import build_byte_tokenizer


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
