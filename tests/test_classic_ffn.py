"""The adapter on classic (non-gated) FFNs: BERT's split intermediate/output, GPT-2's Conv1D
c_fc/c_proj, OPT's fc1/fc2 on the decoder layer (docs/method.md section 1, the non-gated form)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import ALL_METHODS, CLASSIC, model_output, tiny_base
from torch import nn
from transformers.pytorch_utils import Conv1D

from graphlora.adapter_io import load_adapter, save_adapter
from graphlora.config import MoELoRAConfig
from graphlora.inject import (
    count_trainable_parameters,
    inject_adapter,
    is_adapter_name,
    moe_blocks,
    reset_load_state,
)
from graphlora.moe import LoRALinear, MoELoRAFFN, PassThrough
from graphlora.structure import UnsupportedModelError, find_ffns

SMALL = {"gcn_hidden": 16}


def _cfg(method: str, **kw) -> MoELoRAConfig:
    return MoELoRAConfig(method=method, **{**SMALL, **kw})


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if hasattr(model, "lm_head"):
        return model(**batch, labels=batch["input_ids"]).loss
    out = model(**batch)  # an encoder: any differentiable function of its output will do
    return out.last_hidden_state.pow(2).mean() + out.get("aux_loss", 0.0)


def _train_steps(model: nn.Module, batch: dict[str, torch.Tensor], steps: int = 3) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        _loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("arch", CLASSIC)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_output_equals_base_right_after_injection(method, arch, batch):
    ref = model_output(tiny_base(arch), batch)
    model = inject_adapter(tiny_base(arch), _cfg(method))
    assert len(moe_blocks(model)) == 2
    torch.testing.assert_close(model_output(model, batch), ref, rtol=0, atol=1e-5)


def _weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``F.linear`` takes it, (out, in); a ``Conv1D`` stores it as (in, out)."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def _naive_expert(block: MoELoRAFFN, e: int, x: torch.Tensor) -> torch.Tensor:
    """E_e(h) = (W_down + s B_down A_down) act((W_up + s B_up A_up) h), full matrices."""
    s, up, down = block.scaling, block.base_up, block.base_down
    w_up = _weight(up) + s * block.lora_B_up[e] @ block.lora_A_up[e]
    w_down = _weight(down) + s * block.lora_B_down[e] @ block.lora_A_down[e]
    return F.linear(block.act(F.linear(x, w_up, up.bias)), w_down, down.bias)


@pytest.mark.parametrize("arch", CLASSIC)
@pytest.mark.parametrize("method", ["graphlora", "mixlora", "loramoe", "lora"])
def test_block_equals_per_expert_reference(arch, method):
    torch.manual_seed(0)
    experts = None if method == "lora" else 4
    model = inject_adapter(tiny_base(arch), _cfg(method, dropout=0.0, num_experts=experts))
    block = moe_blocks(model)[0]
    assert isinstance(block, MoELoRAFFN)
    for p in block.parameters():
        if p.requires_grad:
            p.data.normal_(std=0.3)  # non-zero B so experts differ
    x = torch.randn(2, 5, 32)
    flat = x.reshape(-1, 32)
    out = block(x).reshape(-1, 32)
    routing = block._route(flat)
    ref = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for slot in range(routing.indices.shape[1]):
            e = routing.indices[t, slot].item()
            ref[t] += routing.weights[t, slot] * _naive_expert(block, e, flat[t : t + 1])[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_split_bert_ffn_keeps_dropout_residual_and_layernorm(batch):
    model = inject_adapter(tiny_base("bert"), _cfg("mixlora"))
    layer = model.encoder.layer[0]
    assert isinstance(layer.intermediate.dense, MoELoRAFFN)
    assert isinstance(layer.intermediate.intermediate_act_fn, PassThrough)
    assert isinstance(layer.output.dense, PassThrough)
    assert isinstance(layer.output.LayerNorm, nn.LayerNorm)  # untouched, applied after the block
    block = layer.intermediate.dense
    h = torch.randn(2, 3, 32)
    expected = layer.output.LayerNorm(block(h) + h)  # eval: dropout off
    torch.testing.assert_close(layer.feed_forward_chunk(h), expected)


@pytest.mark.parametrize(
    ("arch", "names"),
    [
        ("bert", {"query", "key", "value", "dense"}),
        ("gpt2", {"c_attn", "c_proj"}),
        ("opt", {"q_proj", "k_proj", "v_proj", "out_proj"}),
    ],
)
def test_attention_lora_finds_each_layout(arch, names):
    model = inject_adapter(tiny_base(arch), _cfg("graphlora"))
    found = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(found) == 2 * len(names)
    assert {n.rpartition(".")[2] for n in found} == names
    assert not any(".mlp." in n or "intermediate" in n for n in found)


def test_attention_lora_refused_when_no_projections_are_known():
    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mixer = nn.Linear(8, 8)  # not an attention layout the adapter knows
            self.fc1, self.activation_fn, self.fc2 = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)

    model = nn.Sequential(Layer(), Layer())
    with pytest.raises(UnsupportedModelError, match=r"attention_lora is on.*attention_lora: false"):
        inject_adapter(model, _cfg("mixlora"))
    assert isinstance(model[0].fc1, nn.Linear), "a refused injection must change nothing"
    inject_adapter(model, _cfg("mixlora", attention_lora=False))
    assert isinstance(model[0].fc1, MoELoRAFFN) and isinstance(model[1].fc2, PassThrough)


@pytest.mark.parametrize("arch", CLASSIC)
def test_trainable_parameter_count_closed_form(arch):
    cfg = _cfg("mixlora", attention_lora=False)
    model = inject_adapter(tiny_base(arch), cfg)
    d, inter, r, n = 32, 64, cfg.rank, cfg.experts_for(0, 2)
    per_layer = n * r * (2 * d + 2 * inter) + n * d  # up/down A and B per expert + router
    assert count_trainable_parameters(model) == 2 * per_layer


@pytest.mark.parametrize("arch", CLASSIC)
def test_train_then_save_load_reproduces_outputs(arch, batch, tmp_path):
    model = inject_adapter(tiny_base(arch), _cfg("graphlora", dropout=0.0, graph_seed=3))
    before = {k: v.clone() for k, v in model.state_dict().items() if not is_adapter_name(k)}
    _train_steps(model, batch)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items()), "frozen weights changed"
    assert any(b.lora_B_up.abs().sum() > 0 for b in moe_blocks(model)), "the adapter did not learn"
    ref = model_output(model, batch)
    save_adapter(model, tmp_path / "ad")
    loaded = load_adapter(tiny_base(arch), tmp_path / "ad").eval()
    assert torch.equal(model_output(loaded, batch), ref)


def test_padding_excluded_from_statistics_when_tokens_are_flattened(batch):
    # OPT flattens (B, S, d) to (B*S, d) before fc1; the mask must still line up.
    model = inject_adapter(tiny_base("opt"), _cfg("mixlora"))
    assert find_ffns(tiny_base("opt"))[0].owner == "model.decoder.layers.0"
    reset_load_state(model)
    model.train()
    model(**batch)
    real = int(batch["attention_mask"].sum())
    for block in moe_blocks(model):
        assert block.routing_counts.sum().item() == real * block.top_k
