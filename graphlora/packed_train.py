"""The training loop: one run, or several runs over one frozen base model at once (docs/method.md,
"Packing several adapters over one base").

``PackedTrainer`` loads the base once and trains its runs, the slots, side by side
(``graphlora.packing``): each step is one forward and one backward of the base over the packed
batch, the slots' rows concatenated. ``run_training`` (``graphlora.train``) is a trainer of one
slot. Every slot keeps its own ``graphlora.run.RunState``: its optimizer and learning-rate
schedule, its data order, its dropout generator, its evaluation schedule, its metrics, its
checkpoints. A slot's loss is its rows' task loss plus its own weighted auxiliary loss; the
slots' parameters are disjoint and the base is frozen, so the backward of the sum gives each slot
the gradients of its own loss. A slot therefore computes what ``run_training`` computes for the
same configuration and seed, to float rounding, whoever its neighbours are.

A host drives it step by step::

    trainer = PackedTrainer(first_cfg)           # the base model and the data, once
    trainer.add("t1", cfg1, adapter1, on_eval=report)
    trainer.add("t2", cfg2, adapter2)
    while trainer.slots:
        for result in trainer.step():            # slots that finished in this step
            ...
        if room_for_another: trainer.add("t3", cfg3, adapter3)   # joins mid-way

Slots may differ in everything a run sets but what the packed batch shares
(``SHARED_FIELDS``: the model, the data, the sequence length, the batch and the numerics).

Two things stay outside the guarantee, as in ``graphlora.packing``. The base model's own dropout
would draw from torch's global RNG over the whole packed batch, so the trainer refuses a base
that has any unless told to turn it off. And rows padded wider than they would be alone move the
base's hidden states by float rounding (about 1e-7), enough to flip a near-tie in top-k routing;
the slots' rows are padded to the widest slot's width in each step, so slots match their runs
alone to 1e-5 where their batches have the same width (the ``synthetic`` task's do).

Data parallelism packs too: on several ``torch.distributed`` ranks (initialised by Ray Train,
torchrun or the caller), every rank holds the same slots, added and stopped in the same order,
and trains its shard of each slot's batch; the slots' gradients are averaged in one all-reduce per
step (the adapters are small, and top-k routing can leave an expert unused on one rank, which
DDP's bucketed reducer does not allow); a non-finite loss on any rank ends the slot on all of
them; evaluation counts are summed over the ranks, so every rank reports the same metrics; rank 0
alone writes checkpoints and adapters.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from graphlora.config import MoELoRAConfig
from graphlora.data import load_task
from graphlora.encoder import HEAD_ATTR, attach_head, option_forward, option_loss
from graphlora.evaluate import EvalResult, pad_batch
from graphlora.examples import DatasetSplits, Example
from graphlora.models import load_model_and_tokenizer
from graphlora.packing import inject_packed
from graphlora.recompute import enable_gradient_checkpointing
from graphlora.run import (
    NonFiniteLossError,
    OnEval,
    OnStep,
    RunState,
    TrainConfig,
    all_reduce_sum,
    bf16_enabled,
    dropout_generator,
    encode_train,
    evaluate_sharded,
    labelled_forward,
    log_rank0,
    micro_batch,
    non_finite_message,
    pick_device,
    rank_and_world,
    run_shape,
    seed_everything,
)

__all__ = [
    "SHARED_FIELDS",
    "PackedTrainer",
    "SlotResult",
    "base_dropout",
    "packing_problem",
    "run_packed",
]

SHARED_FIELDS = (
    "model",
    "model_revision",
    "dataset",
    "data_dir",
    "max_length",
    "batch_size",
    "grad_accum",
    "train_on_prompt",
    "dtype",
    "bf16",
    "device",
    "gradient_checkpointing",
)
"""``TrainConfig`` fields every slot of a packed trainer shares: one base model and one data set,
one packed batch of ``batch_size`` rows per slot, one numeric setting. Every other field
(seed, steps, learning rate and schedule, evaluation, output...) is the slot's own."""


