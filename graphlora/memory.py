"""What a trial needs in memory, from the model's config alone (no weights loaded), and whether
it needs gradient checkpointing to fit (``graphlora.recompute``).

``plan_memory`` adds up a training step's peak: the frozen weights in their dtype, the adapter's
parameters, their gradients and AdamW's two fp32 states, each layer's saved activations (kept
for the backward, or with checkpointing only each layer's input plus one layer recomputed at a
time), and the output head's logits, which the training loss computes at labelled positions
only (``graphlora.run.labelled_forward``). ``decide_checkpointing`` answers
``gradient_checkpointing: auto`` for a memory budget; ``resolve_checkpointing`` does it for a
run's ``TrainConfig`` (what a search's preflight calls before it launches trials).

``measure_step`` runs one real training step (forward, backward, optimizer step) of the real
modules and tracks its tensors with ``torch.distributed._tools.mem_tracker.MemTracker``: on real
CPU tensors for small models, on fake tensors (``FakeTensorMode``, nothing allocated) for
Qwen2-7B's and Llama-3-8B's configurations, which ship with graphlora (``SHIPPED_CONFIGS``), so
the plan can be checked offline. ``benchmarks/memory_plan.py`` prints both side by side.
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, PretrainedConfig

from graphlora.config import MoELoRAConfig
from graphlora.models import is_encoder_config, reference_config, resolve_dtype
from graphlora.packing import inject_packed
from graphlora.presets import SHIPPED_CONFIGS, shipped_config
from graphlora.recompute import enable_gradient_checkpointing
from graphlora.run import TrainConfig

__all__ = [
    "GPUS",
    "SHIPPED_CONFIGS",
    "MeasuredStep",
    "MemoryPlan",
    "decide_checkpointing",
    "measure_step",
    "model_config",
    "plan_memory",
    "resolve_checkpointing",
    "trial_shape",
]

GiB = 2**30

GPUS = {
    "A10G 24GB": 24e9,
    "L4 24GB": 24e9,
    "A100 40GB": 40e9,
    "A100 80GB": 80e9,
    "H100 80GB": 80e9,
}
"""Memory of common GPUs in bytes, as sold (decimal GB). Usable memory is less: the CUDA context
and the allocator's fragmentation take some (``decide_checkpointing``'s ``headroom``)."""


def model_config(model: str | PretrainedConfig, *, revision: str | None = None) -> PretrainedConfig:
    """The config of a model reference without loading weights: a shipped one
    (``SHIPPED_CONFIGS``), else ``graphlora.models.reference_config`` (presets, packaged and
    local folders, the Hub)."""
    if isinstance(model, PretrainedConfig):
        return model
    if model in SHIPPED_CONFIGS:
        return shipped_config(model)
    return reference_config(model, revision=revision)


@dataclass
class MeasuredStep:
    """Peak tensor memory of one measured training step (``measure_step``), in bytes, by
    MemTracker's categories.

    Attributes:
        peak: the step's peak, everything resident included (weights, optimizer states).
        breakdown: MemTracker's categories at that peak (Parameter, Buffer, Gradient,
            Activation, Temp, Optstate, Other).
        layers: transformer layers of the measured model.
        fake: measured on fake tensors (nothing allocated).
    """

    peak: int
    breakdown: dict[str, int]
    layers: int
    fake: bool


class _NoHook:
    """A hook handle with nothing to remove."""

    def remove(self) -> None:
        pass


def _build(config: PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    auto = AutoModel if is_encoder_config(config) else AutoModelForCausalLM
    return auto.from_config(config, dtype=dtype)


def _step_batch(
    config: PretrainedConfig, rows: int, length: int, labelled: int | None
) -> dict[str, torch.Tensor]:
    """``rows`` sequences of ``length`` tokens; the last ``labelled`` positions of each row
    predicted (None: every position, as ``train_on_prompt``)."""
    ids = torch.randint(0, config.get_text_config().vocab_size, (rows, length))
    labels = ids.clone()
    if labelled is not None:
        labels[:, : length - labelled] = -100
    # No padding, so no mask: which tokens a mask keeps is data the fake tensors do not hold.
    return {"input_ids": ids, "attention_mask": None, "labels": labels}


def measure_step(
    model: str | PretrainedConfig,
    adapter: MoELoRAConfig,
    *,
    batch_size: int,
    max_length: int,
    dtype: str | torch.dtype = "bfloat16",
    gradient_checkpointing: bool = False,
    adapters: int = 1,
    labelled_per_row: int | None = None,
    layers: int | None = None,
    fake: bool = True,
    attn_implementation: str = "sdpa",
) -> MeasuredStep:
    """Peak memory of one training step of the real modules: ``adapters`` copies of
    ``adapter`` packed over the base (``inject_packed``), ``batch_size`` rows of ``max_length``
    tokens each, forward, loss (cross-entropy at labelled positions plus the weighted auxiliary
    losses), backward and AdamW step. A first step creates the optimizer states; the second is
    measured, as every step after the first runs.

    Args:
        model: a model reference or config (see ``model_config``).
        adapter: the adapter of every slot.
        batch_size: rows per slot per step.
        max_length: tokens per row (every row full).
        dtype: the frozen weights' dtype.
        gradient_checkpointing: recompute every layer in the backward.
        adapters: slots packed over the base.
        labelled_per_row: predicted positions per row (None: all, as ``train_on_prompt``).
        layers: build only this many transformer layers (the rest of the config as given).
        fake: run on fake tensors (``FakeTensorMode``: shapes only, nothing allocated; the
            only way to step a 7B model on a laptop); else on real CPU tensors.
        attn_implementation: transformers' attention (``sdpa``; ``eager`` keeps the attention
            probabilities, heads x length^2, for the backward).

    An encoder (MiniLM, BERT) has no output head here: its loss is the mean square of its last
    hidden states plus the auxiliary losses, so only its body's memory is measured.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    config = copy.deepcopy(model_config(model))
    if layers is not None:
        config.num_hidden_layers = layers
    config._attn_implementation = attn_implementation
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with mode:
        torch.manual_seed(0)
        base = _build(config, resolve_dtype(dtype))
        slots = [str(i) for i in range(adapters)]
        pack = inject_packed(base, {s: adapter for s in slots}, seeds=dict.fromkeys(slots, 0))
        if gradient_checkpointing:
            enable_gradient_checkpointing(base)
        base.train()
        optimizers = [torch.optim.AdamW(pack.parameters(s), lr=1e-4) for s in slots]
        batch = _step_batch(config, batch_size * adapters, max_length, labelled_per_row)
        encoder = is_encoder_config(config)

        def step() -> None:
            rows = dict.fromkeys(slots, batch_size)
            with pack.layout(rows):
                if encoder:
                    out = base(input_ids=batch["input_ids"])
                    per_slot = pack.split(out.last_hidden_state)
                    task = {s: h.float().pow(2).mean() for s, h in per_slot.items()}
                else:
                    # The head at the last k positions of each row, which are the labelled ones:
                    # labelled_forward's boolean pick is data that fake tensors do not hold.
                    k = labelled_per_row or 0
                    out = base(input_ids=batch["input_ids"], use_cache=False, logits_to_keep=k)
                    target = batch["labels"][:, -k:] if k else batch["labels"]
                    logits = out.logits.flatten(0, 1).float()  # (rows x k, vocab)
                    task = {"": F.cross_entropy(logits, target.reshape(-1))}
            aux = out.get("slot_aux_loss") or {}
            loss = sum(task.values()) + sum(a for a in aux.values())
            loss.backward()
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)

        # AdamW creates its states at its first step: take one on zero gradients, so that the
        # measured step runs as every step after the first, without a second forward.
        for opt in optimizers:
            for group in opt.param_groups:
                for param in group["params"]:
                    param.grad = torch.zeros_like(param)
            opt.step()
            opt.zero_grad(set_to_none=True)
        tracker = MemTracker()
        # MemTracker hooks every parameter's gradient, and a frozen one refuses hooks: mark the
        # frozen ones as hooked already (they get no gradient to track).
        for param in base.parameters():
            if not param.requires_grad:
                tracker._param_to_grad_hook_handles[param] = (_NoHook(), _NoHook())
        tracker.track_external(base, *optimizers)
        with tracker:
            step()
        snapshot = tracker.get_tracker_snapshot("peak")
    total: dict[str, int] = {}
    for device_snap in snapshot.values():
        for key, value in device_snap.items():
            total[key] = total.get(key, 0) + value
    peak = total.pop("Total", sum(total.values()))
    return MeasuredStep(peak, total, config.num_hidden_layers, fake)


