"""Routers: token -> probabilities over experts (docs/method.md section 2).

Every router computes in fp32 whatever the model dtype (autocast is switched off inside) and
returns full probabilities; ``route`` turns them into top-k weights and indices.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily

from graphlora.config import EXPERT_FEATURES
from graphlora.graph import build_moe_graph, normalized_adjacency


@dataclass
class Routing:
    """Routing result for T tokens.

    Attributes:
        probs: (T, N) fp32 full softmax over experts (before top-k).
        topk_probs: (T, K) fp32 un-renormalised probabilities of the chosen experts.
        weights: (T, K) fp32 renormalised top-k weights (paper eq. 5), summing to 1 per token.
        indices: (T, K) int64 chosen experts.
    """

    probs: torch.Tensor
    topk_probs: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor


def route(probs: torch.Tensor, top_k: int) -> Routing:
    """Top-k selection and renormalisation of ``probs`` (T, N)."""
    if top_k >= probs.shape[-1]:
        topk_probs = probs
        indices = torch.arange(probs.shape[-1], device=probs.device).expand_as(probs)
    else:
        topk_probs, indices = probs.topk(top_k, dim=-1)
    weights = topk_probs / topk_probs.sum(dim=-1, keepdim=True)
    return Routing(probs=probs, topk_probs=topk_probs, weights=weights, indices=indices)


def expert_counts(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(N,) int64: how many of ``indices`` (chosen experts, any shape) went to each expert.

    On fake tensors (a memory plan's training step, ``graphlora.memory``) the choices are
    unknown and the count cannot be taken: every expert gets an equal share, the load a
    balanced router gives, so the step's shapes are those of a balanced step.
    """
    flat = indices.reshape(-1)
    if is_fake(flat):
        share = flat.numel() // num_experts
        return torch.full((num_experts,), share, dtype=torch.long, device=flat.device)
    return torch.bincount(flat, minlength=num_experts)


def expert_count_list(indices: torch.Tensor, num_experts: int) -> list[int]:
    """``expert_counts`` as Python ints (the sizes a dispatch splits tokens into)."""
    if is_fake(indices):  # the balanced share, the remainder to the first experts
        share, extra = divmod(indices.numel(), num_experts)
        return [share + (e < extra) for e in range(num_experts)]
    return expert_counts(indices, num_experts).tolist()


def _no_autocast(x: torch.Tensor) -> torch.autocast:
    return torch.autocast(device_type=x.device.type, enabled=False)


