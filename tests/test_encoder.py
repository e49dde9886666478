"""Encoders score multiple choice through a similarity head over option texts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from graphlora.adapter_io import load_adapter, save_adapter
from graphlora.config import MoELoRAConfig
from graphlora.data import Example, load_task
from graphlora.encoder import attach_head, option_logits, option_loss
from graphlora.examples import parse_listed_options
from graphlora.inject import inject_adapter, is_adapter_name
from graphlora.models import load_model_and_tokenizer
from graphlora.train import run_training


def test_listed_options_are_parsed_from_llm_adapters_instructions():
    arc = (
        "Please choose the correct answer to the question: Which gas do plants take in?\n\n"
        "Answer1: oxygen Answer2: carbon dioxide Answer3: helium\n\n"
        "Answer format: answer1/answer2/answer3"
    )
    assert parse_listed_options(arc, ["answer1", "answer2", "answer3"]) == (
        "Which gas do plants take in?",
        ("oxygen", "carbon dioxide", "helium"),
    )
    wino = (
        "Please choose the correct answer to fill in the blank to complete the given sentence: "
        "Sarah beat Maria so _ won.\n\nOption1: Sarah Option2: Maria Answer format: option1/option2"
    )
    assert parse_listed_options(wino, ["option1", "option2"])[1] == ("Sarah", "Maria")
    boolq = "Please answer the following question with true or false, question: is it?\n\n"
    assert parse_listed_options(boolq + "Answer format: true/false", ["true", "false"]) == (
        "is it?",
        (),
    )


@pytest.mark.parametrize("task", ["arc-easy", "openbookqa", "siqa", "piqa", "winogrande"])
def test_shipped_tasks_carry_option_texts(task):
    test = load_task(task).test
    assert all(len(ex.options) == len(ex.candidates) for ex in test)
    assert all(all(ex.options) and ex.question for ex in test)
    assert not load_task("boolq").test[0].options  # BoolQ's files carry no passage


def test_options_must_match_candidates():
    with pytest.raises(ValueError, match="one option text per candidate"):
        Example(prompt="q", candidates=(" a", " b"), label=0, options=("x",))


def _examples() -> list[Example]:
    return [
        Example("p", (" answer1", " answer2", " answer3"), 1, "why?", ("yes", "no", "maybe")),
        Example("p", (" option1", " option2"), 0, "fill _ in", ("Sarah", "Maria")),
    ]


def test_similarity_head_trains_with_the_adapter_and_is_saved_with_it(tmp_path):
    model, tokenizer, info = load_model_and_tokenizer("tiny-bert", dtype="float32")
    assert info.architecture == "encoder"
    inject_adapter(model, MoELoRAConfig(method="graphlora", num_experts=4, gcn_hidden=16))
    attach_head(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "graphlora_head.log_scale" in trainable and all(is_adapter_name(n) for n in trainable)
    examples = _examples()
    logits = option_logits(model, tokenizer, examples)
    assert [lg.shape for lg in logits] == [torch.Size([3]), torch.Size([2])]
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = option_loss(option_logits(model, tokenizer, examples), [ex.label for ex in examples])
        loss.backward()
        assert model.graphlora_head.log_scale.grad is not None
        opt.step()
        opt.zero_grad()
    model.eval()
    assert model.graphlora_head.log_scale.item() != pytest.approx(torch.tensor(20.0).log().item())
    with torch.no_grad():
        want = option_logits(model, tokenizer, examples)
    save_adapter(model, tmp_path / "ad")
    fresh, _, _ = load_model_and_tokenizer("tiny-bert", dtype="float32")
    loaded = load_adapter(fresh, tmp_path / "ad").eval()
    with torch.no_grad():
        got = option_logits(loaded, tokenizer, examples)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_examples_without_option_texts_are_refused():
    model, tokenizer, _ = load_model_and_tokenizer("tiny-bert", dtype="float32")
    attach_head(model)
    with pytest.raises(ValueError, match=r"example 0 has no option texts.*not BoolQ"):
        option_logits(model, tokenizer, [Example("p", (" true", " false"), 0)])


def _arc_slice(n_train: int = 32, n_eval: int = 8):
    """A few ARC-Easy examples (option texts listed), so a tiny encoder trains in seconds."""
    from graphlora.data import DatasetSplits

    arc = load_task("arc-easy")
    return DatasetSplits(
        arc.train[:n_train], arc.validation[:n_eval], arc.test[:n_eval], "arc-easy slice"
    )


def _encoder_cfg(**kw):
    from graphlora.train import TrainConfig

    base = dict(
        model="tiny-bert",
        dataset="arc-easy",
        max_steps=4,
        batch_size=4,
        eval_every=2,
        log_every=0,
        max_length=64,
        eval_batch_size=4,
        dtype="float32",
    )
    return TrainConfig(**{**base, **kw})


def test_run_training_trains_an_encoder_through_its_head_and_saves_it(tmp_path):
    from graphlora.evaluate import evaluate_examples

    data = _arc_slice()
    adapter = MoELoRAConfig(method="graphlora", num_experts=4, gcn_hidden=16)
    m = run_training(
        _encoder_cfg(eval_at_start=True, output_dir=str(tmp_path / "ad")), adapter, data=data
    )
    for key in ("step0_val_accuracy", "step0_test_accuracy", "val_accuracy", "test_accuracy"):
        assert 0 <= m[key] <= 1, key
    assert m["val_loss"] > 0 and m["step0_val_loss"] > 0
    assert any(k.startswith("aux_") for k in m), "the adapter's auxiliary losses were trained on"
    doc = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert doc["head"]["kind"] == "similarity"
    # The saved adapter (head included) answers the test split exactly as training scored it.
    fresh, tokenizer, _ = load_model_and_tokenizer("tiny-bert", dtype="float32")
    loaded = load_adapter(fresh, tmp_path / "ad").eval()
    res = evaluate_examples(loaded, tokenizer, data.test, batch_size=4, max_length=64)
    assert res.accuracy == m["test_accuracy"]
    assert res.loss == pytest.approx(m["test_loss"], rel=1e-5)


def test_an_encoder_checkpoint_resumes_with_its_head(tmp_path):
    data = _arc_slice()
    adapter = MoELoRAConfig(method="graphlora", num_experts=4, gcn_hidden=16)

    def keep(step, metrics, state_dir):
        if step == 2:
            shutil.copytree(state_dir, tmp_path / "ckpt")

    full = run_training(_encoder_cfg(), adapter, data=data, on_eval=keep, checkpoint=True)
    weights = load_file(tmp_path / "ckpt" / "adapter_model.safetensors")
    assert "graphlora_head.log_scale" in weights
    resumed = run_training(_encoder_cfg(), adapter, data=data, resume_from=tmp_path / "ckpt")
    assert resumed["test_accuracy"] == full["test_accuracy"]
    assert resumed["test_loss"] == pytest.approx(full["test_loss"], rel=1e-5)


def test_an_encoder_refuses_a_task_without_option_texts():
    with pytest.raises(ValueError, match=r"dataset 'boolq': train example 0 has no option texts"):
        run_training(_encoder_cfg(dataset="boolq"), MoELoRAConfig(method="lora"))
