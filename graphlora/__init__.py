"""GraphLoRA: graph-routed mixture-of-LoRA-experts fine-tuning for Hugging Face causal LMs.

A plain PyTorch library: it never imports ray, mlflow or optuna (``pipelines/`` does).
"""

from __future__ import annotations

from graphlora.adapter_io import load_adapter, save_adapter
from graphlora.config import METHOD_PRESETS, MoELoRAConfig
from graphlora.inject import (
    count_trainable_parameters,
    inject_adapter,
    reset_load_state,
    routing_health,
    routing_stats,
)

__version__ = "0.1.0"

__all__ = [
    "METHOD_PRESETS",
    "MoELoRAConfig",
    "__version__",
    "count_trainable_parameters",
    "inject_adapter",
    "load_adapter",
    "reset_load_state",
    "routing_health",
    "routing_stats",
    "save_adapter",
]
