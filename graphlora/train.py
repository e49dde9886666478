"""One fine-tuning run: dataset + base model + adapter -> accuracy (works alone and under DDP).

``run_training`` is what every Ray Train worker of a search calls. Under ``torch.distributed``
(initialised by Ray Train, torchrun or the caller) each rank trains on its shard of every batch,
adapter gradients are averaged with one all-reduce per step (the adapter is small, and top-k
routing can leave an expert unused on one rank, which DDP's bucketed reducer does not allow), and
evaluation counts are all-reduced so every rank reports the same metrics.

Command line (no Ray)::

    python -m graphlora.train --model tiny-qwen2 --dataset synthetic --method graphlora
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from graphlora.checkpoint import load_training_state, save_training_state
from graphlora.config import MoELoRAConfig
from graphlora.data import DatasetSplits, Example, load_task
from graphlora.encoder import attach_head, option_forward, option_loss
from graphlora.evaluate import EvalResult, encode_pair, evaluate_examples, head_at, pad_batch
from graphlora.inject import (
    count_trainable_parameters,
    gcn_hidden_used,
    inject_adapter,
    moe_blocks,
    reset_load_state,
    routing_counts,
    routing_stats,
    save_adapter,
)
from graphlora.models import adapter_defaults, load_model_and_tokenizer, training_defaults
from graphlora.packing import use_generator_dropout

# on_eval(step, metrics) -> stop?; with run_training(checkpoint=True): on_eval(step, metrics,
# state_dir), state_dir a temporary checkpoint folder on rank 0 (None on other ranks).
OnEval = Callable[..., "bool | None"]
OnStep = Callable[[int, torch.nn.Module], None]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class TrainConfig:
    """Settings of one fine-tuning run (everything but the adapter)."""

    model: str = "tiny-qwen2"
    """Hub id, local checkpoint folder, or offline preset (tiny-qwen2, tiny-llama)."""
    model_revision: str | None = None
    """Hub revision (branch, tag or commit) of ``model``."""
    dataset: str = "synthetic"
    """Task name (arc-challenge, boolq, openbookqa, siqa, synthetic, ...) or a path to
    LLM-Adapters JSON files."""
    data_dir: str | None = None
    """Folder holding one LLM-Adapters folder per task (``ARC-Challenge/train.json``,
    ``test.json``); default: env GRAPHLORA_DATA_DIR, else the copy shipped with graphlora. A
    ``dataset`` of ``hub:<task>`` loads the Hugging Face Hub version instead."""
    seed: int = 0
    """Seed of adapter init, data order and dropout."""
    max_steps: int = 300
    """Optimizer steps."""
    batch_size: int = 16
    """Examples per optimizer step, summed over ranks and accumulation steps."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    learning_rate: float = 3e-3
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.05
    """Fraction of max_steps spent in linear warm-up."""
    lr_schedule: str = "cosine"
    """Decay after warm-up: cosine, linear or constant."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    eval_every: int = 50
    """Evaluate on validation every N steps (and at the end)."""
    eval_batch_size: int = 64
    """Sequences per evaluation forward."""
    max_eval_examples: int | None = 500
    """Cap on validation examples per evaluation (None: all)."""
    max_test_examples: int | None = None
    """Cap on test examples (None: all)."""
    eval_test: bool = True
    """Evaluate the test split at the end."""
    eval_at_start: bool = False
    """Also evaluate before the first step (validation, and test if ``eval_test``): metrics
    ``step0_val_accuracy``, ``step0_val_loss``, ``step0_test_accuracy``."""
    max_length: int = 512
    """Longest tokenized prompt + answer; prompts are cut from the left."""
    train_on_prompt: bool = False
    """Also train on prompt tokens (default: answer tokens only)."""
    dtype: str = "auto"
    """Base model weights: auto (bf16 on CUDA, else fp32), float32, bfloat16, float16."""
    bf16: bool | None = None
    """bf16 autocast; None means on for CUDA devices that support it."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    log_every: int = 25
    """Progress line every N steps (rank 0)."""
    output_dir: str | None = None
    """Save the final adapter here (rank 0)."""
    inject_nan_at_step: int | None = None
    """Fault injection for tests: the loss becomes NaN at this step (1-based)."""

    def __post_init__(self) -> None:
        checks = [
            ("max_steps", self.max_steps >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("grad_accum", self.grad_accum >= 1, "must be >= 1"),
            ("learning_rate", self.learning_rate > 0, "must be > 0"),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1, "must be in [0, 1)"),
            (
                "lr_schedule",
                self.lr_schedule in ("cosine", "linear", "constant"),
                "must be cosine, linear or constant",
            ),
            ("eval_every", self.eval_every >= 1, "must be >= 1"),
            ("max_length", self.max_length >= 8, "must be >= 8"),
            ("max_grad_norm", self.max_grad_norm >= 0, "must be >= 0"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"{name}: {why} (got {getattr(self, name)!r})")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict; unknown keys raise a ValueError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown training field; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def training_field_names() -> list[str]:
    """Names of every TrainConfig field (for search-space validation)."""
    return [f.name for f in dataclasses.fields(TrainConfig)]


# ----------------------------------------------------------------------------------------------
# distributed helpers


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _pick_device(name: str) -> torch.device:
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and device.index is None:
            # A bare "cuda": this rank's GPU (torch.cuda.set_device needs an index).
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _log(msg: str) -> None:
    if _world()[0] == 0:
        print(msg, file=sys.stderr, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    warm = int(cfg.warmup_ratio * cfg.max_steps)
    if step < warm:
        return (step + 1) / warm
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = (step - warm) / max(1, cfg.max_steps - warm)
    if cfg.lr_schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# the loop


def _encode_train(tokenizer, examples: list[Example], cfg: TrainConfig):  # noqa: ANN001, ANN202
    eos = tokenizer.eos_token or ""
    out = [encode_pair(tokenizer, ex.prompt, ex.answer + eos, cfg.max_length) for ex in examples]
    if cfg.train_on_prompt:
        for e in out:
            e.n_context = 1
    return out


def labelled_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a causal LM's (B, S) ``labels`` (-100: no label): ``(target, keep, select)``, the
    next-token targets (B, S-1), which of them are labelled, and the (B, S) positions whose
    output predicts a label (where ``head_at`` runs the output head)."""
    target = labels[:, 1:]
    keep = target != -100
    return target, keep, torch.nn.functional.pad(keep, (0, 1), value=False)


def _forward_loss(model, batch: dict[str, torch.Tensor]):  # noqa: ANN001, ANN202
    """``model(**batch)`` with the same ``loss`` (mean cross-entropy of the labelled tokens, plus
    the adapter's auxiliary loss), but the output head runs only where a label is predicted: no
    (batch, length, vocab) logits tensor. ``logits`` come out as (labelled tokens, vocab)."""
    if model.get_output_embeddings() is None:
        return model(**batch)
    target, keep, select = labelled_positions(batch["labels"])
    with head_at(model, select):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    task = torch.nn.functional.cross_entropy(out.logits.float(), target[keep])
    aux = out.get("aux_loss")
    out["task_loss"] = task
    out["loss"] = task if aux is None else task + aux.to(task.dtype)
    return out


def _use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast: ``cfg.bf16``, else on for CUDA devices that support it."""
    if cfg.bf16 is not None:
        return cfg.bf16
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def _micro_batch(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """``(examples per micro-batch on a rank, examples per optimizer step)``."""
    micro = max(1, cfg.batch_size // (world * cfg.grad_accum))
    return micro, micro * world * cfg.grad_accum


def _non_finite_message(step: int, loss: float, cfg: TrainConfig, adapter: MoELoRAConfig) -> str:
    return (
        f"step {step + 1}: training loss is {loss} (lr {cfg.learning_rate:g}, "
        f"method {adapter.method}); lower the learning rate or the loss coefficients"
    )


def _encoder_loss(model, tokenizer, examples: list[Example], cfg: TrainConfig):  # noqa: ANN001, ANN202
    """An encoder's loss on a micro-batch: the cross-entropy of the scoring head's option logits
    plus the adapter's auxiliary loss (``graphlora.encoder``); a dict like a model output."""
    logits, aux = option_forward(model, tokenizer, examples, max_length=cfg.max_length)
    task = option_loss(logits, [ex.label for ex in examples])
    loss = task if "aux_loss" not in aux else task + aux["aux_loss"].to(task.dtype)
    return {"loss": loss, "task_loss": task, "aux_losses": aux.get("aux_losses") or {}}


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


def _evaluate(model, tokenizer, examples, cfg: TrainConfig, device) -> EvalResult:  # noqa: ANN001
    rank, world = _world()
    shard = list(examples)[rank::world]
    res = evaluate_examples(
        model,
        tokenizer,
        shard,
        batch_size=cfg.eval_batch_size,
        max_length=cfg.max_length,
        device=device,
    )
    sums = torch.tensor([res.correct, res.total, res.nll_sum, res.nll_tokens], dtype=torch.float64)
    sums = _all_reduce_sum(sums.to(device)).cpu().tolist()
    return EvalResult(int(sums[0]), int(sums[1]), sums[2], int(sums[3]), res.predictions)


def _add_counts(total: list[list[float]], new: list[list[float]]) -> list[list[float]]:
    """Per-layer routing counts added up (``total`` empty: ``new``)."""
    if not total:
        return [list(layer) for layer in new]
    return [[a + b for a, b in zip(x, y, strict=True)] for x, y in zip(total, new, strict=True)]


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def dropout_generator(seed: int, device: torch.device) -> torch.Generator:
    """The generator a run's LoRA dropout draws from (``use_generator_dropout``), seeded from the
    run's seed alone: a run draws the same masks alone and as a packed slot
    (``graphlora.packed_train``), whatever else draws from torch's global RNG."""
    return torch.Generator(device=device).manual_seed(seed)


class DataOrder:
    """A run's order of training examples: a fresh permutation of ``range(size)`` per epoch from
    ``random.Random(seed)``, taken ``n`` at a time. ``rng`` and ``queue`` (the indices left in
    the current epoch) are what a checkpoint keeps."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.rng = random.Random(seed)
        self.queue: list[int] = []

    def take(self, n: int) -> list[int]:
        while len(self.queue) < n:  # epochs: a fresh seeded permutation each time
            perm = list(range(self.size))
            self.rng.shuffle(perm)
            self.queue += perm
        taken, self.queue = self.queue[:n], self.queue[n:]
        return taken


class RunState:
    """What one training run keeps besides its model: its optimizer and learning-rate schedule,
    data order, dropout generator, counters, evaluations and the metrics they report, and its
    checkpoints. ``run_training`` keeps one; so does each slot of a packed trainer
    (``graphlora.packed_train``), so a slot reports what the same run alone reports.

    Args:
        cfg: the run's settings.
        data: its splits; validation is capped at ``max_eval_examples``, test at
            ``max_test_examples`` (and left out without ``eval_test``).
        adapter: the model carrying the adapter, or a packed slot's view (``Pack.adapter``): its
            trainable parameters are optimized, its routing counts and statistics reported.
        generator: the generator its LoRA dropout draws from (saved in checkpoints).
        evaluate: scores examples with the run's adapter and leaves it in training mode.
        device: where the run trains (for the peak memory figure).
        label: prefix of the run's log lines (a slot's id).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        data: DatasetSplits,
        adapter: torch.nn.Module,
        generator: torch.Generator,
        evaluate: Callable[[list[Example]], EvalResult],
        device: torch.device,
        *,
        label: str = "",
    ) -> None:
        self.cfg, self.adapter, self.generator, self.device = cfg, adapter, generator, device
        self._evaluate = evaluate
        self.label = label
        self.params = [p for p in adapter.parameters() if p.requires_grad]
        self.n_trainable = count_trainable_parameters(adapter)
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
        self.order = DataOrder(len(data.train), cfg.seed)
        cap = cfg.max_eval_examples
        self.val = data.validation[:cap] if cap else data.validation
        cap = cfg.max_test_examples
        self.test = (data.test[:cap] if cap else data.test) if cfg.eval_test else []
        self.step = 0  # optimizer steps done
        self.best_val = 0.0
        self.train_time = self.eval_time = self.checkpoint_time = self.setup_time = 0.0
        self.samples = 0
        self.metrics: dict[str, float] = {}  # the last evaluation's
        self.counts: list[list[float]] = []  # the whole run's routing counts (evaluations reset)
        self.loss_sum, self.aux_sum, self.loss_n = 0.0, {}, 0  # since the last evaluation

    # Steps --------------------------------------------------------------------------------------

    def begin_step(self) -> float:
        """Set the learning rate of the coming step; returns it."""
        lr = self.cfg.learning_rate * lr_factor(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def add_aux(self, aux: dict[str, torch.Tensor]) -> None:
        """Count one micro-batch's unweighted auxiliary losses."""
        for k, v in aux.items():
            self.aux_sum[k] = self.aux_sum.get(k, 0.0) + v.item() / self.cfg.grad_accum

    def optimizer_step(self) -> None:
        """Clip the gradients (``max_grad_norm``) and take the optimizer step."""
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def end_step(self, loss: float, samples: int, seconds: float) -> None:
        """Count a finished step: its loss, examples and time."""
        self.train_time += seconds
        self.samples += samples
        self.loss_sum += loss
        self.loss_n += 1
        self.step += 1
        every = self.cfg.log_every
        if every and self.step % every == 0:
            _log(
                f"[graphlora] {self.label}step {self.step}/{self.cfg.max_steps} loss "
                f"{self.loss_sum / self.loss_n:.4f} lr {self.optimizer.param_groups[0]['lr']:.2e} "
                f"{self.samples / self.train_time:.1f} samples/s"
            )

    # Evaluations --------------------------------------------------------------------------------

    @property
    def eval_due(self) -> bool:
        """Whether the step just taken evaluates (every ``eval_every`` steps, and the last)."""
        return self.step % self.cfg.eval_every == 0 or self.step == self.cfg.max_steps

    def evaluate_at_start(self) -> None:
        """The step-0 evaluation (``eval_at_start``): ``step0_*`` metrics."""
        t1 = time.perf_counter()
        res = self._evaluate(self.val)
        self.metrics["step0_val_accuracy"] = res.accuracy
        self.metrics["step0_val_loss"] = res.loss
        _log(
            f"[graphlora] {self.label}eval @ 0: val_accuracy {res.accuracy:.4f} "
            f"val_loss {res.loss:.4f}"
        )
        if self.test:
            res = self._evaluate(self.test)
            self.metrics["step0_test_accuracy"] = res.accuracy
            _log(
                f"[graphlora] {self.label}step 0 test_accuracy {res.accuracy:.4f} on "
                f"{res.total} examples"
            )
        self.metrics["step0_eval_time_s"] = time.perf_counter() - t1

    def evaluate(self) -> dict[str, float]:
        """Evaluate on validation after the step just taken; returns (and keeps) the metrics."""
        t1 = time.perf_counter()
        res = self._evaluate(self.val)
        self.best_val = max(self.best_val, res.accuracy)
        self.counts = _add_counts(self.counts, routing_counts(self.adapter))
        n = max(1, self.loss_n)
        metrics = {
            "step": float(self.step),
            "val_accuracy": res.accuracy,
            "val_loss": res.loss,
            "best_val_accuracy": self.best_val,
            "train_loss": self.loss_sum / n,
            "learning_rate": self.optimizer.param_groups[0]["lr"],
            "trainable_params": float(self.n_trainable),
            "samples_per_sec": self.samples / self.train_time,
            "peak_memory_mb": _peak_memory_mb(self.device),
            "eval_time_s": time.perf_counter() - t1,
            "train_time_s": self.train_time,
            "setup_time_s": self.setup_time,
            **{f"aux_{k}": v / n for k, v in self.aux_sum.items()},
            **routing_stats(self.adapter, reset=True),
            **{k: v for k, v in self.metrics.items() if k.startswith("step0_")},
        }
        self.eval_time += metrics["eval_time_s"]
        metrics["eval_time_total_s"] = self.eval_time
        metrics["checkpoint_time_s"] = self.checkpoint_time
        _log(
            f"[graphlora] {self.label}eval @ {self.step}: val_accuracy {res.accuracy:.4f} "
            f"val_loss {res.loss:.4f} (best {self.best_val:.4f})"
        )
        self.loss_sum, self.aux_sum, self.loss_n = 0.0, {}, 0
        self.metrics = metrics
        return metrics

    def finish(self, stopped_early: bool) -> dict[str, float]:
        """The run's final metrics: the last evaluation's, the run's load map, and the test
        split (``eval_test``)."""
        metrics = self.metrics
        metrics["stopped_early"] = float(stopped_early)
        for i, layer in enumerate(self.counts):  # the load map of the run (training tokens)
            metrics.update({f"routing_counts/layer{i}/expert{j}": n for j, n in enumerate(layer)})
        if (used := gcn_hidden_used(self.adapter)) is not None:
            metrics["gcn_hidden_used"] = float(used)
        if self.test:
            t1 = time.perf_counter()
            res = self._evaluate(self.test)
            metrics["test_time_s"] = time.perf_counter() - t1
            metrics["test_accuracy"] = res.accuracy
            metrics["test_loss"] = res.loss
            _log(
                f"[graphlora] {self.label}test_accuracy {res.accuracy:.4f} on {res.total} examples"
            )
        return metrics

    # Checkpoints --------------------------------------------------------------------------------

    def save_checkpoint(self, path: str | Path, metadata: dict[str, Any]) -> Path:
        """Write the adapter and the whole training state into folder ``path``
        (``graphlora.checkpoint``); the time it takes counts in ``checkpoint_time_s``."""
        t1 = time.perf_counter()
        progress = {
            "step": self.step,
            "best_val": self.best_val,
            "train_time": self.train_time,
            "eval_time": self.eval_time,
            "checkpoint_time": self.checkpoint_time,
            "samples": self.samples,
            "metrics": self.metrics,
            "routing_counts": self.counts,
            # Between evaluations (a packed slot may be saved at any step):
            "loss_sum": self.loss_sum,
            "aux_sum": self.aux_sum,
            "loss_n": self.loss_n,
            "block_counts": [b.routing_counts.detach().cpu() for b in moe_blocks(self.adapter)],
            "dropout_rng": self.generator.get_state(),
        }
        out = save_training_state(
            path,
            self.adapter,
            self.optimizer,
            progress,
            order_rng=self.order.rng,
            order=self.order.queue,
            metadata=metadata,
        )
        self.checkpoint_time += time.perf_counter() - t1
        self.metrics["checkpoint_time_s"] = self.checkpoint_time
        return out

    def load_checkpoint(self, path: str | Path, expect: dict[str, Any]) -> None:
        """Continue from a checkpoint of the same run (``expect``: what it must agree on).

        Raises:
            CheckpointError: ``path`` is not a checkpoint of this configuration.
        """
        progress, self.order.queue = load_training_state(
            path, self.adapter, self.optimizer, order_rng=self.order.rng, expect=expect
        )
        self.step, self.best_val = int(progress["step"]), float(progress["best_val"])
        self.train_time, self.samples = float(progress["train_time"]), int(progress["samples"])
        self.eval_time = float(progress.get("eval_time", 0.0))
        self.checkpoint_time = float(progress.get("checkpoint_time", 0.0))
        self.metrics = dict(progress["metrics"])
        self.counts = progress.get("routing_counts") or []
        self.loss_sum = float(progress.get("loss_sum", 0.0))
        self.aux_sum = dict(progress.get("aux_sum") or {})
        self.loss_n = int(progress.get("loss_n", 0))
        if "block_counts" in progress:  # routing counts since the last evaluation
            blocks = moe_blocks(self.adapter)
            for block, counts in zip(blocks, progress["block_counts"], strict=True):
                block.routing_counts.copy_(counts.to(block.routing_counts.device))
        if "dropout_rng" in progress:  # older checkpoints drew dropout from the global RNG
            self.generator.set_state(progress["dropout_rng"])


def run_training(
    train_cfg: TrainConfig,
    adapter_cfg: MoELoRAConfig,
    *,
    on_eval: OnEval | None = None,
    on_step: OnStep | None = None,
    data: DatasetSplits | None = None,
    checkpoint: bool = False,
    resume_from: str | Path | None = None,
) -> dict[str, float]:
    """Fine-tune ``train_cfg.model`` with the adapter on ``train_cfg.dataset``; return metrics.

    Args:
        train_cfg: run settings.
        adapter_cfg: the adapter.
        on_eval: called on every rank after each evaluation with ``(step, metrics)``; returning
            True stops the run (the decision is all-reduced, so ranks stop together).
        on_step: called on every rank after each optimizer step with ``(step, model)``.
        data: pre-loaded splits (else loaded from ``train_cfg.dataset``).
        checkpoint: after each evaluation, rank 0 writes the full training state to a temporary
            folder (``graphlora.checkpoint``) and passes it to ``on_eval`` as a third argument
            (other ranks get None); the folder is deleted when ``on_eval`` returns.
        resume_from: a checkpoint folder to continue from (same adapter and training settings);
            the run goes on from its step with the same data order and learning rates.

    Returns:
        Final flat metrics: ``val_accuracy``, ``val_loss``, ``best_val_accuracy``,
        ``test_accuracy``/``test_loss`` (if ``eval_test``), ``train_loss``, aux losses,
        routing statistics, ``trainable_params``, ``samples_per_sec``, ``peak_memory_mb``,
        ``steps``, ``stopped_early`` (0/1), ``gcn_hidden_used`` (graph router only: the GCN
        width built, ``gcn_hidden`` capped at the hidden size),
        ``routing_counts/layer{i}/expert{j}`` (the whole run's routing counts of training tokens
        per MoE layer and expert, on this rank: the load map), and where the time went, in seconds:
        ``setup_time_s`` (data, model, adapter, encoding; resuming included),
        ``train_time_s`` (optimizer steps), ``eval_time_total_s`` (validation),
        ``checkpoint_time_s`` (writing ``checkpoint`` states), ``test_time_s``; with
        ``eval_at_start``, ``step0_val_accuracy``, ``step0_val_loss``, ``step0_test_accuracy``
        and ``step0_eval_time_s`` (before the first step).

    LoRA dropout draws from a generator of the run's own, seeded from ``train_cfg.seed``
    (``dropout_generator``) and kept in checkpoints, not from torch's global RNG: a run computes
    what the same configuration computes as a slot of a packed trainer
    (``graphlora.packed_train``). The base model's own dropout (GPT-2's, BERT's) still draws from
    the global RNG.

    An encoder (``info.architecture == "encoder"``: MiniLM, BERT) gets a scoring head after the
    adapter is injected (``graphlora.encoder.attach_head``), trained and saved with the adapter:
    the loss is the cross-entropy of the head's logits over each question's option texts plus
    the adapter's auxiliary loss, and evaluation picks the option of highest logit. Tasks whose
    examples list no option texts (BoolQ) are refused for an encoder.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (on every rank at once).
        CheckpointError: ``resume_from`` is not a checkpoint of this configuration.
    """
    cfg = train_cfg
    started = time.perf_counter()
    rank, world = _world()
    device = _pick_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    data = data if data is not None else load_task(cfg.dataset, data_dir=cfg.data_dir)
    if not data.train or not data.validation:
        raise ValueError(f"dataset {cfg.dataset!r}: needs non-empty train and validation splits")
    model, tokenizer, info = load_model_and_tokenizer(
        cfg.model, revision=cfg.model_revision, dtype=cfg.dtype
    )
    encoder = info.architecture == "encoder"
    if encoder:
        _check_options(cfg.dataset, data)
    seed_everything(cfg.seed)  # same adapter init on every rank
    inject_adapter(model, adapter_cfg)
    if encoder:  # scores option texts through a head trained and saved with the adapter
        attach_head(model)
    model.to(device)
    reset_load_state(model)
    generator = dropout_generator(cfg.seed, device)
    use_generator_dropout(model, generator)

    def evaluate(examples: list[Example]) -> EvalResult:
        res = _evaluate(model, tokenizer, examples, cfg, device)
        model.train()
        return res

    run = RunState(cfg, data, model, generator, evaluate, device)
    params = run.params
    use_bf16 = _use_bf16(cfg, device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # A decoder trains on tokenized prompt + answer; an encoder on the examples' texts.
    encoded = list(data.train) if encoder else _encode_train(tokenizer, data.train, cfg)
    micro, per_step = _micro_batch(cfg, world)
    _log(
        f"[graphlora] {info.name} ({info.kind}) on {data.source}: {len(data.train)} train / "
        f"{len(data.validation)} val / {len(data.test)} test; method {adapter_cfg.method}; "
        f"{run.n_trainable:,} trainable params; {world} rank(s) x {micro} x {cfg.grad_accum} "
        f"accum on {device}"
    )
    metadata = {"base_model": info.to_dict(), "run": _run_shape(cfg, info.to_dict())}
    if resume_from is not None:
        run.load_checkpoint(resume_from, expect={"run": metadata["run"]})
        _log(f"[graphlora] resumed from {resume_from} at step {run.step}/{cfg.max_steps}")
    if cfg.eval_at_start and run.step == 0:
        run.evaluate_at_start()
        reset_load_state(model)
        model.train()
    run.setup_time = time.perf_counter() - started  # data, model, adapter, encoding (and resume)
    stopped_early = False
    model.train()
    for step in range(run.step, cfg.max_steps):
        t0 = time.perf_counter()
        run.begin_step()
        global_idx = run.order.take(per_step)
        step_loss = 0.0
        for a in range(cfg.grad_accum):
            chunk = global_idx[a * micro * world : (a + 1) * micro * world][rank::world]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                if encoder:
                    out = _encoder_loss(model, tokenizer, [encoded[i] for i in chunk], cfg)
                else:
                    out = _forward_loss(model, pad_batch([encoded[i] for i in chunk], pad, device))
            if cfg.inject_nan_at_step == step + 1:
                out["loss"] = out["loss"] * float("nan")
            (out["loss"] / cfg.grad_accum).backward()
            step_loss += out["loss"].detach().float() / cfg.grad_accum
            run.add_aux(out.get("aux_losses") or {})
        # One all-reduce: averaged adapter gradients plus the loss (so every rank sees NaNs).
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [step_loss.reshape(1)])
        flat = _all_reduce_sum(flat) / world
        global_loss = flat[-1].item()
        if not math.isfinite(global_loss):
            raise NonFiniteLossError(_non_finite_message(step, global_loss, cfg, adapter_cfg))
        offset = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].view_as(p).to(p.dtype)
            offset += g.numel()
        run.optimizer_step()
        seconds = time.perf_counter() - t0
        if on_step is not None:
            on_step(step + 1, model)
        run.end_step(global_loss, per_step, seconds)
        if run.eval_due:
            metrics = run.evaluate()
            if checkpoint:
                with tempfile.TemporaryDirectory(prefix="graphlora-ckpt-") as tmp:
                    state_dir = run.save_checkpoint(tmp, metadata) if rank == 0 else None
                    stop = bool(on_eval(run.step, dict(metrics), state_dir)) if on_eval else False
            else:
                stop = bool(on_eval(run.step, dict(metrics))) if on_eval is not None else False
            flag = _all_reduce_sum(torch.tensor([float(stop)], device=device))
            if flag.item() > 0 and run.step < cfg.max_steps:
                stopped_early = True
                _log(f"[graphlora] stopped early at step {run.step} (asked by the caller)")
                break
    metrics = run.finish(stopped_early)
    if cfg.output_dir and rank == 0:
        save_adapter(model, cfg.output_dir, metadata={"base_model": info.to_dict()})
    return metrics


# Settings that do not change what a run computes; a checkpoint may be resumed under other values.
_NOT_RUN_SHAPING = {
    "output_dir",
    "log_every",
    "eval_batch_size",
    "device",
    "inject_nan_at_step",
    "eval_test",
    "max_test_examples",
    "eval_at_start",
}


def _run_shape(cfg: TrainConfig, base_model: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed by this run (JSON-ready)."""
    run = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_RUN_SHAPING}
    return json.loads(json.dumps({**run, "base_model": base_model.get("name")}, default=str))


def run_seeds(
    train_cfg: TrainConfig,
    adapter_cfg: MoELoRAConfig,
    seeds: list[int],
    data: DatasetSplits | None = None,
) -> dict[str, Any]:
    """Run one configuration over several seeds (the paper's stability measure).

    Returns:
        ``{"seeds": [...], "per_seed": [metrics...], "test_accuracy_mean", "test_accuracy_std",
        "val_accuracy_mean", "val_accuracy_std", "trainable_params"}`` (std is the sample
        standard deviation; no ``_std`` for one seed).
    """
    data = data if data is not None else load_task(train_cfg.dataset, data_dir=train_cfg.data_dir)
    per_seed = []
    for seed in seeds:
        cfg = dataclasses.replace(train_cfg, seed=seed)
        if train_cfg.output_dir:
            cfg.output_dir = str(Path(train_cfg.output_dir) / f"seed{seed}")
        _log(f"[graphlora] seed {seed} ({len(per_seed) + 1}/{len(seeds)})")
        per_seed.append({"seed": seed, **run_training(cfg, adapter_cfg, data=data)})
    return {"seeds": list(seeds), "per_seed": per_seed, **summarize_seeds(per_seed)}


def summarize_seeds(per_seed: list[dict[str, float]]) -> dict[str, float]:
    """Mean and sample standard deviation of accuracy metrics over seeds (no ``_std`` for one
    seed: its spread is unknown, not zero; docs/method.md, "Selection")."""
    out: dict[str, float] = {}
    for key in ("test_accuracy", "val_accuracy", "best_val_accuracy"):
        values = [m[key] for m in per_seed if key in m]
        if values:
            out[f"{key}_mean"] = statistics.fmean(values)
            if len(values) > 1:
                out[f"{key}_std"] = statistics.stdev(values)
    if per_seed and "trainable_params" in per_seed[0]:
        out["trainable_params"] = per_seed[0]["trainable_params"]
    return out


# ----------------------------------------------------------------------------------------------
# command line


def load_run_file(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a YAML/JSON run file with ``adapter:`` and ``training:`` sections."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--config: {file} does not exist")
    try:
        doc = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"--config: {file} is not valid YAML/JSON: {err}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"--config: {file} must hold a mapping with adapter: and training:")
    extra = sorted(set(doc) - {"adapter", "training", "method", "source"})
    if extra:
        raise ValueError(
            f"--config: {file}: unknown top-level key {extra[0]!r}; "
            "expected adapter:, training: (and optionally method:)"
        )
    adapter = dict(doc.get("adapter") or {})
    if "method" in doc:
        adapter.setdefault("method", doc["method"])
    return adapter, dict(doc.get("training") or {})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m graphlora.train",
        description="Fine-tune one MoE-LoRA configuration (no Ray); prints metrics as JSON last. "
        "A packaged model (minilm-l6) brings its own training defaults (sequence length, steps, "
        "batch, learning rate, step-0 evaluation) and adapter defaults per method (rank, "
        "alpha, loss coefficients); flags and --config override them.",
    )
    p.add_argument("--model", help="hub id, local path, or preset (tiny-qwen2, tiny-llama)")
    p.add_argument("--dataset", help="task name or path to LLM-Adapters JSON (file or folder)")
    p.add_argument(
        "--data-dir",
        help="folder with one LLM-Adapters folder per task (ARC-Challenge/train.json, test.json); "
        "default: $GRAPHLORA_DATA_DIR, else the copy shipped with graphlora "
        "(--dataset hub:<task> loads the Hugging Face Hub version instead)",
    )
    p.add_argument("--method", help="lora, mixlora, loramoe, mingmoe, mola, graphlora, ...")
    p.add_argument("--seeds", type=int, nargs="+", help="one or more seeds (default 0)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--lr", type=float, dest="learning_rate")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument(
        "--max-length", type=int, help="longest tokenized text (an encoder: each question/option)"
    )
    p.add_argument(
        "--eval-at-start",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="evaluate before the first step too (validation and test: the step-0 accuracy)",
    )
    p.add_argument("--output-dir", help="save each seed's adapter under this folder")
    p.add_argument("--config", help="YAML/JSON file with adapter: and training: sections")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        adapter, training = load_run_file(args.config) if args.config else ({}, {})
        for key in (
            "model",
            "dataset",
            "data_dir",
            "max_steps",
            "learning_rate",
            "batch_size",
            "eval_every",
            "max_length",
            "eval_at_start",
            "output_dir",
        ):
            if getattr(args, key) is not None:
                training[key] = getattr(args, key)
        # The model's own defaults (packaged models) fill what neither flags nor --config set.
        for key, value in training_defaults(training.get("model", TrainConfig.model)).items():
            training.setdefault(key, value)
        if args.method:
            adapter["method"] = args.method
        model = training.get("model", TrainConfig.model)
        method = adapter.get("method", MoELoRAConfig.method)
        for key, value in adapter_defaults(model, method).items():
            adapter.setdefault(key, value)
        train_cfg = TrainConfig.from_dict(training)
        adapter_cfg = MoELoRAConfig.from_dict(adapter)
        seeds = args.seeds or [train_cfg.seed]
        # Load the data once up front: a malformed file fails here, before any model is built.
        data = load_task(train_cfg.dataset, data_dir=train_cfg.data_dir)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        result = run_seeds(train_cfg, adapter_cfg, seeds, data=data)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    print(json.dumps({"method": adapter_cfg.method, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
