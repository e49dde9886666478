"""The MoE-LoRA feed-forward blocks and the plain LoRA linear (docs/method.md section 1).

All wrap frozen base modules rather than subclassing them. LoRA ``B`` matrices start at zero, so
right after injection the model computes exactly what the base model computes.

Two forms share routing, losses and dispatch (``MoELoRABlock``): ``MoELoRAMLP`` over a gated FFN
(``down(act(gate h) * up h)``: Llama, Qwen2...) and ``MoELoRAFFN`` over a classic one
(``down(act(up h))``: BERT, GPT-2, OPT), whose projections may be ``nn.Linear`` or transformers'
``Conv1D`` (GPT-2: the weight is stored transposed, (in, out)).

A block computes the frozen ``W_gate h`` and ``W_up h`` once for all tokens; only the LoRA deltas
are per expert, and only the tokens routed to an expert pass through it. Because the down projection
is linear, ``sum_i g_i W_down h_i = W_down (sum_i g_i h_i)``: the frozen down projection also runs
once, on the routing-weighted sum of the experts' intermediate activations (the weights sum to one,
so its bias is added exactly once).

Under ``torch.distributed`` every rank sees only its shard of the batch, but the Normal loss is a
function of the load c of the whole batch: each training forward sums this batch's contribution
over the ranks (``global_load``), so every rank computes the loss a single process would compute
on the global batch, with the same gradient once the ranks' gradients are averaged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from graphlora.config import MoELoRAConfig
from graphlora.health import HEALTH_FIELDS, batch_health
from graphlora.losses import (
    batch_balance_loss,
    normal_balance_loss,
    poisson_distinction_loss,
    switch_balance_loss,
    switch_loss,
)
from graphlora.routers import (
    GraphRouter,
    Routing,
    SoftmaxRouter,
    expert_count_list,
    expert_counts,
    route,
)


class RoutingContext:
    """State shared by the blocks of one model: the padding mask of the current batch, and how
    the Normal loss's load c is summed over data-parallel ranks."""

    def __init__(self) -> None:
        self.attention_mask: torch.Tensor | None = None
        self.sync_load: bool = True
        """Sum each training batch's load contribution over the ranks of ``load_group`` when
        torch.distributed is initialised with more than one rank. Every rank must then run the
        same number of training forwards and backwards (as data-parallel training does); turn it
        off to train ranks independently."""
        self.load_group: dist.ProcessGroup | None = None
        """Process group of the data-parallel ranks (None: the default group)."""
        self.health_in_eval: bool = False
        """Count evaluation forwards in the blocks' routing health too (training forwards always
        count): set it to measure how held-out tokens are routed."""
        self.replaying: bool = False
        """The blocks are being recomputed in the backward (gradient checkpointing,
        ``graphlora.recompute``): they compute what their forward computed and record nothing."""

    def token_mask(self, batch_shape: torch.Size) -> torch.Tensor | None:
        """(T,) bool mask of real tokens for hidden states of shape ``batch_shape``: (B, S), or
        (B * S,) for models that flatten tokens before their FFN (OPT)."""
        mask = self.attention_mask
        if mask is None or mask.dim() != 2 or len(batch_shape) not in (1, 2):
            return None
        if len(batch_shape) == 1:
            if batch_shape[0] % mask.shape[0]:
                return None
            batch_shape = torch.Size((mask.shape[0], batch_shape[0] // mask.shape[0]))
        if mask.shape[0] != batch_shape[0] or mask.shape[1] < batch_shape[1]:
            return None
        # With a KV cache the mask covers past tokens too: the current ones are the last S.
        return mask[:, -batch_shape[1] :].reshape(-1).bool()


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward is the all-reduce (sum) of the incoming gradients."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def global_load(contrib: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum of every rank's load contribution ``contrib`` (N,), differentiable; the identity when
    torch.distributed is not initialised or has one rank.

    Why the gradient comes out right: every rank computes the same loss L(c) of the same global
    c = c_prev + sum_q b_q (b_q: rank q's contribution). The backward all-reduce sums the ranks'
    incoming gradients, so rank r gets W * dL/dc * db_r/dtheta (W ranks). Averaging the ranks'
    gradients (data-parallel training) gives dL/dc * sum_r db_r/dtheta: the gradient of one
    process on the global batch. A detached sum would give 1/W of it.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return contrib
    return _SumOverRanks.apply(contrib, group)


class _Combine(torch.autograd.Function):
    """``zeros(rows, ...).index_add(0, index, source)`` that keeps only ``index`` for the
    backward. torch's own ``index_add`` keeps ``source`` too, though its gradient is only
    ``grad[index]``: for the experts' outputs, a (T*K, I) copy per layer for nothing."""

    @staticmethod
    def forward(ctx: Any, source: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
        ctx.save_for_backward(index)
        return source.new_zeros(rows, *source.shape[1:]).index_add_(0, index, source)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


def combine(source: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    """Sum of ``source``'s rows (n, ...) into ``rows`` rows at ``index`` (n,), differentiable
    with respect to ``source``, keeping only ``index`` for the backward."""
    return _Combine.apply(source, index, rows)


def _kaiming_(t: torch.Tensor) -> torch.Tensor:
    # PEFT's LoRA A init, applied per expert slice so fan_in is the slice's input size.
    for piece in t.reshape(-1, *t.shape[-2:]):
        nn.init.kaiming_uniform_(piece, a=math.sqrt(5))
    return t


def is_projection(module: nn.Module | None) -> bool:
    """True for the projections the adapter wraps: ``nn.Linear`` and transformers' ``Conv1D``."""
    return isinstance(module, (nn.Linear, Conv1D))


def projection_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a ``Conv1D``."""
    if isinstance(module, Conv1D):
        return module.nx, module.nf
    return module.in_features, module.out_features


class LoRALinear(nn.Module):
    """``base_layer(x) + s * B A dropout(x)`` around a frozen ``nn.Linear`` or ``Conv1D``."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scaling = alpha / rank
        d_in, d_out = projection_features(base_layer)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(_kaiming_(torch.empty(rank, d_in)))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank))

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The low-rank update ``s * B A dropout(x)`` alone, without the frozen output."""
        dt = x.dtype
        delta = F.linear(F.linear(self.lora_dropout(x), self.lora_A.to(dt)), self.lora_B.to(dt))
        return delta * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.delta(x)


class PassThrough(nn.Identity):
    """Stands where a classic FFN's activation or down projection was: the ``MoELoRAFFN`` that
    replaced the FFN's up projection already applied it, inside each expert."""

    def __init__(self, applied_by: str) -> None:
        super().__init__()
        self.applied_by = applied_by

    def extra_repr(self) -> str:
        return f"applied by {self.applied_by}"


class MoELoRABlock(nn.Module):
    """What every MoE-LoRA block shares: the down projection's LoRA, ``lora_A_down`` (N, r, I) and
    ``lora_B_down`` (N, d, r), routing, auxiliary losses, load, and the dispatch of tokens to
    experts. A subclass names the frozen per-token products (``_frozen``), an expert's
    intermediate activation (``_expert_hidden``) and the frozen down projection (``_base_down``).

    The output is ``sum_{i in S(h)} g_hat_i E_i(h)`` (paper eq. 5). During training the block keeps
    its unweighted auxiliary losses in ``self.aux`` for ``graphlora.inject`` to collect.
    """

    def _init_block(
        self,
        d: int,
        inter: int,
        config: MoELoRAConfig,
        *,
        num_experts: int,
        act: Callable[[torch.Tensor], torch.Tensor],
        context: RoutingContext,
        layer_seed: int,
    ) -> None:
        """What every block sets up: the down projection's LoRA, dropout and routing. Called
        after the subclass's own LoRA factors, so initial weights are drawn in the same order."""
        self.act, self.context = act, context
        self.num_experts = n = num_experts
        self.top_k = config.top_k_for(n)
        self.scaling = config.scaling
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A_down = nn.Parameter(_kaiming_(torch.empty(n, config.rank, inter)))
        self.lora_B_down = nn.Parameter(torch.zeros(n, d, config.rank))
        if config.router == "graph":
            self.router: nn.Module | None = GraphRouter(
                d,
                n,
                gcn_hidden=config.gcn_hidden_for(d),
                gcn_layers=config.gcn_layers,
                edge_density=config.edge_density,
                graph_seed=config.graph_seed + layer_seed,
                expert_features=config.expert_features,
                act=act,
            )
        elif config.router in ("softmax", "dense"):
            self.router = SoftmaxRouter(d, n, init_std=config.router_init_std)
        else:
            self.router = None

        self.use_poisson = config.poisson_coef > 0 and self.router is not None
        self.use_normal = config.normal_coef > 0 and self.router is not None
        self.use_balance = config.balance_coef > 0 and self.router is not None
        self.lambda_range = tuple(config.lambda_range)
        self.balance = config.balance
        if self.use_poisson:
            self.coord_lambda = nn.Parameter(torch.tensor(float(config.lambda_init)))
        sigma0 = config.sigma_init if config.sigma_init is not None else n / 2
        self.fixed_sigma = float(sigma0)  # the batch form's sigma: a constant target
        if self.use_normal and self.balance == "paper":
            # sigma = softplus(raw) keeps sigma positive; raw is set so sigma starts at sigma0.
            self.coord_sigma_raw = nn.Parameter(
                torch.tensor(sigma0 + math.log(-math.expm1(-sigma0)))
            )
        # c of the paper's Normal loss: cumulative top-k weight per expert this training run.
        self.register_buffer("coord_load", torch.zeros(n), persistent=False)
        # Detached diagnostics: (token, slot) assignments per expert, training tokens of this
        # rank only, since the last reset.
        self.register_buffer("routing_counts", torch.zeros(n), persistent=False)
        # Routing health since the last reset: batches seen, then the sum of each figure of
        # graphlora.health.HEALTH_FIELDS over them (this rank's real tokens).
        self.register_buffer(
            "routing_health", torch.zeros(1 + len(HEALTH_FIELDS)), persistent=False
        )
        self.aux: dict[str, torch.Tensor] = {}

    @property
    def lam(self) -> torch.Tensor:
        """Poisson rate lambda, clamped into its configured range."""
        return self.coord_lambda.clamp(*self.lambda_range)

    @property
    def sigma(self) -> torch.Tensor:
        """Normal sigma (> 0): trainable with balance paper, a constant otherwise."""
        if hasattr(self, "coord_sigma_raw"):
            return F.softplus(self.coord_sigma_raw)
        return torch.tensor(self.fixed_sigma)

    def reset_load(self) -> None:
        """Forget the cumulative load c (start of a training run) and the diagnostics."""
        self.coord_load.zero_()
        self.routing_counts.zero_()
        self.routing_health.zero_()

    def _route(self, x: torch.Tensor) -> Routing:
        if self.router is None:
            ones = torch.ones(x.shape[0], 1, device=x.device, dtype=torch.float32)
            zeros = torch.zeros(x.shape[0], 1, device=x.device, dtype=torch.long)
            return Routing(probs=ones, topk_probs=ones, weights=ones, indices=zeros)
        return route(self.router(x), self.top_k)

    def _update_stats(self, routing: Routing, mask: torch.Tensor | None) -> None:
        if not self.training:  # evaluation passes touch neither the load nor the diagnostics
            self.aux = {}
            if self.context.health_in_eval and self.router is not None:
                idx, probs = self._real(routing.indices, mask), self._real(routing.probs, mask)
                self._count_health(idx, probs)
            return
        # A recomputation in the backward runs the same differentiable operations, in the same
        # order (autograd matches their saved tensors by position), but records nothing.
        replay = self.context.replaying
        idx = self._real(routing.indices, mask)
        topk = self._real(routing.topk_probs, mask)
        probs = self._real(routing.probs, mask)
        with torch.no_grad():
            counts = expert_counts(idx, self.num_experts)
            if not replay:
                self.routing_counts += counts.to(self.routing_counts.dtype)
        if self.router is not None and not replay:
            self._count_health(idx, probs)
        aux: dict[str, torch.Tensor] = {}
        if self.use_poisson:
            aux["poisson"] = poisson_distinction_loss(routing.probs, self.lam, mask)
        if self.use_normal and self.balance == "paper":
            contrib = torch.zeros(self.num_experts, device=topk.device, dtype=torch.float32)
            contrib = contrib.index_add(0, idx.reshape(-1), topk.reshape(-1).float())
            if self.context.sync_load:
                contrib = global_load(contrib, self.context.load_group)  # all ranks: global batch
            if not replay:  # the forward's c_prev, which the replay starts from again
                self._load_before = self.coord_load.detach().clone()
            load = self._load_before + contrib  # c_now = c_prev.detach() + this batch
            if not replay:
                self.coord_load.copy_(load.detach())
            aux["normal"] = normal_balance_loss(load, self.sigma)
        elif self.use_normal:
            frac, mean_probs = self._batch_load(counts, probs)
            if self.balance == "batch":
                aux["normal"] = batch_balance_loss(frac, mean_probs, self.fixed_sigma)
            else:
                aux["normal"] = switch_loss(frac, mean_probs)
        if self.use_balance:
            aux["balance"] = switch_balance_loss(routing.probs, routing.indices, mask)
        if not replay:
            self.aux = aux

    @staticmethod
    def _real(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The rows of ``t`` (T, ...) of real tokens (all rows without a mask)."""
        return t if mask is None else t[mask]

    def _count_health(self, idx: torch.Tensor, probs: torch.Tensor) -> None:
        health = batch_health(idx, probs, self.num_experts).to(self.routing_health.device)
        self.routing_health[0] += 1
        self.routing_health[1:] += health

    def _batch_load(
        self, counts: torch.Tensor, probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This training batch's assignment fractions f (no gradient) and mean full-softmax
        probabilities P (with gradient), over the global batch under torch.distributed."""
        n = self.num_experts
        tokens = torch.full((1,), float(probs.shape[0]), device=probs.device)
        stats = torch.cat([counts.float(), probs.float().sum(dim=0), tokens])  # (2N+1,)
        if self.context.sync_load:
            stats = global_load(stats, self.context.load_group)
        counts, prob_sum, tokens = stats[:n], stats[n : 2 * n], stats[2 * n]
        frac = counts.detach() / counts.detach().sum().clamp_min(1.0)
        return frac, prob_sum / tokens.detach().clamp_min(1.0)

    def _frozen(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The frozen per-token products all experts share, each (T, I)."""
        raise NotImplementedError

    def _expert_hidden(
        self, e: int, xe: torch.Tensor, frozen: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        """Expert ``e``'s intermediate activation (n_e, I) for its tokens ``xe`` (dropout applied)
        and their rows of the frozen products."""
        raise NotImplementedError

    def _base_down(self, h: torch.Tensor) -> torch.Tensor:
        """The frozen down projection, (T, I) -> (T, d)."""
        raise NotImplementedError

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])  # (T, d)
        t, dt, s = x.shape[0], x.dtype, self.scaling
        mask = self.context.token_mask(shape[:-1])
        frozen = self._frozen(x)  # (T, I) each, shared by all experts
        routing = self._route(x)
        self._update_stats(routing, mask)
        weights = routing.weights.to(dt)  # (T, K)
        xd = self.lora_dropout(x)
        n, k = self.num_experts, routing.indices.shape[1]

        dense = k == n  # every expert sees every token, in order: no dispatch needed
        if not dense:
            flat = routing.indices.reshape(-1)  # (T*K,)
            order = flat.argsort(stable=True)
            counts = expert_count_list(flat, n)
            tok = order // k  # token of each sorted (token, slot) assignment
            slot_w = weights.reshape(-1)[order]
            # split (not slicing) so backward is one concatenation, not N zero-filled copies.
            parts = [
                t_.split(counts)
                for t_ in (xd[tok], *(f[tok] for f in frozen), slot_w)  # (T*K, d|I..), (T*K,)
            ]
        hs, downs = [], []
        for e in range(n):
            if dense:
                xe, fe, we = xd, frozen, weights[:, e]
            else:
                if counts[e] == 0:
                    continue
                xe, *fe, we = (part[e] for part in parts)
            he = self._expert_hidden(e, xe, tuple(fe))  # (n_e, I)
            de = (
                F.linear(
                    F.linear(self.lora_dropout(he), self.lora_A_down[e].to(dt)),
                    self.lora_B_down[e].to(dt),
                )
                * s
            )  # (n_e, d)
            hs.append(he * we[:, None])
            downs.append(de * we[:, None])
        if dense:
            h_mix, down = torch.stack(hs).sum(0), torch.stack(downs).sum(0)
        else:
            h_mix = combine(torch.cat(hs), tok, t)  # (T, I)
            down = combine(torch.cat(downs), tok, t)  # (T, d)
        # Weights sum to 1 per token, so a down projection's bias is still added exactly once.
        out = self._base_down(h_mix) + down
        return out.reshape(shape)


class MoELoRAMLP(MoELoRABlock):
    """Mixture of LoRA experts over a frozen gated MLP (gate_proj, up_proj, down_proj).

    Expert i is the base MLP with its own LoRA deltas on all three projections (MixLoRA style).
    """

    def __init__(
        self,
        base_mlp: nn.Module,
        config: MoELoRAConfig,
        *,
        num_experts: int,
        act: Callable[[torch.Tensor], torch.Tensor],
        context: RoutingContext,
        layer_seed: int = 0,
    ) -> None:
        super().__init__()
        self.base_mlp = base_mlp
        n, r = num_experts, config.rank
        d = base_mlp.gate_proj.in_features
        inter = base_mlp.gate_proj.out_features
        # Stacked expert weights: one parameter per projection, experts along dim 0.
        self.lora_A_gate_up = nn.Parameter(_kaiming_(torch.empty(n, 2 * r, d)))
        self.lora_B_gate = nn.Parameter(torch.zeros(n, inter, r))
        self.lora_B_up = nn.Parameter(torch.zeros(n, inter, r))
        self._init_block(
            d, inter, config, num_experts=n, act=act, context=context, layer_seed=layer_seed
        )

    def _frozen(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.base_mlp.gate_proj(x), self.base_mlp.up_proj(x)

    def _expert_hidden(
        self, e: int, xe: torch.Tensor, frozen: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        ge, ue = frozen
        dt, s, r = xe.dtype, self.scaling, self.lora_B_gate.shape[-1]
        z = F.linear(xe, self.lora_A_gate_up[e].to(dt))  # (n_e, 2r)
        ge = ge + F.linear(z[:, :r], self.lora_B_gate[e].to(dt)) * s
        ue = ue + F.linear(z[:, r:], self.lora_B_up[e].to(dt)) * s
        return self.act(ge) * ue

    def _base_down(self, h: torch.Tensor) -> torch.Tensor:
        return self.base_mlp.down_proj(h)


class MoELoRAFFN(MoELoRABlock):
    """Mixture of LoRA experts over a frozen classic (non-gated) FFN ``down(act(up h))``.

    Expert i adapts the up and down projections (docs/method.md section 1, the non-gated form):
    ``E_i(h) = (W_down + s B_down,i A_down,i) act((W_up + s B_up,i A_up,i) h)``. The projections
    may be ``nn.Linear`` or ``Conv1D`` and may live in different modules of the base model (BERT:
    ``intermediate.dense`` and ``output.dense``); the block takes them as given and returns what
    the down projection would have returned, so whatever the model does after it (dropout,
    residual, LayerNorm) stays as it was.
    """

    def __init__(
        self,
        up: nn.Module,
        down: nn.Module,
        config: MoELoRAConfig,
        *,
        num_experts: int,
        act: Callable[[torch.Tensor], torch.Tensor],
        context: RoutingContext,
        layer_seed: int = 0,
    ) -> None:
        super().__init__()
        d, inter = projection_features(up)
        if projection_features(down) != (inter, d):
            raise ValueError(
                f"classic FFN: the up projection maps {d} -> {inter} but the down projection "
                f"maps {projection_features(down)[0]} -> {projection_features(down)[1]}; "
                "expected the reverse of the up projection"
            )
        self.base_up = up
        self.base_down = down
        n, r = num_experts, config.rank
        self.lora_A_up = nn.Parameter(_kaiming_(torch.empty(n, r, d)))
        self.lora_B_up = nn.Parameter(torch.zeros(n, inter, r))
        self._init_block(
            d, inter, config, num_experts=n, act=act, context=context, layer_seed=layer_seed
        )

    def _frozen(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.base_up(x),)

    def _expert_hidden(
        self, e: int, xe: torch.Tensor, frozen: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        (ue,) = frozen
        dt = xe.dtype
        delta = F.linear(F.linear(xe, self.lora_A_up[e].to(dt)), self.lora_B_up[e].to(dt))
        return self.act(ue + delta * self.scaling)

    def _base_down(self, h: torch.Tensor) -> torch.Tensor:
        return self.base_down(h)
