"""One training run's parts, for the training loop (``graphlora.packed_train.PackedTrainer``,
which trains one run for ``graphlora.train.run_training`` and several packed over one frozen base
for a search): its settings (``TrainConfig``), the state it keeps besides the model
(``RunState``: optimizer and learning-rate schedule, data order, dropout generator, evaluations,
checkpoints), and the small steps of a training step (sharded evaluation, micro-batch sizes, the
labelled-positions forward, the NaN message, what a checkpoint must agree on).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from graphlora.checkpoint import load_training_state, save_training_state
from graphlora.config import MoELoRAConfig
from graphlora.evaluate import EvalResult, encode_pair, evaluate_examples, head_at
from graphlora.examples import DatasetSplits, Example
from graphlora.inject import (
    count_trainable_parameters,
    gcn_hidden_used,
    moe_blocks,
    routing_counts,
    routing_health,
    routing_stats,
)

# on_eval(step, metrics) -> stop?; with checkpoint=True: on_eval(step, metrics, state_dir),
# state_dir a temporary checkpoint folder on rank 0 (None on other ranks).
OnEval = Callable[..., "bool | None"]
# on_step(step, adapter) after each optimizer step; adapter: the run's (PackedTrainer.add).
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
    gradient_checkpointing: bool | str = False
    """Recompute every transformer layer in the backward instead of keeping its activations
    (``graphlora.recompute``): a step holds one layer's activations instead of all of them, for
    a second forward of every layer. ``"auto"`` is decided by the caller, who knows the memory
    budget (``graphlora.memory.decide_checkpointing``); the library alone takes it as off."""
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
            (
                "gradient_checkpointing",
                self.gradient_checkpointing in (True, False, "auto"),
                'must be true, false or "auto"',
            ),
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


# ----------------------------------------------------------------------------------------------
# distributed helpers


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` under ``torch.distributed``; ``(0, 1)`` without it."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks, in place (``t`` itself when there is one rank)."""
    if rank_and_world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def pick_device(name: str) -> torch.device:
    """The device ``TrainConfig.device`` names: ``auto`` is this rank's GPU (``LOCAL_RANK``) when
    there is one, else the CPU; a bare ``cuda`` gets this rank's index."""
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and device.index is None:
            # A bare "cuda": this rank's GPU (torch.cuda.set_device needs an index).
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def log_rank0(msg: str) -> None:
    """A progress line on stderr, from rank 0 only."""
    if rank_and_world()[0] == 0:
        print(msg, file=sys.stderr, flush=True)


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's global RNGs (CPU and every GPU): the adapter's initialisation."""
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
# pieces of a step


def encode_train(tokenizer, examples: list[Example], cfg: TrainConfig):  # noqa: ANN001, ANN202
    """Tokenized prompt + answer (+ EOS) of each training example, prompts cut from the left at
    ``max_length``; the loss covers the answer, or everything with ``train_on_prompt``."""
    eos = tokenizer.eos_token or ""
    out = [encode_pair(tokenizer, ex.prompt, ex.answer + eos, cfg.max_length) for ex in examples]
    if cfg.train_on_prompt:
        for e in out:
            e.n_context = 1
    return out


def labelled_forward(model, batch: dict[str, torch.Tensor]):  # noqa: ANN001, ANN201
    """A causal LM's forward over ``batch`` whose output head runs only where a label (not -100)
    is predicted (``head_at``): no (B, S, vocab) logits tensor.

    Returns:
        ``(output, target)``: the output, whose ``logits`` are (labelled tokens, vocab) in
        row-major order, and those tokens' next-token targets (labelled tokens,).
    """
    target = batch["labels"][:, 1:]  # (B, S-1)
    keep = target != -100
    select = torch.nn.functional.pad(keep, (0, 1), value=False)  # (B, S): predicts a label
    with head_at(model, select):  # no KV cache: a training forward never reads it back
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        )
    return out, target[keep]


def bf16_enabled(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast: ``cfg.bf16``, else on for CUDA devices that support it."""
    if cfg.bf16 is not None:
        return cfg.bf16
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def micro_batch(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """``(examples per micro-batch on a rank, examples per optimizer step)``."""
    micro = max(1, cfg.batch_size // (world * cfg.grad_accum))
    return micro, micro * world * cfg.grad_accum


def non_finite_message(step: int, loss: float, cfg: TrainConfig, adapter: MoELoRAConfig) -> str:
    return (
        f"step {step + 1}: training loss is {loss} (lr {cfg.learning_rate:g}, "
        f"method {adapter.method}); lower the learning rate or the loss coefficients"
    )


def evaluate_sharded(model, tokenizer, examples, cfg: TrainConfig, device) -> EvalResult:  # noqa: ANN001
    """Score ``examples``, each rank its shard; the counts are summed over the ranks, so every
    rank returns the same accuracy and loss (its own shard's predictions)."""
    rank, world = rank_and_world()
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
    sums = all_reduce_sum(sums.to(device)).cpu().tolist()
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
    run's seed alone: a run draws the same masks alone and packed with others
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
    checkpoints. Each slot of the trainer (``graphlora.packed_train``) keeps one, so a slot
    reports what the same run alone reports.

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
            log_rank0(
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
        log_rank0(
            f"[graphlora] {self.label}eval @ 0: val_accuracy {res.accuracy:.4f} "
            f"val_loss {res.loss:.4f}"
        )
        if self.test:
            res = self._evaluate(self.test)
            self.metrics["step0_test_accuracy"] = res.accuracy
            log_rank0(
                f"[graphlora] {self.label}step 0 test_accuracy {res.accuracy:.4f} on "
                f"{res.total} examples"
            )
        self.metrics["step0_eval_time_s"] = time.perf_counter() - t1

    def evaluate(self) -> dict[str, float]:
        """Evaluate on validation after the step just taken; returns (and keeps) the metrics."""
        t1 = time.perf_counter()
        train_health = routing_health(self.adapter, reset=True)  # the batches since the last
        res, val_health = self._evaluate_with_health(self.val)
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
            **train_health,
            **val_health,
            **{k: v for k, v in self.metrics.items() if k.startswith("step0_")},
        }
        self.eval_time += metrics["eval_time_s"]
        metrics["eval_time_total_s"] = self.eval_time
        metrics["checkpoint_time_s"] = self.checkpoint_time
        log_rank0(
            f"[graphlora] {self.label}eval @ {self.step}: val_accuracy {res.accuracy:.4f} "
            f"val_loss {res.loss:.4f} (best {self.best_val:.4f})"
        )
        self.loss_sum, self.aux_sum, self.loss_n = 0.0, {}, 0
        self.metrics = metrics
        return metrics

    def _evaluate_with_health(self, examples: list[Example]) -> tuple[EvalResult, dict]:
        """Evaluate ``examples`` and measure how their tokens are routed: ``val_routing/<field>``
        for the model-wide figures of ``graphlora.health`` (held-out tokens, this rank's shard)."""
        context = getattr(self.adapter, "graphlora_context", None)
        if context is None:
            return self._evaluate(examples), {}
        context.health_in_eval = True
        try:
            res = self._evaluate(examples)
        finally:
            context.health_in_eval = False
        health = routing_health(self.adapter, reset=True)
        return res, {f"val_{k}": v for k, v in health.items() if k.startswith("routing/")}

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
            log_rank0(
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
            "block_health": [b.routing_health.detach().cpu() for b in moe_blocks(self.adapter)],
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
        for key, name in (("block_counts", "routing_counts"), ("block_health", "routing_health")):
            if key in progress:  # routing counts and health since the last evaluation
                for block, saved in zip(moe_blocks(self.adapter), progress[key], strict=True):
                    getattr(block, name).copy_(saved.to(getattr(block, name).device))
        if "dropout_rng" in progress:  # older checkpoints drew dropout from the global RNG
            self.generator.set_state(progress["dropout_rng"])


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
    "gradient_checkpointing",
}


def run_shape(cfg: TrainConfig, base_model: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed by this run (JSON-ready)."""
    run = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_RUN_SHAPING}
    return json.loads(json.dumps({**run, "base_model": base_model.get("name")}, default=str))
