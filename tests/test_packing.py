"""Packed adapters (graphlora.packing): a slot of a pack computes what its adapter alone computes.

Every comparison gives each slot's rows the same sequence width in the pack as alone, as a host
packing trials will. Rows padded to a wider common width would not be comparable to 1e-5: the
base model's sums run over more (masked) positions and its matrix products take other shapes, so
the hidden states differ by about 1e-7, and where two experts' router probabilities nearly tie,
top-k can then pick another expert for a token, which changes that token's output far more than
the rounding did.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphlora.adapter_io import load_adapter, load_adapter_state_dict
from graphlora.config import MoELoRAConfig
from graphlora.inject import count_trainable_parameters, inject_adapter, moe_blocks
from graphlora.packing import GeneratorDropout, inject_packed, use_generator_dropout
from graphlora.presets import build_preset_model
from graphlora.structure import UnsupportedModelError

CONFIGS = {  # experts, top-k, rank, losses, dropout, attention and layers all differ
    "graph": MoELoRAConfig(
        method="graphlora",
        num_experts=4,
        rank=2,
        gcn_hidden=16,
        edge_density=0.5,
        poisson_coef=0.01,
        normal_coef=2.0,
        dropout=0.1,
    ),
    "plain": MoELoRAConfig(method="lora", rank=4, dropout=0.0),
    "mix": MoELoRAConfig(
        method="mixlora",
        num_experts=6,
        top_k=3,
        rank=8,
        dropout=0.05,
        attention_lora=False,
        target_layers=[1, 3],
    ),
    "dense": MoELoRAConfig(method="loramoe", num_experts=3, rank=3, alpha=6.0, dropout=0.2),
}
ROWS, WIDTH = 2, 10


def _base(preset: str) -> nn.Module:
    """The preset with its own dropout off: the base model's dropout (GPT-2's 0.1 on embeddings,
    attention and residuals) draws from torch's global RNG over the whole packed batch, so with it
    on a slot's rows would get other masks in a pack than alone."""
    model = build_preset_model(preset)[0]
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def _batch(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (ROWS, WIDTH), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, WIDTH - 3 - seed % 3 :] = 0  # padding at the end, of a different length per slot
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _packed_batch(batches: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([b[k] for b in batches.values()]) for k in ("input_ids", "attention_mask")}


def _task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the next token at labelled positions (the causal LM loss)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())


def _randomize(pack, seed: int = 0) -> None:  # noqa: ANN001
    """Non-zero B so every slot's experts differ from the base and from each other."""
    gen = torch.Generator().manual_seed(seed)
    for slot in pack.slots:
        for name, p in pack.adapter(slot).named_parameters():
            if "lora_B" in name:
                with torch.no_grad():
                    p.normal_(std=0.2, generator=gen)


def _alone(preset: str, pack, slot: str) -> nn.Module:  # noqa: ANN001
    """``slot``'s config injected alone into a fresh model, with the slot's weights and a dropout
    generator in the state the slot's generator is in now."""
    model = inject_adapter(_base(preset), pack.config(slot))
    load_adapter_state_dict(model, pack.state_dict(slot))
    gen = torch.Generator()
    gen.set_state(pack.generator(slot).get_state())
    return use_generator_dropout(model, gen)


def _adapter_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-gpt2"])
def test_each_slot_computes_what_its_adapter_alone_computes(preset):
    torch.manual_seed(0)
    model = _base(preset)
    pack = inject_packed(model, CONFIGS, seeds={s: 10 + i for i, s in enumerate(CONFIGS)})
    _randomize(pack)
    alone = {slot: _alone(preset, pack, slot) for slot in pack.slots}
    batches = {slot: _batch(model, i) for i, slot in enumerate(pack.slots)}

    model.train()
    with pack.layout({slot: ROWS for slot in pack.slots}):
        out = model(**_packed_batch(batches))
        logits = pack.split(out.logits)
    losses = {}
    for slot, batch in batches.items():
        losses[slot] = _task_loss(logits[slot], batch["labels"])
        if slot in out.slot_aux_loss:
            losses[slot] = losses[slot] + out.slot_aux_loss[slot]
    sum(losses.values()).backward()
    assert set(out.slot_aux_losses) == {"graph", "mix"}  # lora and loramoe have none

    for slot, ref_model in alone.items():
        ref_model.train()
        ref = ref_model(**batches[slot])
        ref.loss.backward()
        close = dict(rtol=1e-5, atol=1e-5, msg=lambda m, s=slot: f"slot {s}: {m}")
        torch.testing.assert_close(logits[slot], ref.logits, **close)
        torch.testing.assert_close(losses[slot], ref.loss, **close)
        if slot in out.slot_aux_losses:
            assert set(out.slot_aux_losses[slot]) == set(ref.aux_losses)
            for key, value in ref.aux_losses.items():
                torch.testing.assert_close(out.slot_aux_losses[slot][key], value, **close)
        else:
            assert "aux_losses" not in ref
        view = pack.adapter(slot)
        grads = _adapter_grads(ref_model)
        assert set(grads) == {n for n, p in view.named_parameters() if p.requires_grad}
        packed = dict(view.named_parameters())
        for name, grad in grads.items():
            assert grad is not None and packed[name].grad is not None, name
            torch.testing.assert_close(packed[name].grad, grad, **close)
        for mine, theirs in zip(moe_blocks(view), moe_blocks(ref_model), strict=True):
            torch.testing.assert_close(mine.coord_load, theirs.coord_load, **close)
            assert torch.equal(mine.routing_counts, theirs.routing_counts)
        assert count_trainable_parameters(view) == count_trainable_parameters(ref_model)
    # The slots' dropout did draw, from their own generators (seeded 10 + position).
    for i, slot in enumerate(pack.slots):
        fresh = torch.Generator().manual_seed(10 + i).get_state()
        assert torch.equal(pack.generator(slot).get_state(), fresh) == (slot == "plain")


