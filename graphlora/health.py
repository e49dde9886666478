"""Routing health: does the router spread tokens over experts, batch by batch, and does its choice
depend on the token (docs/method.md section 6)?

A whole-run histogram of expert load hides a router that sends every token of a batch to the same
pair of experts and only rotates the pair between batches: over many batches every expert looks
used. The figures here are per batch (one forward of one MoE layer, this rank's real tokens),
averaged over the batches of a window (a training run's batches since the last evaluation):

- ``batch_entropy``: entropy of the batch's top-k assignment fractions, normalised by log N to
  [0, 1] (1: every expert gets the same share; 0.33 with N = 8, K = 2: one pair for every token);
- ``experts_used``: experts carrying at least 5% of the batch's assignments;
- ``distinct_topk``: distinct top-k expert sets among the batch's tokens (1: the choice ignores
  the token);
- ``token_mi``: mutual information between token and expert under the full softmax,
  H(mean_t p_t) - mean_t H(p_t), normalised by log N (0: every token has the same distribution).

A layer whose ``batch_entropy`` is below :data:`COLLAPSE_ENTROPY` has collapsed. Each MoE block
accumulates its batches' figures (``graphlora.moe``); ``graphlora.inject.routing_health`` reads
them off a model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from graphlora.routers import expert_counts

COLLAPSE_ENTROPY = 0.5
"""A layer whose mean per-batch load entropy is below this has collapsed."""
USED_SHARE = 0.05
"""An expert is in use in a batch when it carries at least this share of its assignments."""
HEALTH_FIELDS = ("batch_entropy", "experts_used", "distinct_topk", "token_mi")
_LAYER_ENTROPY = re.compile(r"^layer(\d+)/batch_entropy$")


def batch_health(indices: torch.Tensor, probs: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The health figures of one batch, in :data:`HEALTH_FIELDS` order, as a (4,) fp32 tensor.

    Args:
        indices: (T, K) chosen experts of the batch's real tokens.
        probs: (T, N) full softmax of the same tokens.
        num_experts: N.
    """
    with torch.no_grad():
        n = num_experts
        flat = indices.reshape(-1)
        frac = expert_counts(flat, n).float() / max(1, flat.numel())
        log_n = math.log(n)
        entropy = -(frac * frac.clamp_min(1e-12).log()).sum() / log_n
        used = (frac >= USED_SHARE).sum().float()
        if indices.shape[0] == 0:
            distinct = torch.zeros((), device=indices.device)
        elif n <= 62:  # one bit per expert: a set is an int64; counted without a device sync
            sets = (torch.ones_like(indices) << indices).sum(dim=-1).sort().values
            distinct = 1 + (sets[1:] != sets[:-1]).sum()
        else:
            sets = indices.sort(dim=-1).values
            distinct = sets.unique(dim=0).shape[0] * torch.ones((), device=indices.device)
        p = probs.float()
        if p.shape[0]:
            mean_p = p.mean(dim=0)
            h_mean = -(mean_p * mean_p.clamp_min(1e-12).log()).sum()
            h_tok = -(p * p.clamp_min(1e-12).log()).sum(dim=-1).mean()
            mi = ((h_mean - h_tok) / log_n).clamp_min(0.0)
        else:
            mi = torch.zeros((), device=p.device)
        return torch.stack([entropy, used, distinct.float(), mi]).float()


def health_summary(layers: list[torch.Tensor]) -> dict[str, float]:
    """Per-layer and model-wide health figures from each MoE layer's accumulated sums.

    Args:
        layers: per MoE layer, a (5,) tensor: batches seen, then the sum over them of each of
            :data:`HEALTH_FIELDS` (what a block accumulates in its ``routing_health`` buffer).
            Layers with no batch are left out.

    Returns:
        ``layer{i}/<field>`` (means over batches) for each of :data:`HEALTH_FIELDS`, their means
        over layers as ``routing/<field>``, ``routing/min_batch_entropy``,
        ``routing/min_experts_used`` and ``routing/collapsed_layers`` (how many layers have a
        batch entropy below :data:`COLLAPSE_ENTROPY`); ``{}`` when no layer saw a batch.
    """
    out: dict[str, float] = {}
    per_field: dict[str, list[float]] = {}
    for i, sums in enumerate(layers):
        batches, *totals = sums.detach().float().cpu().tolist()
        if batches <= 0:
            continue
        for name, total in zip(HEALTH_FIELDS, totals, strict=True):
            out[f"layer{i}/{name}"] = total / batches
            per_field.setdefault(name, []).append(total / batches)
    if not per_field:
        return out
    for name, values in per_field.items():
        out[f"routing/{name}"] = sum(values) / len(values)
    out["routing/min_batch_entropy"] = min(per_field["batch_entropy"])
    out["routing/min_experts_used"] = min(per_field["experts_used"])
    out["routing/collapsed_layers"] = float(collapsed_count(per_field["batch_entropy"]))
    return out


def collapsed_count(entropies: list[float]) -> int:
    """How many of these per-layer batch entropies are below :data:`COLLAPSE_ENTROPY`."""
    return sum(e < COLLAPSE_ENTROPY for e in entropies)


def collapsed_layers(metrics: Mapping[str, float]) -> list[int]:
    """Indices of the layers whose ``layer{i}/batch_entropy`` in ``metrics`` is below
    :data:`COLLAPSE_ENTROPY`, in order."""
    out = []
    for key, value in metrics.items():
        m = _LAYER_ENTROPY.match(key)
        if m and isinstance(value, int | float) and value < COLLAPSE_ENTROPY:
            out.append(int(m[1]))
    return sorted(out)


__all__ = [
    "COLLAPSE_ENTROPY",
    "HEALTH_FIELDS",
    "USED_SHARE",
    "batch_health",
    "collapsed_count",
    "collapsed_layers",
    "health_summary",
]
