"""Auxiliary routing losses (docs/method.md section 3) and the one place that weights them.

Every loss is a free function over routing tensors; none applies a coefficient.
``weighted_aux_loss`` is where the coefficients c_P, c_N and the balance coefficient are applied.
"""

from __future__ import annotations

import math

import torch

from graphlora.config import MoELoRAConfig
from graphlora.routers import expert_counts

EPS = 1e-9


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x[mask.reshape(-1).bool()]


def poisson_target(lam: torch.Tensor, num_experts: int) -> torch.Tensor:
    """v_poisson(lambda)_i = L1norm(lambda^i e^-lambda / i!), i = 1..N (eq. 6), in log space."""
    i = torch.arange(1, num_experts + 1, dtype=torch.float32, device=lam.device)
    log_pmf = i * torch.log(lam.float()) - lam.float() - torch.lgamma(i + 1)
    return torch.softmax(log_pmf, dim=0)  # L1 normalisation of exp(log_pmf)


def poisson_distinction_loss(
    router_probs: torch.Tensor, lam: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Poisson distinction loss, KL(v_poisson || sort_desc(g)) averaged over tokens (eqs. 6-7).

    Args:
        router_probs: (T, N) full softmax over experts (before top-k).
        lam: scalar tensor, the Poisson rate lambda (already clamped by the caller).
        mask: optional (T,) bool/0-1, True for real tokens; masked tokens are ignored.

    Returns:
        Scalar: mean over unmasked tokens of sum_i v_poisson_i * log(v_poisson_i / v_r,i).
    """
    probs = _masked(router_probs.float(), mask)
    if probs.shape[0] == 0:
        return router_probs.sum() * 0.0 + lam.sum() * 0.0
    v_r = probs.sort(dim=-1, descending=True).values  # (T, N)
    target = poisson_target(lam, probs.shape[-1])  # (N,)
    kl = (target * (torch.log(target + EPS) - torch.log(v_r + EPS))).sum(dim=-1)
    return kl.mean()


def normal_target(sigma: torch.Tensor, num_experts: int) -> torch.Tensor:
    """v_normal(sigma)_i, i = 1..N, mu = N/2, L1-normalised and sorted descending (eq. 8)."""
    i = torch.arange(1, num_experts + 1, dtype=torch.float32, device=sigma.device)
    s = sigma.float()
    pdf = torch.exp(-((i - num_experts / 2) ** 2) / (2 * s**2)) / (math.sqrt(2 * math.pi) * s)
    return (pdf / pdf.sum()).sort(descending=True).values


def normal_balance_loss(load: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Normal load-balance loss KL(v_normal || v_a) (paper eqs. 8-9).

    Args:
        load: (N,) cumulative top-k routing weight per expert (c_now, with this batch's gradient).
        sigma: scalar tensor, the Normal's sigma (> 0).

    Returns:
        Scalar: sum_i v_normal_i * log(v_normal_i / v_a,i), v_a = sort_desc(load / sum(load)).
    """
    load = load.float()
    v_a = (load / load.sum().clamp_min(EPS)).sort(descending=True).values
    target = normal_target(sigma, load.shape[0])
    return (target * (torch.log(target + EPS) - torch.log(v_a + EPS))).sum()


def batch_balance_loss(
    fractions: torch.Tensor, mean_probs: torch.Tensor, sigma: torch.Tensor | float
) -> torch.Tensor:
    """GraphLoRA's Normal balance target on the current batch (``balance: batch``,
    docs/method.md section 6): KL(v_normal || v_a) where v_a is this batch's load.

    The value of v_a is the hard top-k assignment fractions f, floored at 1/(2N) and renormalised
    so the log stays finite; its gradient goes through the mean full-softmax probabilities P, as in
    the Switch loss, so every expert gets one, an expert no token picks included (the paper's
    running total of top-k mass gives an unused expert none). Sorting by value assigns each expert
    its rank in the target; sigma should be a constant (a trainable sigma narrows its own target).

    Args:
        fractions: (N,) fraction of this batch's (token, slot) assignments per expert (no grad).
        mean_probs: (N,) mean full-softmax probability per expert over the batch's real tokens.
        sigma: the Normal's sigma (> 0).

    Returns:
        Scalar: sum_i v_normal_i * log(v_normal_i / v_a,i).
    """
    n = fractions.shape[0]
    value = fractions.detach().float().clamp_min(0.5 / n)
    value = value / value.sum()
    mean_probs = mean_probs.float()
    load = value + (mean_probs - mean_probs.detach())  # value f, gradient through P
    order = value.argsort(descending=True, stable=True)
    v_a = load[order]
    sigma_t = torch.as_tensor(sigma, dtype=torch.float32, device=load.device)
    target = normal_target(sigma_t, n)
    return (target * (torch.log(target + EPS) - torch.log(v_a))).sum()


def switch_loss(fractions: torch.Tensor, mean_probs: torch.Tensor) -> torch.Tensor:
    """N * sum_i f_i * P_i from assignment fractions f and mean full-softmax probabilities P."""
    return fractions.shape[0] * (fractions.detach().float() * mean_probs.float()).sum()


def switch_balance_loss(
    router_probs: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch/Mixtral load-balance loss N * sum_i f_i * P_i (MixLoRA's auxiliary loss).

    Args:
        router_probs: (T, N) full softmax.
        indices: (T, K) chosen experts.
        mask: optional (T,) True for real tokens.

    Returns:
        Scalar; f_i is the fraction of (token, slot) assignments to expert i and P_i the mean
        router probability of expert i, both over unmasked tokens.
    """
    probs = _masked(router_probs.float(), mask)
    idx = _masked(indices, mask)
    n = router_probs.shape[-1]
    if probs.shape[0] == 0:
        return router_probs.sum() * 0.0
    f = expert_counts(idx, n).float() / idx.numel()
    return switch_loss(f, probs.mean(dim=0))


AUX_LOSS_COEFS = {"poisson": "poisson_coef", "normal": "normal_coef", "balance": "balance_coef"}


def weighted_aux_loss(aux: dict[str, torch.Tensor], config: MoELoRAConfig) -> torch.Tensor | None:
    """The single place the auxiliary losses get their coefficients: sum_k coef_k * aux_k.

    Args:
        aux: layer-averaged unweighted losses keyed ``poisson``, ``normal``, ``balance``.
        config: the adapter config holding c_P, c_N and the balance coefficient.
    """
    total = None
    for key, value in aux.items():
        term = getattr(config, AUX_LOSS_COEFS[key]) * value
        total = term if total is None else total + term
    return total
