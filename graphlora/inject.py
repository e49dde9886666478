"""Injection of the MoE-LoRA adapter into Hugging Face models, and adapter I/O.

``inject_adapter`` changes the model in place and returns it. Feed-forward networks are found by
structure (``find_ffns``):

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
the Normal loss's load is summed over data-parallel ranks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from graphlora.config import MoELoRAConfig
from graphlora.health import health_summary
from graphlora.losses import weighted_aux_loss
from graphlora.moe import (
    LoRALinear,
    MoELoRABlock,
    MoELoRAFFN,
    MoELoRAMLP,
    PassThrough,
    RoutingContext,
    is_projection,
)
from graphlora.routers import GraphRouter

ADAPTER_MARKERS = ("lora_", "router_", "coord_", "graphlora_head")
"""A parameter or buffer whose name contains one of these belongs to the adapter (the last: an
encoder's scoring head, ``graphlora.encoder``)."""
GATED_MLP = ("gate_proj", "up_proj", "down_proj")
CLASSIC_FFNS = (
    ("intermediate.dense", "intermediate.intermediate_act_fn", "output.dense"),  # BERT, MiniLM
    ("c_fc", "act", "c_proj"),  # GPT-2 (Conv1D)
    ("fc1", "activation_fn", "fc2"),  # OPT (on the decoder layer itself)
)
"""Classic FFNs as (up, activation, down) paths relative to the module that holds all three."""
ATTENTION_LAYOUTS = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),  # Llama, Qwen2, Mistral, Yi, Gemma
    ("q_proj", "k_proj", "v_proj", "out_proj"),  # OPT, BART
    ("self.query", "self.key", "self.value", "output.dense"),  # BERT, RoBERTa, MiniLM
    ("c_attn", "c_proj"),  # GPT-2: q, k, v fused in c_attn (Conv1D)
)
"""Attention projections as paths relative to the attention module, a child of the layer."""
ATTENTION = ATTENTION_LAYOUTS[0]
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT_VERSION = 1


class UnsupportedModelError(ValueError):
    """The model has no structure the adapter knows how to wrap."""


def is_adapter_name(name: str) -> bool:
    """True for parameter/buffer names that belong to the adapter."""
    return any(m in name for m in ADAPTER_MARKERS)


def _has_linears(module: nn.Module, names: tuple[str, ...]) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in names)


def _lookup(module: nn.Module, path: str) -> object | None:
    """The attribute at dotted ``path`` under ``module`` (None when missing)."""
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


@dataclass(frozen=True)
class FFNSite:
    """One feed-forward network of a model, found by structure.

    Attributes:
        owner: Name of the module holding it: the gated MLP itself, or the module the classic
            paths are relative to (BERT's layer, GPT-2's ``mlp``, OPT's decoder layer).
        classic: ``(up, act, down)`` paths relative to ``owner`` (one of ``CLASSIC_FFNS``), or
            None for a gated MLP.
    """

    owner: str
    classic: tuple[str, str, str] | None = None


def find_ffns(model: nn.Module) -> list[FFNSite]:
    """The feed-forward networks the adapter can wrap (gated or classic), in model order."""
    sites = []
    for name, mod in model.named_modules():
        if isinstance(mod, MoELoRABlock):
            continue
        if _has_linears(mod, GATED_MLP):
            sites.append(FFNSite(name))
            continue
        for up, act, down in CLASSIC_FFNS:
            if (
                is_projection(_lookup(mod, up))
                and is_projection(_lookup(mod, down))
                and callable(_lookup(mod, act))
            ):
                sites.append(FFNSite(name, (up, act, down)))
                break
    return sites


def find_gated_mlps(model: nn.Module) -> list[str]:
    """Names of the gated MLPs (gate/up/down ``nn.Linear`` children), in model order."""
    return [site.owner for site in find_ffns(model) if site.classic is None]


def require_ffns(model: nn.Module) -> list[FFNSite]:
    """``find_ffns``, refusing a model without any FFN the adapter can wrap.

    Raises:
        UnsupportedModelError: no FFN was found; the message says what was found instead.
    """
    sites = find_ffns(model)
    if not sites:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no FFN found. Looked for gated MLPs (nn.Linear children "
            f"{list(GATED_MLP)}: Llama, Qwen2, Mistral, Yi, Gemma) and classic FFNs (up, act, "
            f"down: {[list(c) for c in CLASSIC_FFNS]}: BERT, GPT-2, OPT); found: "
            f"{_describe_mlps(model)}"
        )
    return sites