@dataclass
class MemoryPlan:
    """A training step's planned peak memory, in bytes, by what holds it (``plan_memory``).

    Attributes:
        weights: the frozen base model in its dtype, and its buffers.
        adapter: the adapters' trainable parameters (fp32).
        gradients: their gradients (fp32).
        optimizer: AdamW's two fp32 states per trainable parameter.
        activations: what the step keeps for the backward at its peak: every layer's saved
            tensors (with checkpointing: every layer's input and one layer recomputed), the
            largest layer's transient tensors, the embeddings and the final norm.
        logits: the output head's logits at the labelled positions, with the loss's fp32 copies.
        per_layer: one layer's saved tensors without checkpointing, and their parts
            (``attention``, ``router``, ``experts``, ``norms``), for ``describe``.
        per_layer_checkpointed: what one layer keeps with checkpointing (its input).
        transient: the largest tensors alive inside one layer's forward besides its saved ones.
        layers, tokens, gradient_checkpointing, adapters: the shape planned.
    """

    weights: int
    adapter: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    per_layer: dict[str, int]
    per_layer_checkpointed: int
    transient: int
    layers: int
    tokens: int
    gradient_checkpointing: bool
    adapters: int
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """The planned peak: everything above at once."""
        return (
            self.weights
            + self.adapter
            + self.gradients
            + self.optimizer
            + self.activations
            + self.logits
        )

    def fits(self, budget: float, headroom: float = 0.9) -> bool:
        """Whether the peak fits ``headroom`` of ``budget`` bytes (the rest: the CUDA context,
        the allocator's fragmentation)."""
        return self.total <= budget * headroom

    def describe(self) -> str:
        """The plan as a table, in GiB."""
        ckpt = "on" if self.gradient_checkpointing else "off"
        rows = [
            ("frozen weights", self.weights),
            ("adapter parameters (fp32)", self.adapter),
            ("gradients (fp32)", self.gradients),
            ("AdamW states (2 x fp32)", self.optimizer),
            (f"activations ({self.layers} layers, checkpointing {ckpt})", self.activations),
            ("  one layer, kept for the backward", self.per_layer["total"]),
            *[(f"    {k}", v) for k, v in self.per_layer.items() if k != "total"],
            ("  one layer's input (checkpointing)", self.per_layer_checkpointed),
            ("  transient inside one layer", self.transient),
            ("logits at labelled positions", self.logits),
            ("planned peak", self.total),
        ]
        width = max(len(name) for name, _ in rows)
        head = f"memory plan: {self.adapters} adapter(s), {self.tokens} tokens per step per adapter"
        lines = [head] + [f"{name:<{width}}  {value / GiB:9.3f} GiB" for name, value in rows]
        return "\n".join(lines + self.notes)

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "notes"}
        return json.loads(json.dumps({**out, "total": self.total}))


