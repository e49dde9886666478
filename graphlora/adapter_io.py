"""An adapter on disk: its weights and graph (``adapter_model.safetensors``) and its config
(``adapter_config.json``), saved from a model carrying an adapter (or a packed slot's view,
``graphlora.packing.Pack.adapter``) and loaded into a fresh base model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from graphlora.config import MoELoRAConfig
from graphlora.inject import gcn_hidden_used, inject_adapter, is_adapter_name

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT_VERSION = 1


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter parameters and persistent buffers (the graph included), by name."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_name(k)}


def save_adapter(
    model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None
) -> Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into folder ``path``.

    ``adapter_config.json`` holds the config as asked for (``adapter``), for a graph router
    ``gcn_hidden_used``: the GCN width actually built (``gcn_hidden`` capped at the hidden size),
    and for an encoder with a scoring head its ``head`` spec.

    Args:
        model: a model carrying an adapter.
        path: output folder (created).
        metadata: extra JSON-ready facts to keep with the config (e.g. the base model reference).
    """
    config = _config_of(model)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in adapter_state_dict(model).items()}
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / WEIGHTS_NAME)
    doc = {"format_version": FORMAT_VERSION, "adapter": config.to_dict(), **(metadata or {})}
    used = gcn_hidden_used(model)
    if used is not None:
        doc["gcn_hidden_used"] = used
    head = getattr(model, "graphlora_head", None)
    if head is not None:
        doc["head"] = head.spec()
    (out / CONFIG_NAME).write_text(json.dumps(doc, indent=2, sort_keys=True))
    return out


def read_adapter_config(path: str | Path) -> tuple[MoELoRAConfig, dict[str, Any]]:
    """The adapter config and the extra metadata saved in folder ``path``."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no adapter config here; expected a save_adapter folder")
    doc = json.loads(file.read_text())
    adapter = doc.pop("adapter")
    for name in ("expert_features", "balance"):  # saved before these existed: the paper's forms
        adapter.setdefault(name, "paper")
    return MoELoRAConfig.from_dict(adapter), doc


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Inject the adapter saved in ``path`` into base ``model`` and load its weights and graph.

    The result runs without merging: the adapter modules stay in place. Returns the model.
    """
    config, meta = read_adapter_config(path)
    inject_adapter(model, config)
    if meta.get("head"):  # an encoder's scoring head, saved with the adapter
        from graphlora.encoder import attach_head

        attach_head(model, **meta["head"])
    return load_adapter_weights(model, path)


def load_adapter_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the adapter weights and graph saved in ``path`` into a model already carrying the
    same adapter (``inject_adapter``); the base weights are untouched. Returns the model."""
    state = load_file(str(Path(path) / WEIGHTS_NAME))
    return load_adapter_state_dict(model, state, source=str(path))


def load_adapter_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], source: str = "adapter state"
) -> nn.Module:
    """Load adapter weights and graph ``state`` (as ``adapter_state_dict`` gives them) into a
    model already carrying the same adapter; the base weights are untouched. Returns the model.

    Raises:
        ValueError: the keys are not exactly the model's adapter keys (``source`` names where
            the state came from in the message).
    """
    expected = set(adapter_state_dict(model))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(
            f"{source}: adapter weights do not fit this model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); was it saved from another base model?"
        )
    model.load_state_dict(state, strict=False)
    return model


def _config_of(model: nn.Module) -> MoELoRAConfig:
    config = getattr(model, "graphlora_config", None)
    if config is None:
        raise ValueError("this model carries no GraphLoRA adapter; call inject_adapter first")
    return config
