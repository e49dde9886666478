"""The memory plan (graphlora.memory): planned from the config alone, it agrees with one real
training step of the real modules, measured on CPU tensors (tiny presets) and on fake tensors at
Qwen2-7B's exact configuration (2 of its 28 layers)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from graphlora.config import MoELoRAConfig
from graphlora.memory import (
    GPUS,
    SHIPPED_CONFIGS,
    decide_checkpointing,
    measure_step,
    model_config,
    plan_memory,
)

GiB = 2**30
# The plan must come within this share of the measured peak, both ways.
AGREEMENT = (0.85, 1.15)


def _ratio(plan, measured) -> float:  # noqa: ANN001
    return plan.total / measured.peak


def test_the_shipped_configs_load_offline_with_their_notice():
    folder = Path(__file__).parents[1] / "graphlora" / "model_configs"
    assert "Apache" in (folder / "NOTICE").read_text()
    assert "Llama 3 Community License" in (folder / "NOTICE").read_text()
    qwen = model_config("Qwen/Qwen2-7B")
    assert (qwen.hidden_size, qwen.intermediate_size, qwen.num_hidden_layers) == (3584, 18944, 28)
    assert (qwen.num_key_value_heads, qwen.vocab_size) == (4, 152064)
    llama = model_config("meta-llama/Meta-Llama-3-8B")
    assert (llama.hidden_size, llama.intermediate_size, llama.num_hidden_layers) == (
        4096,
        14336,
        32,
    )
    for name in SHIPPED_CONFIGS.values():
        json.loads((folder / name / "config.json").read_text())


def test_the_plan_counts_the_real_parameters_from_the_config_alone():
    plan = plan_memory(
        "Qwen/Qwen2-7B", MoELoRAConfig(method="graphlora"), batch_size=16, max_length=256
    )
    # Qwen2-7B has 7.62 B parameters (bf16: 14.2 GiB).
    assert plan.weights == pytest.approx(7.6156e9 * 2, rel=1e-3)
    assert plan.optimizer == 2 * plan.adapter == 2 * plan.gradients
    assert "planned peak" in plan.describe()


@pytest.mark.parametrize(
    ("preset", "method"),
    [("tiny-qwen2", "graphlora"), ("tiny-llama", "mixlora"), ("tiny-gpt2", "graphlora")],
)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_plan_agrees_with_a_real_cpu_step(preset, method, checkpointing):
    adapter = MoELoRAConfig(method=method, num_experts=8, rank=8)
    shape = dict(batch_size=8, max_length=64, dtype="float32", labelled_per_row=4)
    shape["gradient_checkpointing"] = checkpointing
    measured = measure_step(preset, adapter, fake=False, **shape)
    plan = plan_memory(preset, adapter, **shape)
    assert AGREEMENT[0] <= _ratio(plan, measured) <= AGREEMENT[1], plan.describe()


@pytest.mark.slow
def test_the_plan_agrees_with_a_fake_step_at_qwen2_7b():
    # Qwen2-7B's exact configuration but 2 of its 28 layers; one step on fake tensors, bf16,
    # 16 rows of 256 tokens, the answer's 4 tokens labelled.
    config = copy.deepcopy(model_config("Qwen/Qwen2-7B"))
    config.num_hidden_layers = 2
    adapter = MoELoRAConfig(method="graphlora", num_experts=8, top_k=2, rank=16, alpha=32.0)
    shape = dict(batch_size=16, max_length=256, labelled_per_row=4)
    measured = measure_step(config, adapter, fake=True, **shape)
    plan = plan_memory(config, adapter, **shape)
    assert measured.fake and measured.layers == 2
    # Not a formula checked against itself: the step's own peak is about 10 GiB.
    assert 8 * GiB < measured.peak < 13 * GiB
    assert AGREEMENT[0] <= _ratio(plan, measured) <= AGREEMENT[1], plan.describe()


def test_checkpointing_cuts_the_planned_activations_of_a_7b_trial():
    adapter = MoELoRAConfig(method="graphlora", num_experts=8, top_k=2, rank=2)
    shape = dict(batch_size=16, max_length=256, labelled_per_row=8)
    off = plan_memory("Qwen/Qwen2-7B", adapter, **shape)
    on = plan_memory("Qwen/Qwen2-7B", adapter, gradient_checkpointing=True, **shape)
    assert on.weights == off.weights and on.adapter == off.adapter
    assert on.activations < off.activations / 5
    assert not off.fits(GPUS["H100 80GB"]) and on.fits(GPUS["A100 40GB"])


def test_auto_decides_from_the_budget():
    adapter = MoELoRAConfig(method="graphlora", num_experts=8, top_k=2, rank=2)
    shape = dict(batch_size=16, max_length=256, labelled_per_row=8)
    assert decide_checkpointing("Qwen/Qwen2-7B", adapter, budget=None, **shape) is False
    assert decide_checkpointing("Qwen/Qwen2-7B", adapter, budget=80e9, **shape) is True
    assert decide_checkpointing("tiny-qwen2", adapter, budget=24e9, **shape) is False


def test_a_run_resolves_auto_from_its_own_shape_and_the_budget():
    from graphlora.memory import resolve_checkpointing, trial_shape
    from graphlora.run import TrainConfig

    adapter = MoELoRAConfig(method="graphlora", num_experts=8, top_k=2, rank=2)
    run = TrainConfig(model="Qwen/Qwen2-7B", batch_size=16, grad_accum=2, max_length=256)
    assert trial_shape(run)["batch_size"] == 8 and trial_shape(run)["dtype"] == "bfloat16"
    auto = TrainConfig(**{**run.to_dict(), "gradient_checkpointing": "auto"})
    assert resolve_checkpointing(auto, adapter, budget=None) is False
    assert resolve_checkpointing(auto, adapter, budget=24e9, labelled_per_row=8) is True
    assert resolve_checkpointing(auto, adapter, budget=1e12, labelled_per_row=8) is False
    assert resolve_checkpointing(run, adapter, budget=80e9) is False  # false stays false