def _dtype_bytes(dtype: str | torch.dtype) -> int:
    resolved = resolve_dtype(dtype)
    return torch.empty((), dtype=resolved, device="meta").element_size()


def _base_dropout(config: PretrainedConfig) -> bool:
    """Whether the base model drops out hidden states in training (BERT, GPT-2, OPT)."""
    keys = ("hidden_dropout_prob", "resid_pdrop", "dropout")
    return any(float(getattr(config, key, 0.0) or 0.0) > 0 for key in keys)


def activation_saves(act: nn.Module) -> float:
    """How many input-sized tensors the activation keeps for the backward: 1 for SiLU or the
    exact GELU (their input), about 4 for GPT-2's tanh GELU written in Python. Measured on a
    small real tensor, whatever the activation is."""
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with contextlib.ExitStack() as stack:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        stack.enter_context(unset_fake_temporarily())
        x = torch.randn(64, 64, requires_grad=True) * 1.0  # not a leaf: saved like a hidden
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t))
        act(x)
    return sum(saved.values()) / x.untyped_storage().nbytes()


def _router_bytes(block: nn.Module, d: int, a: float) -> float:
    """fp32 bytes a block's router keeps per token (``graphlora.routers``): the token's fp32
    copy, and for the graph router its GCN's node tensors, (N+1) x d_gcn per layer, with ``a``
    input-sized tensors kept by each activation."""
    from graphlora.routers import GraphRouter

    router, n, k = block.router, block.num_experts, block.top_k
    if router is None:
        return 0
    extras = 16 * n + 12 * k  # top-k indices and weights, the Poisson loss's sorted copy
    if not isinstance(router, GraphRouter):
        return 4 * (d + n) + extras
    g, layers = router.gcn_hidden, len(router.router_gcn_weights)
    token = (a + 1) * g  # act(P h) and its output
    first = a * (n + 1) * g + (n * g if router.expert_features == "token" else 0)
    middle = max(0, layers - 2) * (1 + a) * (n + 1) * g  # matmul output, activation
    last = (2 + a) * n * g if layers >= 2 else n * g  # matmul output, activation, its output
    return 4 * (d + token + first + middle + last) + extras


