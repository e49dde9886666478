"""The packed trainer (graphlora.packed_train): each slot trains as its configuration trains alone.

Four configurations that differ in method (plain ``lora`` and ``graphlora`` among them), experts,
top-k, rank, learning rate, seed, steps and evaluation schedule train side by side over one
tiny-qwen2, and each must report at every evaluation, and end with, what ``run_training`` reports
and ships for it alone (same seed), to 1e-5.

Every training example of the ``synthetic`` task tokenizes to the same width (asserted below), so
a slot's rows have the same width packed as alone. Rows padded to a wider common width would not
be comparable to 1e-5: the base model's sums run over more (masked) positions and its matrix
products take other shapes, which moves hidden states by about 1e-7, and where two experts' router
probabilities nearly tie, top-k can then pick another expert for a token.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from gloo_ranks import run_on_ranks
from safetensors.torch import load_file

from graphlora.adapter_io import WEIGHTS_NAME
from graphlora.config import MoELoRAConfig
from graphlora.models import load_model_and_tokenizer
from graphlora.packed_train import PackedTrainer, run_packed
from graphlora.run import encode_train
from graphlora.synthetic import make_synthetic_task
from graphlora.train import NonFiniteLossError, TrainConfig, run_training

DATA = make_synthetic_task(n_train=40, n_val=8, n_test=8)
TIMING = ("time", "samples_per_sec", "peak_memory")  # not what a run computes


def _cfg(**kw) -> TrainConfig:
    base = dict(
        max_steps=4,
        batch_size=4,
        eval_every=2,
        max_eval_examples=8,
        max_test_examples=8,
        log_every=0,
    )
    return TrainConfig(**{**base, **kw})


RUNS = {
    "graph": (
        _cfg(seed=0),
        MoELoRAConfig(
            method="graphlora", num_experts=4, top_k=2, rank=2, gcn_hidden=16, dropout=0.1
        ),
    ),
    "plain": (_cfg(seed=1, learning_rate=1e-3, eval_test=False), MoELoRAConfig(method="lora")),
    "mix": (
        _cfg(seed=2, learning_rate=5e-3, max_steps=5),
        MoELoRAConfig(method="mixlora", num_experts=6, top_k=3, rank=8),
    ),
    "dense": (
        _cfg(seed=3, eval_every=3, eval_at_start=True),
        MoELoRAConfig(method="loramoe", num_experts=3, rank=3, dropout=0.2),
    ),
}


def _with_output(cfg: TrainConfig, folder: Path) -> TrainConfig:
    return TrainConfig(**{**cfg.to_dict(), "output_dir": str(folder)})


@pytest.fixture(scope="module")
def alone(tmp_path_factory) -> dict[str, tuple[list[dict], dict, Path]]:
    """Each configuration trained alone by run_training: its evaluations, its final metrics and
    the folder of its saved adapter."""
    out = {}
    root = tmp_path_factory.mktemp("alone")
    for slot, (cfg, adapter) in RUNS.items():
        seen: list[dict] = []
        final = run_training(
            _with_output(cfg, root / slot),
            adapter,
            data=DATA,
            on_eval=lambda step, m, seen=seen: seen.append(m),
        )
        out[slot] = (seen, final, root / slot)
    return out


def _assert_same_metrics(a: dict, b: dict, what: str) -> None:
    assert set(a) == set(b), f"{what}: keys differ: {sorted(set(a) ^ set(b))}"
    for key in a:
        if not any(t in key for t in TIMING):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), f"{what}: {key}"


def _assert_same_weights(a: Path, b: Path, what: str) -> None:
    wa, wb = load_file(str(a / WEIGHTS_NAME)), load_file(str(b / WEIGHTS_NAME))
    assert wa.keys() == wb.keys(), what
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-5, msg=f"{what}: {key}")


def _assert_as_alone(alone, slot: str, seen: list[dict], final: dict, folder: Path) -> None:  # noqa: ANN001
    ref_seen, ref_final, ref_folder = alone[slot]
    assert [m["step"] for m in seen] == [m["step"] for m in ref_seen], slot
    for ref, got in zip(ref_seen, seen, strict=True):
        _assert_same_metrics(ref, got, f"slot {slot}, step {ref['step']:.0f}")
    _assert_same_metrics(ref_final, final, f"slot {slot}, final")
    _assert_same_weights(ref_folder, folder, f"slot {slot}")


def _trainer(tmp: Path, slots, seen: dict[str, list], **kw) -> PackedTrainer:  # noqa: ANN001
    trainer = PackedTrainer(RUNS["graph"][0], DATA)
    for slot in slots:
        cfg, adapter = RUNS[slot]
        seen[slot] = []
        trainer.add(
            slot,
            _with_output(cfg, tmp / slot),
            adapter,
            on_eval=lambda step, m, s=seen[slot]: s.append(m),
            **kw.get(slot, {}),
        )
    return trainer


def test_every_training_example_has_the_same_width():
    # The premise of comparing to 1e-5 (module docstring).
    _, tokenizer, _ = load_model_and_tokenizer("tiny-qwen2")
    widths = {len(e.ids) for e in encode_train(tokenizer, DATA.train, _cfg())}
    assert len(widths) == 1, widths


def test_a_pack_trains_each_configuration_as_it_trains_alone(alone, tmp_path):
    seen: dict[str, list] = {}
    trainer = _trainer(tmp_path, RUNS, seen)
    training_forwards = []
    trainer.model.register_forward_pre_hook(lambda m, a: training_forwards.append(m.training))
    results = trainer.run()
    # One forward of the base per step over every slot's rows (5 steps: the longest slot's).
    assert training_forwards.count(True) == 5
    assert set(results) == set(RUNS) and trainer.slots == ()
    for slot in RUNS:
        assert results[slot].error is None
        _assert_as_alone(alone, slot, seen[slot], results[slot].metrics, tmp_path / slot)
    assert "test_accuracy" not in results["plain"].metrics  # its own eval_test: False
    assert "step0_val_accuracy" in results["dense"].metrics  # its own eval_at_start
    assert [m["step"] for m in seen["dense"]] == [3, 4]  # its own eval_every


def test_removing_and_adding_slots_mid_run_leaves_every_slot_as_alone(alone, tmp_path):
    seen: dict[str, list] = {}
    trainer = _trainer(tmp_path, ["graph", "mix", "plain"], seen)
    for _ in range(2):
        assert trainer.step() == []
    last = trainer.remove("mix")  # stopped from outside: leaves at once, nothing more
    assert last["step"] == 2 and "mix" not in trainer.slots and not (tmp_path / "mix").exists()
    assert not any(".mix." in name for name, _ in trainer.model.named_modules())
    cfg, adapter = RUNS["dense"]
    seen["dense"] = []
    trainer.add(
        "dense",
        _with_output(cfg, tmp_path / "dense"),
        adapter,
        on_eval=lambda step, m: seen["dense"].append(m),
    )
    results = trainer.run()
    assert set(results) == {"graph", "plain", "dense"}
    for slot in results:
        _assert_as_alone(alone, slot, seen[slot], results[slot].metrics, tmp_path / slot)
    with pytest.raises(ValueError, match="'mix': id already used"):
        trainer.add("mix", *RUNS["mix"])


def test_a_non_finite_loss_ends_only_its_slot(alone, tmp_path):
    seen: dict[str, list] = {}
    trainer = _trainer(tmp_path, ["graph", "mix"], seen)
    cfg, adapter = RUNS["plain"]
    trainer.add("plain", _cfg(**{**cfg.to_dict(), "inject_nan_at_step": 3}), adapter)
    trainer.step(), trainer.step()
    ended = trainer.step()
    assert [r.slot for r in ended] == ["plain"] and trainer.slots == ("graph", "mix")
    assert isinstance(ended[0].error, NonFiniteLossError)
    assert str(ended[0].error).startswith("step 3: training loss is nan")
    assert ended[0].metrics["step"] == 2  # its last evaluation
    results = trainer.run()
    for slot in ("graph", "mix"):
        assert results[slot].error is None
        _assert_as_alone(alone, slot, seen[slot], results[slot].metrics, tmp_path / slot)


def test_a_slot_checkpoint_resumes_to_the_same_result(alone, tmp_path):
    saved: dict[int, Path] = {}

    def keep(step: int, metrics: dict, state_dir: Path) -> None:
        saved[step] = Path(shutil.copytree(state_dir, tmp_path / f"at{step}"))

    cfg, adapter = RUNS["graph"]  # dropout 0.1: its generator must resume where it was
    trainer = PackedTrainer(cfg, DATA)
    trainer.add("graph", cfg, adapter, on_eval=keep, checkpoint=True)
    trainer.add("mix", *RUNS["mix"])
    for _ in range(3):
        trainer.step()
    assert sorted(saved) == [2]
    mid = trainer.save_checkpoint("graph", tmp_path / "at3")  # between evaluations
    del trainer

    # A slot's checkpoint resumes in another pack, next to another slot...
    later = PackedTrainer(cfg, DATA)
    later.add("dense", *RUNS["dense"])
    later.add("graph", _with_output(cfg, tmp_path / "packed"), adapter, resume_from=mid)
    packed = later.run()["graph"].metrics
    _assert_same_metrics(alone["graph"][1], packed, "resumed in a pack at step 3")
    _assert_same_weights(alone["graph"][2], tmp_path / "packed", "resumed in a pack at step 3")
    # ... and alone: a slot's checkpoint is run_training's.
    final = run_training(
        _with_output(cfg, tmp_path / "single"), adapter, data=DATA, resume_from=saved[2]
    )
    _assert_same_metrics(alone["graph"][1], final, "resumed alone at step 2")
    _assert_same_weights(alone["graph"][2], tmp_path / "single", "resumed alone at step 2")


def test_an_on_eval_stop_finishes_the_slot_as_run_training_does(tmp_path):
    cfg, adapter = RUNS["graph"]
    stop = dict(on_eval=lambda step, m: step >= 2)
    ref = run_training(_with_output(cfg, tmp_path / "alone"), adapter, data=DATA, **stop)
    trainer = PackedTrainer(cfg, DATA)
    trainer.add("graph", _with_output(cfg, tmp_path / "packed"), adapter, **stop)
    trainer.add("plain", *RUNS["plain"])
    trainer.step()
    ended = trainer.step()
    assert [r.slot for r in ended] == ["graph"] and trainer.slots == ("plain",)
    assert ended[0].metrics["stopped_early"] == 1.0 and "test_accuracy" in ended[0].metrics
    _assert_same_metrics(ref, ended[0].metrics, "stopped at step 2")
    _assert_same_weights(tmp_path / "alone", tmp_path / "packed", "stopped at step 2")


def test_a_trainer_is_freed_when_its_last_reference_goes():
    """No slot keeps its trainer alive: `del` frees it without waiting for the cyclic GC (a
    script that builds trainers one after another does not pile them up)."""
    import gc
    import weakref

    trainer = PackedTrainer(RUNS["graph"][0], DATA)
    trainer.add("graph", *RUNS["graph"])
    trainer.step()
    ref = weakref.ref(trainer)
    gc.disable()
    try:
        del trainer
        assert ref() is None
    finally:
        gc.enable()


def test_what_the_slots_cannot_share_is_refused_clearly():
    trainer = PackedTrainer(RUNS["graph"][0], DATA)
    adapter = RUNS["plain"][1]
    for field, value in (("max_length", 256), ("batch_size", 8), ("model", "tiny-llama")):
        with pytest.raises(ValueError, match=rf"slot 'x': {field}=.* the packed slots share"):
            trainer.add("x", _cfg(**{field: value}), adapter)
    assert trainer.slots == () and trainer.pack.slots == ()
    with pytest.raises(ValueError, match="an encoder trains through a scoring head"):
        PackedTrainer(_cfg(model="tiny-bert"), DATA)
    with pytest.raises(ValueError, match="base model has dropout .* base_dropout_off=True"):
        PackedTrainer(_cfg(model="tiny-gpt2"), DATA)


def test_with_the_base_dropout_off_slots_do_not_depend_on_each_other(capsys):
    # GPT-2 drops out on embeddings, attention and residuals; turned off, the base runs in eval
    # mode while the slots' adapters train (their LoRA dropout and auxiliary losses on).
    gpt2 = {
        slot: (_cfg(**{**cfg.to_dict(), "model": "tiny-gpt2", "max_steps": 2}), adapter)
        for slot, (cfg, adapter) in RUNS.items()
        if slot in ("graph", "mix")
    }
    together = run_packed(gpt2, DATA, base_dropout_off=True)
    assert "the base model's dropout is off" in capsys.readouterr().err
    for slot in gpt2:
        own = run_packed({slot: gpt2[slot]}, DATA, base_dropout_off=True)[slot].metrics
        _assert_same_metrics(own, together[slot].metrics, f"gpt2 slot {slot}")
        assert together[slot].metrics["aux_poisson" if slot == "graph" else "aux_balance"] > 0


def test_gradient_accumulation_packs_each_micro_batch():
    runs = {
        slot: (_cfg(**{**RUNS[slot][0].to_dict(), "grad_accum": 2, "max_steps": 2}), adapter)
        for slot, (_, adapter) in RUNS.items()
        if slot in ("graph", "plain")
    }
    together = run_packed(runs, DATA)
    for slot, (cfg, adapter) in runs.items():
        _assert_same_metrics(run_training(cfg, adapter, data=DATA), together[slot].metrics, slot)


DDP_PACK = r"""
from gloo_ranks import join, result
from test_packed_train import DATA, RUNS, _cfg, _with_output
from graphlora.packed_train import PackedTrainer
from graphlora.train import run_training
rank, _, (out,) = join()
slots = {s: RUNS[s] for s in ("graph", "plain", "mix")}
slots["nan"] = (_cfg(seed=5, inject_nan_at_step=3 + rank), RUNS["plain"][1])  # NaN on one rank
results = {}
for s, (cfg, adapter) in slots.items():
    if s == "nan":
        continue
    seen = []
    final = run_training(_with_output(cfg, f"{out}/alone-{s}"), adapter, data=DATA,
                         on_eval=lambda step, m, seen=seen: seen.append(m))
    results[s] = {"alone": seen, "alone_final": final}
