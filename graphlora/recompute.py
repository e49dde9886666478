"""Gradient checkpointing of a model carrying adapters: each transformer layer keeps only its
input in the forward and is run again in the backward (``torch.utils.checkpoint``, non-reentrant),
so a step holds one layer's activations instead of every layer's.

transformers does the checkpointing (``activation_checkpointing_enable``: every
``GradientCheckpointingLayer`` of Qwen2, Llama, GPT-2, OPT, BERT...). What the adapter adds is a
replay: the backward re-runs each layer's MoE blocks after the model's forward has returned, when
what the forward saw is gone (the padding mask the model's hook handed the blocks, a pack's row
layout) or has moved on (the LoRA dropout generators, a block's running load c). ``Replay``
captures that state when a layer's forward starts and puts it back while the layer is recomputed.

During the replay the blocks compute exactly what they computed in the forward, so that autograd
gets the same tensors back, but record nothing: routing counts, routing health, the running load
and the auxiliary losses are counted once per forward, never again in the backward
(``RoutingContext.replaying``, read by ``graphlora.moe``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial

import torch
from torch import nn

from graphlora.moe import LoRALinear, MoELoRABlock, RoutingContext
from graphlora.packing import GeneratorDropout, PackLayout

__all__ = ["Replay", "enable_gradient_checkpointing", "gradient_checkpointing_enabled"]


class Replay:
    """What a layer's forward saw, for its recomputation in the backward: each routing context's
    padding mask, each pack layout's rows and each LoRA dropout generator's state.

    Args:
        model: the model whose adapter state is captured now (a layer's forward is starting).
    """

    def __init__(self, model: nn.Module) -> None:
        contexts: dict[int, RoutingContext] = {}
        layouts: dict[int, PackLayout] = {}
        generators: dict[int, torch.Generator] = {}
        for module in model.modules():
            if isinstance(module, MoELoRABlock):
                contexts[id(module.context)] = module.context
            layout = getattr(module, "layout", None)
            if isinstance(layout, PackLayout):
                layouts[id(layout)] = layout
            if isinstance(module, (MoELoRABlock, LoRALinear)):
                drop = module.lora_dropout
                if isinstance(drop, GeneratorDropout) and drop.training and drop.p > 0:
                    generators[id(drop.generator)] = drop.generator
        self.masks = [(c, c.attention_mask) for c in contexts.values()]
        self.rows = [(lay, lay.rows) for lay in layouts.values()]
        self.states = [(g, g.get_state()) for g in generators.values()]

    @contextmanager
    def replaying(self) -> Iterator[None]:
        """Within this block the adapter sees what it saw when the replay was captured, and its
        blocks record nothing; afterwards everything is as it was."""
        masks = [(c, c.attention_mask, c.replaying) for c, _ in self.masks]
        rows = [(lay, lay.rows) for lay, _ in self.rows]
        states = [(g, g.get_state()) for g, _ in self.states]
        for context, mask in self.masks:
            context.attention_mask, context.replaying = mask, True
        for layout, saved in self.rows:
            layout.rows = saved
        for generator, state in self.states:
            generator.set_state(state)
        try:
            yield
        finally:
            for context, mask, flag in masks:
                context.attention_mask, context.replaying = mask, flag
            for layout, saved in rows:
                layout.rows = saved
            for generator, state in states:
                generator.set_state(state)


def _contexts(model: nn.Module) -> tuple[nullcontext, object]:
    """``torch.utils.checkpoint``'s ``context_fn``: nothing around the forward, the replay of
    what the forward saw around the recomputation."""
    return nullcontext(), Replay(model).replaying()


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute every transformer layer of ``model`` in the backward, in place; the model may
    carry an adapter (``inject_adapter``) or packed adapters (``inject_packed``), before or after
    this call. Returns the model.

    Losses, gradients, auxiliary losses and routing statistics equal those of the same step
    without checkpointing (to float rounding), at the cost of a second forward of every layer.
    Layers only checkpoint in training mode (transformers' rule): a base kept in eval mode while
    its adapters train does not checkpoint.

    Raises:
        ValueError: the model's architecture does not support checkpointing in transformers.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"{type(model).__name__}: transformers does not support gradient checkpointing for "
            "this architecture; set gradient_checkpointing: false"
        )
    kwargs = {"use_reentrant": False, "context_fn": partial(_contexts, model)}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def gradient_checkpointing_enabled(model: nn.Module) -> bool:
    """Whether any layer of ``model`` is set to recompute in the backward."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
