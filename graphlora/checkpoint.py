"""Training-state checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint folder is a complete adapter folder (``save_adapter``: weights, config, graph) plus
``training_state.pt`` with the optimizer state, the step, the data order, the random number
generators, the cumulative expert loads and the running counters. So the last checkpoint of a run
is also its adapter, and a run resumed from step k takes the same batches, learning rates and
dropout masks it would have taken had it never stopped.

``run_training(..., checkpoint=True)`` writes one after every evaluation;
``run_training(..., resume_from=folder)`` continues from one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from graphlora.adapter_io import load_adapter_weights, read_adapter_config, save_adapter
from graphlora.inject import moe_blocks

STATE_NAME = "training_state.pt"
STATE_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint folder is missing, corrupt, or was written by another configuration."""


def save_training_state(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: dict[str, Any],
    *,
    order_rng: random.Random,
    order: list[int],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write the adapter and the training state into folder ``path`` (created).

    Args:
        path: output folder.
        model: the model carrying the adapter.
        optimizer: its optimizer.
        progress: JSON-like counters (``step``, ``best_val``, ``train_time``, ``samples``...).
        order_rng: the data-order generator.
        order: the indices still queued in the current epoch.
        metadata: extra facts for ``adapter_config.json`` (e.g. the base model reference and the
            training settings, which ``load_training_state`` checks).
    """
    out = save_adapter(model, path, metadata=metadata)
    state = {
        "format": STATE_FORMAT,
        "progress": dict(progress),
        "optimizer": optimizer.state_dict(),
        "order_rng": order_rng.getstate(),
        "order": list(order),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "coord_load": [block.coord_load.detach().cpu() for block in moe_blocks(model)],
    }
    tmp = out / (STATE_NAME + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out / STATE_NAME)  # a reader never sees half a state file
    return out


def load_training_state(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    order_rng: random.Random,
    expect: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[int]]:
    """Restore what ``save_training_state`` wrote into an injected ``model`` and ``optimizer``.

    Args:
        path: checkpoint folder.
        model: the base model with the same adapter injected (fresh weights are overwritten).
        optimizer: a fresh optimizer over the adapter parameters.
        order_rng: the data-order generator, set to its saved state.
        expect: metadata entries that must match what the checkpoint recorded (e.g. the
            training settings that shape the run), else ``CheckpointError``.

    Returns:
        ``(progress, order)``: the saved counters and the queued data indices.

    Raises:
        CheckpointError: the folder is not a checkpoint, is corrupt, or does not match.
    """
    folder = Path(path)
    file = folder / STATE_NAME
    if not file.is_file():
        raise CheckpointError(f"{folder}: no {STATE_NAME}; not a training checkpoint")
    try:
        config, meta = read_adapter_config(folder)
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch/json raise many types; all mean "corrupt" here
        raise CheckpointError(f"{folder}: unreadable checkpoint ({err})") from err
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{folder}: checkpoint format {state.get('format')} is unsupported")
    if config.to_dict() != model.graphlora_config.to_dict():
        raise CheckpointError(f"{folder}: written for another adapter configuration")
    for key, want in (expect or {}).items():
        have = meta.get(key)
        if have == want:
            continue
        if isinstance(have, dict) and isinstance(want, dict):
            diff = sorted(k for k in have.keys() | want.keys() if have.get(k) != want.get(k))
            raise CheckpointError(
                f"{folder}: written by another run: "
                + ", ".join(f"{k}={have.get(k)!r} there, {want.get(k)!r} here" for k in diff[:3])
            )
        raise CheckpointError(f"{folder}: written with {key}={have!r}, this run has {want!r}")
    load_adapter_weights(model, folder)
    optimizer.load_state_dict(state["optimizer"])
    blocks = moe_blocks(model)
    for block, load in zip(blocks, state["coord_load"], strict=True):
        block.coord_load.copy_(load.to(block.coord_load.device))
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    order_rng.setstate(_as_tuple(state["order_rng"]))
    return dict(state["progress"]), list(state["order"])


def _as_tuple(value: Any) -> Any:
    """random.Random states are nested tuples; some serialisers hand back lists."""
    if isinstance(value, list | tuple):
        return tuple(_as_tuple(v) for v in value)
    return value


def read_progress(path: str | Path) -> tuple[int, dict[str, float]]:
    """``(step, metrics of the evaluation at that step)`` of a checkpoint folder, without a model.

    Raises:
        CheckpointError: the folder holds no readable training state.
    """
    file = Path(path) / STATE_NAME
    try:
        progress = torch.load(file, map_location="cpu", weights_only=True)["progress"]
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable checkpoint ({err})") from err
    return int(progress["step"]), dict(progress["metrics"])