def _expert_bytes(block: nn.Module, d: int, b: int, dropout: bool) -> tuple[float, float]:
    """Bytes per token a block keeps for the backward (its experts' activations), and the
    largest transient tensors of its forward (the frozen products and their dispatched copies),
    both in the model's dtype of ``b`` bytes (``graphlora.moe.MoELoRABlock.forward``)."""
    from graphlora.moe import MoELoRAMLP

    n, k, inter = block.num_experts, block.top_k, block.lora_A_down.shape[-1]
    gated = isinstance(block, MoELoRAMLP)
    a = activation_saves(block.act)
    drop = 2 if dropout else 0  # the LoRA dropout's mask and output, before A_down
    mask = d if dropout else 0  # the LoRA dropout's mask on the block's input
    if k < n:  # dispatched: per (token, slot) the expert's hidden (gated: the activation's
        # input, both projections, their product) and its weighting, and two d-sized tensors
        # (its input rows, its down delta)
        per_slot = a + (3 if gated else 1) + drop
        saved = b * (mask + k * (2 * d + per_slot * inter))
        transient = b * inter * ((2 if gated else 1) + 3 * k)
    else:  # dense: every expert on every token, in order
        per_expert = a + (3 if gated else 1) + drop
        saved = b * (mask + d + n * (d + per_expert * inter))
        transient = b * inter * ((2 if gated else 1) + n)
    return saved, transient