def test_a_pack_of_one_is_the_adapter_alone_bit_for_bit():
    config = CONFIGS["graph"]
    torch.manual_seed(3)
    pack = inject_packed(_base("tiny-qwen2"), {"only": config}, seeds={"only": 5})
    torch.manual_seed(3)
    alone = inject_adapter(_base("tiny-qwen2"), config)
    # Built as inject_adapter builds it: with the same torch seed, the same initial weights.
    for key, value in pack.state_dict("only").items():
        assert torch.equal(value, alone.state_dict()[key]), key
    _randomize(pack)
    load_adapter_state_dict(alone, pack.state_dict("only"))
    use_generator_dropout(alone, torch.Generator().manual_seed(5))
    batch = _batch(alone, 0)
    pack.model.train()
    alone.train()
    with pack.layout({"only": ROWS}):
        out = pack.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    (_task_loss(out.logits, batch["labels"]) + out.slot_aux_loss["only"]).backward()
    ref = alone(**batch)
    ref.loss.backward()
    assert torch.equal(out.logits, ref.logits)
    packed = dict(pack.adapter("only").named_parameters())
    for name, grad in _adapter_grads(alone).items():
        assert torch.equal(packed[name].grad, grad), name


def _slot_outputs(pack, batches) -> dict[str, torch.Tensor]:  # noqa: ANN001
    with torch.no_grad(), pack.layout({slot: ROWS for slot in batches}):
        return pack.split(pack.model(**_packed_batch(batches)).logits)


