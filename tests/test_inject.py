from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from tiny_models import ALL_METHODS, tiny_base

from graphlora.adapter_io import load_adapter, read_adapter_config, save_adapter
from graphlora.config import MoELoRAConfig
from graphlora.inject import (
    count_trainable_parameters,
    gcn_hidden_used,
    inject_adapter,
    is_adapter_name,
    moe_blocks,
    reset_load_state,
    routing_stats,
)
from graphlora.moe import MoELoRAMLP
from graphlora.structure import UnsupportedModelError

SMALL = {"gcn_hidden": 16}  # keep the graph router tiny in unit tests


def _cfg(method: str, **kw) -> MoELoRAConfig:
    return MoELoRAConfig(method=method, **{**SMALL, **kw})


def _train_steps(model, batch, steps=3, lr=1e-2):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        out = model(**batch, labels=batch["input_ids"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_output_equals_base_right_after_injection(method, arch, batch):
    base = tiny_base(arch)
    ref = base(**batch).logits
    model = inject_adapter(base, _cfg(method))
    torch.testing.assert_close(model(**batch).logits, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_only_adapter_parameters_change(method, batch):
    model = inject_adapter(tiny_base(), _cfg(method, dropout=0.0))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _train_steps(model, batch)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    frozen_changed = {k for k in changed if not is_adapter_name(k)}
    assert not frozen_changed, f"frozen weights changed: {sorted(frozen_changed)[:5]}"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(is_adapter_name(n) for n in trainable)
    assert any("lora_B" in k for k in changed), "the adapter did not learn"
    if method.startswith("graphlora") and method != "graphlora-no-graph":
        assert any("router_gcn_weights" in k for k in changed)


def _naive_expert(block: MoELoRAMLP, e: int, x: torch.Tensor) -> torch.Tensor:
    """E_e(h) straight from docs/method.md section 1, with full weight matrices."""
    r, s, b = block.lora_B_gate.shape[-1], block.scaling, block.base_mlp
    a_gate, a_up = block.lora_A_gate_up[e][:r], block.lora_A_gate_up[e][r:]
    w_gate = b.gate_proj.weight + s * block.lora_B_gate[e] @ a_gate
    w_up = b.up_proj.weight + s * block.lora_B_up[e] @ a_up
    w_down = b.down_proj.weight + s * block.lora_B_down[e] @ block.lora_A_down[e]
    return F.linear(block.act(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


@pytest.mark.parametrize("method", ["mixlora", "graphlora", "loramoe", "lora", "mola"])
def test_sparse_dispatch_matches_naive_top_k_mixture(method):
    torch.manual_seed(0)
    model = inject_adapter(
        tiny_base(), _cfg(method, dropout=0.0, num_experts=4 if method != "lora" else None)
    )
    block = moe_blocks(model)[0]
    for p in block.parameters():
        if p.requires_grad:
            p.data.normal_(std=0.3)  # non-zero B so experts differ
    x = torch.randn(2, 5, 32)
    block.reset_load()
    block.train()  # routing counts are kept for training tokens only
    out = block(x).reshape(-1, 32)
    flat = x.reshape(-1, 32)
    routing = block._route(flat)
    k = block.top_k
    assert routing.indices.shape == (10, k)
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(10))
    # Each token reached exactly K distinct experts.
    assert block.routing_counts.sum().item() == 10 * k
    assert all(len(set(row)) == k for row in routing.indices.tolist())
    ref = torch.zeros_like(flat)
    for t in range(10):
        for slot in range(k):
            e = routing.indices[t, slot].item()
            ref[t] += routing.weights[t, slot] * _naive_expert(block, e, flat[t : t + 1])[0]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_padding_excluded_from_statistics(batch):
    model = inject_adapter(tiny_base(), _cfg("mixlora"))
    reset_load_state(model)
    model.train()
    model(**batch)
    real = int(batch["attention_mask"].sum())
    for block in moe_blocks(model):
        assert block.routing_counts.sum().item() == real * block.top_k
    # Aux losses must not change when only padded positions change.
    a = model(**batch, labels=batch["input_ids"]).aux_losses["balance"]
    ids2 = batch["input_ids"].clone()
    ids2[batch["attention_mask"] == 0] = 5
    b = model(input_ids=ids2, attention_mask=batch["attention_mask"], labels=ids2).aux_losses
    torch.testing.assert_close(a, b["balance"])


def test_forward_exposes_weighted_aux_losses(batch):
    model = inject_adapter(tiny_base(), _cfg("graphlora"))
    model.train()
    out = model(**batch, labels=batch["input_ids"])
    assert set(out.aux_losses) == {"poisson", "normal"}
    expected = 0.8 * out.aux_losses["poisson"] + 8.0 * out.aux_losses["normal"]
    torch.testing.assert_close(out.aux_loss, expected)
    torch.testing.assert_close(out.loss, out.task_loss + expected)
    model.eval()
    assert "aux_loss" not in model(**batch)  # evaluation passes add nothing


def test_lambda_sigma_train_and_load_accumulates(batch):
    model = inject_adapter(tiny_base(), _cfg("graphlora-paper"))  # the running load c
    model.train()
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    block = moe_blocks(model)[0]
    assert block.coord_lambda.grad.abs().item() > 0
    assert block.coord_sigma_raw.grad.abs().item() > 0
    assert block.sigma.item() == pytest.approx(4.0)
    first = block.coord_load.clone()
    real = int(batch["attention_mask"].sum())
    assert 0 < first.sum().item() <= real  # each real token adds its top-k probabilities (<= 1)
    model(**batch, labels=batch["input_ids"])
    assert block.coord_load.sum() > first.sum()
    model.eval()
    model(**batch)
    before_eval = block.coord_load.clone()
    model(**batch)
    assert torch.equal(block.coord_load, before_eval), "evaluation must not update c"
    reset_load_state(model)
    assert block.coord_load.sum().item() == 0


def _expected_trainable(cfg: MoELoRAConfig, layers: int = 2) -> int:
    d, inter, q_out, kv_out, r = 32, 64, 32, 16, cfg.rank
    total = 0
    for pos in range(layers):
        n = cfg.experts_for(pos, layers)
        total += n * r * (3 * d + 3 * inter)  # gate/up/down A and B per expert
        if cfg.router in ("softmax", "dense"):
            total += n * d
        elif cfg.router == "graph":
            h = cfg.gcn_hidden
            total += h * d + n * h + cfg.gcn_layers * h * h + h
        total += int(cfg.poisson_coef > 0 and cfg.router != "none")
        # sigma trains only in the paper's balance form
        total += int(cfg.normal_coef > 0 and cfg.router != "none" and cfg.balance == "paper")
        if cfg.attention_lora:
            total += r * ((d + q_out) + 2 * (d + kv_out) + (q_out + d))
    return total


@pytest.mark.parametrize("method", ALL_METHODS)
def test_trainable_parameter_count_closed_form(method):
    cfg = _cfg(method)
    model = inject_adapter(tiny_base(), cfg)
    assert count_trainable_parameters(model) == _expected_trainable(cfg)
    cfg2 = _cfg(method, attention_lora=False, target_layers=[-1])
    model2 = inject_adapter(tiny_base(), cfg2)
    full = _expected_trainable(cfg2, layers=1)
    assert count_trainable_parameters(model2) == full


@pytest.mark.parametrize("method", ALL_METHODS)
def test_save_load_reproduces_outputs_exactly(method, batch, tmp_path):
    model = inject_adapter(tiny_base(), _cfg(method, graph_seed=5))
    _train_steps(model, batch)
    ref = model(**batch).logits
    save_adapter(model, tmp_path / "ad", metadata={"base_model": "tiny"})
    loaded = load_adapter(tiny_base(), tmp_path / "ad")
    loaded.eval()
    assert torch.equal(loaded(**batch).logits, ref)
    if method == "graphlora":
        a, b = moe_blocks(model)[0].router, moe_blocks(loaded)[0].router
        assert torch.equal(a.router_edge_index, b.router_edge_index)


def test_capped_gcn_width_is_recorded(batch, tmp_path):
    cfg = _cfg("graphlora", gcn_hidden=256)  # wider than the tiny model (hidden 32)
    model = inject_adapter(tiny_base(), cfg)
    assert gcn_hidden_used(model) == cfg.gcn_hidden_for(32) == 32
    assert moe_blocks(model)[0].router.router_gcn_weights[0].shape == (32, 32)
    save_adapter(model, tmp_path / "ad")
    saved, meta = read_adapter_config(tmp_path / "ad")
    assert saved.gcn_hidden == 256 and meta["gcn_hidden_used"] == 32  # asked, and built
    loaded = load_adapter(tiny_base(), tmp_path / "ad")
    assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    plain = inject_adapter(tiny_base(), _cfg("mixlora"))
    assert gcn_hidden_used(plain) is None
    save_adapter(plain, tmp_path / "plain")
    assert "gcn_hidden_used" not in read_adapter_config(tmp_path / "plain")[1]


def test_load_into_wrong_base_fails_clearly(batch, tmp_path):
    model = inject_adapter(tiny_base(layers=2), _cfg("mixlora"))
    save_adapter(model, tmp_path / "ad")
    with pytest.raises(ValueError, match="do not fit this model"):
        load_adapter(tiny_base(layers=3), tmp_path / "ad")


def test_unsupported_architecture_error_says_what_was_found():
    class MLP(torch.nn.Module):  # neither gated nor a classic layout the adapter knows
        def __init__(self) -> None:
            super().__init__()
            self.w_in, self.w_out = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    model = torch.nn.Module()
    model.mlp = MLP()
    with pytest.raises(UnsupportedModelError, match=r"gate_proj.*c_fc.*found: MLP with children"):
        inject_adapter(model, _cfg("graphlora"))


def test_target_layers_and_double_injection():
    model = inject_adapter(tiny_base(), _cfg("mixlora", target_layers=[1]))
    assert len(moe_blocks(model)) == 1
    assert isinstance(model.model.layers[1].mlp, MoELoRAMLP)
    with pytest.raises(ValueError, match="already has"):
        inject_adapter(model, _cfg("mixlora"))
    with pytest.raises(ValueError, match="^target_layers: layer 5"):
        inject_adapter(tiny_base(), _cfg("mixlora", target_layers=[5]))


def test_injected_modules_follow_the_model_mode():
    model = inject_adapter(tiny_base(), _cfg("graphlora"))  # tiny_base is in eval mode
    assert not any(m.training for m in model.modules())
    model = inject_adapter(tiny_base().train(), _cfg("graphlora"))
    assert all(m.training for m in model.modules())


def test_routing_stats_count_training_tokens_only(batch):
    model = inject_adapter(tiny_base(), _cfg("graphlora"))
    model.train()
    model(**batch, labels=batch["input_ids"])
    block = moe_blocks(model)[0]
    counts = block.routing_counts.clone()
    real = int(batch["attention_mask"].sum())
    assert counts.sum().item() == real * block.top_k
    # Validation passes in the middle of training (as run_training does) change nothing.
    model.eval()
    model(**batch)
    assert torch.equal(block.routing_counts, counts), "evaluation tokens were counted"
    stats = routing_stats(model)
    assert {"layer0/load_cv", "layer1/load_entropy", "routing/load_max_frac"} <= set(stats)
    assert 0 <= stats["routing/load_entropy"] <= 1
    assert routing_stats(model) == {}  # reset after reading


def test_bf16_model_routes_in_fp32(batch):
    model = inject_adapter(tiny_base().to(torch.bfloat16), _cfg("graphlora"))
    logits = model(**batch).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_import_graphlora_loads_no_ray_mlflow_optuna():
    code = (
        "import sys, graphlora, graphlora.inject, graphlora.losses, graphlora.routers;"
        "import importlib, pkgutil;"
        "[importlib.import_module('graphlora.' + m.name)"
        " for m in pkgutil.iter_modules(graphlora.__path__)];"
        "bad = [m for m in ('ray', 'mlflow', 'optuna') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
