"""Injection of the MoE-LoRA adapter into Hugging Face models, and what it measures.

``inject_adapter`` changes the model in place and returns it. Feed-forward networks are found by
structure (``graphlora.structure.find_ffns``):

- a gated MLP (a module with ``gate_proj``, ``up_proj`` and ``down_proj`` linears: Llama, Qwen2,
  Mistral...) is replaced by a ``MoELoRAMLP``;
- a classic FFN ``down(act(up h))`` (``CLASSIC_FFNS``: BERT/RoBERTa/MiniLM's split
  ``intermediate.dense`` -> act -> ``output.dense``, GPT-2's ``Conv1D`` ``c_fc``/``c_proj``, OPT's
  ``fc1``/``fc2`` on the decoder layer) gets a ``MoELoRAFFN`` in place of its up projection, which
  returns what the down projection returned; the activation and the down projection become
  ``PassThrough``, so what the model does after them (dropout, residual, LayerNorm) is unchanged.

With ``attention_lora`` the layer's attention projections (``ATTENTION_LAYOUTS``) get a
``LoRALinear`` each; a targeted layer without known ones is refused rather than left unadapted.
Two hooks on the model pass the padding mask to the blocks and add the weighted auxiliary losses to
the output (``output.loss`` = task loss + aux; ``output.task_loss``, ``output.aux_loss`` and
``output.aux_losses`` hold the parts). ``model.graphlora_context`` (a ``RoutingContext``) says how
the Normal loss's load is summed over data-parallel ranks. ``build_adapter`` builds the modules,
here and for each slot of a pack (``graphlora.packing``). Saving and loading an adapter:
``graphlora.adapter_io``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from graphlora.config import MoELoRAConfig
from graphlora.health import health_summary
from graphlora.losses import weighted_aux_loss
from graphlora.moe import LoRALinear, MoELoRABlock, MoELoRAFFN, MoELoRAMLP, RoutingContext
from graphlora.routers import GraphRouter
from graphlora.structure import (
    ATTENTION_LAYOUTS,
    FrozenFFN,
    UnsupportedModelError,
    attention_projections,
    frozen_ffn,
    replace_ffn,
    replace_module,
    require_ffns,
    select_target_layers,
)

ADAPTER_MARKERS = ("lora_", "router_", "coord_", "graphlora_head")
"""A parameter or buffer whose name contains one of these belongs to the adapter (the last: an
encoder's scoring head, ``graphlora.encoder``)."""


def is_adapter_name(name: str) -> bool:
    """True for parameter/buffer names that belong to the adapter."""
    return any(m in name for m in ADAPTER_MARKERS)


def moe_blocks(model: nn.Module) -> list[MoELoRABlock]:
    """The injected MoE blocks (gated and classic), in layer order."""
    return [m for m in model.modules() if isinstance(m, MoELoRABlock)]


def build_adapter(
    config: MoELoRAConfig,
    ffns: Sequence[FrozenFFN],
    attention: Sequence[Sequence[nn.Module]],
    *,
    where: str,
) -> tuple[RoutingContext, dict[int, tuple[MoELoRABlock, list[LoRALinear]]]]:
    """The modules of ``config``'s adapter, around a model's frozen modules, not yet attached:
    the one place an adapter is built, whether it goes into the model (``inject_adapter``) or
    into a pack as one slot of several (``graphlora.packing``).

    Layer by layer, the block and then the attention LoRAs (with ``attention_lora``) are built in
    the order their initial weights are drawn, so the same torch seed gives the same adapter
    wherever it goes. Each module follows its frozen module's device and mode.

    Args:
        config: the adapter.
        ffns: the model's FFN sites, in model order (``frozen_ffn``).
        attention: per FFN site, its layer's attention projections (may be empty).
        where: names the model or slot in error messages.

    Returns:
        The blocks' shared ``RoutingContext``, and per targeted layer its block and LoRAs.

    Raises:
        ValueError: ``target_layers`` is out of range.
        UnsupportedModelError: ``attention_lora`` is on and a targeted layer has no attention
            projections the adapter knows.
    """
    targets = select_target_layers(len(ffns), config.target_layers)
    for layer in targets if config.attention_lora else ():  # refuse before building anything
        if not attention[layer]:
            raise UnsupportedModelError(
                f"{where}: attention_lora is on but FFN layer {layer} has no attention "
                f"projections the adapter knows ({[list(a) for a in ATTENTION_LAYOUTS]}); set "
                "attention_lora: false to adapt the FFNs only"
            )
    context = RoutingContext()
    layers = {}
    for pos, layer in enumerate(targets):
        ffn = ffns[layer]
        kwargs = dict(
            num_experts=config.experts_for(pos, len(targets)),
            act=ffn.act,
            context=context,
            layer_seed=layer,
        )
        if ffn.mlp is not None:
            block: MoELoRABlock = MoELoRAMLP(ffn.mlp, config, **kwargs)
        else:
            block = MoELoRAFFN(ffn.up, ffn.down, config, **kwargs)
        # The new modules follow the model's device and mode: an eval model stays in eval.
        _follow(block, ffn.device).train(ffn.module.training)
        loras = []
        for base in attention[layer] if config.attention_lora else ():
            lora = LoRALinear(base, config.rank, config.alpha, config.dropout)
            loras.append(_follow(lora, base.weight.device).train(base.training))
        layers[layer] = (block, loras)
    return context, layers


def _follow(module: nn.Module, device: torch.device) -> nn.Module:
    """``module``, built on the CPU, moved to ``device``. Left alone on the CPU: a move to the
    same device still swaps every tensor, which fake tensors (``graphlora.memory``) refuse."""
    return module if device.type == "cpu" else module.to(device=device)


def inject_adapter(model: nn.Module, config: MoELoRAConfig) -> nn.Module:
    """Wrap ``model``'s FFNs (and attention projections) with the adapter, in place.

    Gated MLPs get a ``MoELoRAMLP``, classic FFNs a ``MoELoRAFFN`` (see the module docstring),
    built by ``build_adapter``. Freezes every non-adapter parameter. Returns the same model.

    Raises:
        UnsupportedModelError: no FFN was found (the message says what was found), or
            ``attention_lora`` is on and a targeted layer has no attention projections the
            adapter knows.
        ValueError: the model already carries an adapter, or ``target_layers`` is out of range.
    """
    require_bare_model(model)
    sites = require_ffns(model)
    names = [attention_projections(model, site) for site in sites]
    attention = [[model.get_submodule(n) for n in layer] for layer in names]
    ffns = [frozen_ffn(model, site) for site in sites]
    context, layers = build_adapter(config, ffns, attention, where=type(model).__name__)
    for layer, (block, loras) in layers.items():
        replace_ffn(model, sites[layer], block)
        for name, lora in zip(names[layer], loras, strict=False):  # none without attention_lora
            replace_module(model, name, lora)
    model.graphlora_config = config
    model.graphlora_context = context
    mark_only_adapter_trainable(model)
    model.graphlora_hooks = [
        model.register_forward_pre_hook(_capture_mask, with_kwargs=True),
        model.register_forward_hook(_add_aux_losses),
    ]
    return model


def require_bare_model(model: nn.Module) -> None:
    """Refuse a model that already carries an adapter, or packed adapters (``inject_packed``)."""
    if getattr(model, "graphlora_config", None) is not None:
        raise ValueError("this model already has a GraphLoRA adapter; load a fresh base model")
    if getattr(model, "graphlora_pack", None) is not None:
        raise ValueError(
            "this model carries packed adapters (it is already packed); add slots with "
            "model.graphlora_pack.add, or load a fresh base model"
        )


def _capture_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        mask = args[1]
    module.graphlora_context.attention_mask = mask


def collect_aux_losses(model: nn.Module, clear: bool = True) -> dict[str, torch.Tensor]:
    """Unweighted auxiliary losses of the last training forward, averaged over MoE layers."""
    sums: dict[str, list[torch.Tensor]] = {}
    for block in moe_blocks(model):
        for key, value in block.aux.items():
            sums.setdefault(key, []).append(value)
        if clear:
            block.aux = {}
    return {k: torch.stack(v).mean() for k, v in sums.items()}


def _add_aux_losses(module: nn.Module, args: tuple, output: Any) -> Any:
    module.graphlora_context.attention_mask = None
    aux = collect_aux_losses(module)
    if not aux or not hasattr(output, "keys"):
        return output
    total = weighted_aux_loss(aux, module.graphlora_config)
    output["aux_losses"] = aux
    output["aux_loss"] = total
    if output.get("loss") is not None:
        output["task_loss"] = output["loss"]
        output["loss"] = output["loss"] + total.to(output["loss"].dtype)
    return output


def mark_only_adapter_trainable(model: nn.Module) -> None:
    """Freeze everything except adapter parameters."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_name(name))


def count_trainable_parameters(model: nn.Module) -> int:
    """Number of trainable parameter elements."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def reset_load_state(model: nn.Module) -> None:
    """Reset every block's cumulative load c and diagnostics (start of a training run)."""
    for block in moe_blocks(model):
        block.reset_load()


def routing_stats(model: nn.Module, reset: bool = True) -> dict[str, float]:
    """Per-layer expert-load diagnostics since the last reset, detached.

    Keys: ``layer{i}/load_cv`` (coefficient of variation of the load fractions),
    ``layer{i}/load_entropy`` (normalised to [0, 1]), ``layer{i}/load_max_frac``, and their means
    over layers as ``routing/load_cv``, ``routing/load_entropy``, ``routing/load_max_frac``.
    """
    out: dict[str, float] = {}
    per_key: dict[str, list[float]] = {}
    for i, block in enumerate(moe_blocks(model)):
        counts = block.routing_counts.detach().float().cpu()
        if block.num_experts < 2 or counts.sum() == 0:
            continue
        frac = counts / counts.sum()
        ent = -(frac * frac.clamp_min(1e-12).log()).sum() / torch.log(torch.tensor(len(frac)))
        stats = {
            "load_cv": (frac.std(unbiased=False) / frac.mean()).item(),
            "load_entropy": ent.item(),
            "load_max_frac": frac.max().item(),
        }
        for key, value in stats.items():
            out[f"layer{i}/{key}"] = value
            per_key.setdefault(key, []).append(value)
        if reset:
            block.routing_counts.zero_()
    for key, values in per_key.items():
        out[f"routing/{key}"] = sum(values) / len(values)
    return out


def routing_health(model: nn.Module, reset: bool = True) -> dict[str, float]:
    """Per-layer routing health of the batches since the last reset (``graphlora.health``):
    per-batch load entropy, experts in use, distinct top-k sets and token-expert mutual
    information, averaged over the batches of training forwards (and of evaluation forwards
    while ``model.graphlora_context.health_in_eval`` is set). Layers with one expert are left
    out, so an adapter without a router gives ``{}``.

    Args:
        model: a model carrying an adapter, or a packed slot's view.
        reset: start a new window afterwards.
    """
    blocks = moe_blocks(model)
    # A one-expert layer routes nothing: its slot stays, empty, so layer numbers keep matching.
    sums = [
        b.routing_health if b.num_experts >= 2 else torch.zeros_like(b.routing_health)
        for b in blocks
    ]
    out = health_summary(sums)
    if reset:
        for block in blocks:
            block.routing_health.zero_()
    return out


def routing_counts(model: nn.Module) -> list[list[float]]:
    """Per MoE layer, the (token, slot) assignments each expert received since the last reset
    (training tokens only); ``routing_stats(reset=True)`` zeroes them, so a caller that wants a
    whole run's counts adds these up before each reset."""
    return [block.routing_counts.detach().float().cpu().tolist() for block in moe_blocks(model)]


def gcn_hidden_used(model: nn.Module) -> int | None:
    """The GCN width d_gcn the model's graph routers were built with (``gcn_hidden`` capped at
    the hidden size); None when the adapter has no graph router."""
    widths = {m.gcn_hidden for m in model.modules() if isinstance(m, GraphRouter)}
    return max(widths) if widths else None
