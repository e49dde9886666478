"""TEMPORARY stand-in for `graphlora.train.run_training` until the library ships it.

Same interface as the real entry point, so the swap is one line in `pipelines/search.py`
(`DEFAULT_BACKEND`). It trains nothing: it draws a plausible accuracy curve from the
hyperparameters and the seed, sleeps a little per step, and honours `on_eval` early stopping.
Under Ray Train it all-reduces its metrics with `torch.distributed` (initialised by Ray), like
the real library, so multi-worker trials exercise the same collectives.

Env: `GRAPHLORA_STANDIN_STEP_S` seconds slept per training step (default 0.01).
"""

from __future__ import annotations

import math
import os
import random
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

METHOD_PRESETS: dict[str, dict] = dict.fromkeys(
    (
        "graphlora",
        "mixlora",
        "loramoe",
        "mingmoe",
        "mola",
        "lora",
        "graphlora-no-graph",
        "graphlora-no-poisson",
        "graphlora-no-normal",
    ),
    {},
)
DATASETS = ("synthetic", "arc-challenge", "arc-easy", "boolq", "openbookqa", "siqa")


@dataclass
class MoELoRAConfig:
    """Stand-in adapter config (field names follow SPEC.md; the real one is graphlora.config)."""

    method: str = "graphlora"
    num_experts: int = 8
    top_k: int = 2
    rank: int = 2
    alpha: float = 4.0
    dropout: float = 0.05
    edge_density: float = 0.1
    gcn_hidden: int = 256
    gcn_layers: int = 2
    poisson_coef: float = 0.005
    normal_coef: float = 8.0
    balance_coef: float = 0.01
    attention_lora: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHOD_PRESETS:
            raise ValueError(f"method: unknown {self.method!r}; one of {sorted(METHOD_PRESETS)}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k: {self.top_k} must be in [1, num_experts={self.num_experts}]")


@dataclass
class TrainConfig:
    """Stand-in training config (the real one is graphlora.train.TrainConfig)."""

    model: str = "tiny-qwen2"
    dataset: str = "synthetic"
    data_dir: str | None = None
    learning_rate: float = 2e-4
    max_steps: int = 200
    eval_every: int = 50
    batch_size: int = 8
    seed: int = 0
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_seq_len: int = 256


def _peak_accuracy(train_cfg: TrainConfig, adapter_cfg: MoELoRAConfig) -> float:
    """A smooth made-up response surface, best near the paper's optimum (N 8, K 2, r 2)."""
    lr_term = (math.log10(train_cfg.learning_rate) + 3.0) ** 2 * 0.04
    expert_term = abs(math.log2(adapter_cfg.num_experts / 8)) * 0.02
    k_term = abs(adapter_cfg.top_k - 2) * 0.015
    rank_term = abs(math.log2(max(adapter_cfg.rank, 1) / 2)) * 0.01
    method_bonus = 0.02 if adapter_cfg.method == "graphlora" else 0.0
    return max(0.3, 0.8 + method_bonus - lr_term - expert_term - k_term - rank_term)


def _all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Average metrics over DDP ranks when torch.distributed is up (Ray Train sets it up)."""
    try:
        import torch
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return values
    if not (dist.is_available() and dist.is_initialized()):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def run_training(
    train_cfg: TrainConfig,
    adapter_cfg: MoELoRAConfig,
    *,
    on_eval: Callable[[int, dict[str, float]], bool] | None = None,
) -> dict[str, float]:
    """Pretend to train; same contract as `graphlora.train.run_training`.

    Args:
        train_cfg: Training settings.
        adapter_cfg: Adapter settings.
        on_eval: Called after each evaluation with (step, metrics); returning True stops training.

    Returns:
        Final metrics, including `test_accuracy`.
    """
    if train_cfg.dataset not in DATASETS:
        raise ValueError(f"dataset: unknown {train_cfg.dataset!r}; expected one of {DATASETS}")
    step_s = float(os.environ.get("GRAPHLORA_STANDIN_STEP_S", "0.01"))
    rng = random.Random(train_cfg.seed * 1_000_003 + zlib.crc32(adapter_cfg.method.encode()))
    peak = _peak_accuracy(train_cfg, adapter_cfg)
    tau = train_cfg.max_steps / 3
    trainable = adapter_cfg.num_experts * adapter_cfg.rank * 2 * 4096 * 3
    metrics: dict[str, float] = {}
    start = time.perf_counter()
    for step in range(1, train_cfg.max_steps + 1):
        time.sleep(step_s)
        if step % train_cfg.eval_every and step != train_cfg.max_steps:
            continue
        acc = peak * (1 - math.exp(-step / tau)) + rng.gauss(0.0, 0.01)
        metrics = _all_reduce_mean(
            {
                "val_accuracy": acc,
                "val_loss": 1.5 - acc,
                "train_loss": 1.6 - acc + rng.gauss(0.0, 0.02),
                "aux_poisson": 0.1 * math.exp(-step / tau),
                "aux_normal": 0.05 * math.exp(-step / tau),
                "load_max_layer0": 1.0 / adapter_cfg.num_experts + 0.05,
            }
        )
        metrics["trainable_params"] = float(trainable)
        metrics["samples_per_sec"] = step * train_cfg.batch_size / (time.perf_counter() - start)
        if on_eval is not None and on_eval(step, dict(metrics)):
            break
    return {**metrics, "test_accuracy": metrics["val_accuracy"] - 0.01}
