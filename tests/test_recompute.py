"""Gradient checkpointing (graphlora.recompute): a checkpointed step computes what the same step
without checkpointing computes, and counts its auxiliary losses and routing statistics once.

Every test runs the same step twice, on two copies of one model (same weights, same seeds), one
of them checkpointed, and compares the loss, the auxiliary losses, the routing counts, health and
running load, and every trainable gradient to 1e-5. LoRA dropout stays on (0.1): the replay must
draw the same masks as the forward did.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import ALL_METHODS, CLASSIC, DECODERS, tiny_base
from torch import nn

from graphlora.config import MoELoRAConfig
from graphlora.inject import inject_adapter, moe_blocks
from graphlora.packed_train import PackedTrainer
from graphlora.packing import inject_packed, use_generator_dropout
from graphlora.recompute import enable_gradient_checkpointing, gradient_checkpointing_enabled
from graphlora.run import TrainConfig
from graphlora.synthetic import make_synthetic_task

SMALL = {"gcn_hidden": 16, "dropout": 0.1}


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        out = model(**batch, labels=batch["input_ids"], use_cache=False)
        return out.loss, out
    out = model(**batch)  # an encoder: any differentiable function of its output will do
    return out.last_hidden_state.pow(2).mean() + out.get("aux_loss", 0.0), out


def _block_state(model: nn.Module) -> list[torch.Tensor]:
    return [
        t.detach().clone()
        for b in moe_blocks(model)
        for t in (b.routing_counts, b.routing_health, b.coord_load)
    ]


def _step(model: nn.Module, batch: dict[str, torch.Tensor], steps: int = 2) -> dict:
    """``steps`` forward-backward passes (the second starts from the first's running load);
    returns what they computed and recorded."""
    model.train()
    torch.manual_seed(7)  # the base's own dropout (BERT, GPT-2, OPT) draws from here
    use_generator_dropout(model, torch.Generator().manual_seed(3))
    losses, aux = [], []
    for _ in range(steps):
        loss, out = _loss(model, batch)
        loss.backward()
        losses.append(loss.detach())
        aux.append({k: v.detach() for k, v in (out.get("aux_losses") or {}).items()})
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": losses, "aux": aux, "blocks": _block_state(model), "grads": grads}


def _assert_same(ref: dict, got: dict) -> None:
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["loss"], ref["loss"], **close)
    assert [sorted(a) for a in got["aux"]] == [sorted(a) for a in ref["aux"]]
    for a, b in zip(ref["aux"], got["aux"], strict=True):
        for key in a:
            torch.testing.assert_close(b[key], a[key], **close, msg=f"aux {key}")
    # Counted once per forward: exactly the same counts, health and load, not twice as much.
    for a, b in zip(ref["blocks"], got["blocks"], strict=True):
        torch.testing.assert_close(b, a, **close)
    assert got["grads"].keys() == ref["grads"].keys() and ref["grads"]
    for name, grad in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, **close, msg=name)


def _pair(arch: str, config: MoELoRAConfig) -> tuple[nn.Module, nn.Module]:
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(inject_adapter(tiny_base(arch), config))
    enable_gradient_checkpointing(models[1])
    return models[0], models[1]


@pytest.mark.parametrize("arch", [*DECODERS, *CLASSIC])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_a_checkpointed_step_equals_the_step_without(method, arch, batch):
    ref, ckpt = _pair(arch, MoELoRAConfig(method=method, **SMALL))
    assert gradient_checkpointing_enabled(ckpt) and not gradient_checkpointing_enabled(ref)
    _assert_same(_step(ref, batch), _step(ckpt, batch))


def test_the_layers_are_really_recomputed(batch):
    # Each MoE block starts twice per step under checkpointing (forward, then the replay, which
    # stops as soon as it has what the backward needs: a pre-hook sees it, a forward hook may not).
    ref, ckpt = _pair("qwen2", MoELoRAConfig(method="graphlora", **SMALL))
    calls = {"ref": 0, "ckpt": 0}
    for key, model in (("ref", ref), ("ckpt", ckpt)):
        for block in moe_blocks(model):
            block.register_forward_pre_hook(lambda *a, k=key: calls.__setitem__(k, calls[k] + 1))
        _step(model, batch, steps=1)
    assert calls == {"ref": 2, "ckpt": 4}


def test_packed_slots_with_checkpointing_equal_the_pack_without(batch):
    configs = {
        "a": MoELoRAConfig(method="graphlora-paper", num_experts=4, **SMALL),
        "b": MoELoRAConfig(method="mixlora", num_experts=3, **SMALL),
    }
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = tiny_base("qwen2")
        pack = inject_packed(model, configs, seeds={"a": 1, "b": 2})
        if checkpointed:
            enable_gradient_checkpointing(model)
        model.train()
        rows = {"a": 2, "b": 1}
        seen = []
        for _ in range(2):
            with pack.layout(rows):
                out = model(**batch, use_cache=False)
                parts = pack.split(out.logits)
            loss = sum(parts[s].pow(2).mean() + out["slot_aux_loss"][s] for s in ("a", "b"))
            loss.backward()
            seen.append(
                [loss.detach()]
                + [v.detach() for s in "ab" for v in out["slot_aux_losses"][s].values()]
            )
        grads = {
            f"{s}.{n}": p.grad.clone()
            for s in "ab"
            for n, p in pack.adapter(s).named_parameters()
            if p.grad is not None
        }
        state = [_block_state(pack.adapter(s)) for s in "ab"]
        results.append((seen, grads, state))
    (ref_seen, ref_grads, ref_state), (seen, grads, state) = results
    torch.testing.assert_close(seen, ref_seen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, ref_state, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    torch.testing.assert_close(grads, ref_grads, rtol=1e-5, atol=1e-5)


def test_a_packed_trainer_of_two_runs_trains_the_same_with_checkpointing():
    data = make_synthetic_task(n_train=24, n_val=4, n_test=4)
    common = dict(max_steps=3, batch_size=4, eval_every=3, max_eval_examples=4, log_every=0)
    runs = {
        "g": (0, MoELoRAConfig(method="graphlora", num_experts=4, **SMALL)),
        "m": (1, MoELoRAConfig(method="mixlora", num_experts=3, **SMALL)),
    }
    out = []
    for checkpointed in (False, True):
        base = TrainConfig(**common, gradient_checkpointing=checkpointed)
        trainer = PackedTrainer(base, data)
        assert gradient_checkpointing_enabled(trainer.model) is checkpointed
        weights: dict[str, list] = {}
        for slot, (seed, adapter) in runs.items():
            cfg = TrainConfig(**common, seed=seed, gradient_checkpointing=checkpointed)
            weights[slot] = []
            trainer.add(
                slot,
                cfg,
                adapter,
                on_step=lambda step, view, w=weights[slot]: w.append(
                    {n: p.detach().clone() for n, p in view.named_parameters()}
                ),
            )
        results = trainer.run()
        out.append(({s: r.metrics for s, r in results.items()}, weights))
    (ref_metrics, ref_weights), (metrics, weights) = out
    for slot in runs:
        for key, value in ref_metrics[slot].items():
            if not any(t in key for t in ("time", "samples_per_sec", "peak_memory")):
                assert metrics[slot][key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
        torch.testing.assert_close(weights[slot], ref_weights[slot], rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_is_validated():
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        TrainConfig(gradient_checkpointing="sometimes")
    assert TrainConfig(gradient_checkpointing="auto").gradient_checkpointing == "auto"