def _describe_mlps(model: nn.Module) -> str:
    seen = {}
    for name, mod in model.named_modules():
        last = name.rpartition(".")[2]
        if last in ("mlp", "feed_forward", "ffn", "intermediate") or last.isdigit():
            if type(mod).__name__ not in seen:
                seen[type(mod).__name__] = sorted(n for n, _ in mod.named_children())
    if not seen:
        return "no module named *mlp / *feed_forward / *ffn / *intermediate, and no layer list"
    return "; ".join(f"{cls} with children {kids}" for cls, kids in seen.items())


def select_target_layers(num_layers: int, target_layers: list[int] | None) -> list[int]:
    """Resolve ``target_layers`` (None = all, negatives count from the end) to sorted indices."""
    if target_layers is None:
        return list(range(num_layers))
    out = set()
    for i in target_layers:
        j = i + num_layers if i < 0 else i
        if not 0 <= j < num_layers:
            raise ValueError(
                f"target_layers: layer {i} does not exist; the model has {num_layers} FFN "
                f"layers (valid: 0..{num_layers - 1} or -{num_layers}..-1)"
            )
        out.add(j)
    return sorted(out)


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _activation(mlp: nn.Module, model: nn.Module):  # noqa: ANN202
    act = getattr(mlp, "act_fn", None)
    if act is not None:
        return act
    hidden_act = getattr(getattr(model, "config", None), "hidden_act", None)
    if hidden_act is None:
        raise UnsupportedModelError(
            f"{type(mlp).__name__} has no act_fn and the model config no hidden_act: cannot tell "
            "the FFN activation"
        )
    from transformers.activations import ACT2FN

    return ACT2FN[hidden_act]


def _attention_in(model: nn.Module, layer_name: str) -> list[str]:
    layer = model.get_submodule(layer_name) if layer_name else model
    for layout in ATTENTION_LAYOUTS:
        for child_name, child in layer.named_children():
            if all(is_projection(_lookup(child, p)) for p in layout):
                return [_join(layer_name, child_name, p) for p in layout]
    return []


def _attention_of(model: nn.Module, site: FFNSite) -> list[str]:
    """Attention projections of the layer holding ``site``: among the children of the FFN's
    owner (BERT, OPT: the owner is the layer), else of its parent (a gated MLP, GPT-2's mlp)."""
    return _attention_in(model, site.owner) or _attention_in(model, site.owner.rpartition(".")[0])


def moe_blocks(model: nn.Module) -> list[MoELoRABlock]:
    """The injected MoE blocks (gated and classic), in layer order."""
    return [m for m in model.modules() if isinstance(m, MoELoRABlock)]


def inject_adapter(model: nn.Module, config: MoELoRAConfig) -> nn.Module:
    """Wrap ``model``'s FFNs (and attention projections) with the adapter, in place.

    Gated MLPs get a ``MoELoRAMLP``, classic FFNs a ``MoELoRAFFN`` (see the module docstring).
    Freezes every non-adapter parameter. Returns the same model.

    Raises:
        UnsupportedModelError: no FFN was found (the message says what was found), or
            ``attention_lora`` is on and a targeted layer has no attention projections the
            adapter knows.
        ValueError: the model already carries an adapter, or ``target_layers`` is out of range.
    """
    if getattr(model, "graphlora_config", None) is not None:
        raise ValueError("this model already has a GraphLoRA adapter; load a fresh base model")
    if getattr(model, "graphlora_pack", None) is not None:
        raise ValueError("this model carries packed adapters (inject_packed); load a fresh one")
    sites = require_ffns(model)
    targets = select_target_layers(len(sites), config.target_layers)
    attention = {}
    if config.attention_lora:
        for layer in targets:  # refuse before changing anything
            attention[layer] = _attention_of(model, sites[layer])
            if not attention[layer]:
                raise UnsupportedModelError(
                    f"{type(model).__name__}: attention_lora is on but FFN layer {layer} "
                    f"({sites[layer].owner}) has no attention projections the adapter knows "
                    f"({[list(a) for a in ATTENTION_LAYOUTS]}); set attention_lora: false to "
                    "adapt the FFNs only"
                )
    context = RoutingContext()
    for pos, layer in enumerate(targets):
        site = sites[layer]
        kwargs = dict(
            num_experts=config.experts_for(pos, len(targets)), context=context, layer_seed=layer
        )
        if site.classic is None:
            mlp = model.get_submodule(site.owner)
            block: MoELoRABlock = MoELoRAMLP(mlp, config, act=_activation(mlp, model), **kwargs)
            device, training, replaced = mlp.gate_proj.weight.device, mlp.training, site.owner
        else:
            up, act, down = (_join(site.owner, p) for p in site.classic)
            up_mod, down_mod = model.get_submodule(up), model.get_submodule(down)
            act_fn = _lookup(model, act)  # read before it becomes a PassThrough
            block = MoELoRAFFN(up_mod, down_mod, config, act=act_fn, **kwargs)
            device, training, replaced = up_mod.weight.device, up_mod.training, up
            _replace_module(model, act, PassThrough(up).train(training))
            _replace_module(model, down, PassThrough(up).train(training))
        # The new modules follow the model's mode: an eval model stays in eval.
        block.to(device=device).train(training)
        _replace_module(model, replaced, block)
        for proj in attention.get(layer, []):
            base = model.get_submodule(proj)
            lora = LoRALinear(base, config.rank, config.alpha, config.dropout)
            lora.to(device=base.weight.device).train(base.training)
            _replace_module(model, proj, lora)
    model.graphlora_config = config
    model.graphlora_context = context
    mark_only_adapter_trainable(model)
    model.graphlora_hooks = [
        model.register_forward_pre_hook(_capture_mask, with_kwargs=True),
        model.register_forward_hook(_add_aux_losses),
    ]
    return model


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