def plan_memory(
    model: str | PretrainedConfig,
    adapter: MoELoRAConfig,
    *,
    batch_size: int,
    max_length: int,
    dtype: str | torch.dtype = "bfloat16",
    gradient_checkpointing: bool = False,
    adapters: int = 1,
    labelled_per_row: int | None = None,
) -> MemoryPlan:
    """Plan a training step's peak memory from the model's config alone.

    The adapter is built around a fake-tensor copy of the model (``FakeTensorMode``: shapes
    only, a few seconds for a 7B model, nothing allocated), which counts the frozen and
    trainable parameters exactly and gives each MoE layer's experts, top-k and router; the
    activations follow from those shapes (``MemoryPlan``'s fields say what each holds).

    Args:
        model: a model reference (``SHIPPED_CONFIGS``, presets, packaged, local or Hub) or its
            config.
        adapter: the adapter of every slot.
        batch_size: rows per adapter per step (``TrainConfig.batch_size`` / ``grad_accum``).
        max_length: tokens per row (``TrainConfig.max_length``: the plan assumes full rows).
        dtype: the frozen weights' dtype; activations are in it too (bf16 on a GPU).
        gradient_checkpointing: plan with every layer recomputed in the backward.
        adapters: slots packed over the base (``PackedTrainer``).
        labelled_per_row: predicted positions per row (the answer's tokens); None plans every
            position, as ``train_on_prompt`` does.

    Attention is planned as PyTorch's fused ``sdpa`` keeps it (queries, keys and values with
    the key/value heads expanded to every head, its output, the causal mask); ``eager``
    attention would keep heads x length^2 more per row.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from graphlora.inject import inject_adapter, moe_blocks
    from graphlora.moe import MoELoRAMLP

    config = model_config(model)
    text = config.get_text_config()
    b = _dtype_bytes(dtype)
    d, heads = text.hidden_size, text.num_attention_heads
    with FakeTensorMode(allow_non_fake_inputs=True):
        base = _build(config, resolve_dtype(dtype))
        frozen = sum(p.numel() * p.element_size() for p in base.parameters())
        frozen += sum(t.numel() * t.element_size() for t in base.buffers())
        inject_adapter(base, adapter)
        trainable = sum(p.numel() for p in base.parameters() if p.requires_grad)
        blocks = moe_blocks(base)
    layers = text.num_hidden_layers
    rows = batch_size * adapters
    tokens = rows * max_length  # every adapter's rows
    encoder = is_encoder_config(config)
    # Gated-FFN decoders (Llama, Qwen2, Mistral) normalise with RMSNorm, the others LayerNorm.
    rms = not encoder and any(isinstance(block, MoELoRAMLP) for block in blocks)
    dropout = adapter.dropout > 0

    # Per token of one layer: two norms (RMSNorm keeps an fp32 copy of its input, LayerNorm
    # its input), the attention LoRAs (dropout mask and output each), sdpa's tensors.
    norms = 2 * 4 * d if rms else 2 * (d * b + 8)
    lora = (8 if dropout else 2) * d * b if adapter.attention_lora else 0
    attention = 4 * d * b + 4 * heads + max_length * b + lora
    attention += 2 * d if _base_dropout(text) else 0  # boolean masks of the base's dropout
    per_token = []
    transients = []
    parts = {"attention": 0, "router": 0, "experts": 0, "norms": 0}
    for block in blocks:
        router = _router_bytes(block, d, activation_saves(block.act))
        experts, transient = _expert_bytes(block, d, b, dropout)
        per_token.append(attention + norms + router + experts)
        transients.append(transient)
        for key, value in (("attention", attention), ("router", router), ("experts", experts)):
            parts[key] = max(parts[key], value * tokens)
        parts["norms"] = norms * tokens
    # Layers without a block (target_layers) keep their attention and norms.
    per_token += [attention + norms] * (layers - len(blocks))
    per_layer = max(per_token) * tokens
    transient = max(transients, default=0) * batch_size * max_length  # one slot at a time
    layer_input = d * b * tokens
    # The embeddings' output (every layer's input chain starts there) and the final norm.
    outside = layer_input + (4 * d if rms else d * b) * tokens
    if gradient_checkpointing:
        # Every layer's input, then in the backward one layer recomputed with its transient
        # tensors and the gradients flowing through it (a few hidden-sized tensors).
        activations = layers * layer_input + per_layer + transient + 4 * layer_input + outside
    else:
        activations = sum(per_token) * tokens + transient + outside
    labelled = max_length if labelled_per_row is None else labelled_per_row
    vocab = 0 if encoder else text.vocab_size
    logits = rows * labelled * vocab * (b + 8)  # the logits, their fp32 copy, log-softmax
    notes = [
        f"(model {model if isinstance(model, str) else config.model_type}: {frozen / GiB:.2f}"
        f" GiB frozen in {resolve_dtype(dtype)}, {trainable:,} trainable parameters per "
        "adapter; attention planned as sdpa keeps it)"
    ]
    return MemoryPlan(
        weights=frozen,
        adapter=4 * trainable * adapters,
        gradients=4 * trainable * adapters,
        optimizer=8 * trainable * adapters,
        activations=int(activations),
        logits=int(logits),
        per_layer={"total": per_layer, **parts},
        per_layer_checkpointed=layer_input,
        transient=int(transient),
        layers=layers,
        tokens=batch_size * max_length,
        gradient_checkpointing=gradient_checkpointing,
        adapters=adapters,
        notes=notes,
    )


def decide_checkpointing(
    model: str | PretrainedConfig,
    adapter: MoELoRAConfig,
    *,
    budget: float | None,
    headroom: float = 0.9,
    **shape,
) -> bool:
    """``gradient_checkpointing: auto`` for a device of ``budget`` bytes: off when the step
    fits ``headroom`` of it without checkpointing, else on (whether or not it then fits: see
    ``plan_memory(...).fits``). No budget (unknown): off, the library's reading of "auto".

    Args:
        model, adapter: as ``plan_memory``.
        budget: bytes of the device (``torch.cuda.get_device_properties(i).total_memory``,
            ``GPUS``), or None.
        headroom: the share of ``budget`` a step may take.
        **shape: ``plan_memory``'s keyword arguments (batch_size, max_length, dtype, adapters,
            labelled_per_row).
    """
    if budget is None:
        return False
    shape.pop("gradient_checkpointing", None)
    plan = plan_memory(model, adapter, gradient_checkpointing=False, **shape)
    return not plan.fits(budget, headroom)


def trial_shape(train_cfg: TrainConfig, *, adapters: int = 1) -> dict:
    """``plan_memory``'s shape arguments for a run of ``train_cfg`` on a GPU: its micro-batch
    (``batch_size / grad_accum`` rows), ``max_length``, its weights' dtype (``auto``: bf16) and
    checkpointing (``auto`` planned off), ``adapters`` packed."""
    dtype = "bfloat16" if train_cfg.dtype == "auto" else train_cfg.dtype
    return dict(
        batch_size=max(1, train_cfg.batch_size // train_cfg.grad_accum),
        max_length=train_cfg.max_length,
        dtype=dtype,
        gradient_checkpointing=train_cfg.gradient_checkpointing is True,
        adapters=adapters,
    )


def resolve_checkpointing(
    train_cfg: TrainConfig,
    adapter: MoELoRAConfig,
    *,
    budget: float | None,
    adapters: int = 1,
    labelled_per_row: int | None = None,
    headroom: float = 0.9,
) -> bool:
    """The ``gradient_checkpointing`` a run of ``train_cfg`` trains with on a device of
    ``budget`` bytes: its own value when true or false; for ``"auto"``,
    ``decide_checkpointing`` on the run's shape (``trial_shape``; no budget: off)."""
    if train_cfg.gradient_checkpointing != "auto":
        return bool(train_cfg.gradient_checkpointing)
    shape = trial_shape(train_cfg, adapters=adapters)
    return decide_checkpointing(
        train_cfg.model,
        adapter,
        budget=budget,
        headroom=headroom,
        labelled_per_row=labelled_per_row,
        **shape,
    )
