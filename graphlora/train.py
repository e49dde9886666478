"""One fine-tuning run: dataset + base model + adapter -> accuracy (works alone and under DDP).

``run_training`` is what every Ray Train worker of a search calls: a run is the one slot of a
``graphlora.packed_train.PackedTrainer``, the training loop (which also says how it runs on
several ``torch.distributed`` ranks).

Command line (no Ray)::

    python -m graphlora.train --model tiny-qwen2 --dataset synthetic --method graphlora
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from graphlora.config import METHOD_PRESETS, MoELoRAConfig
from graphlora.data import load_task
from graphlora.examples import DatasetSplits
from graphlora.packed_train import PackedTrainer
from graphlora.presets import adapter_defaults, training_defaults
from graphlora.run import NonFiniteLossError, OnEval, OnStep, TrainConfig, log_rank0

__all__ = [
    "NonFiniteLossError",
    "TrainConfig",
    "load_run_file",
    "main",
    "run_seeds",
    "run_training",
    "summarize_seeds",
]


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

    The run is the one slot of a ``single`` ``PackedTrainer``, which also trains an encoder
    (through a scoring head) and a base with dropout of its own (see its ``single`` argument).

    Args:
        train_cfg: run settings.
        adapter_cfg: the adapter.
        on_eval, on_step, checkpoint, resume_from: as ``PackedTrainer.add``'s:
            ``on_eval(step, metrics)`` after each evaluation (True stops the run on every rank),
            ``on_step(step, adapter)`` after each optimizer step, ``checkpoint`` gives
            ``on_eval`` a temporary checkpoint folder as a third argument (rank 0; None
            elsewhere), ``resume_from`` continues from one (same adapter and settings).
        data: pre-loaded splits (else loaded from ``train_cfg.dataset``).

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

    LoRA dropout draws from a generator of the run's own (``graphlora.run.dropout_generator``),
    kept in checkpoints; the base model's own dropout (GPT-2's, BERT's) from torch's global RNG,
    seeded with the run's seed.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (on every rank at once).
        CheckpointError: ``resume_from`` is not a checkpoint of this configuration.
    """
    trainer = PackedTrainer(train_cfg, data, single=True)
    log_rank0(
        f"[graphlora] {trainer.info.name} ({trainer.info.kind}) on {trainer.data.source}: "
        f"{len(trainer.data.train)} train / {len(trainer.data.validation)} val / "
        f"{len(trainer.data.test)} test; {trainer.world} rank(s) x {trainer.micro} x "
        f"{train_cfg.grad_accum} accum on {trainer.device}"
    )
    trainer.add(
        "run",
        train_cfg,
        adapter_cfg,
        on_eval=on_eval,
        on_step=on_step,
        checkpoint=checkpoint,
        resume_from=resume_from,
    )
    result = trainer.run()["run"]
    if result.error is not None:
        raise result.error
    return result.metrics


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
        for f in dataclasses.fields(TrainConfig):  # the flags that set a training field
            if getattr(args, f.name, None) is not None:
                training[f.name] = getattr(args, f.name)
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
