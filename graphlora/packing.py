"""Several adapters over one frozen base model: packed slots (docs/method.md, "Packing several
adapters over one base").

``inject_packed`` puts P adapters, the slots, into one base model. Every FFN site becomes a
``PackedFFN`` holding, in a ``ModuleDict`` keyed by slot id, the MoE-LoRA block of each slot
that targets it, and every attention projection a ``PackedLoRALinear`` holding each slot's
``LoRALinear`` (with ``attention_lora``): the modules ``inject_adapter`` puts in a model for the
same config, built by the same ``graphlora.inject.build_adapter`` around the same frozen
projections (not copies). Slots may differ in every adapter field.

A packed batch is the concatenation, along the batch dimension, of each slot's rows; the pack
says which contiguous rows are whose (``Pack.layout``). An attention projection runs its frozen
linear once over all rows and adds each slot's LoRA update on that slot's rows; an FFN site gives
each slot's block that slot's rows, so the frozen FFN work still totals one pass over the batch.
Rows of a slot that does not adapt a site go through the frozen module alone.

Each slot keeps what an adapter alone keeps: its own ``RoutingContext`` (its rows of the padding
mask), cumulative load, routing counts, auxiliary losses weighted with its own coefficients, and
a dropout generator of its own (``GeneratorDropout``), so what a slot computes does not depend
on the other slots. ``Pack.adapter(slot)`` presents a slot as an ordinary adapter model, with the
names a model carrying only that adapter would have: the functions of ``graphlora.inject``
(``routing_stats``, ``reset_load_state``...) and ``graphlora.adapter_io`` (``save_adapter``,
``adapter_state_dict``...) work on it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphlora.adapter_io import (
    adapter_state_dict,
    load_adapter_weights,
    read_adapter_config,
    save_adapter,
)
from graphlora.config import MoELoRAConfig
from graphlora.inject import (
    ADAPTER_MARKERS,
    build_adapter,
    collect_aux_losses,
    is_adapter_name,
    require_bare_model,
    reset_load_state,
    routing_counts,
)
from graphlora.losses import weighted_aux_loss
from graphlora.moe import LoRALinear, MoELoRABlock, RoutingContext
from graphlora.structure import (
    FrozenFFN,
    attention_projections,
    frozen_ffn,
    replace_ffn,
    replace_module,
    require_ffns,
)

__all__ = [
    "GeneratorDropout",
    "Pack",
    "PackLayout",
    "PackedFFN",
    "PackedLoRALinear",
    "inject_packed",
    "use_generator_dropout",
]


class GeneratorDropout(nn.Module):
    """Inverted dropout whose masks come from its own ``torch.Generator``, not torch's global RNG.

    A slot's masks then depend only on its generator and on the shapes it drew for, so a slot
    draws the same masks alone and in a pack, whatever the other slots do.
    """

    def __init__(self, p: float, generator: torch.Generator) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p: dropout probability must be in [0, 1) (got {p!r})")
        self.p = p
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty_like(x).bernoulli_(1.0 - self.p, generator=self.generator)
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, own generator"


def use_generator_dropout(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Make every LoRA dropout of ``model``'s adapter draw from ``generator``, in place.

    Works on a model carrying an ordinary adapter (``inject_adapter``) and on a slot's view
    (``Pack.adapter``); a pack does this for each slot with its own generator. A model and a slot
    with the same weights whose generators have the same state compute the same training forward.
    The generator must live on the adapter's device. Returns the model.
    """
    owners = [m for m in model.modules() if isinstance(m, (LoRALinear, MoELoRABlock))]
    for module in owners:
        drop = module.lora_dropout
        if isinstance(drop, GeneratorDropout):
            drop.generator = generator
        elif isinstance(drop, nn.Dropout):
            module.lora_dropout = GeneratorDropout(drop.p, generator).train(drop.training)
    return model


