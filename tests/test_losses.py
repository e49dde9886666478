from __future__ import annotations

import math

import pytest
import torch

from graphlora.config import MoELoRAConfig
from graphlora.losses import (
    normal_balance_loss,
    poisson_distinction_loss,
    switch_balance_loss,
    weighted_aux_loss,
)


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def test_poisson_matches_formula_by_hand():
    lam = 1.5
    pmf = [lam**i * math.exp(-lam) / math.factorial(i) for i in (1, 2, 3)]
    target = [p / sum(pmf) for p in pmf]
    rows = [[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]]
    expected = sum(_kl(target, sorted(r, reverse=True)) for r in rows) / 2
    got = poisson_distinction_loss(torch.tensor(rows), torch.tensor(lam))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_poisson_ignores_masked_tokens():
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.98, 0.01, 0.01]])
    lam = torch.tensor(1.2)
    masked = poisson_distinction_loss(probs, lam, mask=torch.tensor([1, 0]))
    assert masked.item() == pytest.approx(poisson_distinction_loss(probs[:1], lam).item())


def test_poisson_large_n_is_finite():
    probs = torch.softmax(torch.randn(4, 64), -1)
    assert torch.isfinite(poisson_distinction_loss(probs, torch.tensor(2.0)))


def test_normal_matches_formula_by_hand():
    n, sigma = 4, 1.3
    mu = n / 2
    pdf = [
        math.exp(-((i - mu) ** 2) / (2 * sigma**2)) / (math.sqrt(2 * math.pi) * sigma)
        for i in range(1, n + 1)
    ]
    target = sorted((p / sum(pdf) for p in pdf), reverse=True)
    load = [3.0, 1.0, 4.0, 2.0]
    v_a = sorted((c / sum(load) for c in load), reverse=True)
    got = normal_balance_loss(torch.tensor(load), torch.tensor(sigma))
    assert got.item() == pytest.approx(_kl(target, v_a), rel=1e-5)


def test_switch_loss_matches_formula():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.3, 0.3, 0.4]])
    idx = torch.tensor([[0], [2], [1]])
    mask = torch.tensor([1, 1, 0])
    f = torch.tensor([0.5, 0.0, 0.5])
    p = probs[:2].mean(0)
    expected = 3 * (f * p).sum()
    got = switch_balance_loss(probs, idx, mask)
    assert got.item() == pytest.approx(expected.item())


def test_lambda_and_sigma_get_gradients():
    probs = torch.softmax(torch.randn(6, 8), -1)
    lam = torch.tensor(1.5, requires_grad=True)
    poisson_distinction_loss(probs, lam).backward()
    assert lam.grad is not None and lam.grad.abs().item() > 0
    sigma = torch.tensor(4.0, requires_grad=True)
    normal_balance_loss(torch.tensor([5.0, 1.0, 1.0, 3.0, 0.5, 2.0, 1.0, 1.0]), sigma).backward()
    assert sigma.grad is not None and sigma.grad.abs().item() > 0


def test_coefficients_applied_in_one_place():
    cfg = MoELoRAConfig(method="graphlora", balance_coef=0.5)
    aux = {"poisson": torch.tensor(2.0), "normal": torch.tensor(1.0), "balance": torch.tensor(4.0)}
    assert weighted_aux_loss(aux, cfg).item() == pytest.approx(0.8 * 2 + 8 * 1 + 0.5 * 4)
    assert weighted_aux_loss({}, cfg) is None