@dataclass
class SlotResult:
    """How a slot ended.

    Attributes:
        slot: its id.
        metrics: what ``run_training`` returns for the run (final metrics, test split included);
            for a slot ended by ``error``, its last evaluation's metrics (empty before one).
        error: why it ended before its last step (a ``NonFiniteLossError``), or None.
    """

    slot: str
    metrics: dict[str, float]
    error: Exception | None = None


@dataclass
class _Slot:
    train_cfg: TrainConfig
    adapter_cfg: MoELoRAConfig
    run: RunState
    metadata: dict = field(default_factory=dict)
    on_eval: OnEval | None = None
    on_step: OnStep | None = None
    checkpoint: bool = False


def base_dropout(model: nn.Module) -> list[str]:
    """Where ``model`` drops out at random in training mode: its ``nn.Dropout`` modules with a
    rate above 0, and its config's dropout rates above 0 (some models apply those with
    ``F.dropout``: OPT). Empty for Qwen2 and Llama, which ship with none."""
    found = [
        f"{name} (p={m.p})"
        for name, m in model.named_modules()
        if isinstance(m, nn.Dropout) and m.p > 0
    ]
    config = getattr(model, "config", None)
    return found + [f"config.{rate}" for rate in _config_dropout(config)]


def _config_dropout(config) -> list[str]:
    """``key=value`` of a model config's dropout rates above 0 (none for a missing config)."""
    return [
        f"{key}={value}"
        for key, value in (config.to_dict() if config is not None else {}).items()
        if "drop" in key and isinstance(value, int | float) and not isinstance(value, bool)
        if value > 0
    ]


def packing_problem(model: str, *, revision: str | None = None) -> str | None:
    """Why a ``PackedTrainer`` would refuse ``model`` (an encoder, or a base with dropout), read
    from its config without loading weights; None when it packs. For a caller that must refuse
    before any work starts (a search with trial hosts).

    Raises:
        ModelLoadError: the reference cannot be resolved.
    """
    from graphlora.models import is_encoder_config, reference_config

    config = reference_config(model, revision=revision)
    if is_encoder_config(config):
        return (
            f"model {model!r} is an encoder, which trains through a scoring head that cannot be "
            "packed; pack a decoder (causal LM)"
        )
    dropout = _config_dropout(config)
    if dropout:
        return (
            f"model {model!r}: the base model has dropout ({', '.join(dropout[:3])}), drawn "
            "over the whole packed batch, so a packed run's masks would depend on the others; "
            "pack a model without (Qwen2, Llama, Mistral)"
        )
    return None


def _check_options(dataset: str, data: DatasetSplits) -> None:
    """An encoder scores option texts: refuse a task whose examples list none (BoolQ)."""
    for split in ("train", "validation", "test"):
        for i, ex in enumerate(getattr(data, split)):
            if not ex.options or ex.question is None:
                raise ValueError(
                    f"dataset {dataset!r}: {split} example {i} has no option texts, which an "
                    "encoder scores; use a task that lists its options (ARC, OBQA, SIQA, PIQA, "
                    "WinoGrande) or a decoder model"
                )


