"""Where an adapter goes in a model: its FFN sites and attention projections, found by structure,
and how a module is replaced (used by ``graphlora.inject`` and ``graphlora.packing``).

An FFN site is a gated MLP (``gate_proj``, ``up_proj``, ``down_proj`` linears: Llama, Qwen2,
Mistral...) or a classic FFN ``down(act(up h))`` (``CLASSIC_FFNS``: BERT/MiniLM, GPT-2, OPT). A
layer's attention projections follow one of ``ATTENTION_LAYOUTS``. An unknown architecture is
refused with an error that lists what is supported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from graphlora.moe import MoELoRABlock, PassThrough, is_projection

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


class UnsupportedModelError(ValueError):
    """The model has no structure the adapter knows how to wrap."""


def _has_linears(module: nn.Module, names: tuple[str, ...]) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in names)


def lookup(module: nn.Module, path: str) -> object | None:
    """The attribute at dotted ``path`` under ``module`` (None when missing)."""
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def join_path(*parts: str) -> str:
    """Dotted module name of ``parts``, empty parts left out (the root's name is "")."""
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
                is_projection(lookup(mod, up))
                and is_projection(lookup(mod, down))
                and callable(lookup(mod, act))
            ):
                sites.append(FFNSite(name, (up, act, down)))
                break
    return sites


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


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` is under ``root``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def ffn_activation(mlp: nn.Module, model: nn.Module):  # noqa: ANN201
    """A gated MLP's activation: its ``act_fn``, else the model config's ``hidden_act``.

    Raises:
        UnsupportedModelError: neither is there.
    """
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
            if all(is_projection(lookup(child, p)) for p in layout):
                return [join_path(layer_name, child_name, p) for p in layout]
    return []


@dataclass(frozen=True)
class FrozenFFN:
    """The frozen modules of one FFN site, which an MoE-LoRA block wraps: a gated ``mlp``, or a
    classic FFN's ``up`` and ``down`` projections; ``act`` is the activation between them."""

    act: Callable[[torch.Tensor], torch.Tensor]
    mlp: nn.Module | None = None
    up: nn.Module | None = None
    down: nn.Module | None = None

    @property
    def module(self) -> nn.Module:
        """The module a block takes the place of (``replace_ffn``): the gated MLP, or ``up``."""
        return self.mlp if self.mlp is not None else self.up

    @property
    def device(self) -> torch.device:
        return (self.mlp.gate_proj if self.mlp is not None else self.up).weight.device


def frozen_ffn(model: nn.Module, site: FFNSite) -> FrozenFFN:
    """The frozen modules of ``site`` (read before ``replace_ffn`` changes them)."""
    if site.classic is None:
        mlp = model.get_submodule(site.owner)
        return FrozenFFN(ffn_activation(mlp, model), mlp=mlp)
    up, act, down = (join_path(site.owner, p) for p in site.classic)
    return FrozenFFN(lookup(model, act), up=model.get_submodule(up), down=model.get_submodule(down))


def replace_ffn(model: nn.Module, site: FFNSite, new: nn.Module) -> None:
    """Put ``new``, which returns what the FFN at ``site`` returns, in its place: in place of a
    gated MLP, or of a classic FFN's up projection, whose activation and down projection become
    ``PassThrough`` (what the model does after them, dropout, residual, LayerNorm, stays)."""
    if site.classic is None:
        replace_module(model, site.owner, new)
        return
    up, act, down = (join_path(site.owner, p) for p in site.classic)
    replace_module(model, act, PassThrough(up).train(new.training))
    replace_module(model, down, PassThrough(up).train(new.training))
    replace_module(model, up, new)


def attention_projections(model: nn.Module, site: FFNSite) -> list[str]:
    """Attention projections of the layer holding ``site``: among the children of the FFN's
    owner (BERT, OPT: the owner is the layer), else of its parent (a gated MLP, GPT-2's mlp)."""
    return _attention_in(model, site.owner) or _attention_in(model, site.owner.rpartition(".")[0])