def load_fractions(model: nn.Module) -> list[list[float]]:
    """Per layer, the fraction of (token, slot) assignments each expert received since reset."""
    out = []
    for block in moe_blocks(model):
        counts = block.routing_counts.float().cpu()
        out.append((counts / counts.sum().clamp_min(1)).tolist())
    return out


def gcn_hidden_used(model: nn.Module) -> int | None:
    """The GCN width d_gcn the model's graph routers were built with (``gcn_hidden`` capped at
    the hidden size); None when the adapter has no graph router."""
    widths = {m.gcn_hidden for m in model.modules() if isinstance(m, GraphRouter)}
    return max(widths) if widths else None


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter parameters and persistent buffers (the graph included), by name."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_name(k)}


def save_adapter(
    model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None
) -> Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into folder ``path``.

    ``adapter_config.json`` holds the config as asked for (``adapter``), for a graph router
    ``gcn_hidden_used``: the GCN width actually built (``gcn_hidden`` capped at the hidden size),
    and for an encoder with a scoring head its ``head`` spec.

    Args:
        model: a model carrying an adapter.
        path: output folder (created).
        metadata: extra JSON-ready facts to keep with the config (e.g. the base model reference).
    """
    config = _config_of(model)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in adapter_state_dict(model).items()}
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / WEIGHTS_NAME)
    doc = {"format_version": FORMAT_VERSION, "adapter": config.to_dict(), **(metadata or {})}
    used = gcn_hidden_used(model)
    if used is not None:
        doc["gcn_hidden_used"] = used
    head = getattr(model, "graphlora_head", None)
    if head is not None:
        doc["head"] = head.spec()
    (out / CONFIG_NAME).write_text(json.dumps(doc, indent=2, sort_keys=True))
    return out


def read_adapter_config(path: str | Path) -> tuple[MoELoRAConfig, dict[str, Any]]:
    """The adapter config and the extra metadata saved in folder ``path``."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no adapter config here; expected a save_adapter folder")
    doc = json.loads(file.read_text())
    adapter = doc.pop("adapter")
    for name in ("expert_features", "balance"):  # saved before these existed: the paper's forms
        adapter.setdefault(name, "paper")
    return MoELoRAConfig.from_dict(adapter), doc


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Inject the adapter saved in ``path`` into base ``model`` and load its weights and graph.

    The result runs without merging: the adapter modules stay in place. Returns the model.
    """
    config, meta = read_adapter_config(path)
    inject_adapter(model, config)
    if meta.get("head"):  # an encoder's scoring head, saved with the adapter
        from graphlora.encoder import attach_head

        attach_head(model, **meta["head"])
    return load_adapter_weights(model, path)


def load_adapter_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the adapter weights and graph saved in ``path`` into a model already carrying the
    same adapter (``inject_adapter``); the base weights are untouched. Returns the model."""
    state = load_file(str(Path(path) / WEIGHTS_NAME))
    return load_adapter_state_dict(model, state, source=str(path))


def load_adapter_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], source: str = "adapter state"
) -> nn.Module:
    """Load adapter weights and graph ``state`` (as ``adapter_state_dict`` gives them) into a
    model already carrying the same adapter; the base weights are untouched. Returns the model.

    Raises:
        ValueError: the keys are not exactly the model's adapter keys (``source`` names where
            the state came from in the message).
    """
    expected = set(adapter_state_dict(model))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(
            f"{source}: adapter weights do not fit this model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); was it saved from another base model?"
        )
    model.load_state_dict(state, strict=False)
    return model


def _config_of(model: nn.Module) -> MoELoRAConfig:
    config = getattr(model, "graphlora_config", None)
    if config is None:
        raise ValueError("this model carries no GraphLoRA adapter; call inject_adapter first")
    return config