class PackedTrainer:
    """Trains runs (slots) over one frozen base model, one packed forward and backward per step;
    each slot computes what ``run_training`` computes for its configuration alone.

    Args:
        base: settings of the base model and the data (``SHARED_FIELDS``); every slot's
            ``TrainConfig`` must agree with it there. Its other fields are not used.
        data: pre-loaded splits (else loaded from ``base.dataset``).
        base_dropout_off: run the base model with its own dropout off (in eval mode, while the
            slots' adapters train). Required for a base that has dropout (GPT-2, OPT, BERT) in a
            trainer of several slots: drawn from torch's global RNG over the packed batch, it
            would make each slot depend on the others. Each slot then equals its configuration
            trained alone with the base's dropout off, which ``run_training`` does not do.
        single: a trainer of one slot at a time (``run_training``'s). It also trains what
            cannot be packed: an encoder (MiniLM, BERT), through a scoring head trained and saved
            with the adapter (``graphlora.encoder``), on tasks that list option texts; and a base
            with dropout of its own, which draws from torch's global RNG, seeded with the run's
            seed when the slot is added.

    Raises:
        ValueError: the base is an encoder or has dropout (without ``base_dropout_off``) and
            ``single`` is False, an encoder's task lists no option texts, or the data lack a
            train or validation split.

    Under ``torch.distributed`` (module docstring) a slot computes what ``run_training``
    computes for its configuration on the same ranks.

    Attributes:
        pack: the ``Pack`` carrying the slots' adapters.
        model, tokenizer, info: the base model (shared), its tokenizer and ``ModelInfo``.
        base_dropout_off: the base dropout turned off (``base_dropout``'s list), or empty.
        setup_time: seconds spent loading the data and the base model, encoding the data.
        results: slot id -> ``SlotResult`` of every slot that finished or failed.
    """

    def __init__(
        self,
        base: TrainConfig,
        data: DatasetSplits | None = None,
        *,
        base_dropout_off: bool = False,
        single: bool = False,
    ) -> None:
        started = time.perf_counter()
        self.rank, self.world = rank_and_world()
        self.base, self.single = base, single
        self.device = pick_device(base.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.data = data if data is not None else load_task(base.dataset, data_dir=base.data_dir)
        if not self.data.train or not self.data.validation:
            raise ValueError(
                f"dataset {base.dataset!r}: needs non-empty train and validation splits"
            )
        model, self.tokenizer, self.info = load_model_and_tokenizer(
            base.model, revision=base.model_revision, dtype=base.dtype
        )
        self.encoder = self.info.architecture == "encoder"
        if self.encoder and not single:
            raise ValueError(
                f"model {base.model!r}: an encoder trains through a scoring head, which cannot be "
                "packed; train it with run_training, or pack a decoder (causal LM)"
            )
        if self.encoder:
            _check_options(base.dataset, self.data)
        dropout = base_dropout(model)
        if dropout and not base_dropout_off and not single:
            shown = ", ".join(dropout[:3]) + (
                f" and {len(dropout) - 3} more" if len(dropout) > 3 else ""
            )
            raise ValueError(
                f"model {base.model!r}: the base model has dropout ({shown}), drawn from torch's "
                "global RNG over the whole packed batch, so a slot's masks would depend on the "
                "other slots; pass base_dropout_off=True to train with it off, or pack a model "
                "without (Qwen2, Llama: tiny-qwen2, tiny-llama)"
            )
        self.base_dropout_off = dropout if base_dropout_off else []
        if base_dropout_off:
            log_rank0(
                f"[graphlora] packed: the base model's dropout is off ({len(dropout)} site(s) "
                "found); it runs in eval mode while the slots' adapters train, so each slot "
                "trains as its configuration alone with the base dropout off"
            )
        self.pack = inject_packed(model)
        self.model = model.to(self.device)
        if base.gradient_checkpointing is True:
            if base_dropout_off:
                raise ValueError(
                    "gradient_checkpointing: transformers checkpoints a layer only in training "
                    "mode, and base_dropout_off keeps the base in eval mode; turn one of them off"
                )
            enable_gradient_checkpointing(self.model)
        self._base_eval = base_dropout_off  # the base in eval mode, the slots' adapters training
        # A decoder trains on tokenized prompt + answer; an encoder on the examples' texts.
        self.encoded = (
            list(self.data.train)
            if self.encoder
            else encode_train(self.tokenizer, self.data.train, base)
        )
        self.micro, self.per_step = micro_batch(base, self.world)
        self.use_bf16 = bf16_enabled(base, self.device)
        pad = self.tokenizer.pad_token_id
        self.pad = pad if pad is not None else 0
        self._slots: dict[str, _Slot] = {}
        self.results: dict[str, SlotResult] = {}
        self._used: set[str] = set()  # slot ids are unique over the trainer's life
        self.setup_time = time.perf_counter() - started

    # Slots -------------------------------------------------------------------------------------

    @property
    def slots(self) -> tuple[str, ...]:
        """Ids of the slots training now, in the order they joined."""
        return tuple(self._slots)

    def add(
        self,
        slot: str,
        train_cfg: TrainConfig,
        adapter_cfg: MoELoRAConfig,
        *,
        on_eval: OnEval | None = None,
        on_step: OnStep | None = None,
        checkpoint: bool = False,
        resume_from: str | Path | None = None,
    ) -> None:
        """Add a run as slot ``slot``; it trains from the next ``step`` on. The other slots are
        untouched, whether they are at their first step or their last.

        The run starts as ``run_training`` starts it: adapter weights (and an encoder's scoring
        head) drawn after seeding torch with ``train_cfg.seed``, dropout generator and data order
        seeded with it, the step-0 evaluation if ``eval_at_start``. Torch's global RNG is left as
        the caller had it, except in a ``single`` trainer, where the base's own dropout draws
        from it: there Python's and torch's RNGs stay seeded with the run's seed.

        Args:
            slot: the slot's id, unique over the trainer's life (a trial id); see ``Pack.add``.
            train_cfg: the run's settings; ``SHARED_FIELDS`` must equal the trainer's.
            adapter_cfg: the run's adapter.
            on_eval: called on every rank after each of this slot's evaluations with
                ``(step, metrics)`` (with ``checkpoint``: ``(step, metrics, state_dir)``);
                returning True stops the slot (the ranks stop together), which then finishes
                (test split, ``output_dir``) as at its last step.
            on_step: called after each of this slot's optimizer steps with ``(step, adapter)``:
                the slot's view (``Pack.adapter``: its modules, under the names of a model
                carrying it alone).
            checkpoint: after each evaluation rank 0 writes the slot's training state to a
                temporary folder and passes it to ``on_eval`` (other ranks get None); the folder
                is deleted when ``on_eval`` returns.
            resume_from: a checkpoint of the same configuration (``save_checkpoint``, or
                ``run_training(checkpoint=True)``: the two are interchangeable) to continue from.

        Raises:
            ValueError: the id is in use or was used, a shared field differs, or a ``single``
                trainer has a slot already.
            CheckpointError: ``resume_from`` is not a checkpoint of this configuration.
        """
        started = time.perf_counter()
        if slot in self._used:
            raise ValueError(f"slot {slot!r}: id already used in this trainer; pick another")
        if self.single and self._slots:
            raise ValueError(f"slot {slot!r}: this trainer trains one slot at a time (single)")
        for name in SHARED_FIELDS:
            mine, theirs = getattr(self.base, name), getattr(train_cfg, name)
            if mine != theirs:
                raise ValueError(
                    f"slot {slot!r}: {name}={theirs!r}, but the packed slots share {name} "
                    f"({mine!r}); train it in a trainer of its own or alone (run_training)"
                )
        devices = [self.device] if self.device.type == "cuda" else []
        rng = contextlib.nullcontext() if self.single else torch.random.fork_rng(devices=devices)
        with rng:
            (seed_everything if self.single else torch.manual_seed)(train_cfg.seed)
            generator = dropout_generator(train_cfg.seed, self.device)
            self.pack.add(slot, adapter_cfg, generator=generator)
            try:
                if self.encoder:  # scores option texts through a head trained with the adapter
                    setattr(self.pack.adapter(slot), HEAD_ATTR, attach_head(self.model))
                run = self._start(slot, train_cfg, generator, resume_from)
            except BaseException:
                self._remove_modules(slot)
                raise
        self._used.add(slot)
        self._slots[slot] = _Slot(
            train_cfg,
            adapter_cfg,
            run,
            metadata={
                "base_model": self.info.to_dict(),
                "run": run_shape(train_cfg, self.info.to_dict()),
            },
            on_eval=on_eval,
            on_step=on_step,
            checkpoint=checkpoint,
        )
        # A single trainer's run waited for the base model and the data too.
        run.setup_time = time.perf_counter() - started + (self.setup_time if self.single else 0)
        log_rank0(
            f"[graphlora] slot {slot}: method {adapter_cfg.method}, {run.n_trainable:,} trainable "
            f"params, step {run.step}/{train_cfg.max_steps}; {len(self._slots)} slot(s) on "
            f"{self.info.name} ({self.device})"
        )

    def _start(
        self,
        slot: str,
        cfg: TrainConfig,
        generator: torch.Generator,
        resume_from: str | Path | None,
    ) -> RunState:
        trainer = weakref.ref(self)  # the slot's run must not keep the trainer (and model) alive

        def evaluate(examples: list[Example]) -> EvalResult:
            self = trainer()  # noqa: PLW0642 - the live trainer
            with self.pack.alone(slot):
                res = evaluate_sharded(self.model, self.tokenizer, examples, cfg, self.device)
            self._train_modes()
            return res

        view = self.pack.adapter(slot)
        self._train_modes()
        self.pack.reset_load(slot)
        label = "" if self.single else f"slot {slot}: "
        run = RunState(cfg, self.data, view, generator, evaluate, self.device, label=label)
        if resume_from is not None:
            shape = run_shape(cfg, self.info.to_dict())
            run.load_checkpoint(resume_from, expect={"run": shape})
            log_rank0(f"[graphlora] {label}resumed from {resume_from} at step {run.step}")
        if cfg.eval_at_start and run.step == 0:
            run.evaluate_at_start()
            self.pack.reset_load(slot)
        return run

    def remove(self, slot: str) -> dict[str, float]:
        """Take ``slot`` out at once (a run stopped from outside): no further step, evaluation or
        saving. Returns its last evaluation's metrics (empty before one)."""
        if slot not in self._slots:
            raise KeyError(f"slot {slot!r}: not training here (slots: {list(self._slots)})")
        metrics = dict(self._slots[slot].run.metrics)
        self._drop(slot)
        return metrics

    def stop(self, slot: str) -> SlotResult:
        """End ``slot`` between steps as ``run_training`` ends a run whose ``on_eval`` returned
        True: its final metrics (test split included, when its settings ask), its adapter saved
        to ``output_dir``. For a caller that decides after ``step`` returns (a scheduler's
        verdict on the evaluation that step made), so that the run ends where it was judged."""
        if slot not in self._slots:
            raise KeyError(f"slot {slot!r}: not training here (slots: {list(self._slots)})")
        run = self._slots[slot].run
        return self._finish(slot, run.step < run.cfg.max_steps)

    def metrics(self, slot: str) -> dict[str, float]:
        """``slot``'s last evaluation's metrics (empty before one)."""
        return dict(self._slots[slot].run.metrics)

    def save_checkpoint(self, slot: str, path: str | Path) -> Path:
        """Write ``slot``'s whole training state into folder ``path``, between steps: a
        ``graphlora.checkpoint`` folder that ``add(..., resume_from=path)`` or
        ``run_training(..., resume_from=path)`` continues from exactly."""
        state = self._slots[slot]
        return state.run.save_checkpoint(path, state.metadata)

    # Training ----------------------------------------------------------------------------------

    def step(self) -> list[SlotResult]:
        """One optimizer step of every slot: one forward and backward of the base over the packed
        batch, then each slot's clipping, optimizer step, evaluation if due (and its
        ``on_eval``). Returns the results of the slots that ended in this step; they have left
        the pack."""
        ended = [self._finish(s, False) for s in self.slots if self._done(s)]
        active = self.slots
        if not active:
            return ended
        t0 = time.perf_counter()
        runs = {s: self._slots[s].run for s in active}
        for run in runs.values():
            run.begin_step()
        indices = {s: run.order.take(self.per_step) for s, run in runs.items()}
        step_loss: dict[str, torch.Tensor] = {}
        failed: dict[str, float] = {}
        span = self.micro * self.world  # a micro-batch's examples over all ranks
        for a in range(self.base.grad_accum):
            live = [s for s in active if s not in failed]
            if not live:
                break
            chunks = {
                s: [self.encoded[i] for i in indices[s][a * span : (a + 1) * span]] for s in live
            }
            chunks = {s: chunk[self.rank :: self.world] for s, chunk in chunks.items()}
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
                if self.encoder:
                    outs = {s: self._encoder_loss(s, chunk) for s, chunk in chunks.items()}
                else:
                    outs = self._forward(
                        {s: pad_batch(c, self.pad, self.device) for s, c in chunks.items()}
                    )
            for s in live:
                if runs[s].cfg.inject_nan_at_step == runs[s].step + 1:
                    outs[s]["loss"] = outs[s]["loss"] * float("nan")
            # Summed over the ranks, so that a non-finite loss on any rank ends the slot on all.
            values = torch.stack([outs[s]["loss"].detach().float() for s in live])
            values = (all_reduce_sum(values) / self.world).tolist()
            total = None
            for s, value in zip(live, values, strict=True):
                if not math.isfinite(value):  # the slot ends; its loss joins no backward
                    failed[s] = value
                    continue
                loss = outs[s]["loss"]
                total = (
                    loss / self.base.grad_accum
                    if total is None
                    else total + loss / self.base.grad_accum
                )
                step_loss[s] = step_loss.get(s, 0.0) + loss.detach().float() / self.base.grad_accum
                runs[s].add_aux(outs[s].get("aux_losses") or {})
            if total is not None:
                total.backward()  # disjoint parameters: each slot gets its own loss's gradients
        trained = [s for s in active if s not in failed]
        for s in trained:
            for p in runs[s].params:  # a parameter without a gradient steps on 0
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        if self.world > 1:
            self._average_over_ranks({s: runs[s] for s in trained}, step_loss)
        for s in trained:
            runs[s].optimizer_step()
        seconds = time.perf_counter() - t0
        for s in active:
            if s in failed:
                run = runs[s]
                error = NonFiniteLossError(
                    non_finite_message(run.step, failed[s], run.cfg, self._slots[s].adapter_cfg)
                )
                ended.append(self._fail(s, error))
            else:
                if self._slots[s].on_step is not None:
                    self._slots[s].on_step(runs[s].step + 1, self.pack.adapter(s))
                runs[s].end_step(step_loss[s].item(), self.per_step, seconds)
        for s in active:
            if s not in self._slots:  # failed above, or removed by an on_eval
                continue
            run = runs[s]
            stop = run.eval_due and self._evaluate(s)
            if stop or self._done(s):
                ended.append(self._finish(s, stop and run.step < run.cfg.max_steps))
        return ended

    def run(self) -> dict[str, SlotResult]:
        """Step until every slot has ended; returns ``results`` (every slot that ended)."""
        while self._slots:
            self.step()
        return dict(self.results)

    # Internals ---------------------------------------------------------------------------------

    def _average_over_ranks(
        self, runs: Mapping[str, RunState], step_loss: dict[str, torch.Tensor]
    ) -> None:
        """Data parallelism: every slot's gradients and step loss averaged over the ranks, in one
        all-reduce."""
        params = [p for run in runs.values() for p in run.params]
        flat = torch.cat(
            [p.grad.reshape(-1).float() for p in params] + [step_loss[s].reshape(1) for s in runs]
        )
        flat = all_reduce_sum(flat) / self.world
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        for i, s in enumerate(runs):
            step_loss[s] = flat[offset + i]

    def _forward(self, batches: Mapping[str, dict[str, torch.Tensor]]) -> dict[str, dict]:
        """Each slot's loss on its rows (the mean cross-entropy of its labelled tokens plus its
        weighted auxiliary loss) from one forward over the packed batch."""
        width = max(b["input_ids"].shape[1] for b in batches.values())
        fill = {"input_ids": self.pad, "attention_mask": 0, "labels": -100}
        packed = {
            key: torch.cat([_widen(b[key], width, value) for b in batches.values()])
            for key, value in fill.items()
        }
        rows = {s: b["input_ids"].shape[0] for s, b in batches.items()}
        with self.pack.layout(rows):
            out, target = labelled_forward(self.model, packed)
        # The head ran on the labelled positions in row order: each slot's tokens in one run.
        counts = torch.stack([(b["labels"][:, 1:] != -100).sum() for b in batches.values()])
        logits = out.logits.split(counts.tolist())
        targets = target.split(counts.tolist())
        aux_loss = out.get("slot_aux_loss") or {}
        aux_losses = out.get("slot_aux_losses") or {}
        result = {}
        for slot, lg, tg in zip(rows, logits, targets, strict=True):
            task = F.cross_entropy(lg.float(), tg)
            aux = aux_loss.get(slot)
            loss = task if aux is None else task + aux.to(task.dtype)
            result[slot] = {"loss": loss, "task_loss": task, "aux_losses": aux_losses.get(slot)}
        return result

    def _encoder_loss(self, slot: str, examples: list[Example]) -> dict:
        """An encoder's loss on a micro-batch: the cross-entropy of the scoring head's option
        logits plus the adapter's weighted auxiliary loss (``graphlora.encoder``)."""
        with self.pack.alone(slot):
            logits, aux = option_forward(
                self.model, self.tokenizer, examples, max_length=self.base.max_length
            )
        task = option_loss(logits, [ex.label for ex in examples])
        loss = task if "aux_loss" not in aux else task + aux["aux_loss"].to(task.dtype)
        return {"loss": loss, "task_loss": task, "aux_losses": aux.get("aux_losses")}

    def _evaluate(self, slot: str) -> bool:
        """``slot``'s evaluation after its step, its checkpoint and ``on_eval``; True: stop."""
        state = self._slots[slot]
        metrics = state.run.evaluate()
        if state.on_eval is None:
            return False
        if not state.checkpoint:
            stop = bool(state.on_eval(state.run.step, dict(metrics)))
        else:  # as run_training: rank 0 writes the state, the other ranks get None
            with tempfile.TemporaryDirectory(prefix="graphlora-ckpt-") as tmp:
                state_dir = None if self.rank else state.run.save_checkpoint(tmp, state.metadata)
                stop = bool(state.on_eval(state.run.step, dict(state.run.metrics), state_dir))
        if self.world > 1:  # the ranks stop together
            stop = all_reduce_sum(torch.tensor([float(stop)], device=self.device)).item() > 0
        return stop

    def _done(self, slot: str) -> bool:
        run = self._slots[slot].run
        return run.step >= run.cfg.max_steps

    def _finish(self, slot: str, stopped_early: bool) -> SlotResult:
        state = self._slots[slot]
        if stopped_early:
            log_rank0(f"[graphlora] slot {slot}: stopped early at step {state.run.step} (on_eval)")
        metrics = state.run.finish(stopped_early)
        if state.train_cfg.output_dir and not self.rank:
            self.pack.save_adapter(
                slot, state.train_cfg.output_dir, metadata={"base_model": self.info.to_dict()}
            )
        self._drop(slot)
        self.results[slot] = SlotResult(slot, metrics)
        return self.results[slot]

    def _fail(self, slot: str, error: Exception) -> SlotResult:
        log_rank0(f"[graphlora] slot {slot}: {error}; the slot ends, the others go on")
        metrics = dict(self._slots[slot].run.metrics)
        self._drop(slot)
        self.results[slot] = SlotResult(slot, metrics, error)
        return self.results[slot]

    def _drop(self, slot: str) -> None:
        self._remove_modules(slot)
        del self._slots[slot]

    def _remove_modules(self, slot: str) -> None:
        self.pack.remove(slot)
        if self.encoder:  # the slot's scoring head
            delattr(self.model, HEAD_ATTR)

    def _train_modes(self) -> None:
        """Training mode for the slots' adapters; the base too unless its dropout is off."""
        self.model.train(not self._base_eval)
        if self._base_eval:
            for slot in self.pack.slots:
                self.pack.adapter(slot).train()


def _widen(t: torch.Tensor, width: int, value: int) -> torch.Tensor:
    """``t`` (B, S) right-padded with ``value`` to ``width`` columns."""
    return t if t.shape[1] == width else F.pad(t, (0, width - t.shape[1]), value=value)


def run_packed(
    slots: Mapping[str, tuple[TrainConfig, MoELoRAConfig]],
    data: DatasetSplits | None = None,
    *,
    base_dropout_off: bool = False,
) -> dict[str, SlotResult]:
    """Train a fixed set of runs together over one base model (``PackedTrainer``).

    Args:
        slots: slot id -> (training settings, adapter); they share ``SHARED_FIELDS``.
        data: pre-loaded splits (else loaded from the first run's dataset).
        base_dropout_off: see ``PackedTrainer``.

    Returns:
        Slot id -> ``SlotResult``: each run's metrics as ``run_training`` returns them, or the
        error that ended it.
    """
    if not slots:
        raise ValueError("run_packed: no slots given")
    first = next(iter(slots.values()))[0]
    trainer = PackedTrainer(first, data, base_dropout_off=base_dropout_off)
    for slot, (train_cfg, adapter_cfg) in slots.items():
        trainer.add(slot, train_cfg, adapter_cfg)
    return trainer.run()