class SoftmaxRouter(nn.Module):
    """g = softmax(W_r h), W_r in R^{N x d}, no bias, N(0, std) init (MixLoRA, MoLA, LoRAMoE)."""

    def __init__(self, hidden_size: int, num_experts: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.router_weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.router_weight, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities (T, N) fp32 for tokens ``x`` (T, d)."""
        with _no_autocast(x):
            return F.linear(x.float(), self.router_weight.float()).softmax(dim=-1)


class GraphRouter(nn.Module):
    """GraphLoRA's GCN router (paper eqs. 3-4, docs/method.md section 2).

    Every token has its own copy of the (N+1)-node MoE graph, and all copies share one normalised
    adjacency A_hat. The token node's feature is ``act(P h)``; the expert nodes' features depend on
    ``expert_features``:

    - ``"paper"``: a trainable vector x_i per expert, the same for every token (the published
      form). The token then reaches each expert node only through its edge to the token node, as
      the same term scaled by a degree-dependent number, which nearly cancels in the softmax: at
      init every token gets nearly the same top-k set (docs/method.md section 6).
    - ``"token"``: ``x_i * act(P h)`` (elementwise), the expert's vector modulated by the token, so
      every expert node sees the token through its own features and the logits spread across
      tokens about as much as across experts from the first step. Same parameters as ``"paper"``.

    In the paper form the first GCN layer splits into a token-independent part computed once per
    forward and a rank-one token part:

        (A_hat X W_0)[j] = (A_hat[:, :N] X_e W_0)[j] + A_hat[j, N] * (x_tok W_0)

    Later layers only need the expert rows of their output, and the last layer's token row is
    discarded, so it is never computed. The result equals L stacked ``GCNConv`` layers (no bias)
    run on every token's graph.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        *,
        gcn_hidden: int = 256,
        gcn_layers: int = 2,
        edge_density: float = 0.1,
        graph_seed: int = 0,
        expert_features: str = "token",
        act: Callable[[torch.Tensor], torch.Tensor] = F.silu,
    ) -> None:
        super().__init__()
        if expert_features not in EXPERT_FEATURES:
            raise ValueError(
                f"expert_features: must be one of {list(EXPERT_FEATURES)} (got {expert_features!r})"
            )
        self.expert_features = expert_features
        self.num_experts = num_experts
        self.gcn_hidden = gcn_hidden
        self.act = act
        # A constant of the run, drawn from its seed on the CPU outside any tensor mode: under
        # fake tensors (graphlora.memory's step) the draw's data-dependent ops cannot run.
        with unset_fake_temporarily():
            edge_index = build_moe_graph(num_experts, edge_density, graph_seed)
            adj = normalized_adjacency(edge_index, num_experts + 1)  # (N+1, N+1)
        # Saved with the adapter: evaluation uses the same graph as training.
        self.register_buffer("router_edge_index", edge_index)
        self.register_buffer("router_adj", adj)
        self.router_expert_features = nn.Parameter(torch.empty(num_experts, gcn_hidden))
        nn.init.xavier_uniform_(self.router_expert_features)
        self.router_token_proj = nn.Parameter(torch.empty(gcn_hidden, hidden_size))  # P
        nn.init.xavier_uniform_(self.router_token_proj)
        self.router_gcn_weights = nn.ParameterList()
        for _ in range(gcn_layers):
            w = nn.Parameter(torch.empty(gcn_hidden, gcn_hidden))  # (in, out)
            nn.init.xavier_uniform_(w)
            self.router_gcn_weights.append(w)
        self.router_out = nn.Parameter(torch.empty(gcn_hidden))  # F: d_gcn -> 1
        bound = 1.0 / math.sqrt(gcn_hidden)
        nn.init.uniform_(self.router_out, -bound, bound)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # A saved graph may have another edge count than a fresh draw would (a different seed):
        # take the saved buffers' shapes before copying them in.
        for name in ("router_edge_index", "router_adj"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def gcn_nodes(self, x: torch.Tensor) -> torch.Tensor:
        """Final GCN representations of the expert nodes, (T, N, d_gcn) fp32, for tokens (T, d)."""
        n = self.num_experts
        adj = self.router_adj.float()
        a_tok = adj[:, n]  # (N+1,) weight of the token node into every node
        weights = [w.float() for w in self.router_gcn_weights]
        with _no_autocast(x):
            tok = self.act(F.linear(x.float(), self.router_token_proj.float()))  # (T, d_gcn)
            experts = self.router_expert_features.float()  # (N, d_gcn)
            tok_w = (tok @ weights[0])[:, None, :]  # (T, 1, d_gcn)
            if self.expert_features == "token":
                # Layer 0 on every token's graph: expert nodes x_i * tok, token node tok.
                nodes_w = (experts[None] * tok[:, None, :]) @ weights[0]  # (T, N, d_gcn)
                h = self.act(torch.matmul(adj[:, :n], nodes_w) + a_tok[:, None] * tok_w)
            else:
                # Layer 0: token-independent expert part once, plus the rank-one token part.
                const = adj[:, :n] @ (experts @ weights[0])  # (N+1, d_gcn)
                h = self.act(const + a_tok[:, None] * tok_w)  # (T, N+1, d_gcn)
            for i, w in enumerate(weights[1:], start=1):
                last = i == len(weights) - 1
                rows = adj[:n] if last else adj  # the last layer's token row is discarded
                h = self.act(torch.matmul(rows, h) @ w)  # (T, N or N+1, d_gcn)
            return h[:, :n]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities (T, N) fp32 for tokens ``x`` (T, d)."""
        with _no_autocast(x):
            logits = self.gcn_nodes(x) @ self.router_out.float()  # (T, N)
            return logits.softmax(dim=-1)
