"""Injection of the MoE-LoRA adapter into Hugging Face decoder models, and adapter I/O.

``inject_adapter`` changes the model in place and returns it: each targeted decoder layer's gated
MLP (found by structure: a module with ``gate_proj``, ``up_proj`` and ``down_proj`` linears) is
wrapped in a ``MoELoRAMLP``, and optionally its attention's q/k/v/o projections in ``LoRALinear``.
Two hooks on the model pass the padding mask to the blocks and add the weighted auxiliary losses to
the output (``output.loss`` = task loss + aux; ``output.task_loss``, ``output.aux_loss`` and
``output.aux_losses`` hold the parts). ``model.graphlora_context`` (a ``RoutingContext``) says how
the Normal loss's load is summed over data-parallel ranks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from graphlora.config import MoELoRAConfig
from graphlora.losses import weighted_aux_loss
from graphlora.moe import LoRALinear, MoELoRAMLP, RoutingContext
from graphlora.routers import GraphRouter

ADAPTER_MARKERS = ("lora_", "router_", "coord_")
"""A parameter or buffer whose name contains one of these belongs to the adapter."""
GATED_MLP = ("gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
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


def find_gated_mlps(model: nn.Module) -> list[str]:
    """Names of the gated MLPs (gate/up/down ``nn.Linear`` children), in model order."""
    return [
        name
        for name, mod in model.named_modules()
        if _has_linears(mod, GATED_MLP) and not isinstance(mod, MoELoRAMLP)
    ]


def _describe_mlps(model: nn.Module) -> str:
    seen = {}
    for name, mod in model.named_modules():
        if name.endswith(("mlp", "feed_forward", "ffn")) and type(mod).__name__ not in seen:
            seen[type(mod).__name__] = sorted(n for n, _ in mod.named_children())
    if not seen:
        return "no module named *mlp / *feed_forward / *ffn"
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
                f"target_layers: layer {i} does not exist; the model has {num_layers} decoder "
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


def _attention_of(model: nn.Module, mlp_name: str) -> list[str]:
    parent_name = mlp_name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    for child_name, child in parent.named_children():
        if _has_linears(child, ATTENTION):
            prefix = f"{parent_name}.{child_name}" if parent_name else child_name
            return [f"{prefix}.{p}" for p in ATTENTION]
    return []


def moe_blocks(model: nn.Module) -> list[MoELoRAMLP]:
    """The injected MoE blocks, in layer order."""
    return [m for m in model.modules() if isinstance(m, MoELoRAMLP)]


def inject_adapter(model: nn.Module, config: MoELoRAConfig) -> nn.Module:
    """Wrap ``model``'s MLPs (and attention projections) with the adapter, in place.

    Freezes every non-adapter parameter. Returns the same model.

    Raises:
        UnsupportedModelError: no gated MLP was found (the message says what was found).
        ValueError: the model already carries an adapter, or ``target_layers`` is out of range.
    """
    if getattr(model, "graphlora_config", None) is not None:
        raise ValueError("this model already has a GraphLoRA adapter; load a fresh base model")
    mlps = find_gated_mlps(model)
    if not mlps:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no gated MLP found. Looked for modules with nn.Linear "
            f"children {list(GATED_MLP)} (Llama, Qwen2, Mistral, Yi, Gemma); found: "
            f"{_describe_mlps(model)}"
        )
    targets = select_target_layers(len(mlps), config.target_layers)
    context = RoutingContext()
    for pos, layer in enumerate(targets):
        name = mlps[layer]
        mlp = model.get_submodule(name)
        block = MoELoRAMLP(
            mlp,
            config,
            num_experts=config.experts_for(pos, len(targets)),
            act=_activation(mlp, model),
            context=context,
            layer_seed=layer,
        )
        # The new modules follow the model's mode: an eval model stays in eval.
        block.to(device=mlp.gate_proj.weight.device).train(mlp.training)
        _replace_module(model, name, block)
        if config.attention_lora:
            for proj in _attention_of(model, name):
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

    ``adapter_config.json`` holds the config as asked for (``adapter``) and, for a graph router,
    ``gcn_hidden_used``: the GCN width actually built (``gcn_hidden`` capped at the hidden size).

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
    (out / CONFIG_NAME).write_text(json.dumps(doc, indent=2, sort_keys=True))
    return out


def read_adapter_config(path: str | Path) -> tuple[MoELoRAConfig, dict[str, Any]]:
    """The adapter config and the extra metadata saved in folder ``path``."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no adapter config here; expected a save_adapter folder")
    doc = json.loads(file.read_text())
    adapter = doc.pop("adapter")
    return MoELoRAConfig.from_dict(adapter), doc


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Inject the adapter saved in ``path`` into base ``model`` and load its weights and graph.

    The result runs without merging: the adapter modules stay in place. Returns the model.
    """
    config, _ = read_adapter_config(path)
    inject_adapter(model, config)
    return load_adapter_weights(model, path)


def load_adapter_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the adapter weights and graph saved in ``path`` into a model already carrying the
    same adapter (``inject_adapter``); the base weights are untouched. Returns the model."""
    state = load_file(str(Path(path) / WEIGHTS_NAME))
    expected = set(adapter_state_dict(model))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(
            f"{path}: adapter weights do not fit this model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); was it saved from another base model?"
        )
    model.load_state_dict(state, strict=False)
    return model


def _config_of(model: nn.Module) -> MoELoRAConfig:
    config = getattr(model, "graphlora_config", None)
    if config is None:
        raise ValueError("this model carries no GraphLoRA adapter; call inject_adapter first")
    return config
