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
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from graphlora.adapter_io import save_adapter
from graphlora.config import METHOD_PRESETS, MoELoRAConfig
from graphlora.data import DatasetSplits, Example, load_task
from graphlora.encoder import attach_head, option_forward, option_loss
from graphlora.evaluate import EvalResult, head_at, pad_batch
from graphlora.inject import inject_adapter, reset_load_state
from graphlora.models import adapter_defaults, load_model_and_tokenizer, training_defaults
from graphlora.packing import use_generator_dropout
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
    labelled_positions,
    log_rank0,
    micro_batch,
    non_finite_message,
    pick_device,
    rank_and_world,
    run_shape,
    seed_everything,
)

__all__ = [
    "NonFiniteLossError",
    "TrainConfig",
    "load_run_file",
    "main",
    "run_seeds",
    "run_training",
    "summarize_seeds",
]


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
    rank, world = rank_and_world()
    device = pick_device(cfg.device)
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
        res = evaluate_sharded(model, tokenizer, examples, cfg, device)
        model.train()
        return res

    run = RunState(cfg, data, model, generator, evaluate, device)
    params = run.params
    use_bf16 = bf16_enabled(cfg, device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # A decoder trains on tokenized prompt + answer; an encoder on the examples' texts.
    encoded = list(data.train) if encoder else encode_train(tokenizer, data.train, cfg)
    micro, per_step = micro_batch(cfg, world)
    log_rank0(
        f"[graphlora] {info.name} ({info.kind}) on {data.source}: {len(data.train)} train / "
        f"{len(data.validation)} val / {len(data.test)} test; method {adapter_cfg.method}; "
        f"{run.n_trainable:,} trainable params; {world} rank(s) x {micro} x {cfg.grad_accum} "
        f"accum on {device}"
    )
    metadata = {"base_model": info.to_dict(), "run": run_shape(cfg, info.to_dict())}
    if resume_from is not None:
        run.load_checkpoint(resume_from, expect={"run": metadata["run"]})
        log_rank0(f"[graphlora] resumed from {resume_from} at step {run.step}/{cfg.max_steps}")
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
        flat = all_reduce_sum(flat) / world
        global_loss = flat[-1].item()
        if not math.isfinite(global_loss):
            raise NonFiniteLossError(non_finite_message(step, global_loss, cfg, adapter_cfg))
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
            flag = all_reduce_sum(torch.tensor([float(stop)], device=device))
            if flag.item() > 0 and run.step < cfg.max_steps:
                stopped_early = True
                log_rank0(f"[graphlora] stopped early at step {run.step} (asked by the caller)")
                break
    metrics = run.finish(stopped_early)
    if cfg.output_dir and rank == 0:
        save_adapter(model, cfg.output_dir, metadata={"base_model": info.to_dict()})
    return metrics


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
        log_rank0(f"[graphlora] seed {seed} ({len(per_seed) + 1}/{len(seeds)})")
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
    p.add_argument("--method", help=f"the adapter's preset: {', '.join(sorted(METHOD_PRESETS))}")
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
