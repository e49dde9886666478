from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch

from graphlora.models import (
    ModelInfo,
    ModelLoadError,
    check_model_reference,
    is_encoder_config,
    load_model_and_tokenizer,
    model_hidden_size,
    resolve_dtype,
)
from graphlora.presets import PACKAGED_MODELS, PRESETS, packaged_model_dir
from graphlora.tokenizer import build_byte_tokenizer


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub offline mode, also for libraries that read the environment at import time."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def _output(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM, last hidden states of an encoder."""
    out = model(input_ids=ids)
    return out.logits if "logits" in out else out.last_hidden_state


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds_offline_and_runs(name: str, offline: None) -> None:
    model, tokenizer, info = load_model_and_tokenizer(name, dtype="float32")
    encoder = PRESETS[name].architecture == "bert"
    assert info == ModelInfo(
        name=name,
        kind="preset",
        revision="seed=0",
        num_parameters=sum(p.numel() for p in model.parameters()),
        dtype="float32",
        architecture="encoder" if encoder else "decoder",
    )
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.model_type == PRESETS[name].architecture
    assert 2 <= model.config.num_hidden_layers <= 4
    assert 64 <= model.config.hidden_size <= 128
    assert not model.training
    ids = _ids(tokenizer, "color of K\n\nAnswer: gold")
    with torch.no_grad():
        out = _output(model, ids)
    width = model.config.hidden_size if encoder else len(tokenizer)
    assert out.shape == (1, ids.shape[1], width)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_weights_depend_only_on_seed(name: str) -> None:
    state = torch.random.get_rng_state()
    a, _, _ = load_model_and_tokenizer(name, seed=3)
    b, _, _ = load_model_and_tokenizer(name, seed=3)
    c, _, _ = load_model_and_tokenizer(name, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state), "global RNG must be left untouched"
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize(
    "text",
    ["hello world", "", "  two  spaces\n\ttab", "héllo wörld", "日本語 🎉 ∑", "e\u0301 (not NFC)"],
)
def test_byte_tokenizer_round_trips(text: str) -> None:
    tokenizer = build_byte_tokenizer()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8")), "one id per UTF-8 byte, id == byte value"
    assert tokenizer.decode(ids) == text
    assert tokenizer(text)["input_ids"] == ids, "encode adds no special tokens"


def test_byte_tokenizer_special_tokens_and_padding() -> None:
    tokenizer = build_byte_tokenizer(padding_side="left")
    assert len(tokenizer) == 259
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        256,
        257,
        258,
    )
    batch = tokenizer(["ab", "abcd"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0].tolist() == [258, 258, 97, 98]
    assert batch["attention_mask"][0].tolist() == [0, 0, 1, 1]
    right = build_byte_tokenizer()(["ab", "abcd"], padding=True)["input_ids"][0]
    assert right == [97, 98, 258, 258]
    assert tokenizer.decode([97, 257, 98], skip_special_tokens=True) == "ab"
    with pytest.raises(ValueError, match="padding_side"):
        build_byte_tokenizer(padding_side="middle")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_save_and_load_local_directory(name: str, tmp_path: Path, offline: None) -> None:
    model, tokenizer, _ = load_model_and_tokenizer(name, seed=1)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    loaded, loaded_tok, info = load_model_and_tokenizer(str(tmp_path))
    assert type(loaded) is type(model), "an encoder loads as its base class, not a causal LM"
    assert info.kind == "local"
    assert info.revision is None
    assert info.num_parameters == sum(p.numel() for p in model.parameters())
    text = "héllo e\u0301 wörld"
    assert loaded_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded_tok.decode(loaded_tok(text)["input_ids"]) == text
    assert loaded_tok.pad_token == tokenizer.pad_token
    ids = _ids(tokenizer, "options: blue gold\ncolor of K\n\nAnswer: gold")
    with torch.no_grad():
        assert torch.equal(_output(model, ids), _output(loaded, ids))


def test_local_directory_without_checkpoint_fails_clearly(tmp_path: Path, offline: None) -> None:
    with pytest.raises(ModelLoadError, match="save_pretrained"):
        load_model_and_tokenizer(str(tmp_path))


def test_missing_path_is_not_sent_to_the_hub(tmp_path: Path, offline: None) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_and_tokenizer(str(tmp_path / "no-such-model"))


def test_unknown_hub_id_offline_fails_fast_with_clear_message(offline: None) -> None:
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as excinfo:
        load_model_and_tokenizer("graphlora-test/no-such-model-xyz")
    assert time.monotonic() - start < 5.0
    message = str(excinfo.value)
    assert "graphlora-test/no-such-model-xyz" in message
    assert "offline" in message
    for preset in PRESETS:
        assert preset in message
    assert "local directory" in message


def test_pad_token_falls_back_to_eos(tmp_path: Path, offline: None) -> None:
    model, tokenizer, _ = load_model_and_tokenizer("tiny-llama")
    tokenizer.pad_token = None
    model.config.pad_token_id = None
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    _, loaded_tok, _ = load_model_and_tokenizer(str(tmp_path))
    assert loaded_tok.pad_token == loaded_tok.eos_token


def test_resolve_dtype() -> None:
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype(torch.float32) is torch.float32
    expected = (
        torch.bfloat16
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        else torch.float32
    )
    assert resolve_dtype("auto") is expected
    with pytest.raises(ValueError, match="Unknown dtype"):
        resolve_dtype("float8")


def test_preset_dtype_is_applied() -> None:
    model, _, info = load_model_and_tokenizer("tiny-qwen2", dtype="bfloat16")
    assert next(model.parameters()).dtype is torch.bfloat16
    assert info.dtype == "bfloat16"


def test_encoder_detection() -> None:
    from transformers import BertConfig, GPT2Config, RobertaConfig

    assert is_encoder_config(BertConfig()) and is_encoder_config(RobertaConfig())
    assert not is_encoder_config(BertConfig(is_decoder=True))
    assert not is_encoder_config(BertConfig(architectures=["BertLMHeadModel"]))
    assert not is_encoder_config(GPT2Config())


def test_packaged_model_resolves_offline_and_falls_back_to_the_hub(
    monkeypatch: pytest.MonkeyPatch, offline: None
) -> None:
    entry = PACKAGED_MODELS["minilm-l6"]
    folder = packaged_model_dir("minilm-l6")  # the dev set-up installs the package
    assert folder is not None and (folder / "model.safetensors").is_file()
    assert check_model_reference("minilm-l6") == "package"
    assert model_hidden_size("minilm-l6") == 384
    # Without the package the name means the Hub copy (offline here: a clear refusal).
    monkeypatch.setitem(
        PACKAGED_MODELS, "minilm-l6", dataclasses.replace(entry, module="no_such_module_xyz")
    )
    assert packaged_model_dir("minilm-l6") is None
    with pytest.raises(ModelLoadError, match=f"{entry.hub_id}.*offline"):
        load_model_and_tokenizer("minilm-l6")
    with pytest.raises(ModelLoadError, match=entry.hub_id):
        check_model_reference("minilm-l6")