trainer = PackedTrainer(slots["graph"][0], DATA)
for s, (cfg, adapter) in slots.items():
    results.setdefault(s, {})["packed"] = []
    trainer.add(s, _with_output(cfg, f"{out}/packed-{s}"), adapter,
                on_eval=lambda step, m, s=s: results[s]["packed"].append(m))
for s, r in trainer.run().items():
    results[s]["packed_final"] = r.metrics
    results[s]["error"] = str(r.error) if r.error else None
result(results)
"""


def test_two_gloo_ranks_pack_each_configuration_as_run_training_on_two_ranks(tmp_path):
    """Data-parallel packing: on 2 ranks, each slot equals its configuration's `run_training`
    on the same 2 ranks (every evaluation, final metrics, adapter weights); a NaN on one rank
    ends its slot on both."""
    results = run_on_ranks(DDP_PACK, tmp_path, str(tmp_path))
    for rank, result in enumerate(results):
        assert result["nan"]["error"].startswith("step 3: training loss is nan"), result["nan"]
        for slot in ("graph", "plain", "mix"):
            r = result[slot]
            assert r["error"] is None, (rank, slot, r["error"])
            assert [m["step"] for m in r["packed"]] == [m["step"] for m in r["alone"]]
            for ref, got in zip(r["alone"], r["packed"], strict=True):
                _assert_same_metrics(ref, got, f"rank {rank}, slot {slot}, step {ref['step']}")
            _assert_same_metrics(r["alone_final"], r["packed_final"], f"rank {rank}, {slot}")
    for slot in ("graph", "plain", "mix"):  # rank 0 wrote them; the ranks agreed
        _assert_same_weights(tmp_path / f"alone-{slot}", tmp_path / f"packed-{slot}", slot)
        a, b = results[0][slot]["packed"], results[1][slot]["packed"]
        assert [m["val_accuracy"] for m in a] == [m["val_accuracy"] for m in b]