class PackLayout:
    """Which contiguous rows of the packed batch belong to which slot; shared by the pack's
    modules and set for each forward by ``Pack.layout``."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, int]] | None = None

    def current(self) -> list[tuple[str, int]]:
        """The layout set now, ``[(slot, rows), ...]`` in batch order.

        Raises:
            RuntimeError: no layout is set.
        """
        if self.rows is None:
            raise RuntimeError(
                "packed adapters: no layout is set; run the forward inside "
                "`with pack.layout({slot: rows, ...}):`"
            )
        return self.rows

    def spans(self, batch: int) -> list[tuple[str, int, int]]:
        """``(slot, start, length)`` along dim 0 of a tensor with ``batch`` rows, skipping empty
        slots. A tensor whose tokens are flattened into dim 0 (OPT's FFN input: batch x sequence
        rows) is split in proportion.

        Raises:
            RuntimeError: no layout is set.
            ValueError: ``batch`` does not fit the layout.
        """
        rows = self.current()
        total = sum(n for _, n in rows)
        if batch == total:
            per_row = 1
        elif total and batch % total == 0:
            per_row = batch // total
        else:
            raise ValueError(
                f"packed adapters: the batch has {batch} rows but the layout "
                f"{dict(rows)} covers {total}; give every row of the batch to one slot"
            )
        out, start = [], 0
        for slot, n in rows:
            if n:
                out.append((slot, start, n * per_row))
                start += n * per_row
        return out

    def split(self, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """``(slot, its rows of tensor)`` along dim 0, as ``spans`` cuts them. One ``split``,
        not a slice per slot, so the backward is one concatenation, not a zero-filled copy of
        the whole tensor per slot."""
        spans = self.spans(tensor.shape[0])
        parts = tensor.split([n for _, _, n in spans])
        return [(slot, part) for (slot, _, _), part in zip(spans, parts, strict=True)]


class PackedLoRALinear(nn.Module):
    """A frozen projection shared by the slots: the frozen linear once over every row, plus each
    slot's ``LoRALinear`` update on that slot's rows (none for a slot without one here)."""

    def __init__(self, base_layer: nn.Module, layout: PackLayout) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.slots = nn.ModuleDict()
        self.layout = layout

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        if not len(self.slots):
            return base
        rows = self.layout.split(x)
        parts = []
        for (slot, xs), (_, piece) in zip(rows, self.layout.split(base), strict=True):
            parts.append(piece + self.slots[slot].delta(xs) if slot in self.slots else piece)
        return torch.cat(parts) if len(parts) != 1 else parts[0]


class PackedFFN(nn.Module):
    """One FFN site shared by the slots: each slot's MoE-LoRA block runs on that slot's rows (a
    slot without a block here gets the frozen FFN), so the frozen work totals one pass.

    Stands where ``inject_adapter`` puts its block (``graphlora.structure.replace_ffn``).
    """

    def __init__(self, layout: PackLayout, ffn: FrozenFFN) -> None:
        super().__init__()
        self.base_mlp, self.base_up, self.base_down = ffn.mlp, ffn.up, ffn.down
        self.act = ffn.act
        self.slots = nn.ModuleDict()
        self.layout = layout

    @property
    def frozen(self) -> FrozenFFN:
        """The frozen modules a slot's block wraps here (``graphlora.inject.build_adapter``)."""
        return FrozenFFN(self.act, self.base_mlp, self.base_up, self.base_down)

    def _frozen_ffn(self, x: torch.Tensor) -> torch.Tensor:
        if self.base_mlp is not None:
            return self.base_mlp(x)
        return self.base_down(self.act(self.base_up(x)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        parts = []
        for slot, rows in self.layout.split(hidden):
            parts.append(self.slots[slot](rows) if slot in self.slots else self._frozen_ffn(rows))
        if not parts:
            return self._frozen_ffn(hidden)
        return torch.cat(parts) if len(parts) != 1 else parts[0]


def _check_slot_id(slot: object) -> str:
    if not isinstance(slot, str) or not slot or "." in slot:
        raise ValueError(f"slot id: must be a non-empty string without '.' (got {slot!r})")
    markers = [m for m in ADAPTER_MARKERS if m in slot]
    if markers:
        raise ValueError(
            f"slot id {slot!r}: contains {markers[0]!r}, which marks adapter names "
            f"({list(ADAPTER_MARKERS)}); pick another id"
        )
    return slot


def _place(root: nn.Module, path: str, module: nn.Module) -> None:
    """Attach ``module`` at dotted ``path`` under ``root``, creating empty containers."""
    *parents, last = path.split(".")
    node = root
    for part in parents:
        child = node._modules.get(part)
        if child is None:
            child = nn.Module()
            node.add_module(part, child)
        node = child
    node.add_module(last, module)


class Pack:
    """Handle on a model carrying packed adapters (``inject_packed``): adds, removes and lays out
    slots, and gives each slot's parameters, losses, load and weights.

    Typical training step of a host with slots ``a`` and ``b``::

        with pack.layout({"a": 4, "b": 4}):
            out = model(input_ids=ids, attention_mask=mask)  # 8 rows: a's 4, then b's 4
            logits = pack.split(out.logits)
        aux = out.get("slot_aux_loss", {})  # absent in eval mode, or when no slot has losses
        loss = sum(task_loss(logits[s], ...) + aux.get(s, 0) for s in ("a", "b"))
        loss.backward()  # each slot's gradient is that of its own loss

    Attributes:
        model: the base model the slots live in (changed in place).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._layout = PackLayout()
        self._configs: dict[str, MoELoRAConfig] = {}
        self._contexts: dict[str, RoutingContext] = {}
        self._generators: dict[str, torch.Generator] = {}
        self._views: dict[str, nn.Module] = {}
        self._ffns: list[PackedFFN] = []
        self._attention: list[list[PackedLoRALinear]] = []

    # Slots -------------------------------------------------------------------------------------

    @property
    def slots(self) -> tuple[str, ...]:
        """Slot ids, in the order they were added."""
        return tuple(self._configs)

    def config(self, slot: str) -> MoELoRAConfig:
        """The adapter config of ``slot``."""
        return self._configs[self._known(slot)]

    def generator(self, slot: str) -> torch.Generator:
        """The generator ``slot``'s LoRA dropout draws from."""
        return self._generators[self._known(slot)]

    def add(
        self,
        slot: str,
        config: MoELoRAConfig,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Add an adapter as slot ``slot``, built as ``inject_adapter`` builds it
        (``build_adapter``: the same torch seed gives the same initial weights). The other slots
        are untouched.

        Args:
            slot: the slot's id: a non-empty string without '.' or an adapter marker.
            config: the adapter's config.
            seed: seed of the slot's dropout generator (ignored with ``generator``); None draws
                one from torch's global RNG, after the weights, so seeding torch seeds the slot.
            generator: the dropout generator itself (on the model's device).

        Raises:
            ValueError: the id is taken or malformed, or ``target_layers`` is out of range.
            UnsupportedModelError: ``attention_lora`` is on and a targeted layer has no attention
                projections the adapter knows.
        """
        _check_slot_id(slot)
        if slot in self._configs:
            raise ValueError(f"slot {slot!r}: already in the pack; remove it first or pick an id")
        context, layers = build_adapter(
            config,
            [site.frozen for site in self._ffns],
            [[proj.base_layer for proj in layer] for layer in self._attention],
            where=f"slot {slot!r}",
        )
        for layer, (block, loras) in layers.items():
            self._ffns[layer].slots[slot] = block
            for proj, lora in zip(self._attention[layer], loras, strict=False):
                proj.slots[slot] = lora  # (no LoRAs without attention_lora)
        self._configs[slot] = config
        self._contexts[slot] = context
        self._views[slot] = view = self._build_view(slot)
        for name, param in view.named_parameters():
            param.requires_grad_(is_adapter_name(name))
        if generator is None:
            if seed is None:
                seed = int(torch.randint(0, 2**62, ()).item())
            device = next(iter(self.model.parameters())).device
            generator = torch.Generator(device=device).manual_seed(seed)
        self._generators[slot] = generator
        use_generator_dropout(view, generator)

    def remove(self, slot: str) -> None:
        """Take ``slot`` out of the pack at once: its modules leave the model, the other slots
        are untouched."""
        self._known(slot)
        if self._layout.rows is not None and slot in dict(self._layout.rows):
            raise RuntimeError(f"slot {slot!r}: in the current layout; remove it outside it")
        for site in self._sites():
            if slot in site.slots:
                del site.slots[slot]
        for store in (self._configs, self._contexts, self._generators, self._views):
            del store[slot]

    # Layout ------------------------------------------------------------------------------------

    @contextmanager
    def layout(self, rows: Mapping[str, int]) -> Iterator[Pack]:
        """Within this block the packed batch is ``rows``' slots' rows, in this order.

        Args:
            rows: slot id -> number of consecutive rows (batch entries); slots left out have none.
        """
        for slot, n in rows.items():
            self._known(slot)
            if not isinstance(n, int) or n < 0:
                raise ValueError(f"layout: slot {slot!r} needs a row count >= 0 (got {n!r})")
        previous, self._layout.rows = self._layout.rows, list(rows.items())
        try:
            yield self
        finally:
            self._layout.rows = previous

    @contextmanager
    def alone(self, slot: str) -> Iterator[Pack]:
        """Within this block every row of any batch is ``slot``'s, whatever the batch size (the
        prompt and candidate passes of an evaluation differ): the model computes what ``slot``'s
        adapter alone computes, and the other slots compute nothing. The output of a training
        forward carries ``slot``'s ``aux_losses`` and ``aux_loss`` as that adapter's model alone
        does (``graphlora.inject``), besides ``slot_aux_losses`` and ``slot_aux_loss``."""
        with self.layout({slot: 1}):  # split in proportion, one slot takes every row
            yield self

    def split(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each slot's rows of a packed ``tensor`` (dim 0 is the batch), under the current
        layout; slots without rows are left out."""
        return dict(self._layout.split(tensor))

    # Per-slot adapter --------------------------------------------------------------------------

    def adapter(self, slot: str) -> nn.Module:
        """``slot`` as an ordinary adapter model (module docstring): the pack's modules (not
        copies) under the names a model carrying only that adapter has, and
        ``graphlora_config``; not for a forward pass."""
        return self._views[self._known(slot)]

    def parameters(self, slot: str) -> list[nn.Parameter]:
        """``slot``'s trainable parameters (for its own optimizer)."""
        return [p for n, p in self.adapter(slot).named_parameters() if is_adapter_name(n)]

    def state_dict(self, slot: str) -> dict[str, torch.Tensor]:
        """``slot``'s adapter weights and graph, keyed as ``adapter_state_dict`` keys them on a
        model carrying only that adapter."""
        return adapter_state_dict(self.adapter(slot))

    def save_adapter(
        self, slot: str, path: str | Path, metadata: dict[str, Any] | None = None
    ) -> Path:
        """Save ``slot`` as an ordinary adapter folder (``adapter_io.save_adapter``), which
        ``load_adapter`` injects into a fresh base model."""
        return save_adapter(self.adapter(slot), path, metadata)

    def load_adapter(self, slot: str, path: str | Path, *, seed: int | None = None) -> None:
        """Add slot ``slot`` from an adapter folder written by ``save_adapter``."""
        config, meta = read_adapter_config(path)
        if meta.get("head"):
            raise ValueError(f"{path}: an encoder's scoring head cannot be packed")
        self.add(slot, config, seed=seed)
        try:
            load_adapter_weights(self.adapter(slot), path)
        except Exception:
            self.remove(slot)
            raise

    # Losses and load ---------------------------------------------------------------------------

    def collect_aux_losses(self, clear: bool = True) -> dict[str, dict[str, torch.Tensor]]:
        """Per slot, its unweighted auxiliary losses of the last training forward, averaged over
        its MoE layers (``collect_aux_losses`` of the slot alone); slots without any are left
        out."""
        out = {}
        for slot, view in self._views.items():
            aux = collect_aux_losses(view, clear=clear)
            if aux:
                out[slot] = aux
        return out

    def weighted_aux_loss(self, slot: str, aux: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """``slot``'s auxiliary losses ``aux`` weighted with its own coefficients."""
        return weighted_aux_loss(aux, self.config(slot))

    def reset_load(self, slot: str | None = None) -> None:
        """Reset the cumulative load c and routing counts of ``slot`` (None: every slot)."""
        for s in self.slots if slot is None else (self._known(slot),):
            reset_load_state(self._views[s])

    def routing_counts(self, slot: str) -> list[list[float]]:
        """``slot``'s routing counts per MoE layer (``graphlora.inject.routing_counts``)."""
        return routing_counts(self.adapter(slot))

    # Internals ---------------------------------------------------------------------------------

    def _known(self, slot: str) -> str:
        if slot not in self._configs:
            raise KeyError(f"slot {slot!r}: not in the pack (slots: {list(self._configs)})")
        return slot

    def _sites(self) -> Iterator[PackedFFN | PackedLoRALinear]:
        yield from self._ffns
        for projections in self._attention:
            yield from projections

    def _build_view(self, slot: str) -> nn.Module:
        view = nn.Module()
        view.graphlora_config = self._configs[slot]
        view.graphlora_context = self._contexts[slot]
        for name, module in self.model.named_modules():  # model order: layer by layer
            if isinstance(module, (PackedFFN, PackedLoRALinear)) and slot in module.slots:
                _place(view, name, module.slots[slot])
        return view

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._layout.current()  # no layout: say so before the model runs
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]
        spans = self._layout.spans(mask.shape[0]) if mask is not None else []
        for context in self._contexts.values():
            context.attention_mask = None
        for slot, start, n in spans:
            self._contexts[slot].attention_mask = mask.narrow(0, start, n)

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> Any:
        for context in self._contexts.values():
            context.attention_mask = None
        if not hasattr(output, "keys"):
            return output  # the blocks keep their losses for collect_aux_losses
        aux = self.collect_aux_losses()
        if aux:
            output["slot_aux_losses"] = aux
            output["slot_aux_loss"] = {s: self.weighted_aux_loss(s, a) for s, a in aux.items()}
        rows = self._layout.rows or []
        if len(rows) == 1 and rows[0][0] in aux:  # one slot's batch: as its adapter alone
            output["aux_losses"] = aux[rows[0][0]]
            output["aux_loss"] = output["slot_aux_loss"][rows[0][0]]
        return output


def inject_packed(
    model: nn.Module,
    configs: Mapping[str, MoELoRAConfig] | Sequence[MoELoRAConfig] = (),
    *,
    seeds: Mapping[str, int] | None = None,
) -> Pack:
    """Prepare ``model`` to carry several adapters at once and add ``configs`` as its slots.

    Every FFN site and attention projection is wrapped in place (module docstring) and every
    parameter of the model is frozen. A forward must run inside ``pack.layout``; its output then
    carries, for slots with auxiliary losses, the unweighted ones (``slot_aux_losses``) and their
    weighted sum (``slot_aux_loss``), keyed by slot. The output's own ``loss`` (when labels are
    passed) is the base model's task loss over the whole packed batch, with no auxiliary loss: a
    slot's loss is its rows' task loss plus its ``slot_aux_loss``.

    Args:
        model: a base model without an adapter.
        configs: slot id -> config; a sequence gets ids "0", "1", ...
        seeds: slot id -> seed of its dropout generator (see ``Pack.add``).

    Returns:
        The ``Pack``; ``model.graphlora_pack`` refers to it as well.

    Raises:
        ValueError: the model already carries an adapter or a pack.
        UnsupportedModelError: no FFN was found, or a slot asks for attention LoRA on a layer
            without attention projections the adapter knows.
    """
    require_bare_model(model)
    sites = require_ffns(model)
    # Found before anything is replaced:
    attention = [attention_projections(model, site) for site in sites]
    pack = Pack(model)
    for site, projections in zip(sites, attention, strict=True):
        ffn = frozen_ffn(model, site)
        packed = PackedFFN(pack._layout, ffn).train(ffn.module.training)
        replace_ffn(model, site, packed)
        pack._ffns.append(packed)
        wrapped = []
        for proj in projections:
            base = model.get_submodule(proj)
            wrapped.append(PackedLoRALinear(base, pack._layout).train(base.training))
            replace_module(model, proj, wrapped[-1])
        pack._attention.append(wrapped)
    for param in model.parameters():
        param.requires_grad_(False)
    model.graphlora_pack = pack
    model.graphlora_pack_hooks = [
        model.register_forward_pre_hook(pack._before_forward, with_kwargs=True),
        model.register_forward_hook(pack._after_forward),
    ]
    items = configs.items() if isinstance(configs, Mapping) else enumerate(configs)
    for slot, config in items:
        slot = str(slot)
        pack.add(slot, config, seed=None if seeds is None else seeds.get(slot))
    return pack
