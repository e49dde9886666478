from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gloo_ranks import run_on_ranks

from graphlora.config import MoELoRAConfig
from graphlora.data import DATA_DIR_ENV
from graphlora.run import lr_factor, pick_device, run_shape
from graphlora.synthetic import make_synthetic_task
from graphlora.train import (
    NonFiniteLossError,
    TrainConfig,
    main,
    run_training,
    summarize_seeds,
)

REPO = Path(__file__).resolve().parents[1]


def _quick(**kw) -> TrainConfig:
    base = dict(
        max_steps=4,
        batch_size=4,
        eval_every=2,
        max_eval_examples=8,
        max_test_examples=8,
        log_every=0,
        learning_rate=3e-3,
    )
    return TrainConfig(**{**base, **kw})


SMALL_DATA = make_synthetic_task(n_train=64, n_val=8, n_test=8)


def test_train_config_validation():
    with pytest.raises(ValueError, match="^learning_rate:"):
        TrainConfig(learning_rate=0)
    with pytest.raises(ValueError, match="^lr_schedule:"):
        TrainConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="^max_stepz: unknown training field"):
        TrainConfig.from_dict({"max_stepz": 3})


def test_lr_schedule_warms_up_and_decays():
    cfg = TrainConfig(max_steps=100, warmup_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(99, cfg) < 0.01


def test_metrics_and_callback_stop():
    seen = []

    def on_eval(step, metrics):
        seen.append((step, metrics))
        return step >= 2  # ask to stop at the first evaluation

    m = run_training(
        _quick(), MoELoRAConfig(method="graphlora", gcn_hidden=16), on_eval=on_eval, data=SMALL_DATA
    )
    assert [s for s, _ in seen] == [2]
    for key in (
        "val_accuracy",
        "val_loss",
        "train_loss",
        "trainable_params",
        "samples_per_sec",
        "peak_memory_mb",
        "aux_poisson",
        "aux_normal",
        "routing/load_cv",
        "routing/batch_entropy",
        "routing/min_experts_used",
        "layer0/distinct_topk",
        "val_routing/batch_entropy",  # held-out tokens, measured in the validation pass
    ):
        assert key in seen[0][1], key
    assert m["stopped_early"] == 1.0 and 0 <= m["test_accuracy"] <= 1
    # Where the time went: each part measured, none of them counted twice.
    parts = ("setup_time_s", "train_time_s", "eval_time_total_s", "test_time_s")
    assert all(m[k] > 0 for k in parts) and m["checkpoint_time_s"] == 0  # no checkpoints asked


def test_nan_loss_stops_with_clear_error():
    with pytest.raises(NonFiniteLossError, match=r"step 2: training loss is nan"):
        run_training(_quick(inject_nan_at_step=2), MoELoRAConfig(method="mixlora"), data=SMALL_DATA)


def test_summarize_seeds():
    s = summarize_seeds(
        [
            {"test_accuracy": 0.5, "trainable_params": 10},
            {"test_accuracy": 0.7, "trainable_params": 10},
        ]
    )
    assert s["test_accuracy_mean"] == pytest.approx(0.6)
    assert s["test_accuracy_std"] == pytest.approx(0.1414, abs=1e-3)


DDP_WORKER = r"""
import hashlib
from gloo_ranks import join, result
from graphlora.config import MoELoRAConfig
from graphlora.synthetic import make_synthetic_task
from graphlora.adapter_io import adapter_state_dict
from graphlora.train import TrainConfig, run_training
join()
hashes, evals = [], []
def on_step(step, model):
    h = hashlib.sha256()
    for k, v in sorted(adapter_state_dict(model).items()):
        h.update(v.detach().cpu().numpy().tobytes())
    hashes.append(h.hexdigest())
def on_eval(step, metrics):
    evals.append(metrics)
cfg = TrainConfig(max_steps=4, batch_size=8, eval_every=2, max_eval_examples=10,
                  max_test_examples=10, log_every=0, seed=3)
final = run_training(cfg, MoELoRAConfig(method="graphlora", gcn_hidden=16), on_eval=on_eval,
                     on_step=on_step, data=make_synthetic_task(n_train=64, n_val=10, n_test=10))
keys = ("val_accuracy", "val_loss", "train_loss", "best_val_accuracy")
result({"hashes": hashes, "evals": [{k: e[k] for k in keys} for e in evals],
        "test": final["test_accuracy"]})
"""


def test_two_process_gloo_ddp_ranks_agree(tmp_path):
    results = run_on_ranks(DDP_WORKER, tmp_path)
    assert len(results[0]["hashes"]) == 4
    assert results[0]["hashes"] == results[1]["hashes"], "adapter parameters diverged"
    assert results[0]["evals"] == results[1]["evals"], "ranks reported different metrics"
    assert results[0]["test"] == results[1]["test"]


@pytest.mark.slow
def test_tiny_preset_learns_the_synthetic_task():
    # The quickstart's promise: a good configuration reaches >= 0.8 (chance is 0.25) within the
    # quickstart's 160 steps; in 100 (its schedule fitted to 100) it reaches 0.90.
    m = run_training(
        TrainConfig(
            max_steps=100, log_every=0, eval_every=100, max_test_examples=0, eval_test=False
        ),
        MoELoRAConfig(method="graphlora"),
    )
    assert m["best_val_accuracy"] >= 0.8, m


@pytest.mark.parametrize("task", ["arc-challenge", "boolq"])
def test_real_benchmark_files_end_to_end(task, tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)  # the copy shipped with graphlora
    m = run_training(
        _quick(dataset=task, max_length=256, output_dir=str(tmp_path / "a")),
        MoELoRAConfig(method="graphlora", gcn_hidden=16),
    )
    assert 0 <= m["test_accuracy"] <= 1 and 0 <= m["val_accuracy"] <= 1
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()


def test_cli_trains_on_a_task_name_offline_with_no_data_dir(tmp_path, monkeypatch, capsys):
    # The fresh-clone promise: `python -m graphlora.train --model tiny-qwen2 --dataset
    # arc-challenge --max-steps 5` works with no variable set and no network (HF_HUB_OFFLINE is
    # set by conftest). Batch and evaluation are capped so the test takes seconds.
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # nothing is read relative to the working directory
    caps = tmp_path / "caps.yaml"
    caps.write_text(
        "training: {batch_size: 4, max_eval_examples: 8, max_test_examples: 8, max_length: 256}\n"
    )
    argv = ["--model", "tiny-qwen2", "--dataset", "arc-challenge", "--max-steps", "5"]
    assert main([*argv, "--config", str(caps)]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out.strip().splitlines()[-1])
    assert doc["per_seed"][0]["step"] == 5 and 0 <= doc["test_accuracy_mean"] <= 1
    assert "task_data/commonsense/ARC-Challenge" in err  # the shipped copy was read


def test_cli_prints_json_last_and_rejects_bad_input(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bad = subprocess.run(
        [sys.executable, "-m", "graphlora.train", "--method", "nope"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: method:")
    missing = subprocess.run(
        [sys.executable, "-m", "graphlora.train", "--dataset", str(tmp_path / "nothing.json")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert missing.returncode == 2 and "nothing.json" in missing.stderr
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "method: lora\ntraining: {max_steps: 2, batch_size: 2, eval_every: 2, "
        "max_eval_examples: 4, max_test_examples: 4}\n"
    )
    ok = subprocess.run(
        [sys.executable, "-m", "graphlora.train", "--config", str(cfg), "--seeds", "0", "1"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    doc = json.loads(ok.stdout.strip().splitlines()[-1])
    assert doc["seeds"] == [0, 1] and len(doc["per_seed"]) == 2
    assert (
        "test_accuracy_mean" in doc and "test_accuracy_std" in doc and doc["trainable_params"] > 0
    )


def test_a_packaged_model_brings_its_own_training_defaults():
    # `python -m graphlora.train --model minilm-l6 --dataset arc-easy` runs with the preset's
    # sequence length, steps, batch and learning rate, and prints the step-0 accuracy.
    from graphlora.presets import training_defaults

    defaults = training_defaults("minilm-l6")
    cfg = TrainConfig.from_dict({"model": "minilm-l6", **defaults})
    assert cfg.max_length <= 256 and cfg.eval_at_start and cfg.max_steps <= 300
    assert training_defaults("tiny-qwen2") == {}
    assert "eval_at_start" not in run_shape(cfg, {})  # a checkpoint resumes with or without


def test_a_packaged_model_brings_adapter_defaults_per_method_that_flags_override(monkeypatch):
    """The CLI gives a graphlora run on MiniLM the model's own rank, alpha, Normal coefficient
    and router width; another method, another model, or a --config value keeps its own."""
    import graphlora.train as train_mod
    from graphlora.presets import adapter_defaults

    seen = []
    monkeypatch.setattr(
        train_mod, "run_seeds", lambda t, a, seeds, data: seen.append(a) or {"seeds": seeds}
    )
    base = ["--model", "minilm-l6", "--dataset", "arc-easy", "--max-steps", "1"]
    assert train_mod.main([*base, "--method", "graphlora"]) == 0
    assert train_mod.main([*base, "--method", "lora"]) == 0
    graph, lora = seen
    wanted = adapter_defaults("minilm-l6", "graphlora")
    assert wanted and all(getattr(graph, k) == v for k, v in wanted.items())
    assert lora.rank == MoELoRAConfig(method="lora").rank  # the lora preset's own
    assert adapter_defaults("tiny-qwen2", "graphlora") == {}


def test_a_bare_cuda_device_names_this_ranks_gpu(monkeypatch):
    """`device: cuda` (as TrainConfig documents it) resolves to an indexed device, which
    torch.cuda.set_device needs (a bare "cuda" made run_training raise on a GPU machine)."""

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert str(pick_device("cuda")) == "cuda:0"
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert str(pick_device("cuda")) == "cuda:3"
    assert str(pick_device("cuda:1")) == "cuda:1"
    assert str(pick_device("cpu")) == "cpu"