def test_removing_and_adding_slots_leaves_the_others_unchanged():
    torch.manual_seed(0)
    pack = inject_packed(_base("tiny-qwen2"), CONFIGS)
    _randomize(pack)
    batches = {slot: _batch(pack.model, i) for i, slot in enumerate(pack.slots)}
    before = _slot_outputs(pack, batches)
    swapped = _slot_outputs(pack, dict(reversed(batches.items())))  # order of slots in the batch
    for slot in pack.slots:
        torch.testing.assert_close(swapped[slot], before[slot], rtol=0, atol=1e-6)

    pack.remove("mix")
    assert "mix" not in pack.slots and not any("mix" in n for n, _ in pack.model.named_modules())
    del batches["mix"]
    after = _slot_outputs(pack, batches)
    for slot in batches:
        torch.testing.assert_close(after[slot], before[slot], rtol=0, atol=1e-6)

    late = MoELoRAConfig(method="mingmoe", num_experts=5, rank=2, dropout=0.0)
    pack.add("late", late)
    batches["late"] = _batch(pack.model, 7)
    inputs = {k: v for k, v in batches["late"].items() if k != "labels"}
    added = _slot_outputs(pack, batches)
    base_logits = _base("tiny-qwen2")(**inputs).logits
    torch.testing.assert_close(added["late"], base_logits, rtol=0, atol=1e-5)  # B = 0
    for slot in after:
        torch.testing.assert_close(added[slot], after[slot], rtol=0, atol=1e-6)
    _randomize(pack, seed=1)  # every slot's B drawn again, the new one's included
    moved = _slot_outputs(pack, batches)
    del batches["late"]
    without = _slot_outputs(pack, batches)
    for slot in batches:
        torch.testing.assert_close(moved[slot], without[slot], rtol=0, atol=1e-6)
    alone = _alone("tiny-qwen2", pack, "late").eval()
    ref = alone(**inputs).logits
    torch.testing.assert_close(moved["late"], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-gpt2", "tiny-opt"])  # OPT: flat tokens
def test_a_saved_slot_loads_as_an_ordinary_adapter(preset, tmp_path):
    torch.manual_seed(0)
    pack = inject_packed(_base(preset), CONFIGS)
    _randomize(pack)
    batches = {slot: _batch(pack.model, i) for i, slot in enumerate(pack.slots)}
    outputs = _slot_outputs(pack, batches)
    other = inject_packed(_base(preset))  # an empty pack takes slots from adapter folders
    for slot in pack.slots:
        path = pack.save_adapter(slot, tmp_path / slot, metadata={"base_model": preset})
        model = load_adapter(_base(preset), path).eval()
        inputs = {k: v for k, v in batches[slot].items() if k != "labels"}
        with torch.no_grad():
            logits = model(**inputs).logits
        torch.testing.assert_close(logits, outputs[slot], rtol=1e-5, atol=1e-5)
        other.load_adapter(slot, path)
        for key, value in pack.state_dict(slot).items():
            assert torch.equal(other.state_dict(slot)[key], value), key
    reloaded = _slot_outputs(other, batches)
    for slot in pack.slots:
        torch.testing.assert_close(reloaded[slot], outputs[slot], rtol=0, atol=1e-6)


def test_per_slot_parameters_load_and_routing_counts():
    torch.manual_seed(0)
    pack = inject_packed(_base("tiny-qwen2"), CONFIGS)
    params = {slot: {id(p) for p in pack.parameters(slot)} for slot in pack.slots}
    for a in pack.slots:
        assert all(not params[a] & params[b] for b in pack.slots if b != a)
    trainable = {id(p) for p in pack.model.parameters() if p.requires_grad}
    assert trainable == set().union(*params.values())  # the base is frozen
    batches = {slot: _batch(pack.model, i) for i, slot in enumerate(pack.slots)}
    pack.model.train()
    with pack.layout({"graph": ROWS, "mix": ROWS}):  # slots without rows compute nothing
        pack.model(**_packed_batch({s: batches[s] for s in ("graph", "mix")}))
    real = int(batches["graph"]["attention_mask"].sum())
    assert all(sum(c) == real * 2 for c in pack.routing_counts("graph"))  # top-2, real tokens
    assert all(sum(c) == 0 for c in pack.routing_counts("dense"))
    assert len(pack.routing_counts("mix")) == 2  # target_layers [1, 3]
    assert all(b.routing_health[0] == 1 for b in moe_blocks(pack.adapter("graph")))  # one batch
    pack.reset_load("graph")
    assert all(b.routing_health.sum() == 0 for b in moe_blocks(pack.adapter("graph")))
    assert all(sum(c) > 0 for c in pack.routing_counts("mix"))


def test_generator_dropout_follows_its_generator_only():
    drop = GeneratorDropout(0.5, torch.Generator().manual_seed(1)).train()
    x = torch.ones(64)
    torch.manual_seed(0)
    a = drop(x)
    drop.generator.manual_seed(1)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(drop(x), a)
    assert set(a.tolist()) == {0.0, 2.0}
    assert torch.equal(drop.eval()(x), x)


def test_misuse_is_refused_clearly():
    pack = inject_packed(_base("tiny-qwen2"), {"a": CONFIGS["plain"]})
    ids = torch.zeros(3, 4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="no layout is set"):
        pack.model(input_ids=ids)
    with pytest.raises(ValueError, match="the batch has 3 rows but the layout"):
        with pack.layout({"a": 2}):
            pack.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    with pytest.raises(KeyError, match="'b': not in the pack"):
        pack.layout({"b": 1}).__enter__()
    with pack.layout({"a": 1}), pytest.raises(RuntimeError, match="in the current layout"):
        pack.remove("a")
    with pytest.raises(ValueError, match="already in the pack"):
        pack.add("a", CONFIGS["plain"])
    for bad in ("x.y", "", "my_lora_1"):
        with pytest.raises(ValueError, match="slot id"):
            pack.add(bad, CONFIGS["plain"])
    with pytest.raises(ValueError, match="carries packed adapters"):
        inject_adapter(pack.model, CONFIGS["plain"])
    with pytest.raises(ValueError, match="already packed"):
        inject_packed(pack.model)

    class OneFFN(nn.Module):  # an FFN and no attention
        def __init__(self) -> None:
            super().__init__()
            self.mlp = nn.Module()
            self.mlp.gate_proj, self.mlp.up_proj = nn.Linear(8, 16), nn.Linear(8, 16)
            self.mlp.down_proj, self.mlp.act_fn = nn.Linear(16, 8), nn.SiLU()

    ffn_only = inject_packed(OneFFN())
    with pytest.raises(UnsupportedModelError, match="set attention_lora: false"):
        ffn_only.add("a", CONFIGS["plain"])
    assert ffn_only.slots == ()
    ffn_only.add("a", MoELoRAConfig(method="mixlora", num_experts=2, attention_lora=False))
